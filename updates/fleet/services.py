"""Writes with side effects on the fleet: heartbeats, liveness, the audit log."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from django.db import models, transaction
from django.utils import timezone

from updates.audit import SYSTEM, event_log
from updates.jobs.outbox import commands_ack_traffic_role
from updates.jobs.services import job_finish, job_heartbeat_refresh
from updates.models import Node, UpdateJob

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Heartbeat:
    """What an agent reports. Agents are untrusted: every field is sanitised."""

    node_id: str
    installed_version: str = ""
    raft_role: str = ""
    disk_free_bytes: int | None = None
    disk_total_bytes: int | None = None
    memory_available_bytes: int | None = None
    load_1m: float | None = None
    restore_points: tuple[dict[str, Any], ...] = ()
    error_rate: float | None = None
    p99_latency_ms: float | None = None
    service_healthy: bool | None = None
    last_job: dict[str, Any] | None = None
    # The job the agent is working on right now: a sign of life for that job.
    active_job_id: int | None = None
    # The traffic role the node serves now ("active"/"standby"; "" outside blue/green).
    traffic_role: str = ""

    @classmethod
    def from_payload(cls, payload: dict[str, Any]) -> Heartbeat:
        role = str(payload.get("raft_role") or "")
        traffic = str(payload.get("traffic_role") or "")
        return cls(
            node_id=str(payload.get("node_id") or "")[:64],
            installed_version=str(payload.get("installed_version") or "")[:64],
            raft_role=role if role in Node.RaftRole.values else "",
            disk_free_bytes=_non_negative_int(payload.get("disk_free_bytes")),
            disk_total_bytes=_non_negative_int(payload.get("disk_total_bytes")),
            memory_available_bytes=_non_negative_int(payload.get("memory_available_bytes")),
            load_1m=_finite_float(payload.get("load_1m")),
            restore_points=_restore_points(payload.get("restore_points")),
            error_rate=_finite_float(payload.get("error_rate")),
            p99_latency_ms=_finite_float(payload.get("p99_latency_ms")),
            service_healthy=(
                payload["service_healthy"]
                if isinstance(payload.get("service_healthy"), bool)
                else None
            ),
            last_job=payload["last_job"] if isinstance(payload.get("last_job"), dict) else None,
            active_job_id=_job_id(payload.get("active_job_id")),
            traffic_role=traffic if traffic in TRAFFIC_ROLES else "",
        )


TRAFFIC_ROLES = frozenset({"active", "standby"})


def _job_id(value: Any) -> int | None:
    """A job id as the agent sends it (a decimal string or an int), else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if value > 0 else None
    if isinstance(value, str) and value.isdigit() and len(value) < 19:
        return int(value) or None
    return None


def _restore_points(value: Any) -> tuple[dict[str, Any], ...]:
    """Keep only well-formed entries with short string/number fields."""
    if not isinstance(value, list):
        return ()
    points = []
    for item in value[:50]:
        if not isinstance(item, dict) or not isinstance(item.get("id"), str):
            continue
        points.append(
            {
                key: item[key] if isinstance(item[key], int | float) else str(item[key])[:128]
                for key in ("id", "version", "created", "file_count", "size")
                if key in item and item[key] is not None
            }
        )
    return tuple(points)


def _non_negative_int(value: Any) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return int(value) if value >= 0 and math.isfinite(value) else None


def _finite_float(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


@transaction.atomic
def node_record_heartbeat(*, heartbeat: Heartbeat, now: datetime | None = None) -> Node | None:
    """Record a heartbeat. An unknown node id is rejected and logged; no node is created."""
    now = now or timezone.now()
    node = Node.objects.select_for_update().filter(node_id=heartbeat.node_id).first()
    if node is None:
        log.warning("heartbeat from unknown node %r rejected", heartbeat.node_id)
        event_log(
            verb="heartbeat.rejected",
            actor_label=f"node:{heartbeat.node_id}",
            details={"reason": "unknown node id", "node_id": heartbeat.node_id},
        )
        return None
    came_online = node.status in {Node.Status.OFFLINE, Node.Status.UNKNOWN}
    node.installed_version = heartbeat.installed_version
    node.raft_role = heartbeat.raft_role
    node.disk_free_bytes = heartbeat.disk_free_bytes
    node.disk_total_bytes = heartbeat.disk_total_bytes
    node.memory_available_bytes = heartbeat.memory_available_bytes
    node.load_1m = heartbeat.load_1m
    node.restore_points = list(heartbeat.restore_points)
    node.error_rate = heartbeat.error_rate
    node.p99_latency_ms = heartbeat.p99_latency_ms
    node.service_healthy = heartbeat.service_healthy
    node.last_heartbeat = now
    node.traffic_role = heartbeat.traffic_role
    if came_online:
        node.status = Node.Status.ONLINE
    node.save()
    commands_ack_traffic_role(node, heartbeat.traffic_role, now=now)
    if heartbeat.active_job_id is not None:
        job_heartbeat_refresh(job_id=heartbeat.active_job_id, node=node, now=now)
    if heartbeat.last_job:
        _catch_up_final_report(node, heartbeat.last_job)
    if came_online:
        event_log(
            verb="node.online",
            actor_label=f"node:{node.node_id}",
            tenant=node.tenant_id,
            obj=node,
            details={"version": node.installed_version},
        )
    return node


def _catch_up_final_report(node: Node, report: dict[str, Any]) -> None:
    """Close a job whose final report was lost (the agent repeats it in every
    heartbeat). Finishing is conditional on the job being active: a no-op otherwise."""

    try:
        job_id = int(report.get("job_id", 0))
    except (TypeError, ValueError):
        return
    if (
        not UpdateJob.objects.filter(pk=job_id, node=node, state__in=UpdateJob.ACTIVE_STATES)
        .exclude(state__in=UpdateJob.WAITING_STATES)
        .exists()
    ):
        return
    result = report.get("result")
    job_finish(
        job_id=job_id,
        node_id=node.node_id,
        ok=bool(report.get("ok")),
        error_code=str(report.get("error_code") or ""),
        error_message=str(report.get("error_message") or ""),
        result=result if isinstance(result, dict) else {},
    )


def report_reject(*, node_id: str, task: str, reason: str) -> None:
    """An agent report that failed its signature check: dropped, and logged."""
    log.warning("%s report claiming node %r rejected: %s", task, node_id, reason)
    event_log(
        verb="report.rejected",
        actor_label=f"node:{node_id[:64]}",
        details={"node_id": node_id[:64], "task": task, "reason": reason[:200]},
    )


def nodes_mark_offline(*, silence_seconds: int, now: datetime | None = None) -> list[str]:
    """Mark nodes silent for longer than `silence_seconds` offline, one Event each.

    Each node is claimed by a conditional UPDATE, so two beat runs racing each
    other log one Event per node, not two.
    """
    now = now or timezone.now()
    cutoff = now - timedelta(seconds=silence_seconds)
    silent = Node.objects.exclude(status=Node.Status.OFFLINE).filter(
        models.Q(last_heartbeat__lt=cutoff)
        | models.Q(last_heartbeat__isnull=True, status=Node.Status.ONLINE)
    )
    marked: list[str] = []
    for node_pk, node_id, tenant_id, last in silent.values_list(
        "pk", "node_id", "tenant_id", "last_heartbeat"
    ):
        with transaction.atomic():
            claimed = (
                Node.objects.filter(pk=node_pk, last_heartbeat=last)
                .exclude(status=Node.Status.OFFLINE)
                .update(status=Node.Status.OFFLINE)
            )
            if not claimed:
                continue
            event_log(
                verb="node.offline",
                actor_label=SYSTEM,
                tenant=tenant_id,
                obj=Node(pk=node_pk, node_id=node_id),
                details={
                    "node_id": node_id,
                    "last_heartbeat": last.isoformat() if last else None,
                    "silence_seconds": silence_seconds,
                },
            )
        marked.append(node_id)
    return marked
