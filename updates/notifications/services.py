"""Writes: channel configuration, delivery attempts with backoff, aggregates, the sweep.

Deliveries move between states only by conditional UPDATE with a row-count
check (claim, then record), so duplicated or late Celery messages can never
send a message twice or revive a finished delivery.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import partial
from typing import Any

from django.conf import settings
from django.db import transaction
from django.db.models import F
from django.utils import timezone

from tenants.models import Tenant
from updates.audit import event_log
from updates.engine.protocols import HttpSend, NotificationWebhook

from . import dispatch
from .channels import (
    DeliveryError,
    PagerDutyChannel,
    PermanentError,
    RateLimited,
    SignedWebhookChannel,
    SlackChannel,
)
from .crypto import SecretUnreadable, decrypt_secrets, encrypt_secrets, mask
from .egress import EgressPolicy, guarded_send
from .messages import aggregate_notification, test_notification
from .models import Channel, Delivery

log = logging.getLogger(__name__)

S = Delivery.Status
# Honour a receiver's Retry-After, but never park a message for more than this.
MAX_RETRY_AFTER_SECONDS = 3600
# Keyed by the channel type's value, so a plain string from a form looks up the same.
SECRET_FIELDS: dict[str, tuple[str, ...]] = {
    Channel.Type.SLACK: ("url",),
    Channel.Type.PAGERDUTY: ("routing_key",),
    Channel.Type.WEBHOOK: ("url", "signing_secret"),
}


# ------------------------------------------------------------ configuration


def _hints(secrets: dict[str, str]) -> dict[str, str]:
    return {name: mask(value) for name, value in secrets.items()}


@transaction.atomic
def channel_create(
    *,
    name: str,
    channel_type: str,
    tenant: Tenant | None,
    kinds: list[str],
    secrets: dict[str, str],
    user: Any,
    enabled: bool = True,
) -> Channel:
    wanted = SECRET_FIELDS[Channel.Type(channel_type)]
    secrets = {k: v for k, v in secrets.items() if k in wanted and v}
    channel = Channel.objects.create(
        name=name,
        type=channel_type,
        tenant=tenant,
        kinds=sorted(set(kinds)),
        enabled=enabled,
        secrets=encrypt_secrets(secrets),
        secret_hints=_hints(secrets),
        created_by=user,
    )
    _audit("notification.channel_created", channel, user)
    return channel


@transaction.atomic
def channel_update(
    *,
    channel: Channel,
    name: str,
    kinds: list[str],
    enabled: bool,
    secrets: dict[str, str],
    user: Any,
) -> Channel:
    """Secrets are write-only: an empty value keeps the stored one."""
    changed = {k: v for k, v in secrets.items() if k in SECRET_FIELDS[channel.type] and v}
    if changed:
        stored = decrypt_secrets(channel.secrets) if channel.secrets else {}
        stored.update(changed)
        channel.secrets = encrypt_secrets(stored)
        channel.secret_hints = {**channel.secret_hints, **_hints(changed)}
    channel.name, channel.kinds, channel.enabled = name, sorted(set(kinds)), enabled
    channel.save()
    _audit("notification.channel_updated", channel, user, secrets_changed=sorted(changed))
    return channel


@transaction.atomic
def channel_delete(*, channel: Channel, user: Any) -> None:
    _audit("notification.channel_deleted", channel, user)
    channel.delete()


def _audit(verb: str, channel: Channel, user: Any, **extra: Any) -> None:
    # Never the secrets themselves: only which ones changed.
    event_log(
        verb=verb,
        actor=user,
        tenant=channel.tenant_id,
        obj=channel,
        details={"name": channel.name, "type": channel.type, "kinds": channel.kinds, **extra},
    )


def build_channel(channel: Channel, *, send: HttpSend | None = None) -> NotificationWebhook:
    """The real NotificationWebhook for a configured channel."""
    secrets = decrypt_secrets(channel.secrets)
    timeout = float(settings.THEMIS_NOTIFY_TIMEOUT_SECONDS)
    send = send or guarded_send(
        timeout=timeout,
        policy=EgressPolicy.from_setting(settings.THEMIS_NOTIFY_EGRESS_ALLOW),
        allow_http=settings.THEMIS_NOTIFY_ALLOW_HTTP,
    )
    try:
        if channel.type == Channel.Type.SLACK:
            return SlackChannel(url=secrets["url"], timeout=timeout, send=send)
        if channel.type == Channel.Type.PAGERDUTY:
            return PagerDutyChannel(
                routing_key=secrets["routing_key"],
                events_url=settings.THEMIS_PAGERDUTY_EVENTS_URL,
                timeout=timeout,
                send=send,
            )
        return SignedWebhookChannel(
            url=secrets["url"], secret=secrets["signing_secret"], timeout=timeout, send=send
        )
    except KeyError as missing:
        raise PermanentError(f"channel is missing its {missing.args[0]}: edit it") from None


# ----------------------------------------------------------------- delivery


@dataclass(frozen=True)
class Attempt:
    """What one attempt did: sent, retry in `retry_in` seconds, or gave up."""

    status: str
    retry_in: float | None = None
    error: str = ""


def backoff_seconds(attempt: int, retry_after: float | None = None) -> float:
    """Exponential backoff with 'equal jitter' (half fixed, half random), so a
    fleet of failed deliveries does not retry in lockstep; at least Retry-After."""
    base = settings.THEMIS_NOTIFY_BACKOFF_BASE_MS / 1000
    cap = settings.THEMIS_NOTIFY_BACKOFF_MAX_MS / 1000
    ceiling = min(cap, base * 2 ** max(0, attempt - 1))
    delay = ceiling / 2 + random.uniform(0, ceiling / 2)  # noqa: S311 - jitter, not crypto
    if retry_after is not None:
        delay = max(delay, min(retry_after, MAX_RETRY_AFTER_SECONDS))
    return float(delay)


def _claim(delivery_id: int, now: datetime) -> Delivery | None:
    # A nudge that arrives early (or twice) finds nothing to claim and does nothing.
    due = now + timedelta(seconds=1)
    claimed = Delivery.objects.filter(
        pk=delivery_id, status__in=Delivery.OPEN_STATES, next_attempt_at__lte=due
    ).update(status=S.SENDING, attempts=F("attempts") + 1, claimed_at=now)
    if not claimed:
        return None
    return Delivery.objects.select_related("channel").get(pk=delivery_id)


def delivery_attempt(*, delivery_id: int, send: HttpSend | None = None) -> Attempt | None:
    """Try to send one delivery now. None when there was nothing to claim."""
    delivery = _claim(delivery_id, timezone.now())
    if delivery is None:
        return None
    try:
        if not delivery.channel.enabled and not delivery.is_test:
            raise PermanentError("channel disabled before the message went out")
        build_channel(delivery.channel, send=send).send(delivery.payload)
    except DeliveryError as err:
        return _record_failure(delivery, err)
    except SecretUnreadable as err:
        return _record_failure(delivery, PermanentError(str(err)))
    except Exception as err:  # a bug in rendering will not heal by retrying
        log.exception("notifications: delivery %s failed unexpectedly", delivery.pk)
        return _record_failure(delivery, PermanentError(f"internal error: {type(err).__name__}"))
    Delivery.objects.filter(pk=delivery.pk, status=S.SENDING).update(
        status=S.SENT, sent_at=timezone.now(), last_error="", last_status_code=None
    )
    return Attempt(S.SENT)


def _record_failure(delivery: Delivery, err: DeliveryError) -> Attempt:
    max_attempts = settings.THEMIS_NOTIFY_MAX_ATTEMPTS
    fields: dict[str, Any] = {"last_status_code": err.status}
    # A test message gets one attempt: the person who clicked wants the answer now.
    if not err.retryable or delivery.attempts >= max_attempts or delivery.is_test:
        why = "not retryable" if not err.retryable else f"after {delivery.attempts} attempt(s)"
        message = f"{err.message} — gave up {why}"
        fields.update(status=S.GAVE_UP, last_error=message)
        attempt = Attempt(S.GAVE_UP, error=message)
    else:
        retry_after = err.retry_after if isinstance(err, RateLimited) else None
        delay = backoff_seconds(delivery.attempts, retry_after)
        progress = f"attempt {delivery.attempts}/{max_attempts}, next in {delay:.1f}s"
        message = f"{err.message} — {progress}"
        if retry_after is not None:
            message += f" (Retry-After {retry_after:g}s)"
        fields.update(
            status=S.RETRYING,
            last_error=message,
            next_attempt_at=timezone.now() + timedelta(seconds=delay),
        )
        attempt = Attempt(S.RETRYING, retry_in=delay, error=message)
    Delivery.objects.filter(pk=delivery.pk, status=S.SENDING).update(**fields)
    log.warning("notifications: delivery %s: %s", delivery.pk, message)
    return attempt


def delivery_run(*, delivery_id: int) -> Attempt | None:
    """One attempt, and the nudge for the next one when it should be retried."""
    attempt = delivery_attempt(delivery_id=delivery_id)
    if attempt is not None and attempt.retry_in is not None:
        dispatch.enqueue(dispatch.DELIVER_TASK, delivery_id, countdown=attempt.retry_in)
    return attempt


def aggregate_flush(*, delivery_id: int) -> bool:
    """Close an aggregate and render its one summary. False if already closed."""
    with transaction.atomic():
        closed = Delivery.objects.filter(pk=delivery_id, status=S.COLLECTING).update(
            status=S.PENDING, next_attempt_at=timezone.now()
        )
        if not closed:
            return False
        delivery = Delivery.objects.get(pk=delivery_id)
        items = [item.summary for item in delivery.items.all()]
        payload = aggregate_notification(
            rollout_id=delivery.rollout_id or 0, items=items, first=delivery.payload
        )
        Delivery.objects.filter(pk=delivery_id).update(payload=payload, kind=payload["kind"])
    return True


def channel_send_test(*, channel: Channel, user: Any) -> Delivery:
    """Queue one test message for the coordinator and log it like any delivery. It is sent
    by a worker, never by the web process: a URL must not make the dashboard itself connect."""
    now = timezone.now()
    delivery = Delivery(channel=channel, tenant_id=channel.tenant_id, is_test=True)
    delivery.payload = {
        **test_notification(
            channel_name=channel.name,
            tenant=channel.tenant.name if channel.tenant else None,
            now=now.isoformat().replace("+00:00", "Z"),
        ),
        "id": str(delivery.uuid),
    }
    delivery.pagerduty_action = delivery.payload["pagerduty_action"]
    delivery.incident_key = delivery.payload["incident_key"]
    delivery.save()
    transaction.on_commit(partial(dispatch.enqueue, dispatch.DELIVER_TASK, delivery.pk))
    _audit("notification.channel_tested", channel, user, delivery_id=delivery.pk)
    return delivery


# -------------------------------------------------------------------- sweep

# A nudge is presumed lost this long after the delivery fell due.
NUDGE_GRACE = timedelta(seconds=60)


def deliveries_sweep(*, now: datetime | None = None) -> dict[str, int]:
    """The reaper: flush aggregates and re-nudge deliveries whose Celery message
    was lost (broker down, worker killed), and forget old log rows."""
    now = now or timezone.now()
    stuck_after = timedelta(seconds=2 * settings.THEMIS_NOTIFY_TIMEOUT_SECONDS + 60)
    # A worker died mid-send: the attempt counts, the delivery goes back to retrying.
    revived = Delivery.objects.filter(status=S.SENDING, claimed_at__lt=now - stuck_after).update(
        status=S.RETRYING, next_attempt_at=now, last_error="worker lost during the attempt"
    )
    overdue = now - NUDGE_GRACE
    batches = list(
        Delivery.objects.filter(status=S.COLLECTING, next_attempt_at__lt=overdue).values_list(
            "pk", flat=True
        )
    )
    for pk in batches:
        dispatch.enqueue(dispatch.FLUSH_TASK, pk)
    due = list(
        Delivery.objects.filter(status__in=Delivery.OPEN_STATES, next_attempt_at__lt=overdue)
        .order_by("next_attempt_at")
        .values_list("pk", flat=True)[:500]
    )
    for pk in due:
        dispatch.enqueue(dispatch.DELIVER_TASK, pk)
    cutoff = now - timedelta(days=settings.THEMIS_NOTIFY_LOG_DAYS)
    forgotten, _ = Delivery.objects.filter(
        created_at__lt=cutoff, status__in=[S.SENT, S.GAVE_UP]
    ).delete()
    return {"revived": revived, "flushed": len(batches), "renudged": len(due), "deleted": forgotten}
