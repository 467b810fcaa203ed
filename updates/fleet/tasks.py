"""Coordinator tasks (queue `dashboard`). Thin: parse, call a service.

Signatures accept extra kwargs so agents and dashboard can be upgraded apart."""

from __future__ import annotations

from typing import Any

from celery import shared_task
from django.conf import settings

from updates.fleet import services
from updates.fleet.reports import open_report
from updates.taskqueue import TaskName


@shared_task(name=TaskName.RECORD_HEARTBEAT, ignore_result=True)
def record_heartbeat(
    payload: dict[str, Any] | None = None, envelope: Any = None, **_extra: Any
) -> None:
    report = open_report(envelope, payload or {}, "heartbeat")
    if report is not None:
        services.node_record_heartbeat(heartbeat=services.Heartbeat.from_payload(report))


@shared_task(name=TaskName.MARK_OFFLINE_NODES, ignore_result=True)
def mark_offline_nodes(**_extra: Any) -> list[str]:
    return services.nodes_mark_offline(silence_seconds=settings.THEMIS_NODE_OFFLINE_AFTER)
