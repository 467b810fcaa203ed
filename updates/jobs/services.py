"""Update, rollback and contract jobs: a persisted state machine per node.

Transitions are conditional UPDATEs (`... WHERE state IN (allowed)`), so a late
or duplicated report from an agent can never move a job backwards or revive a
finished one. Each state change is an Event. Agents are untrusted: a report
counts only for the job of the node it names. A job reaches its agent only as an
outbox command (`outbox.py`); any report for it acknowledges that command.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from django.db import IntegrityError, transaction
from django.db.models import QuerySet
from django.utils import timezone

from tenants.gate import GateDecision, GateFn
from tenants.services import update_gate
from updates.audit import event_log, event_log_many, new_event
from updates.jobs import outbox
from updates.jobs.deadlines import LOST_CODE, job_end_lost, wake_rollout_after_commit
from updates.jobs.selectors import PlanFn, PlanUnresolvable, job_plan_resolve
from updates.jobs.transport import NodeTransport, default_transport
from updates.live.services import announce, job_topics
from updates.models import (
    PRIMARY_PRODUCT,
    Event,
    Node,
    NodeCommand,
    NodeComponent,
    Release,
    UpdateJob,
)

log = logging.getLogger(__name__)

S = UpdateJob.State
# A CANCELLING job moves on with the agent's first step: it had started before the cancel.
ORDER: list[str] = [
    S.QUEUED,
    S.CANCELLING,
    S.PREFLIGHT,
    S.DOWNLOADING,
    S.VERIFYING,
    S.APPLYING,
    S.HEALTH_CHECK,
]

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
    # The service reloaded onto the new files; the bundle's own checks ran.
    "RELOADED": S.HEALTH_CHECK,
    "VERIFIED": S.HEALTH_CHECK,
    "COMMITTED": S.HEALTH_CHECK,
    "REJOINING": S.HEALTH_CHECK,
    # The bundle's expand migrations, inside the apply (after the switch, before the reload).
    "MIGRATING": S.APPLYING,
    "MIGRATED": S.APPLYING,
    # A contract job: the node database's contract migrations.
    "CONTRACTING": S.APPLYING,
}
# Engine error codes after which the node is back on its old version
ROLLED_BACK_CODES = {
    "APPLY_FAILED_ROLLED_BACK",
    "HEALTH_CHECK_FAILED_ROLLED_BACK",
    "VERIFICATION_FAILED_ROLLED_BACK",
}
# The agent died mid-job; after engine recovery the node may be on its old version.
INTERRUPTED_CODE = "INTERRUPTED"
# The agent's answer to a cancel command for a job it had not started.
CANCELLED_CODE = "CANCELLED"
# Agent steps that acknowledge a command without moving the job: "ACCEPTED" when it starts
# on a command, "IN_PROGRESS" when a repeated command finds the job still running.
ACK_STEPS = frozenset({"ACCEPTED", "IN_PROGRESS"})

__all__ = [
    "LOST_CODE",
    "JobConflict",
    "PlanRefused",
    "default_transport",
    "job_cancel",
    "job_end_lost",
    "job_enqueue",
    "job_finish",
    "job_record_progress",
    "job_start_contract",
    "job_start_rollback",
    "job_start_update",
    "wake_rollout_after_commit",
]


class JobConflict(Exception):
    """The node already has an active job, or the request makes no sense now."""


class PlanRefused(JobConflict):
    """No plan of published releases takes the node to the release (a dependency that
    cannot be met, a conflict, a cycle): the update is refused with the explanation."""

    def __init__(self, message: str, explanation: str) -> None:
        super().__init__(message)
        self.explanation = explanation


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
    plans: PlanFn = job_plan_resolve,
) -> UpdateJob:
    """Create an update job and send it to the node's agent once committed; or,
    when the tenant's window, blackouts or consent say not now, park it in a
    WAITING state with the reason (a beat task releases it later). `plans`: where the
    node's plan comes from (a rollout's drive resolves many nodes' plans at once)."""
    _must_be_published(release)
    # Resolved before anything is written: a refused plan leaves no job behind.
    job = _new_update_job(node, release, rollout, plans, now or timezone.now(), gate)
    job.created_by = user
    # The job and its command commit together, or neither does.
    with transaction.atomic():
        _store_job(job)
        if job.state == S.QUEUED:
            job_enqueue(job, transport=transport, options=options)
    return job


def job_updates_prepare(
    nodes: list[Node],
    *,
    release: Release,
    rollout: Any,
    gate: GateFn | None = None,
    now: datetime | None = None,
    plans: PlanFn = job_plan_resolve,
) -> list[UpdateJob]:
    """The first half of `job_start_update` for many nodes at once (a rollout's drive): each
    node's job, not yet stored, with its plan and its gate's state. Writes nothing; raises
    PlanRefused for the first node no plan takes to the release."""
    _must_be_published(release)
    at = now or timezone.now()
    return [_new_update_job(node, release, rollout, plans, at, gate) for node in nodes]


def job_updates_store(
    new: list[UpdateJob],
    *,
    transport: NodeTransport | None = None,
    options: dict[str, Any] | None = None,
) -> list[UpdateJob]:
    """The second half: one INSERT for the jobs, one for their audit entries and one for the
    commands of those not waiting (sent once the caller's transaction commits). All or
    nothing: a node with an update in progress raises JobConflict, and what was written
    belongs to the caller's savepoint to undo."""
    try:
        with transaction.atomic(savepoint=False):
            created = UpdateJob.objects.bulk_create(new)
    except IntegrityError:
        raise JobConflict("a node of the batch already has an update in progress") from None
    event_log_many([_job_event(job) for job in created])
    queued = [job for job in created if job.state == S.QUEUED]
    for command in outbox.commands_for_jobs(queued, options=options):
        outbox.relay_after_commit(command, transport or default_transport())
    return created


def _must_be_published(release: Release) -> None:
    if release.state != Release.State.PUBLISHED:
        raise JobConflict(f"release {release.version} is {release.state}: no new updates")


def _new_update_job(
    node: Node, release: Release, rollout: Any, plans: PlanFn, at: datetime, gate: GateFn | None
) -> UpdateJob:
    """An update job not yet stored: its plan (PlanRefused when none takes the node to the
    release) and, from the gate, QUEUED or a WAITING state with the reason."""
    try:
        plan = plans(node=node, release=release)
    except PlanUnresolvable as failed:
        raise PlanRefused(
            f"no update plan takes {node.node_id} to {release.product} {release.version}:"
            f" {failed.explanation}",
            failed.explanation,
        ) from None
    decision = _gate_decision(node, release, at, gate)
    return UpdateJob(
        node=node,
        release=release,
        kind=UpdateJob.Kind.UPDATE,
        rollout=rollout,
        state=S.QUEUED if decision.allowed else (decision.wait_state or S.WAITING_FOR_WINDOW),
        wait_reason="" if decision.allowed else str(decision.reason)[:255],
        plan=plan.to_json(),
    )


def job_start_rollback(
    *,
    node: Node,
    point_id: str,
    user: Any,
    transport: NodeTransport | None = None,
    rollout: Any = None,
    require_known_point: bool = True,
) -> UpdateJob:
    point = node.restore_point(point_id)
    if require_known_point and point_id:
        if point is None:
            raise JobConflict(f"node {node.node_id} reports no restore point {point_id!r}")
        if not point.get("version"):
            raise JobConflict(
                f"restore point {point_id!r} of node {node.node_id} was taken before anything "
                "was installed: rolling back to it would leave the node without ThemisDB"
            )
    with transaction.atomic():
        job = _create_job(
            node=node,
            user=user,
            kind=UpdateJob.Kind.ROLLBACK,
            point_id=point_id,
            restore_version=str((point or {}).get("version") or "")[:64],
            rollout=rollout,
        )
        job_enqueue(job, transport=transport)
    return job


def job_start_contract(
    *,
    node: Node,
    release: Release,
    user: Any,
    transport: NodeTransport | None = None,
    rollout: Any = None,
) -> UpdateJob:
    """Ask the node's agent to run the contract migrations of `release`, which it runs (the
    agent refuses if it runs another version). No window or consent gate: nothing is
    installed and the service is not restarted; the rollout decides when (every node of the
    cluster runs the release, plus its contract delay)."""
    with transaction.atomic():
        job = _create_job(
            node=node, user=user, kind=UpdateJob.Kind.CONTRACT, release=release, rollout=rollout
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
    restore_version: str = "",
    rollout: Any = None,
    state: str = S.QUEUED,
    wait_reason: str = "",
    plan: list[dict[str, Any]] | None = None,
) -> UpdateJob:
    job = UpdateJob(
        node=node,
        release=release,
        kind=kind,
        restore_point=point_id,
        restore_version=restore_version,
        created_by=user,
        rollout=rollout,
        state=state,
        wait_reason=wait_reason,
        plan=plan or [],
    )
    _store_job(job)
    return job


def _store_job(job: UpdateJob) -> None:
    """Insert a new job and its audit entry. No savepoint of its own: every caller runs this
    in its own atomic block, which a JobConflict leaves (rolling back to its savepoint)."""
    try:
        with transaction.atomic(savepoint=False):
            job.save(force_insert=True)
            event_log_many([_job_event(job)])
    except IntegrityError:
        raise JobConflict(f"node {job.node.node_id} already has an update in progress") from None


def _job_event(job: UpdateJob) -> Event:
    """The audit entry of a job just created."""
    plan, release = job.plan, job.release
    return new_event(
        verb=f"job.{job.kind}.{'queued' if job.state == S.QUEUED else 'waiting'}",
        actor=job.created_by,
        tenant=job.node.tenant_id,
        obj=job,
        details={
            "node_id": job.node.node_id,
            "version": release.version if release else None,
            "restore_point": job.restore_point or None,
            **({"restore_version": job.restore_version} if job.restore_version else {}),
            "rollout_id": job.rollout_id,
            "wait_reason": job.wait_reason or None,
            # Named only when the job installs more than its own release.
            **(
                {"plan": [f"{p['product']} {p['version']}" for p in plan]}
                if plan and len(plan) > 1
                else {}
            ),
        },
    )


def job_enqueue(
    job: UpdateJob,
    *,
    transport: NodeTransport | None = None,
    options: dict[str, Any] | None = None,
) -> NodeCommand:
    """Write the command that sends a QUEUED job to its node's agent, in the surrounding
    transaction; the relay sends it once that commits (and re-sends it until acknowledged).
    `transport` is the seam for the first send; the beat relay uses the default one."""
    # No savepoint: one INSERT, whose failure no caller catches (the caller's transaction
    # rolls back whole); a savepoint is two statements more for every node a drive starts.
    with transaction.atomic(savepoint=False):
        command = outbox.command_for_job(job, options=options)
    outbox.relay_after_commit(command, transport or default_transport())
    return command


def _acknowledge(jobs: QuerySet[UpdateJob], node_id: str, now: datetime) -> int:
    """A report for an active job: it acknowledges the job's command and keeps it alive,
    and the pages showing the job hear of it. Returns the job's pk, or 0 when the job is not
    active (a late report changes nothing)."""
    active = jobs.filter(state__in=UpdateJob.ACTIVE_STATES)
    found = active.values_list("pk", "rollout_id").first()
    if found is None:
        return 0
    job_id, rollout_id = found
    active.filter(acked_at__isnull=True).update(acked_at=now)
    active.update(last_report_at=now)
    outbox.commands_ack_for_job(job_id, now=now)
    announce(*job_topics(node_id, rollout_id))
    return int(job_id)


def _late_report(job_id: int, node_id: str, what: str, details: dict[str, Any]) -> None:
    """A report for a job a deadline or an operator already ended: kept for the record."""
    job = UpdateJob.objects.filter(pk=job_id, node__node_id=node_id, state=S.LOST).first()
    if job is None:
        return
    log.warning("job %s: %s from %s after it ended LOST; ignored", job_id, what, node_id)
    event_log(
        verb="job.late_report",
        actor_label=f"node:{node_id}",
        tenant=job.node.tenant_id,
        obj=job,
        details={"node_id": node_id, "report": what, **details},
    )


@dataclass(frozen=True)
class ByteFigures:
    """A download's figures as one progress report gives them."""

    done: int
    total: int | None
    per_second: int | None
    eta_seconds: int | None


def _record_bytes(jobs: QuerySet[UpdateJob], figures: ByteFigures, sequence: int | None) -> None:
    """The byte figures, whatever state the job is in by now: a download's last report can
    arrive after a later step's, or after the final report, and it still says what the node
    fetched. Ordered by their own sequence, so an overtaken report moves nothing back."""
    fields: dict[str, Any] = {
        "bytes_done": figures.done,
        "bytes_total": figures.total,
        "bytes_per_second": figures.per_second,
        "eta_seconds": figures.eta_seconds,
    }
    if sequence is not None:
        jobs = jobs.filter(bytes_sequence__lt=sequence)
        fields["bytes_sequence"] = sequence
    jobs.update(**fields)


def job_record_progress(
    *,
    job_id: int,
    node_id: str,
    step: str,
    percent: int = 0,
    bytes_done: int | None = None,
    bytes_total: int | None = None,
    bytes_per_second: int | None = None,
    eta_seconds: int | None = None,
    sequence: int | None = None,
    now: datetime | None = None,
) -> bool:
    """Record an agent's progress report; returns whether it was accepted.

    `sequence` (the report's, from the agent) orders reports that arrive out of order:
    within a state, one older than the report the job's figures came from moves nothing
    (a state only ever moves forward anyway)."""
    now = now or timezone.now()
    state = STEP_TO_STATE.get(step)
    if state is None and step not in ACK_STEPS:
        log.warning("job %s: unknown step %r from %s ignored", job_id, step, node_id)
        return False
    jobs = UpdateJob.objects.filter(pk=job_id, node__node_id=node_id)
    with transaction.atomic():
        if bytes_done is not None:
            figures = ByteFigures(bytes_done, bytes_total, bytes_per_second, eta_seconds)
            _record_bytes(jobs, figures, sequence)
        if not _acknowledge(jobs, node_id, now):
            _late_report(job_id, node_id, f"progress {step}", {"step": step})
            return False
        if state is None:
            return True  # an acknowledgement only: the job's state does not move
        fields: dict[str, Any] = {"step": step[:64], "progress_percent": max(0, min(100, percent))}
        if sequence is not None:
            fields["progress_sequence"] = sequence
        moved = jobs.filter(state__in=[s for s in _states_before(state) if s != state]).update(
            state=state, **fields
        )
        if moved:
            job = jobs.select_related("node").get()
            if job.started_at is None:
                jobs.update(started_at=now)
                Node.objects.filter(pk=job.node_id).update(status=Node.Status.UPDATING)
            event_log(
                verb=f"job.{state.lower()}",
                actor_label=f"node:{node_id}",
                tenant=job.node.tenant_id,
                obj=job,
                details={"step": step, "percent": percent},
            )
            return True
        same_state = jobs.filter(state=state)
        if sequence is not None:
            same_state = same_state.filter(progress_sequence__lt=sequence)
        return bool(same_state.update(**fields))


def _final_state(ok: bool, error_code: str, result: dict[str, Any], job: UpdateJob | None) -> str:
    if ok:
        return S.DONE
    if error_code == CANCELLED_CODE and job is not None and job.state == S.CANCELLING:
        return S.CANCELLED
    if error_code in ROLLED_BACK_CODES:
        return S.ROLLED_BACK
    if error_code == INTERRUPTED_CODE and job is not None and _back_where_it_started(job, result):
        return S.ROLLED_BACK
    return S.FAILED


def _back_where_it_started(job: UpdateJob, result: dict[str, Any]) -> bool:
    """After an interruption: recovery left the node on the version it had before the job."""
    if result.get("version_to"):
        return False
    before = result.get("version_from")
    installed = result.get("installed_version", job.node.installed_version)
    return bool(before) and before == installed


def job_finish(
    *,
    job_id: int,
    node_id: str,
    ok: bool,
    error_code: str = "",
    error_message: str = "",
    result: dict[str, Any] | None = None,
    now: datetime | None = None,
) -> UpdateJob | None:
    """Close a job from the agent's final report. Finished jobs stay finished."""
    now = now or timezone.now()
    result = result or {}
    jobs = UpdateJob.objects.filter(pk=job_id, node__node_id=node_id)
    with transaction.atomic():
        if not _acknowledge(jobs, node_id, now):
            log.warning("job %s: final report from %s ignored (not active)", job_id, node_id)
            _late_report(
                job_id,
                node_id,
                "final report",
                {"ok": ok, "error_code": error_code[:64], "version_to": result.get("version_to")},
            )
            return None
        current = jobs.select_related("node").first()
        final = _final_state(ok, error_code, result, current)
        closed = jobs.filter(state__in=UpdateJob.ACTIVE_STATES).update(
            state=final,
            progress_percent=100 if ok else 0,
            finished_at=now,
            error_code=error_code[:64],
            error_message=error_message[:4000],
            result=result,
        )
        if not closed:
            log.warning("job %s: final report from %s ignored (not active)", job_id, node_id)
            return None
        job = jobs.select_related("node", "release").get()
        _node_after_job(job, final, result)
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
                "version_from": result.get("version_from"),
                "version_to": result.get("version_to"),
                "rollout_id": job.rollout_id,
            },
        )
    return job


def job_heartbeat_refresh(*, job_id: int, node: Node, now: datetime) -> bool:
    """The node's heartbeat names this job as the one in hand: it is alive."""
    return bool(
        UpdateJob.objects.filter(pk=job_id, node=node, state__in=UpdateJob.ACTIVE_STATES).update(
            last_report_at=now
        )
    )


def job_end_by_operator(*, job: UpdateJob, user: Any, reason: str) -> bool:
    """An operator ends a stuck job (any active state): LOST, with who and why."""
    who = getattr(user, "username", "") or "an operator"
    return job_end_lost(
        job_id=job.pk,
        reason=f"ended by {who}: {reason}" if reason else f"ended by {who}",
        user=user,
        states=UpdateJob.ACTIVE_STATES,
    )


def _node_after_job(job: UpdateJob, final: str, result: dict[str, Any]) -> None:
    status = Node.Status.FAILED if final == S.FAILED else Node.Status.ONLINE
    fields: dict[str, Any] = {"status": status}
    steps = job.plan_steps
    version = result.get("version_to")
    # `version_to` is the server's version: a job of another component (a plan) says none.
    primary = job.release is None or job.release.product == PRIMARY_PRODUCT
    if final == S.DONE and isinstance(version, str) and primary:
        fields["installed_version"] = version[:64]
    schema = result.get("schema_version")
    if final == S.DONE and isinstance(schema, str) and schema:
        # An apply that migrated, or a contract: the node page shows it before the heartbeat.
        fields["schema_version"] = schema[:64]
    if final == S.DONE and steps:
        # Every step went on: the node page shows the new versions before the heartbeat.
        versions = {step.product: step.version for step in steps}
        if PRIMARY_PRODUCT in versions and "installed_version" not in fields:
            fields["installed_version"] = versions[PRIMARY_PRODUCT]
        NodeComponent.objects.record(
            node_id=job.node_id, versions=versions, now=timezone.now(), replace=False
        )
    Node.objects.filter(pk=job.node_id).update(**fields)


def job_cancel(*, job: UpdateJob, user: Any, transport: NodeTransport | None = None) -> str | None:
    """Cancel a job the agent has not started (queued or waiting). If its command never
    left, the job ends CANCELLED now. If it was sent, it may sit in the agent's queue or
    be starting: the job is CANCELLING and a cancel command asks the agent, which either
    had not started it (it never will; the job ends CANCELLED) or had (the job goes on).
    Returns the job's new state, or None when it had already started or ended."""
    not_started = [S.QUEUED, *UpdateJob.WAITING_STATES]
    with transaction.atomic():
        sent = NodeCommand.objects.filter(
            job_id=job.pk,
            kind__in=[NodeCommand.Kind.APPLY, NodeCommand.Kind.ROLLBACK, NodeCommand.Kind.CONTRACT],
            attempts__gt=0,
        ).exists()
        state = S.CANCELLING if sent else S.CANCELLED
        finished_at = None if sent else timezone.now()
        changed = UpdateJob.objects.filter(pk=job.pk, state__in=not_started).update(
            state=state, finished_at=finished_at
        )
        if not changed:
            return None
        NodeCommand.objects.filter(job_id=job.pk, state__in=NodeCommand.OPEN_STATES).update(
            state=NodeCommand.State.ABANDONED, last_error="job cancelled"
        )
        verb = "job.cancelling" if sent else "job.cancelled"
        event_log(verb=verb, actor=user, tenant=job.node.tenant_id, obj=job)
        announce(*job_topics(job.node.node_id, job.rollout_id))
        if sent:
            outbox.relay_after_commit(outbox.command_cancel(job), transport)
    return state
