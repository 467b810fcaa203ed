"""Coordinator tasks (queue `dashboard`). Thin: verify, parse, call a service.

Every report arrives as one signed `envelope` (updates.fleet.reports); anything else
a sender adds is ignored, an unsigned report is refused. A refused report is counted
and never raises: a hostile message must not crash a task."""

from __future__ import annotations

from typing import Any

from celery import shared_task, signals
from django.conf import settings
from django.db import transaction

from updates.engine.reports import ReportType
from updates.fleet import services
from updates.fleet.ingest import IngesterThread, IngestOptions
from updates.fleet.reports import open_report
from updates.fleet.validation import FinalReport, ProgressReport
from updates.jobs import services as jobs
from updates.taskqueue import TaskName

_ingesters: list[IngesterThread] = []


@signals.worker_ready.connect
def start_heartbeat_ingester(sender: Any = None, **_kwargs: Any) -> None:
    """Every coordinator worker (one that takes queue `dashboard`) also takes heartbeats
    off their queue in batches, unless THEMIS_HEARTBEAT_INGESTER is off (dedicated
    `manage.py ingest_heartbeats` processes instead). Started once the pool has forked."""
    consumed = sender.app.amqp.queues.consume_from or {} if sender is not None else {}
    if "dashboard" not in consumed or not settings.THEMIS_HEARTBEAT_INGESTER:
        return
    ingester = IngesterThread(IngestOptions.from_settings())
    ingester.start()
    _ingesters.append(ingester)


@signals.worker_shutdown.connect
def stop_heartbeat_ingester(**_kwargs: Any) -> None:
    for ingester in _ingesters:
        ingester.stop.set()
    for ingester in _ingesters:
        ingester.join(timeout=10)
    _ingesters.clear()


@shared_task(name=TaskName.RECORD_HEARTBEAT, ignore_result=True)
def record_heartbeat(envelope: Any = None, **_extra: Any) -> None:
    """One heartbeat (an agent that sends them on queue `dashboard`, or a worker told to
    take queue `heartbeats`): the one-by-one path, same checks as a batch."""
    with transaction.atomic():
        opened = open_report(
            envelope, ReportType.HEARTBEAT, services.Heartbeat.from_payload, newest_only=True
        )
        if opened is not None:
            services.node_record_heartbeat(heartbeat=opened[1])


@shared_task(name=TaskName.MARK_OFFLINE_NODES, ignore_result=True)
def mark_offline_nodes(**_extra: Any) -> list[str]:
    return services.nodes_mark_offline(silence_seconds=settings.THEMIS_NODE_OFFLINE_AFTER)


@shared_task(name=TaskName.JOB_PROGRESS, ignore_result=True)
def job_progress(envelope: Any = None, **_extra: Any) -> None:
    with transaction.atomic():
        opened = open_report(envelope, ReportType.JOB_PROGRESS, ProgressReport.from_payload)
        if opened is None:
            return
        report = opened[1]
        jobs.job_record_progress(
            job_id=report.job_id,
            node_id=report.node_id,
            step=report.step,
            percent=report.percent,
            bytes_done=report.bytes_done,
            bytes_total=report.bytes_total,
            bytes_per_second=report.bytes_per_second,
            eta_seconds=report.eta_seconds,
            sequence=opened.seq,
        )


@shared_task(name=TaskName.JOB_FINISHED, ignore_result=True)
def job_finished(envelope: Any = None, **_extra: Any) -> None:
    with transaction.atomic():
        opened = open_report(envelope, ReportType.JOB_FINISHED, FinalReport.from_payload)
        if opened is None:
            return
        report = opened[1]
        jobs.job_finish(
            job_id=report.job_id,
            node_id=report.node_id,
            ok=report.ok,
            error_code=report.error_code,
            error_message=report.error_message,
            result=report.result,
        )
