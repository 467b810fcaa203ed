"""From an audit Event to Delivery rows and a nudge to the coordinator.

`notify_event` listens to `updates.audit.event_log` (subscribed in the app's `ready`). It must never
raise, block or delay the update that logged the event: it only registers an
on-commit callback (so a rolled-back transaction notifies nobody), and that
callback swallows and logs its own failures. The Delivery rows are the truth;
the Celery message is only a nudge, and a lost nudge is re-sent by the sweep.
"""

from __future__ import annotations

import logging
from datetime import timedelta
from functools import partial
from typing import Any

from celery import current_app
from django.conf import settings
from django.db import IntegrityError, transaction
from django.utils import timezone

from updates.models import Event

from .kinds import PAGERDUTY_KINDS, RESOLVE, VERBS
from .messages import Occurrence, describe, item_summary
from .models import Channel, Delivery, DeliveryItem

log = logging.getLogger(__name__)

DELIVER_TASK = "updates.notifications.tasks.deliver"
FLUSH_TASK = "updates.notifications.tasks.flush_batch"


def notify_event(event: Event) -> None:
    """Schedule notifications for `event` once the current transaction commits."""
    try:
        if event.verb not in VERBS:
            return  # cheap exit for the many events nobody is notified about
        transaction.on_commit(partial(_route_safely, event), robust=True)
    except Exception:  # a notification problem must never fail the caller
        log.exception("notifications: could not schedule event %s", event.pk)


def _route_safely(event: Event) -> None:
    try:
        route_event(event=event)
    except Exception:
        log.exception("notifications: routing event %s (%s) failed", event.pk, event.verb)


def enqueue(task_name: str, delivery_id: int, *, countdown: float = 0) -> None:
    """Nudge the coordinator. Never raises and never waits on a dead broker:
    publishing is not retried, because the sweep re-sends lost nudges."""
    try:
        current_app.send_task(
            task_name, args=[delivery_id], countdown=countdown or None, retry=False
        )
    except Exception as err:
        log.warning("notifications: could not enqueue %s(%s): %s", task_name, delivery_id, err)


def route_event(*, event: Event) -> list[int]:
    """Create the deliveries (or aggregate items) for one Event, on every channel
    whose filters want it. Returns the ids of the deliveries created or joined."""
    channels = list(Channel.objects.filter(enabled=True))
    if not channels:
        return []  # the common case in small setups: no queries beyond this one
    occurrence = describe(event)
    if occurrence is None:
        return []
    routed: list[int] = []
    for channel in channels:
        if not channel.wants(kind=occurrence.kind, tenant_id=event.tenant_id):
            continue
        if channel.type == Channel.Type.PAGERDUTY and not _pagerduty_wants(channel, occurrence):
            continue
        delivery_id = (
            _join_aggregate(channel, occurrence)
            if occurrence.aggregated
            else _create_delivery(channel, occurrence)
        )
        if delivery_id is not None:
            routed.append(delivery_id)
    return routed


def _pagerduty_wants(channel: Channel, occurrence: Occurrence) -> bool:
    """PagerDuty hears triggers, and a resolve only while our incident is open."""
    if occurrence.kind not in PAGERDUTY_KINDS:
        return False
    if occurrence.spec.pagerduty != RESOLVE:
        return True
    last = (
        Delivery.objects.filter(
            channel=channel, incident_key=occurrence.notification["incident_key"], is_test=False
        )
        .order_by("-pk")
        .values_list("pagerduty_action", flat=True)
        .first()
    )
    return last == "trigger"


def _dedup_key(occurrence: Occurrence) -> str:
    """At most one message per (rollout, stage, kind) per channel; other events once."""
    if occurrence.rollout_id is not None and not occurrence.spec.node_level:
        stage = occurrence.stage if occurrence.stage is not None else "-"
        return f"rollout:{occurrence.rollout_id}:stage:{stage}:{occurrence.kind}"
    return f"event:{occurrence.event.pk}"


def _new_delivery(channel: Channel, occurrence: Occurrence, **fields: Any) -> Delivery:
    notification = occurrence.notification
    delivery = Delivery(
        channel=channel,
        kind=occurrence.kind,
        tenant_id=occurrence.event.tenant_id,
        rollout_id=occurrence.rollout_id,
        incident_key=notification["incident_key"],
        pagerduty_action=notification["pagerduty_action"],
        **fields,
    )
    delivery.payload = {**notification, "id": str(delivery.uuid)}
    delivery.save()
    return delivery


def _create_delivery(channel: Channel, occurrence: Occurrence) -> int | None:
    try:
        with transaction.atomic():
            delivery = _new_delivery(channel, occurrence, dedup_key=_dedup_key(occurrence))
    except IntegrityError:
        log.info("notifications: %s already sent to channel %s", _dedup_key(occurrence), channel.pk)
        return None
    enqueue(DELIVER_TASK, delivery.pk)
    return delivery.pk


def _join_aggregate(channel: Channel, occurrence: Occurrence) -> int:
    """Add a node-level event to the open aggregate of its (rollout, channel), opening
    one (and scheduling its flush after the window) if there is none.

    The open row is locked while the item is added, so a flush (which closes it
    by conditional UPDATE) either sees this item or makes us open a new one."""
    window = settings.THEMIS_NOTIFY_BATCH_WINDOW_MS / 1000
    opened = False
    with transaction.atomic():
        open_batch = Delivery.objects.select_for_update().filter(
            channel=channel, rollout_id=occurrence.rollout_id, status=Delivery.Status.COLLECTING
        )
        batch_id = open_batch.values_list("pk", flat=True).first()
        if batch_id is None:
            try:
                with transaction.atomic():
                    batch_id = _new_delivery(
                        channel,
                        occurrence,
                        status=Delivery.Status.COLLECTING,
                        next_attempt_at=timezone.now() + timedelta(seconds=window),
                    ).pk
                opened = True
            except IntegrityError:  # another router opened it a moment ago
                batch_id = open_batch.values_list("pk", flat=True).get()
        item = DeliveryItem(
            delivery_id=batch_id,
            event_id=occurrence.event.pk,
            kind=occurrence.kind,
            summary=item_summary(occurrence),
        )
        DeliveryItem.objects.bulk_create([item], ignore_conflicts=True)
    if opened:
        enqueue(FLUSH_TASK, batch_id, countdown=window)
    return batch_id
