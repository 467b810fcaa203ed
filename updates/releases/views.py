"""Dashboard pages. Thin: fetch through scoped selectors, render."""

from __future__ import annotations

from django.contrib import messages
from django.contrib.auth.decorators import login_not_required, permission_required
from django.http import HttpRequest, HttpResponse
from django.http.response import HttpResponseBase
from django.shortcuts import get_object_or_404, redirect, render
from django.views.decorators.http import require_GET, require_http_methods

from tenants.roles import PUBLISH_RELEASE
from themis_dashboard.htmx import HtmxHttpRequest
from updates.models import Release
from updates.releases import artifacts, selectors, services
from updates.releases.forms import ReleaseUploadForm
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
