"""Notification channels as the channel pages scope and change them: the same selectors decide
who sees and who may edit which channel, the same form checks the input, the same services
write it. Secrets are write-only: an answer holds only the hints the pages show, and an error
message never repeats a submitted secret."""

from __future__ import annotations

import re
from typing import Any

from drf_spectacular.utils import extend_schema
from rest_framework.request import Request
from rest_framework.response import Response

from tenants.models import Tenant
from updates.api.models import Scope
from updates.api.serializers import (
    ChannelCreateSerializer,
    ChannelSerializer,
    ChannelUpdateSerializer,
    ErrorSerializer,
)
from updates.api.views.access import READ, Rule
from updates.api.views.base import ApiError, ApiView, invalid
from updates.api.views.releases import ERRORS
from updates.notifications import selectors, services
from updates.notifications.crypto import SecretUnreadable
from updates.notifications.forms import SECRET_FIELDS_ALL, ChannelForm
from updates.notifications.models import Channel

# Who may change which channel is the channel pages' rule (notifications.selectors): operators
# every channel, tenant admins their tenants' (others are 404), responders none (403).
ADMIN = Rule(Scope.ADMIN)
# A secret's pieces between URL delimiters: what of it a message could quote.
_PIECES = re.compile(r"[^:/@?#&=\s]{4,}")


def _secret_pieces(value: str) -> set[str]:
    """What of a submitted secret no answer may hold: all of it but what its hint shows (a
    URL's scheme and host, see `crypto.mask`)."""
    shown = ""
    if "://" in value:
        scheme, rest = value.split("://", 1)
        shown = f"{scheme}://{rest.split('/', 1)[0].rsplit('@', 1)[-1]}"
    public = set(_PIECES.findall(shown))
    return {value, *(p for p in _PIECES.findall(value) if p not in public)}


def _redacted(fields: dict[str, list[str]], submitted: dict[str, str]) -> dict[str, list[str]]:
    """The form's messages without any piece of a submitted secret (the message for a URL it
    cannot parse may quote the URL's user and password)."""
    pieces = sorted(
        {p for value in submitted.values() for p in _secret_pieces(value)}, key=len, reverse=True
    )

    def clean(message: str) -> str:
        for piece in pieces:
            message = message.replace(piece, "…")
        return message

    return {name: [clean(m) for m in messages] for name, messages in fields.items()}


def _form_valid(form: ChannelForm, submitted: dict[str, str]) -> ChannelForm:
    if not form.is_valid():
        fields = {k: [str(m) for m in v] for k, v in form.errors.items()}
        raise invalid(_redacted(fields, submitted))
    return form


def _secrets(values: dict[str, Any]) -> dict[str, str]:
    return {name: str(values[name]) for name in SECRET_FIELDS_ALL if values.get(name)}


def _tenant_choice(request: Request, slug: str | None) -> int | str:
    """The form's tenant field takes an id; the API names tenants by slug. A tenant this user
    cannot see is no choice at all, refused by the form like one they may not edit."""
    if not slug:
        return ""
    tenant = Tenant.objects.visible_to(request.user).filter(slug=slug).first()
    return tenant.pk if tenant else -1


class ChannelList(ApiView):
    rules = {"GET": READ, "POST": ADMIN}
    actions = {"POST": "channel.create"}

    @extend_schema(
        operation_id="channels_list", responses={200: ChannelSerializer(many=True), **ERRORS}
    )
    def get(self, request: Request) -> Response:
        channels = selectors.channels_for_user(request.user).order_by("name", "id")
        return Response(ChannelSerializer(channels, many=True).data)

    @extend_schema(
        operation_id="channels_create",
        request=ChannelCreateSerializer,
        responses={201: ChannelSerializer, 422: ErrorSerializer, **ERRORS},
        description="Create a channel as the channel page does (tenant admins for their "
        "tenants, operators also fleet-wide). The secrets are write-only: the answer shows "
        "only their hints. Honours Idempotency-Key.",
    )
    def post(self, request: Request) -> Response:
        if not selectors.can_create_channels(request.user):
            raise ApiError(403, "permission_denied", "your role does not allow this")
        return self.idempotent(request, lambda: self._create(request))

    def _create(self, request: Request) -> Response:
        data = ChannelCreateSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        values = data.validated_data
        submitted = _secrets(values)
        form = _form_valid(
            ChannelForm(
                {
                    "name": values["name"],
                    "type": values["type"],
                    "tenant": _tenant_choice(request, values.get("tenant")),
                    "kinds": values["kinds"],
                    "enabled": values["enabled"],
                    **submitted,
                },
                user=request.user,
            ),
            submitted,
        )
        cleaned = form.cleaned_data
        channel = services.channel_create(
            name=cleaned["name"],
            channel_type=cleaned["type"],
            tenant=cleaned["tenant"],
            kinds=cleaned["kinds"],
            enabled=cleaned["enabled"],
            secrets=form.secrets(),
            user=self.user,
        )
        self.audit_tenant = channel.tenant_id
        return Response(ChannelSerializer(channel).data, status=201)


def _fixed(channel: Channel, values: dict[str, Any]) -> None:
    """Type and tenant cannot change (the edit page shows them disabled): sending them is
    allowed only unchanged."""
    errors: dict[str, list[str]] = {}
    if "type" in values and values["type"] != channel.type:
        errors["type"] = ["fixed once created: make a new channel of the other type"]
    if "tenant" in values and (values["tenant"] or None) != (
        channel.tenant.slug if channel.tenant else None
    ):
        errors["tenant"] = ["fixed once created: make a new channel for the other tenant"]
    if errors:
        raise invalid(errors)


class ChannelDetail(ApiView):
    rules = {"GET": READ, "PATCH": ADMIN, "DELETE": ADMIN}
    actions = {"PATCH": "channel.update", "DELETE": "channel.delete"}

    @extend_schema(operation_id="channels_retrieve", responses={200: ChannelSerializer, **ERRORS})
    def get(self, request: Request, channel_id: int) -> Response:
        return Response(
            ChannelSerializer(selectors.get_channel_for_user(request.user, channel_id)).data
        )

    @extend_schema(
        operation_id="channels_update",
        request=ChannelUpdateSerializer,
        responses={200: ChannelSerializer, **ERRORS},
        description="Change a channel as its edit page does: a field left out keeps its value, "
        "a secret left out keeps the stored one. The answer shows only the secrets' hints.",
    )
    def patch(self, request: Request, channel_id: int) -> Response:
        channel = selectors.get_channel_for_user(request.user, channel_id, edit=True)
        self.audit_tenant = channel.tenant_id
        data = ChannelUpdateSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        values = data.validated_data
        _fixed(channel, values)
        submitted = _secrets(values)
        form = _form_valid(
            ChannelForm(
                {
                    "name": values.get("name", channel.name),
                    "kinds": values.get("kinds", channel.kinds),
                    "enabled": values.get("enabled", channel.enabled),
                    **submitted,
                },
                user=request.user,
                channel=channel,
            ),
            submitted,
        )
        cleaned = form.cleaned_data
        try:
            services.channel_update(
                channel=channel,
                name=cleaned["name"],
                kinds=cleaned["kinds"],
                enabled=cleaned["enabled"],
                secrets=form.secrets(),
                user=self.user,
            )
        except SecretUnreadable as err:
            raise invalid({"non_field_errors": [f"{err}: send every secret field."]}) from None
        return Response(ChannelSerializer(channel).data)

    @extend_schema(operation_id="channels_delete", responses={204: None, **ERRORS})
    def delete(self, request: Request, channel_id: int) -> Response:
        channel = selectors.get_channel_for_user(request.user, channel_id, edit=True)
        self.audit_tenant = channel.tenant_id
        services.channel_delete(channel=channel, user=self.user)
        return Response(status=204)
