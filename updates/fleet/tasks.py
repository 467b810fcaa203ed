"""Coordinator tasks (queue `dashboard`). Thin: parse, call a service.

Signatures accept extra kwargs so agents and dashboard can be upgraded apart."""

from __future__ import annotations

from typing import Any

from celery import shared_task
from django.conf import settings

from updates.fleet import services
from updates.fleet.reports import open_report
from updates.jobs import services as jobs
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


@shared_task(name=TaskName.JOB_PROGRESS, ignore_result=True)
def job_progress(envelope: Any = None, **legacy: Any) -> None:
    report = open_report(envelope, legacy, "job_progress")
    if report is None:
        return
    jobs.job_record_progress(
        job_id=int(report["job_id"]),
        node_id=str(report["node_id"]),
        step=str(report["step"]),
        percent=int(report.get("percent", 0)),
        bytes_done=report.get("bytes_done"),
        bytes_total=report.get("bytes_total"),
    )


@shared_task(name=TaskName.JOB_FINISHED, ignore_result=True)
def job_finished(envelope: Any = None, **legacy: Any) -> None:
    report = open_report(envelope, legacy, "job_finished")
    if report is None:
        return
    result = report.get("result")
    jobs.job_finish(
        job_id=int(report["job_id"]),
        node_id=str(report["node_id"]),
        ok=bool(report.get("ok")),
        error_code=str(report.get("error_code", "")),
        error_message=str(report.get("error_message", "")),
        result=result if isinstance(result, dict) else {},
    )
