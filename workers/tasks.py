"""Coordinator tasks (queue `dashboard`). Thin: parse, call a service.

Signatures accept extra kwargs so agents and dashboard can be upgraded apart."""

from __future__ import annotations

from typing import Any

from celery import shared_task
from django.conf import settings

from updates import artifacts, jobs, services
from updates.engine.reports import ReportInvalid, envelope_node_id, verify_report
from updates.node_keys import node_key


def open_report(envelope: Any, legacy: dict[str, Any], task: str) -> dict[str, Any] | None:
    """The verified content of an agent's report, or None (rejected and logged).
    Unsigned reports pass only when THEMIS_REQUIRE_SIGNED_REPORTS is off."""
    if envelope is None:
        if settings.THEMIS_REQUIRE_SIGNED_REPORTS:
            services.report_reject(
                node_id=str(legacy.get("node_id", "")), task=task, reason="unsigned report"
            )
            return None
        return legacy
    node_id = envelope_node_id(envelope)
    try:
        return verify_report(node_key(node_id), envelope)
    except ReportInvalid as err:
        services.report_reject(node_id=node_id, task=task, reason=str(err))
        return None


@shared_task(name="workers.tasks.record_heartbeat", ignore_result=True)
def record_heartbeat(
    payload: dict[str, Any] | None = None, envelope: Any = None, **_extra: Any
) -> None:
    report = open_report(envelope, payload or {}, "heartbeat")
    if report is not None:
        services.node_record_heartbeat(heartbeat=services.Heartbeat.from_payload(report))


@shared_task(name="workers.tasks.mark_offline_nodes", ignore_result=True)
def mark_offline_nodes(**_extra: Any) -> list[str]:
    return services.nodes_mark_offline(silence_seconds=settings.THEMIS_NODE_OFFLINE_AFTER)


@shared_task(name="workers.tasks.job_progress", ignore_result=True)
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


@shared_task(name="workers.tasks.job_finished", ignore_result=True)
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


@shared_task(name="workers.tasks.generate_release_deltas", ignore_result=True)
def generate_release_deltas(release_id: int, **_extra: Any) -> list[str]:
    """Build and sign the delta bundles of a freshly published release."""
    from updates.deltas import release_deltas_generate

    files = release_deltas_generate(release_id=int(release_id))
    return [f.base_version for f in files]


@shared_task(name="workers.tasks.cleanup_artifact_tombstones", ignore_result=True)
def cleanup_artifact_tombstones(**_extra: Any) -> int:
    return artifacts.artifact_tombstones_cleanup()


@shared_task(name="workers.tasks.release_waiting_jobs", ignore_result=True)
def release_waiting_jobs(**_extra: Any) -> list[int]:
    """Beat: start jobs whose maintenance window opened or whose consent came."""
    from tenants.services import waiting_jobs_release

    # Each released job goes to its agent the same way a fresh one does.
    return waiting_jobs_release(start_job=jobs.job_enqueue)


@shared_task(name="workers.tasks.drive_rollout", ignore_result=True)
def drive_rollout(rollout_id: int, **_extra: Any) -> str:
    from updates.rollouts import rollout_drive

    state = rollout_drive(int(rollout_id))
    if state == "BUSY":
        # Another drive holds the lease right now; look again shortly so the
        # event that woke us is not lost.
        drive_rollout.apply_async((rollout_id,), countdown=1)
    return state


WAKE_DEBOUNCE_MS = 300


def wake_rollout(rollout_id: int) -> bool:
    """Schedule one drive of a rollout soon, however many of its jobs finish
    meanwhile: the first finish in a 300 ms window schedules the drive, the
    others ride along (the drive reads everything committed before it runs).
    The beat reaper is the backstop if a wake-up is ever lost."""
    import redis

    try:
        client = redis.Redis.from_url(settings.REDIS_URL)
        first = client.set(f"themis:wake:{rollout_id}", 1, nx=True, px=WAKE_DEBOUNCE_MS)
    except redis.RedisError:
        first = True  # no debounce without Redis; a drive too many is harmless
    if first:
        drive_rollout.apply_async((rollout_id,), countdown=WAKE_DEBOUNCE_MS / 1000)
    return bool(first)


@shared_task(name="workers.tasks.drive_active_rollouts", ignore_result=True)
def drive_active_rollouts(**_extra: Any) -> int:
    """The reaper: every active rollout gets driven, so a rollout whose
    coordinator died goes on from its persisted state."""
    from updates.rollouts import active_rollout_ids, rollout_drive

    ids = active_rollout_ids()
    for rollout_id in ids:
        rollout_drive(rollout_id)
    return len(ids)
