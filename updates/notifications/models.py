from __future__ import annotations

import uuid
from typing import Any

from django.conf import settings
from django.db import models
from django.utils import timezone

from tenants.models import Tenant
from tenants.roles import VIEW_ALL_TENANTS

from .kinds import Kind


class ChannelQuerySet(models.QuerySet["Channel"]):
    def visible_to(self, user: Any) -> ChannelQuerySet:
        """Operators and responders see every channel; a tenant admin only the
        channels of tenants they administer (never the fleet-wide ones)."""
        if not user.is_authenticated:
            return self.none()
        if user.has_perm(VIEW_ALL_TENANTS):
            return self.all()
        return self.filter(tenant__admins=user)


class Channel(models.Model):
    """Where notifications go. `tenant` empty means fleet-wide (every event)."""

    class Type(models.TextChoices):
        SLACK = "slack", "Slack"
        PAGERDUTY = "pagerduty", "PagerDuty"
        WEBHOOK = "webhook", "Signed JSON webhook"

    name = models.CharField(max_length=120)
    type = models.CharField(max_length=16, choices=Type.choices)
    tenant = models.ForeignKey(
        Tenant,
        on_delete=models.CASCADE,
        null=True,
        blank=True,
        related_name="notification_channels",
        help_text="empty: fleet-wide",
    )
    kinds = models.JSONField(default=list, blank=True, help_text="notification kinds to send")
    enabled = models.BooleanField(default=True)
    # Fernet token of {"url": ..., "routing_key": ..., "signing_secret": ...}; see crypto.py.
    secrets = models.TextField(blank=True, editable=False)
    # What the UI may show instead: {"url": "https://hooks.slack.com/…abcd"}
    secret_hints = models.JSONField(default=dict, blank=True, editable=False)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.SET_NULL, null=True, blank=True, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    objects = ChannelQuerySet.as_manager()

    class Meta:
        ordering = ["tenant__name", "name", "pk"]

    def __str__(self) -> str:
        return f"{self.get_type_display()} · {self.name}"

    @property
    def scope_label(self) -> str:
        return self.tenant.name if self.tenant_id and self.tenant else "Fleet-wide"

    def wants(self, *, kind: str, tenant_id: int | None) -> bool:
        """The channel's filters: its kinds, and its tenant unless fleet-wide."""
        if not self.enabled or kind not in self.kinds:
            return False
        return self.tenant_id is None or self.tenant_id == tenant_id

    def kind_labels(self) -> list[str]:
        return [Kind(k).label for k in self.kinds if k in Kind.values]


class DeliveryQuerySet(models.QuerySet["Delivery"]):
    def visible_to(self, user: Any) -> DeliveryQuerySet:
        return self.filter(channel__in=Channel.objects.visible_to(user))


class Delivery(models.Model):
    """One message to one channel, and what happened to it: the delivery log.

    State moves only by conditional UPDATE (see services.py), so a duplicated
    Celery message can never send twice or resurrect a finished delivery.
    """

    class Status(models.TextChoices):
        COLLECTING = "collecting", "Collecting"  # an aggregate still open for items
        PENDING = "pending", "Pending"
        SENDING = "sending", "Sending"
        RETRYING = "retrying", "Retrying"
        SENT = "sent", "Sent"
        GAVE_UP = "gave_up", "Gave up"

    OPEN_STATES = (Status.PENDING, Status.RETRYING)

    uuid = models.UUIDField(default=uuid.uuid4, unique=True, editable=False)
    channel = models.ForeignKey(Channel, on_delete=models.CASCADE, related_name="deliveries")
    kind = models.CharField(max_length=32, choices=Kind.choices, blank=True)
    tenant_id = models.BigIntegerField(null=True, blank=True)  # loose, like Event.tenant
    rollout_id = models.BigIntegerField(null=True, blank=True)
    # Our rate limit: one message per (channel, dedup_key), e.g. one per rollout stage.
    dedup_key = models.CharField(max_length=200, blank=True)
    # PagerDuty: the dedup_key sent to PagerDuty and what we asked it to do.
    incident_key = models.CharField(max_length=200, blank=True)
    pagerduty_action = models.CharField(max_length=16, blank=True)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.PENDING)
    attempts = models.PositiveSmallIntegerField(default=0)
    next_attempt_at = models.DateTimeField(default=timezone.now, db_index=True)
    claimed_at = models.DateTimeField(null=True, blank=True)
    last_status_code = models.PositiveSmallIntegerField(null=True, blank=True)
    last_error = models.TextField(blank=True)
    payload = models.JSONField(default=dict, blank=True)
    is_test = models.BooleanField(default=False)
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)
    updated_at = models.DateTimeField(auto_now=True)
    sent_at = models.DateTimeField(null=True, blank=True)

    objects = DeliveryQuerySet.as_manager()

    class Meta:
        ordering = ["-created_at", "-id"]
        constraints = [
            models.UniqueConstraint(
                fields=["channel", "dedup_key"],
                condition=~models.Q(dedup_key=""),
                name="notification_once_per_dedup_key",
            ),
            # One open aggregate per (channel, rollout): items join it until it is flushed.
            models.UniqueConstraint(
                fields=["channel", "rollout_id"],
                condition=models.Q(status="collecting"),
                name="notification_one_open_batch",
            ),
        ]

    def __str__(self) -> str:
        return f"delivery {self.pk} {self.kind} -> {self.channel_id} {self.status}"

    @property
    def title(self) -> str:
        if self.status == self.Status.COLLECTING:
            return f"Rollout #{self.rollout_id}: collecting node events"
        return str(self.payload.get("title") or self.get_kind_display() or "")


class DeliveryItem(models.Model):
    """A node-level event waiting in an aggregate (one summary per rollout and channel)."""

    delivery = models.ForeignKey(Delivery, on_delete=models.CASCADE, related_name="items")
    event_id = models.BigIntegerField()
    kind = models.CharField(max_length=32, choices=Kind.choices)
    summary = models.JSONField(default=dict)  # {"node", "error_code", "error", ...}
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["id"]
        constraints = [
            models.UniqueConstraint(fields=["delivery", "event_id"], name="notification_item_once")
        ]

    def __str__(self) -> str:
        return f"item {self.event_id} in delivery {self.delivery_id}"
