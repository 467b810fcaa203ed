"""Notification channels, read-only, as the channel pages scope them. Their secrets never
leave the dashboard: only the hints the pages show."""

from __future__ import annotations

from drf_spectacular.utils import extend_schema
from rest_framework.request import Request
from rest_framework.response import Response

from updates.api.serializers import ChannelSerializer
from updates.api.views.access import READ
from updates.api.views.base import ApiView
from updates.api.views.releases import ERRORS
from updates.notifications import selectors


class ChannelList(ApiView):
    rules = {"GET": READ}

    @extend_schema(
        operation_id="channels_list", responses={200: ChannelSerializer(many=True), **ERRORS}
    )
    def get(self, request: Request) -> Response:
        channels = selectors.channels_for_user(request.user).order_by("name", "id")
        return Response(ChannelSerializer(channels, many=True).data)


class ChannelDetail(ApiView):
    rules = {"GET": READ}

    @extend_schema(operation_id="channels_retrieve", responses={200: ChannelSerializer, **ERRORS})
    def get(self, request: Request, channel_id: int) -> Response:
        return Response(
            ChannelSerializer(selectors.get_channel_for_user(request.user, channel_id)).data
        )
