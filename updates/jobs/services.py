"""Update and rollback jobs: a persisted state machine per node.

Transitions are conditional UPDATEs (`... WHERE state IN (allowed)`), so a late
or duplicated report from an agent can never move a job backwards or revive a
finished one. Each state change is an Event. Agents are untrusted: a report
counts only for the job of the node it names.
"""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Any

from django.db import IntegrityError, transaction
from django.utils import timezone

from tenants.gate import GateDecision, GateFn
from tenants.services import update_gate
from updates.audit import event_log
from updates.jobs.transport import NodeTransport, default_transport
from updates.models import Node, Release, ReleaseFile, UpdateJob
from updates.releases.artifacts import artifact_url, delta_variant, job_download_token
from updates.taskqueue import TaskName, enqueue_debounced_on_commit, enqueue_on_commit

log = logging.getLogger(__name__)

S = UpdateJob.State
ORDER: list[str] = [S.QUEUED, S.PREFLIGHT, S.DOWNLOADING, S.VERIFYING, S.APPLYING, S.HEALTH_CHECK]

# Engine journal steps (and agent steps) -> job state
STEP_TO_STATE = {
    "PREFLIGHT": S.PREFLIGHT,
    "DRAINING": S.PREFLIGHT,
    "DOWNLOADING": S.DOWNLOADING,
    "LOCKED": S.VERIFYING,
    "STAGED": S.VERIFYING,
    "RESTORE_POINT": S.APPLYING,
    "SWITCHING": S.APPLYING,
    "SWITCHED": S.APPLYING,
    "VERIFYING": S.HEALTH_CHECK,
    "COMMITTED": S.HEALTH_CHECK,
    "REJOINING": S.HEALTH_CHECK,
}
# Engine error codes after which the node is back on its old version
ROLLED_BACK_CODES = {"APPLY_FAILED_ROLLED_BACK", "HEALTH_CHECK_FAILED_ROLLED_BACK"}


class JobConflict(Exception):
    """The node already has an active job, or the request makes no sense now."""


def _states_before(state: str) -> list[str]:
    return ORDER[: ORDER.index(state) + 1] if state in ORDER else list(ORDER)


def default_gate() -> GateFn:
    """The tenants' windows, blackouts and consent."""
    return update_gate


def _gate_decision(node: Node, release: Release, at: datetime, gate: GateFn | None) -> GateDecision:
    gate = gate or default_gate()
    return gate(node=node, release=release, at=at)


def job_start_update(
    *,
    node: Node,
    release: Release,
    user: Any,
    transport: NodeTransport | None = None,
    rollout: Any = None,
    gate: GateFn | None = None,
    now: datetime | None = None,
    options: dict[str, Any] | None = None,
) -> UpdateJob:
    """Create an update job and send it to the node's agent once committed; or,
    when the tenant's window, blackouts or consent say not now, park it in a
    WAITING state with the reason (a beat task releases it later)."""
    if release.state != Release.State.PUBLISHED:
        raise JobConflict(f"release {release.version} is {release.state}: no new updates")
    decision = _gate_decision(node, release, now or timezone.now(), gate)
    state = S.QUEUED if decision.allowed else (decision.wait_state or S.WAITING_FOR_WINDOW)
    job = _create_job(
        node=node,
        user=user,
        kind=UpdateJob.Kind.UPDATE,
        release=release,
        rollout=rollout,
        state=state,
        wait_reason="" if decision.allowed else str(decision.reason)[:255],
    )
    if decision.allowed:
        job_enqueue(job, transport=transport, options=options)
    return job


def job_start_rollback(
    *,
    node: Node,
    point_id: str,
    user: Any,
    transport: NodeTransport | None = None,
    rollout: Any = None,
    require_known_point: bool = True,
) -> UpdateJob:
    known = {p.get("id") for p in node.restore_points or []}
    if require_known_point and point_id and point_id not in known:
        raise JobConflict(f"node {node.node_id} reports no restore point {point_id!r}")
    job = _create_job(
        node=node, user=user, kind=UpdateJob.Kind.ROLLBACK, point_id=point_id, rollout=rollout
    )
    job_enqueue(job, transport=transport)
    return job


def _create_job(
    *,
    node: Node,
    user: Any,
    kind: str,
    release: Release | None = None,
    point_id: str = "",
    rollout: Any = None,
    state: str = S.QUEUED,
    wait_reason: str = "",
) -> UpdateJob:
    try:
        with transaction.atomic():
            job = UpdateJob.objects.create(
                node=node,
                release=release,
                kind=kind,
                restore_point=point_id,
                created_by=user,
                rollout=rollout,
                state=state,
                wait_reason=wait_reason,
            )
            event_log(
                verb=f"job.{kind}.{'queued' if state == S.QUEUED else 'waiting'}",
                actor=user,
                tenant=node.tenant_id,
                obj=job,
                details={
                    "node_id": node.node_id,
                    "version": release.version if release else None,
                    "restore_point": point_id or None,
                    "rollout_id": rollout.pk if rollout is not None else None,
                    "wait_reason": wait_reason or None,
                },
            )
    except IntegrityError:
        raise JobConflict(f"node {node.node_id} already has an update in progress") from None
    return job


def job_enqueue(
    job: UpdateJob,
    *,
    transport: NodeTransport | None = None,
    options: dict[str, Any] | None = None,
) -> None:
    """Send a QUEUED job to its node's agent, once the surrounding transaction commits."""
    transport = transport or default_transport()
    node_id = job.node.node_id
    extra = dict(options or {})
    if job.rollout is not None and "health_timeout" not in extra:
        extra["health_timeout"] = job.rollout.opts.health_timeout

    def send() -> None:
        if job.kind == UpdateJob.Kind.UPDATE:
            release = job.release
            assert release is not None
            # The token is made at dispatch: a job that waited for its window
            # must not start with an already expired one.
            full = {
                "artifact_url": artifact_url(job),
                "sha256": release.sha256,
                "size": release.size,
            }
            delta = _delta_for(job)
            if delta is not None:
                # The agent falls back to the full bundle for any file whose
                # base on the node is not the one the delta was made against.
                full = {
                    "artifact_url": artifact_url(job, variant=delta_variant(delta.base_version)),
                    "sha256": delta.sha256,
                    "size": delta.size,
                    "full_artifact_url": full["artifact_url"],
                    "full_sha256": full["sha256"],
                    "full_size": full["size"],
                }
            transport.update_node(
                node_id,
                str(job.pk),
                download_token=job_download_token(job),
                version=release.version,
                **full,
                **extra,
            )
        else:
            transport.rollback_node(node_id, str(job.pk), job.restore_point or None)

    # Only once the job row is committed may an agent hear of it.
    transaction.on_commit(send)


def _delta_for(job: UpdateJob) -> ReleaseFile | None:
    """The delta bundle of the job's release made from the node's installed
    version, if there is one (read at dispatch, so a delta finished while the
    job waited for its window is used)."""
    installed = (
        Node.objects.filter(pk=job.node_id).values_list("installed_version", flat=True).first()
    )
    if not installed or job.release_id is None:
        return None
    return (
        ReleaseFile.objects.filter(
            release_id=job.release_id, kind=ReleaseFile.Kind.DELTA, base_version=installed
        )
        .exclude(file="")
        .order_by("-pk")
        .first()
    )


def job_record_progress(
    *,
    job_id: int,
    node_id: str,
    step: str,
    percent: int = 0,
    bytes_done: int | None = None,
    bytes_total: int | None = None,
) -> bool:
    """Record an agent's progress report; returns whether it was accepted."""
    state = STEP_TO_STATE.get(step)
    if state is None:
        log.warning("job %s: unknown step %r from %s ignored", job_id, step, node_id)
        return False
    jobs = UpdateJob.objects.filter(pk=job_id, node__node_id=node_id)
    fields: dict[str, Any] = {"step": step[:64], "progress_percent": max(0, min(100, percent))}
    if bytes_done is not None:
        fields.update(bytes_done=bytes_done, bytes_total=bytes_total)
    with transaction.atomic():
        moved = jobs.filter(state__in=[s for s in _states_before(state) if s != state]).update(
            state=state, **fields
        )
        if moved:
            job = jobs.select_related("node").get()
            if job.started_at is None:
                jobs.update(started_at=timezone.now())
                Node.objects.filter(pk=job.node_id).update(status=Node.Status.UPDATING)
            event_log(
                verb=f"job.{state.lower()}",
                actor_label=f"node:{node_id}",
                tenant=job.node.tenant_id,
                obj=job,
                details={"step": step, "percent": percent},
            )
            return True
        return bool(jobs.filter(state=state).update(**fields))


def job_finish(
    *,
    job_id: int,
    node_id: str,
    ok: bool,
    error_code: str = "",
    error_message: str = "",
    result: dict[str, Any] | None = None,
) -> UpdateJob | None:
    """Close a job from the agent's final report. Finished jobs stay finished."""
    if ok:
        final = S.DONE
    elif error_code in ROLLED_BACK_CODES:
        final = S.ROLLED_BACK
    else:
        final = S.FAILED
    jobs = UpdateJob.objects.filter(pk=job_id, node__node_id=node_id)
    with transaction.atomic():
        closed = jobs.filter(state__in=UpdateJob.ACTIVE_STATES).update(
            state=final,
            progress_percent=100 if ok else 0,
            finished_at=timezone.now(),
            error_code=error_code[:64],
            error_message=error_message[:4000],
            result=result or {},
        )
        if not closed:
            log.warning("job %s: final report from %s ignored (not active)", job_id, node_id)
            return None
        job = jobs.select_related("node", "release").get()
        _node_after_job(job, final, result or {})
        if job.rollout_id:
            wake_rollout_after_commit(job.rollout_id, debounce=True)
        event_log(
            verb=f"job.{final.lower()}",
            actor_label=f"node:{node_id}",
            tenant=job.node.tenant_id,
            obj=job,
            details={
                "node_id": node_id,
                "kind": job.kind,
                "error_code": error_code,
                "error": error_message[:500],
                "version_from": (result or {}).get("version_from"),
                "version_to": (result or {}).get("version_to"),
                "rollout_id": job.rollout_id,
            },
        )
    return job


def wake_rollout_after_commit(rollout_id: int, *, debounce: bool) -> None:
    """Once committed, let the coordinator take the rollout's next step.
    Finished jobs debounce (many finish at once); a person's decision drives now."""
    if debounce:
        enqueue_debounced_on_commit(
            TaskName.DRIVE_ROLLOUT, rollout_id, key=f"rollout-wake:{rollout_id}"
        )
    else:
        enqueue_on_commit(TaskName.DRIVE_ROLLOUT, rollout_id)


def _node_after_job(job: UpdateJob, final: str, result: dict[str, Any]) -> None:
    status = Node.Status.FAILED if final == S.FAILED else Node.Status.ONLINE
    fields: dict[str, Any] = {"status": status}
    version = result.get("version_to")
    if final == S.DONE and isinstance(version, str):
        fields["installed_version"] = version[:64]
    Node.objects.filter(pk=job.node_id).update(**fields)


def job_cancel(*, job: UpdateJob, user: Any) -> bool:
    """Cancel a job the agent has not started yet (queued or waiting)."""
    not_started = [S.QUEUED, *UpdateJob.WAITING_STATES]
    cancelled = UpdateJob.objects.filter(pk=job.pk, state__in=not_started).update(
        state=S.CANCELLED, finished_at=timezone.now()
    )
    if cancelled:
        event_log(verb="job.cancelled", actor=user, tenant=job.node.tenant_id, obj=job)
    return bool(cancelled)
