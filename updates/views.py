"""Dashboard pages. Thin: fetch through scoped selectors, render."""

from __future__ import annotations

from django.conf import settings
from django.core.paginator import Paginator
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render
from django.views.decorators.http import require_GET
from django_htmx.middleware import HtmxDetails

from . import selectors
from .forms import EventFilterForm


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
    releases = selectors.releases_for_user(request.user)
    return render(request, "updates/releases.html", {"releases": releases})


@require_GET
def event_list(request: HtmxHttpRequest) -> HttpResponse:
    form = EventFilterForm(request.GET or None, user=request.user)
    events = selectors.events_for_user(request.user, form.to_filter())
    page = Paginator(events, 50).get_page(request.GET.get("page"))
    query = request.GET.copy()
    query.pop("page", None)
    context = {"form": form, "page": page, "query": query.urlencode()}
    return render(request, _partial(request, "updates/events.html", "results"), context)
