"""The coordinator: `rollout_drive` takes a rollout's next steps from its stored state.
Owns the lease, syncing plan rows with job outcomes, starting nodes, stage
completion, finishing, failing, cancelling and aborting. Calls updates.jobs,
`gate`, `bluegreen` and `records`; never the operator actions in `services`.
"""

from __future__ import annotations

import logging
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from django.db import models
from django.db.models import Q, QuerySet
from django.utils import timezone

from tenants.gate import GateDecision, GateFn
from updates.jobs import services as jobs
from updates.jobs.transport import NodeTransport
from updates.models import Node, Release, Rollout, RolloutNode, StageDecision, UpdateJob
from updates.rollouts.bluegreen import SwitchFn, blue_green_switch
from updates.rollouts.gate import baking, canary_gate
from updates.rollouts.records import Decision, record_decision, rollout_event
from updates.rollouts.rollback_plan import rollback_step

log = logging.getLogger(__name__)

R = Rollout.State
RN = RolloutNode.State
LEASE_SECONDS = 30
FINISHED_ROWS = (RN.DONE, RN.SKIPPED, RN.FAILED, RN.ROLLED_BACK)

JOB_TO_ROW = {
    UpdateJob.State.DONE: RN.DONE,
    UpdateJob.State.FAILED: RN.FAILED,
    UpdateJob.State.ROLLED_BACK: RN.ROLLED_BACK,
    UpdateJob.State.CANCELLED: RN.FAILED,
}


class DriveOutcome(models.TextChoices):
    """What `rollout_drive` returns: BUSY (another coordinator holds the lease)
    or the rollout's state after the drive (same values as Rollout.State)."""

    BUSY = "BUSY"
    PLANNED = "PLANNED"
    RUNNING = "RUNNING"
    AWAITING_APPROVAL = "AWAITING_APPROVAL"
    PAUSED = "PAUSED"
    CANCELLING = "CANCELLING"
    ABORTING = "ABORTING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"
    ABORTED = "ABORTED"


@dataclass
class DriveContext:
    """Hooks a drive uses; tests replace them, None means the real one."""

    transport: NodeTransport | None = None
    now: datetime | None = None
    gate: GateFn | None = None
    switch: SwitchFn | None = None


# --------------------------------------------------------------------- the lease


def claim_lease(rollout_id: int, owner: str, now: datetime) -> bool:
    free = Q(lease_owner="") | Q(lease_expires__lt=now) | Q(lease_owner=owner)
    return bool(
        Rollout.objects.filter(Q(pk=rollout_id) & free).update(
            lease_owner=owner, lease_expires=now + timedelta(seconds=LEASE_SECONDS)
        )
    )


def release_lease(rollout_id: int, owner: str) -> None:
    Rollout.objects.filter(pk=rollout_id, lease_owner=owner).update(
        lease_owner="", lease_expires=None
    )


# --------------------------------------------------------------------- the drive


def rollout_drive(rollout_id: int, *, ctx: DriveContext | None = None) -> DriveOutcome:
    """Take the next steps of a rollout. Returns the rollout's state afterwards,
    or BUSY when another coordinator holds its lease."""
    ctx = ctx or DriveContext()
    now = ctx.now or timezone.now()
    owner = f"drive-{uuid.uuid4().hex[:12]}"
    if not claim_lease(rollout_id, owner, now):
        return DriveOutcome.BUSY
    try:
        rollout = Rollout.objects.select_related("release").get(pk=rollout_id)
        sync_rows(rollout)
        handler = _HANDLERS.get(rollout.state)
        if handler is not None:
            handler(rollout, ctx, now)
        rollout.refresh_from_db(fields=["state"])
        return DriveOutcome(rollout.state)
    finally:
        release_lease(rollout_id, owner)


def sync_rows(rollout: Rollout) -> None:
    """Carry job outcomes into the plan, in a few set-wise conditional UPDATEs
    (a row moves once; the database picks the rows, however many are in flight)."""
    active = RolloutNode.objects.filter(rollout=rollout, state__in=[RN.RUNNING, RN.WAITING])
    for job_state, row_state in JOB_TO_ROW.items():
        active.filter(job__state=job_state).update(state=row_state)
    active.filter(state=RN.RUNNING, job__state__in=UpdateJob.WAITING_STATES).update(
        state=RN.WAITING
    )
    active.filter(state=RN.WAITING).exclude(job__state__in=UpdateJob.WAITING_STATES).exclude(
        job__state__in=list(JOB_TO_ROW)
    ).update(state=RN.RUNNING)


def _rows(rollout: Rollout) -> list[RolloutNode]:
    return list(
        RolloutNode.objects.filter(rollout=rollout)
        .select_related("node", "job")
        .order_by("position")
    )


def _in_flight(rows: list[RolloutNode]) -> list[RolloutNode]:
    return [r for r in rows if r.state in (RN.RUNNING, RN.WAITING)]


def _drive_running(rollout: Rollout, ctx: DriveContext, now: datetime) -> None:
    # Targeted queries, not the whole plan: one drive per finished job must
    # cost the same for a 10-node and a 10,000-node rollout.
    plan = RolloutNode.objects.filter(rollout=rollout)
    if rollout.opts.rollback_on_failure:
        failed = plan.filter(state__in=[RN.FAILED, RN.ROLLED_BACK]).select_related("node").first()
        if failed is not None:
            _fail(
                rollout, _rows(rollout), f"node {failed.node.node_id} failed its update", ctx, now
            )
            return
    stage_plan = plan.filter(stage=rollout.current_stage)
    _start_next(rollout, plan, stage_plan, ctx, now)
    if not stage_plan.exclude(state__in=FINISHED_ROWS).exists():
        _stage_complete(rollout, _rows(rollout), ctx, now)


# ---------------------------------------------------------------- starting nodes


def _start_next(
    rollout: Rollout,
    plan: QuerySet[RolloutNode],
    stage_plan: QuerySet[RolloutNode],
    ctx: DriveContext,
    now: datetime,
) -> None:
    opts = rollout.opts
    per_cluster = max(1, opts.max_unavailable)
    in_flight = plan.filter(state__in=[RN.RUNNING, RN.WAITING])
    busy = Counter(c for c in in_flight.values_list("node__cluster_id", flat=True) if c)
    if rollout.strategy == Rollout.Strategy.ROLLING and not opts.parallel:
        budget = per_cluster - in_flight.filter(stage=rollout.current_stage).count()
    else:
        budget = stage_plan.filter(state=RN.PENDING).count()
    if opts.max_parallel:
        # Fleet-wide cap on nodes updating at once, whatever the stage allows.
        budget = min(budget, opts.max_parallel - in_flight.count())
    if budget <= 0:
        return
    # A few more candidates than the budget: some may wait for their cluster.
    candidates = stage_plan.filter(state=RN.PENDING).select_related("node", "node__tenant")
    gate = _cached_gate(ctx.gate or jobs.default_gate())
    for row in candidates.order_by("position")[: budget + 64]:
        if budget <= 0:
            break
        cluster = row.node.cluster_id
        if cluster and busy[cluster] >= per_cluster:
            continue
        if row.is_leader and _leader_must_wait(row, plan):
            continue
        if _start_row(rollout, row, ctx, now, gate):
            budget -= 1
            if cluster:
                busy[cluster] += 1


def _cached_gate(gate: GateFn) -> GateFn:
    """Windows, blackouts and consent are per tenant: ask once per tenant per drive."""
    decisions: dict[int, GateDecision] = {}

    def cached(*, node: Node, release: Release | None, at: datetime | None = None) -> GateDecision:
        if node.tenant_id not in decisions:
            decisions[node.tenant_id] = gate(node=node, release=release, at=at)
        return decisions[node.tenant_id]

    return cached


def _leader_must_wait(leader: RolloutNode, plan: QuerySet[RolloutNode]) -> bool:
    """The Raft leader goes last: every other node of its cluster first."""
    cluster_id = leader.node.cluster_id
    # A leader outside any cluster waits for the other nodes outside any cluster.
    same_cluster = (
        Q(node__cluster__isnull=True) if cluster_id is None else Q(node__cluster_id=cluster_id)
    )
    return bool(
        plan.filter(same_cluster, is_leader=False).exclude(state__in=[RN.DONE, RN.SKIPPED]).exists()
    )


def _start_row(
    rollout: Rollout, row: RolloutNode, ctx: DriveContext, now: datetime, gate: GateFn
) -> bool:
    if rollout.strategy == Rollout.Strategy.ROLLBACK:
        return _start_rollback_row(rollout, row, ctx)
    try:
        job = jobs.job_start_update(
            node=row.node,
            release=rollout.release,
            user=None,
            transport=ctx.transport,
            rollout=rollout,
            gate=gate,
            now=now,
            options={"health_timeout": rollout.opts.health_timeout},
        )
    except jobs.JobConflict as conflict:
        log.info("rollout %s: %s; will retry", rollout.pk, conflict)
        return False
    state = RN.WAITING if job.state in UpdateJob.WAITING_STATES else RN.RUNNING
    RolloutNode.objects.filter(pk=row.pk, state=RN.PENDING).update(state=state, job=job)
    row.state = state
    return True


def _start_rollback_row(rollout: Rollout, row: RolloutNode, ctx: DriveContext) -> bool:
    step = rollback_step(row.node, busy=False)
    if step.restore_point is None:
        RolloutNode.objects.filter(pk=row.pk, state=RN.PENDING).update(state=RN.SKIPPED)
        return False
    try:
        job = jobs.job_start_rollback(
            node=row.node,
            point_id=step.restore_point,
            user=None,
            transport=ctx.transport,
            rollout=rollout,
        )
    except jobs.JobConflict as conflict:
        log.info("rollout %s: %s; will retry", rollout.pk, conflict)
        return False
    RolloutNode.objects.filter(pk=row.pk, state=RN.PENDING).update(state=RN.RUNNING, job=job)
    return True


# -------------------------------------------------------------- stage completion


def _stage_complete(
    rollout: Rollout, rows: list[RolloutNode], ctx: DriveContext, now: datetime
) -> None:
    stage = rollout.current_stage
    last_stage = max(r.stage for r in rows)
    if not StageDecision.objects.filter(
        rollout=rollout, stage=stage, decision=Decision.STAGE_COMPLETED
    ).exists():
        record_decision(rollout, Decision.STAGE_COMPLETED, None, "coordinator")
        done = sum(r.state == RN.DONE for r in rows)
        rollout_event(rollout, "rollout.stage_completed", nodes_done=done, nodes_total=len(rows))
    if stage >= last_stage:
        _finish(rollout, rows, ctx, now)
        return
    if rollout.strategy != Rollout.Strategy.CANARY:
        Rollout.objects.filter(pk=rollout.pk).update(current_stage=stage + 1)
        return
    if baking(rollout, stage, now):
        return
    verdict = canary_gate(rollout, [r for r in rows if r.stage <= stage and r.state == RN.DONE])
    if not verdict.passed:
        record_decision(rollout, Decision.GATE_FAILED, None, "gate", **verdict.as_dict())
        _fail(
            rollout,
            rows,
            f"health gate failed after stage {stage + 1}: {verdict.reason}",
            ctx,
            now,
            roll_back=True,
        )
        return
    record_decision(rollout, Decision.GATE_PASSED, None, "gate", **verdict.as_dict())
    next_is_final = stage + 1 >= last_stage
    if _promotes_itself(rollout, stage + 1, final=next_is_final):
        record_decision(rollout, Decision.AUTO_PROMOTED, None, "gate", to_stage=stage + 1)
        Rollout.objects.filter(pk=rollout.pk).update(current_stage=stage + 1)
        rollout_event(rollout, "rollout.promoted", approved_by="gate (automatic)")
        return
    if Rollout.objects.transition(rollout.pk, (R.RUNNING,), R.AWAITING_APPROVAL):
        rollout_event(
            rollout, "rollout.awaiting_approval", next_stage=stage + 1, final=next_is_final
        )


def _promotes_itself(rollout: Rollout, next_stage: int, *, final: bool) -> bool:
    """Into the final stage only with the automatic gate; into the others when
    that stage is marked auto_promote."""
    opts = rollout.opts
    if final:
        return opts.gate.automatic
    return next_stage < len(opts.stages) and opts.stages[next_stage].auto_promote


# ------------------------------------------------------------- finishing, failing


def _finish(rollout: Rollout, rows: list[RolloutNode], ctx: DriveContext, now: datetime) -> None:
    if rollout.strategy == Rollout.Strategy.BLUE_GREEN and rollout.cluster_id:
        blue_green_switch(rollout=rollout, switch=ctx.switch, user=None)
    failed = [r for r in rows if r.state in (RN.FAILED, RN.ROLLED_BACK)]
    final = R.FAILED if failed else R.COMPLETED
    if Rollout.objects.transition(rollout.pk, (R.RUNNING,), final, finished_at=now):
        rollout_event(
            rollout,
            "rollout.failed" if failed else "rollout.completed",
            nodes_done=sum(r.state == RN.DONE for r in rows),
            nodes_failed=len(failed),
            nodes_total=len(rows),
        )


def _fail(
    rollout: Rollout,
    rows: list[RolloutNode],
    reason: str,
    ctx: DriveContext,
    now: datetime,
    *,
    roll_back: bool = False,
) -> None:
    """Stop starting nodes. A canary (or an abort) also rolls back what it touched."""
    RolloutNode.objects.filter(rollout=rollout, state=RN.PENDING).update(state=RN.SKIPPED)
    if roll_back or rollout.strategy == Rollout.Strategy.CANARY:
        if Rollout.objects.transition(rollout.pk, (R.RUNNING,), R.ABORTING, error_message=reason):
            rollout_event(rollout, "rollout.failed", reason=reason, rolling_back=True)
        rollout.refresh_from_db()
        _drive_aborting(rollout, ctx, now)
        return
    if Rollout.objects.transition(
        rollout.pk, (R.RUNNING,), R.FAILED, error_message=reason, finished_at=now
    ):
        rollout_event(
            rollout,
            "rollout.failed",
            reason=reason,
            nodes_failed=sum(r.state in (RN.FAILED, RN.ROLLED_BACK) for r in rows),
        )


# ---------------------------------------------------------- cancelling, aborting


def _stop_starting(rollout: Rollout) -> list[RolloutNode]:
    """No new node starts: pending rows are skipped, parked jobs cancelled.
    Returns the plan as it stands afterwards."""
    RolloutNode.objects.filter(rollout=rollout, state=RN.PENDING).update(state=RN.SKIPPED)
    for row in _rows(rollout):
        if row.state == RN.WAITING and row.job is not None:
            jobs.job_cancel(job=row.job, user=None)
    sync_rows(rollout)
    return _rows(rollout)


def _drive_cancelling(rollout: Rollout, ctx: DriveContext, now: datetime) -> None:
    if not _in_flight(_stop_starting(rollout)) and Rollout.objects.transition(
        rollout.pk, (R.CANCELLING,), R.CANCELLED, finished_at=now
    ):
        rollout_event(rollout, "rollout.cancelled_done")


def _drive_aborting(rollout: Rollout, ctx: DriveContext, now: datetime) -> None:
    """Wait for nodes in flight, then roll back every node this rollout updated."""
    rows = _stop_starting(rollout)
    if _in_flight(rows):
        return
    pending_rollbacks = False
    for row in rows:
        # A rollback rollout that is stopped keeps what it restored.
        if row.state != RN.DONE or rollout.strategy == Rollout.Strategy.ROLLBACK:
            continue
        rollback_job = (
            UpdateJob.objects.filter(rollout=rollout, node_id=row.node_id, kind="rollback")
            .order_by("-pk")
            .first()
        )
        if rollback_job is None:
            point = (row.job.result or {}).get("restore_point", "") if row.job else ""
            try:
                jobs.job_start_rollback(
                    node=row.node,
                    point_id=point,
                    user=None,
                    transport=ctx.transport,
                    rollout=rollout,
                    require_known_point=False,
                )
            except jobs.JobConflict as conflict:
                log.info("rollout %s: rollback of %s waits: %s", rollout.pk, row.node, conflict)
            pending_rollbacks = True
        elif rollback_job.state == UpdateJob.State.DONE:
            RolloutNode.objects.filter(pk=row.pk, state=RN.DONE).update(state=RN.ROLLED_BACK)
        elif rollback_job.is_active:
            pending_rollbacks = True
        else:
            pending_rollbacks = False  # a failed rollback is reported, not retried forever
    if pending_rollbacks:
        return
    decisions = StageDecision.objects.filter(rollout=rollout)
    # A rollback the operator asked for ends ABORTED; one the gate or a failed
    # node caused ends FAILED.
    was_failure = (
        decisions.filter(decision=Decision.GATE_FAILED).exists()
        or not decisions.filter(decision=Decision.ABORTED).exists()
    )
    final = R.FAILED if was_failure else R.ABORTED
    if Rollout.objects.transition(rollout.pk, (R.ABORTING,), final, finished_at=now):
        rollout_event(
            rollout,
            "rollout.rolled_back",
            final_state=final,
            nodes_rolled_back=RolloutNode.objects.filter(
                rollout=rollout, state=RN.ROLLED_BACK
            ).count(),
        )


_HANDLERS: dict[str, Callable[[Rollout, DriveContext, datetime], None]] = {
    R.RUNNING: _drive_running,
    R.CANCELLING: _drive_cancelling,
    R.ABORTING: _drive_aborting,
}
