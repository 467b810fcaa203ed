"""Reads and the permission rules, always scoped to the requesting user.

Who may do what:
- operators: every channel, fleet-wide and per tenant;
- tenant admins: the channels of their own tenants (others are 404);
- responders: read-only (channels and the delivery log).
"""

from __future__ import annotations

from typing import Any

from django.core.exceptions import PermissionDenied
from django.db.models import QuerySet
from django.shortcuts import get_object_or_404

from tenants.models import Tenant
from tenants.roles import START_UPDATE

from .models import Channel, Delivery


def can_manage_fleet_channels(user: Any) -> bool:
    # The operator role is the one that may start updates; responders may not. The channel
    # pages and the API both ask here, with the permission's name from tenants/roles.py.
    return bool(user.is_authenticated and user.has_perm(START_UPDATE))


def editable_tenants(user: Any) -> QuerySet[Tenant]:
    if can_manage_fleet_channels(user):
        return Tenant.objects.all()
    if not user.is_authenticated:
        return Tenant.objects.none()
    return Tenant.objects.filter(admins=user)


def can_create_channels(user: Any) -> bool:
    return can_manage_fleet_channels(user) or editable_tenants(user).exists()


def can_edit_channel(user: Any, channel: Channel) -> bool:
    if can_manage_fleet_channels(user):
        return True
    return (
        channel.tenant_id is not None
        and editable_tenants(user).filter(pk=channel.tenant_id).exists()
    )


def channels_for_user(user: Any) -> QuerySet[Channel]:
    return Channel.objects.visible_to(user).select_related("tenant")


def get_channel_for_user(user: Any, pk: int, *, edit: bool = False) -> Channel:
    """The one way views fetch a channel: 404 if not visible, 403 if read-only."""
    channel = get_object_or_404(channels_for_user(user), pk=pk)
    if edit and not can_edit_channel(user, channel):
        raise PermissionDenied("read-only")
    return channel


def deliveries_for_user(
    user: Any, *, channel: Channel | None = None, status: str = ""
) -> QuerySet[Delivery]:
    deliveries = Delivery.objects.visible_to(user).select_related("channel", "channel__tenant")
    if channel is not None:
        deliveries = deliveries.filter(channel=channel)
    if status:
        deliveries = deliveries.filter(status=status)
    return deliveries.order_by("-created_at", "-id")


def get_test_delivery_for_user(user: Any, pk: int) -> Delivery:
    """A test delivery the user may see (404 otherwise), for its live result."""
    return get_object_or_404(deliveries_for_user(user).filter(is_test=True), pk=pk)
