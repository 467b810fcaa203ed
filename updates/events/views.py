"""The events page and its node suggestions. Thin: a form reads the query string, a selector
reads one page."""

from __future__ import annotations

from django.http import HttpResponse
from django.shortcuts import render
from django.views.decorators.http import require_GET

from themis_dashboard.htmx import HtmxHttpRequest, partial_template
from updates.events import selectors
from updates.events.forms import EventFilterForm

TEMPLATE = "updates/events.html"


@require_GET
def event_list(request: HtmxHttpRequest) -> HttpResponse:
    form = EventFilterForm(request.GET or None, user=request.user)
    if form.bad_cursor:
        # A cursor we did not sign (edited, truncated, from another install): say so with a 400
        # rather than guess a position.
        page = selectors.EventPage(events=[], at_start=False)
    else:
        page = selectors.events_page(request.user, form.to_filter(), form.page_cursor())
    query = request.GET.copy()
    query.pop("cursor", None)
    query.pop("page", None)
    context = {"form": form, "page": page, "query": query.urlencode()}
    return render(
        request,
        partial_template(request, TEMPLATE, "results"),
        context,
        status=400 if form.bad_cursor else 200,
    )


@require_GET
def event_node_search(request: HtmxHttpRequest) -> HttpResponse:
    """At most a score of the visible nodes whose id starts with what was typed, as the
    <option>s of the node field's suggestion list."""
    text = request.GET.get("node", "")[:64]
    nodes = selectors.nodes_matching(request.user, text)
    return render(request, f"{TEMPLATE}#node-options", {"nodes": nodes})
