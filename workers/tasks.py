"""Coordinator tasks (queue `dashboard`). Thin: parse, call a service."""

from __future__ import annotations

from typing import Any

from celery import shared_task
from django.conf import settings

from updates import services


@shared_task(name="workers.tasks.record_heartbeat", ignore_result=True)
def record_heartbeat(payload: dict[str, Any] | None = None, **_extra: Any) -> None:
    # Extra kwargs are tolerated so agents and dashboard can be upgraded separately.
    heartbeat = services.Heartbeat.from_payload(payload or {})
    services.node_record_heartbeat(heartbeat=heartbeat)


@shared_task(name="workers.tasks.mark_offline_nodes", ignore_result=True)
def mark_offline_nodes(**_extra: Any) -> list[str]:
    return services.nodes_mark_offline(silence_seconds=settings.THEMIS_NODE_OFFLINE_AFTER)
