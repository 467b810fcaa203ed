"""The audit log: the events page's filters, newest first, with cursor pagination (stable while
new events arrive)."""

from __future__ import annotations

from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework.pagination import CursorPagination
from rest_framework.request import Request
from rest_framework.response import Response

from updates.api.serializers import EventSerializer, paginated
from updates.api.views.access import READ
from updates.api.views.base import ApiError, ApiView, strict_page_size
from updates.api.views.releases import ERRORS
from updates.events import selectors
from updates.events.forms import EventFilterForm

FILTERS = ("tenant", "node", "verb", "actor", "since", "until")


class EventCursor(CursorPagination):
    page_size = 100
    page_size_query_param = "page_size"
    max_page_size = 1000
    ordering = ("-created_at", "-id")

    def get_page_size(self, request: Request) -> int:
        return strict_page_size(request, self.page_size, self.max_page_size)


class EventList(ApiView):
    rules = {"GET": READ}

    @extend_schema(
        operation_id="events_list",
        parameters=[
            OpenApiParameter("tenant", int, description="tenant id"),
            OpenApiParameter("node", str, description="node id"),
            OpenApiParameter("verb", str, description="verb prefix, e.g. rollout."),
            OpenApiParameter("actor", str, description="user name, system or node:<id>"),
            OpenApiParameter("since", str, description="ISO date-time, inclusive"),
            OpenApiParameter("until", str, description="ISO date-time, exclusive"),
            OpenApiParameter("cursor", str),
            OpenApiParameter("page_size", int),
        ],
        responses={200: paginated(EventSerializer, cursor=True), **ERRORS},
    )
    def get(self, request: Request) -> Response:
        params = {k: request.query_params[k] for k in FILTERS if k in request.query_params}
        form = EventFilterForm(params, user=request.user)
        if not form.is_valid():
            fields = {k: [str(m) for m in v] for k, v in form.errors.items()}
            raise ApiError(
                400,
                "invalid",
                "; ".join(f"{k}: {m}" for k, msgs in fields.items() for m in msgs),
                fields,
            )
        events = selectors.events_for_user(request.user, form.to_filter())
        pages = EventCursor()
        page = pages.paginate_queryset(events, request, view=self)
        return pages.get_paginated_response(EventSerializer(page, many=True).data)
