"""Dashboard pages. Thin: fetch through scoped selectors, render."""

from __future__ import annotations

from django.conf import settings
from django.contrib import messages
from django.contrib.auth.decorators import permission_required
from django.core.paginator import Paginator
from django.http import HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.views.decorators.http import require_GET, require_http_methods
from django_htmx.middleware import HtmxDetails

from . import selectors
from .forms import EventFilterForm, ReleaseUploadForm
from .releases import ReleaseRejected, release_publish


class HtmxHttpRequest(HttpRequest):
    htmx: HtmxDetails


def _partial(request: HtmxHttpRequest, template: str, partial: str) -> str:
    """Full page normally; only the named partial for an HTMX request."""
    return f"{template}#{partial}" if request.htmx else template


@require_GET
def fleet(request: HtmxHttpRequest) -> HttpResponse:
    groups = selectors.fleet_for_user(request.user)
    context = {
        "groups": groups,
        "counts": selectors.fleet_status_counts(groups),
        "poll_seconds": settings.THEMIS_FLEET_POLL_SECONDS,
    }
    return render(request, _partial(request, "updates/fleet.html", "grid"), context)


@require_GET
def node_detail(request: HtmxHttpRequest, node_id: str) -> HttpResponse:
    node = selectors.get_node_for_user(request.user, node_id)
    jobs = node.jobs.select_related("release").order_by("-created_at")[:50]
    context = {"node": node, "jobs": jobs, "poll_seconds": settings.THEMIS_FLEET_POLL_SECONDS}
    return render(request, _partial(request, "updates/node_detail.html", "status"), context)


@require_GET
def release_list(request: HtmxHttpRequest) -> HttpResponse:
    return _release_page(request, ReleaseUploadForm())


def _release_page(
    request: HtmxHttpRequest, form: ReleaseUploadForm, status: int = 200
) -> HttpResponse:
    releases = selectors.releases_for_user(request.user)
    context = {"releases": releases, "form": form}
    return render(request, "updates/releases.html", context, status=status)


@require_http_methods(["POST"])
@permission_required("updates.publish_release", raise_exception=True)
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


@require_GET
def event_list(request: HtmxHttpRequest) -> HttpResponse:
    form = EventFilterForm(request.GET or None, user=request.user)
    events = selectors.events_for_user(request.user, form.to_filter())
    page = Paginator(events, 50).get_page(request.GET.get("page"))
    query = request.GET.copy()
    query.pop("page", None)
    context = {"form": form, "page": page, "query": query.urlencode()}
    return render(request, _partial(request, "updates/events.html", "results"), context)
