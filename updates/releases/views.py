"""Dashboard pages. Thin: fetch through scoped selectors, render."""

from __future__ import annotations

from pathlib import Path

from django.contrib import messages
from django.contrib.auth.decorators import login_not_required, permission_required
from django.http import HttpRequest, HttpResponse
from django.http.response import HttpResponseBase
from django.shortcuts import get_object_or_404, redirect, render
from django.utils import timezone
from django.views.decorators.http import require_GET, require_http_methods

from tenants.roles import PUBLISH_RELEASE
from themis_dashboard.htmx import HtmxHttpRequest
from updates.models import Release, ReleaseFeed
from updates.releases import artifacts, feeds, parts, selectors, services
from updates.releases.forms import ReleaseFeedForm, ReleaseUploadForm
from updates.releases.services import ReleaseRejected, release_publish


@require_GET
def release_list(request: HtmxHttpRequest) -> HttpResponse:
    return _release_page(request, ReleaseUploadForm())


def _release_page(
    request: HtmxHttpRequest, form: ReleaseUploadForm, status: int = 200
) -> HttpResponse:
    releases = selectors.release_rows_for_user(request.user)
    context = {"releases": releases, "form": form}
    return render(request, "updates/releases.html", context, status=status)


@require_http_methods(["POST"])
@permission_required(PUBLISH_RELEASE, raise_exception=True)
def release_upload(request: HtmxHttpRequest) -> HttpResponse:
    form = ReleaseUploadForm(request.POST, request.FILES)
    if not form.is_valid():
        return _release_page(request, form, status=400)
    try:
        release = release_publish(
            upload=form.cleaned_data["bundle"],
            user=request.user,
            channel=form.cleaned_data["channel"],
        )
    except ReleaseRejected as rejected:
        form.add_error("bundle", f"Rejected ({rejected.code}): {rejected.message}")
        return _release_page(request, form, status=400)
    messages.success(request, f"Published {release.product} {release.version}.")
    return redirect("release_list")


@require_http_methods(["POST"])
@permission_required(PUBLISH_RELEASE, raise_exception=True)
def release_deprecate(request: HtmxHttpRequest, release_id: int) -> HttpResponse:
    release = get_object_or_404(Release, pk=release_id)
    if services.release_deprecate(release=release, user=request.user):
        messages.success(request, f"Deprecated {release.product} {release.version}.")
    else:
        messages.info(request, f"{release.product} {release.version} was already deprecated.")
    return redirect("release_list")


@require_http_methods(["POST"])
@permission_required(PUBLISH_RELEASE, raise_exception=True)
def release_delete(request: HtmxHttpRequest, release_id: int) -> HttpResponse:
    release = get_object_or_404(Release, pk=release_id)
    try:
        services.release_delete(release=release, user=request.user)
    except services.ReleaseInUse as in_use:
        messages.error(request, str(in_use))
    else:
        messages.success(request, f"Deleted {release.product} {release.version} and its files.")
    return redirect("release_list")


# Nodes have no session: the per-job token in the Authorization header is the
# only credential (never a query parameter, which ends up in access logs).
@login_not_required
@require_GET
def artifact_job_bundle(
    request: HttpRequest, job_id: int, variant: str | None = None
) -> HttpResponseBase:
    token = artifacts.bearer_token(request.headers.get("Authorization"))
    try:
        job = artifacts.job_for_download(job_id=job_id, token=token)
    except artifacts.DownloadRefused as refused:
        return HttpResponse(f"{refused.reason}\n", status=refused.status, content_type="text/plain")
    return artifacts.job_artifact_response(
        job,
        range_header=request.headers.get("Range"),
        if_range=request.headers.get("If-Range"),
        variant=variant,
    )


@login_not_required
@require_GET
def artifact_job_plan_bundle(
    request: HttpRequest, job_id: int, release_id: int
) -> HttpResponseBase:
    """The bundle of one release in a multi-component job's plan, behind the job's token."""
    token = artifacts.bearer_token(request.headers.get("Authorization"))
    try:
        job = artifacts.job_for_download(job_id=job_id, token=token)
        release = artifacts.job_plan_release(job, release_id)
    except artifacts.DownloadRefused as refused:
        return HttpResponse(f"{refused.reason}\n", status=refused.status, content_type="text/plain")
    return artifacts.artifact_response(
        Path(release.artifact.path),
        sha256=release.sha256,
        range_header=request.headers.get("Range"),
        if_range=request.headers.get("If-Range"),
    )


@login_not_required
@require_GET
def artifact_job_parts(request: HttpRequest, job_id: int, name: str) -> HttpResponseBase:
    """Delivery by parts: the release's manifest, signature or one file object, behind the
    same token as the bundle."""
    token = artifacts.bearer_token(request.headers.get("Authorization"))
    try:
        job = artifacts.job_for_download(job_id=job_id, token=token)
    except artifacts.DownloadRefused as refused:
        return HttpResponse(f"{refused.reason}\n", status=refused.status, content_type="text/plain")
    return parts.job_parts_response(
        job,
        name,
        range_header=request.headers.get("Range"),
        if_range=request.headers.get("If-Range"),
    )


# Release feeds: operators only, like publishing (a feed publishes what it imports).


@require_GET
@permission_required(PUBLISH_RELEASE, raise_exception=True)
def feed_list(request: HtmxHttpRequest) -> HttpResponse:
    now = timezone.now()
    context = {"rows": selectors.feed_rows(now), "now": now}
    return render(request, "updates/release_feeds.html", context)


def _feed_form_page(request: HtmxHttpRequest, form: ReleaseFeedForm, status: int) -> HttpResponse:
    context = {"form": form, "feed": form.feed}
    return render(request, "updates/release_feed_form.html", context, status=status)


@require_http_methods(["GET", "POST"])
@permission_required(PUBLISH_RELEASE, raise_exception=True)
def feed_new(request: HtmxHttpRequest) -> HttpResponse:
    form = ReleaseFeedForm(request.POST or None)
    if request.method == "GET" or not form.is_valid():
        return _feed_form_page(request, form, status=200 if request.method == "GET" else 400)
    data = form.cleaned_data
    feed = feeds.feed_create(
        name=data["name"],
        kind=data["kind"],
        url=data["url"],
        product=data["product"],
        channel=data["channel"],
        enabled=data["enabled"],
        poll_interval_seconds=data["poll_interval_seconds"],
        token=data["token"],
        user=request.user,
    )
    messages.success(request, f"Feed {feed.name} saved; it is polled within a minute.")
    return redirect("release_feed_list")


@require_http_methods(["GET", "POST"])
@permission_required(PUBLISH_RELEASE, raise_exception=True)
def feed_edit(request: HtmxHttpRequest, feed_id: int) -> HttpResponse:
    feed = get_object_or_404(ReleaseFeed, pk=feed_id)
    form = ReleaseFeedForm(request.POST or None, feed=feed)
    if request.method == "GET" or not form.is_valid():
        return _feed_form_page(request, form, status=200 if request.method == "GET" else 400)
    data = form.cleaned_data
    feeds.feed_update(
        feed=feed,
        name=data["name"],
        url=data["url"],
        product=data["product"],
        channel=data["channel"],
        enabled=data["enabled"],
        poll_interval_seconds=data["poll_interval_seconds"],
        token=data["token"],
        clear_token=bool(data.get("clear_token")),
        user=request.user,
    )
    messages.success(request, f"Feed {feed.name} saved.")
    return redirect("release_feed_list")


@require_http_methods(["POST"])
@permission_required(PUBLISH_RELEASE, raise_exception=True)
def feed_poll(request: HtmxHttpRequest, feed_id: int) -> HttpResponse:
    feed = get_object_or_404(ReleaseFeed, pk=feed_id)
    at = feeds.feed_poll_soon(feed=feed, user=request.user)
    if at is None:
        messages.info(request, f"{feed.name}: a poll is already under way, or the feed is off.")
    elif at > timezone.now():
        messages.info(request, f"{feed.name}: polled at {at:%H:%M:%S} UTC, when its server allows.")
    else:
        messages.success(request, f"{feed.name}: polling now.")
    return redirect("release_feed_list")
