"""Coordinator tasks for notifications (queue `dashboard`). Thin: ids in, a
service call, nothing else. Retries are driven by the Delivery row (attempts,
next_attempt_at), so a lost or duplicated message cannot lose or double-send."""

from __future__ import annotations

from typing import Any

from celery import shared_task

from . import services


@shared_task(name="updates.notifications.tasks.deliver", ignore_result=True)
def deliver(delivery_id: int, **_extra: Any) -> None:
    services.delivery_run(delivery_id=int(delivery_id))


@shared_task(name="updates.notifications.tasks.flush_batch", ignore_result=True)
def flush_batch(delivery_id: int, **_extra: Any) -> None:
    if services.aggregate_flush(delivery_id=int(delivery_id)):
        services.delivery_run(delivery_id=int(delivery_id))


@shared_task(name="updates.notifications.tasks.sweep", ignore_result=True)
def sweep(**_extra: Any) -> dict[str, int]:
    return services.deliveries_sweep()
