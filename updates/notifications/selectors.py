"""Reads and the permission rules, always scoped to the requesting user.

Who may do what:
- operators: every channel, fleet-wide and per tenant;
- tenant admins: the channels of their own tenants (others are 404);
- responders: read-only (channels and the delivery log).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from django.core.exceptions import PermissionDenied
from django.db.models import Count, Exists, Min, OuterRef, Q, QuerySet
from django.shortcuts import get_object_or_404
from django.utils import timezone

from tenants.models import Consent, Tenant
from tenants.roles import APPROVE_ROLLOUT, START_UPDATE
from updates.models import Rollout, UpdateJob

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


# --- the inbox: what waits on this user -------------------------------------------------


@dataclass(frozen=True)
class PendingApproval:
    """A rollout held at a canary gate for a responder's decision."""

    rollout_id: int
    release: str
    target: str
    since: datetime
    started_by: str


@dataclass(frozen=True)
class PendingTenantConsent:
    """A release that nodes of one of the user's tenants wait to be consented to."""

    tenant_slug: str
    tenant_name: str
    release: str
    nodes: int
    since: datetime


@dataclass(frozen=True)
class Inbox:
    approvals: list[PendingApproval]
    consents: list[PendingTenantConsent]

    @property
    def count(self) -> int:
        return len(self.approvals) + len(self.consents)


def _approvals(user: Any) -> QuerySet[Rollout]:
    if not (user.is_authenticated and user.has_perm(APPROVE_ROLLOUT)):
        return Rollout.objects.none()
    return Rollout.objects.filter(state=Rollout.State.AWAITING_APPROVAL)


def _consents(user: Any) -> QuerySet[UpdateJob]:
    """Jobs waiting for consent on nodes of the tenants this user administers (operators
    see every tenant's on its page, but consent is the tenant's to give)."""
    if not user.is_authenticated:
        return UpdateJob.objects.none()
    # Granted and not expired: the jobs start at the next beat, nothing waits on the admin.
    granted = Consent.objects.filter(
        tenant_id=OuterRef("node__tenant_id"),
        release_id=OuterRef("release_id"),
        decision=Consent.Decision.GRANTED,
    ).filter(Q(expires_at__isnull=True) | Q(expires_at__gt=timezone.now()))
    return UpdateJob.objects.filter(
        state=UpdateJob.State.WAITING_FOR_CONSENT,
        release__isnull=False,
        node__tenant__admins=user,
    ).exclude(Exists(granted))


def inbox_count(user: Any, *, tenant_admin: bool) -> int:
    """How many items wait on this user, for the header's badge on every page: one query
    per kind the user can have (none for a role that has neither)."""
    count = 0
    if user.is_authenticated and user.has_perm(APPROVE_ROLLOUT):
        count += _approvals(user).count()
    if tenant_admin:
        count += _consents(user).values("node__tenant_id", "release_id").distinct().count()
    return count


def inbox(user: Any) -> Inbox:
    """Everything that waits on this user, oldest first within each kind."""
    approvals = [
        PendingApproval(
            rollout_id=rollout.pk,
            release=f"{rollout.release.product} {rollout.release.version}",
            target=str(rollout.cluster or rollout.tenant or "the fleet"),
            since=rollout.started_at or rollout.created_at,
            started_by=rollout.created_by.get_username() if rollout.created_by else "system",
        )
        for rollout in _approvals(user)
        .select_related("release", "cluster", "tenant", "created_by")
        .order_by("created_at")
    ]
    waiting = (
        _consents(user)
        .values("node__tenant__slug", "node__tenant__name", "release__product", "release__version")
        .annotate(nodes=Count("node_id", distinct=True), since=Min("created_at"))
        .order_by("since")
    )
    consents = [
        PendingTenantConsent(
            tenant_slug=row["node__tenant__slug"],
            tenant_name=row["node__tenant__name"],
            release=f"{row['release__product']} {row['release__version']}",
            nodes=row["nodes"],
            since=row["since"],
        )
        for row in waiting
    ]
    return Inbox(approvals=approvals, consents=consents)
