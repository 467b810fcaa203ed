"""Rollouts: the coordinator's rules, as services.

A rollout's state lives in the database (Rollout, RolloutNode, StageDecision);
`rollout_drive` looks at it and takes the next steps, so any coordinator can
pick up a rollout where a dead one left it. One drive at a time per rollout:
a short lease claimed by conditional UPDATE.
"""

from __future__ import annotations

import logging
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from django.db import transaction
from django.db.models import Q
from django.utils import timezone

from updates.audit import event_log
from updates.jobs import services as jobs
from updates.jobs.transport import NodeTransport, default_transport
from updates.models import Cluster, Node, Release, Rollout, RolloutNode, StageDecision, UpdateJob
from updates.rollouts.plan import DEFAULT_STAGES, NodeInfo, PlanError, plan_rollout
from updates.rollouts.rollback_plan import rollback_step, tenant_rollback_plan

log = logging.getLogger(__name__)

R = Rollout.State
RN = RolloutNode.State
LEASE_SECONDS = 30

DEFAULT_OPTIONS: dict[str, Any] = {
    "max_unavailable": 1,
    "parallel": False,
    "health_timeout": 30,
    "rollback_on_failure": True,
    "stages": [{"fraction": f, "auto_promote": False} for f in DEFAULT_STAGES],
    "gate": {"max_error_rate": 0.05, "max_p99_ms": 500.0, "automatic": False, "bake_seconds": 0},
}

# Hooks the coordinator calls; tests and the tenants app may replace them.
GateFn = Callable[[Node, Release, datetime], Any]
SwitchFn = Callable[[Cluster, str, Rollout], None]


class RolloutError(Exception):
    """The request cannot be done in the rollout's current state."""


@dataclass
class DriveContext:
    transport: NodeTransport | None = None
    now: datetime | None = None
    gate: GateFn | None = None
    switch: SwitchFn | None = None


# ------------------------------------------------------------------ creation


def node_infos(nodes: list[Node]) -> list[NodeInfo]:
    return [
        NodeInfo(
            pk=n.pk,
            node_id=n.node_id,
            cluster_id=n.cluster_id,
            is_leader=n.raft_role == Node.RaftRole.LEADER,
            installed_version=n.installed_version,
            color=n.color,
        )
        for n in nodes
    ]


def merged_options(options: dict[str, Any] | None) -> dict[str, Any]:
    merged = {**DEFAULT_OPTIONS, **(options or {})}
    merged["gate"] = {**DEFAULT_OPTIONS["gate"], **(options or {}).get("gate", {})}
    return merged


def rollout_preview(
    *, release: Release, strategy: str, nodes: list[Node], options: dict[str, Any] | None = None
) -> Any:
    """The plan as it would run, without saving anything (shown before start)."""
    opts = merged_options(options)
    idle = _idle_color(nodes) if strategy == Rollout.Strategy.BLUE_GREEN else ""
    return plan_rollout(
        strategy,
        release.version,
        node_infos(nodes),
        stages=[s["fraction"] for s in opts["stages"]],
        idle_color=idle,
    )


def _idle_color(nodes: list[Node]) -> str:
    clusters = {n.cluster for n in nodes if n.cluster is not None}
    if len(clusters) != 1:
        raise PlanError("blue/green targets exactly one cluster")
    active = next(iter(clusters)).active_color
    if active not in {"blue", "green"}:
        raise PlanError("blue/green: the cluster has no active colour (blue or green)")
    return "green" if active == "blue" else "blue"


@transaction.atomic
def rollout_create(
    *,
    release: Release,
    strategy: str,
    nodes: list[Node],
    user: Any,
    target: dict[str, Any] | None = None,
    options: dict[str, Any] | None = None,
    name: str = "",
) -> Rollout:
    if release.state != Release.State.PUBLISHED:
        raise PlanError(f"release {release.version} is {release.state}: no new rollouts")
    plan = rollout_preview(release=release, strategy=strategy, nodes=nodes, options=options)
    tenants = {n.tenant_id for n in nodes}
    clusters = {n.cluster_id for n in nodes}
    rollout = Rollout.objects.create(
        release=release,
        strategy=strategy,
        name=name,
        target=target or {},
        tenant_id=next(iter(tenants)) if len(tenants) == 1 else None,
        cluster_id=next(iter(clusters)) if len(clusters) == 1 else None,
        options=merged_options(options),
        created_by=user,
    )
    RolloutNode.objects.bulk_create(
        RolloutNode(
            rollout=rollout,
            node_id=p.node.pk,
            position=p.position,
            stage=p.stage,
            is_leader=p.node.is_leader,
            version_before=p.node.installed_version,
        )
        for p in plan.nodes
    )
    event_log(
        verb="rollout.created",
        actor=user,
        tenant=rollout.tenant_id,
        obj=rollout,
        details=_summary(rollout, nodes_total=len(plan.nodes), stages=plan.stage_sizes),
    )
    return rollout


def _summary(rollout: Rollout, **extra: Any) -> dict[str, Any]:
    return {
        "rollout_id": rollout.pk,
        "strategy": rollout.strategy,
        "release_version": rollout.release.version,
        "stage": rollout.current_stage,
        **extra,
    }


# --------------------------------------------------------------- operator actions


def _transition(rollout: Rollout, allowed: tuple[str, ...], to: str, **fields: Any) -> None:
    moved = Rollout.objects.filter(pk=rollout.pk, state__in=allowed).update(state=to, **fields)
    if not moved:
        rollout.refresh_from_db()
        raise RolloutError(f"rollout {rollout.pk} is {rollout.state}: cannot go to {to}")
    rollout.refresh_from_db()


def _decide(rollout: Rollout, decision: str, user: Any, label: str = "", **details: Any) -> None:
    StageDecision.objects.create(
        rollout=rollout,
        stage=rollout.current_stage,
        decision=decision,
        decided_by=user,
        decided_by_label=label or (user.get_username() if user else "system"),
        details=details,
    )


def _operator_action(
    rollout: Rollout,
    user: Any,
    allowed: tuple[str, ...],
    to: str,
    decision: str,
    *,
    drive: bool = True,
    error_message: str | None = None,
    **details: Any,
) -> Rollout:
    """A person's decision: conditional transition, StageDecision, Event, wake-up."""
    fields = {"error_message": error_message} if error_message is not None else {}
    _transition(rollout, allowed, to, **fields)
    _decide(rollout, decision, user, **details)
    event_log(
        verb=f"rollout.{decision}",
        actor=user,
        tenant=rollout.tenant_id,
        obj=rollout,
        details=_summary(rollout, **details),
    )
    if drive:
        jobs.wake_rollout_after_commit(rollout.pk, debounce=False)
    return rollout


@transaction.atomic
def rollout_start(*, rollout: Rollout, user: Any) -> Rollout:
    _transition(rollout, (R.PLANNED,), R.RUNNING, started_at=timezone.now())
    _decide(rollout, "started", user)
    event_log(
        verb="rollout.started",
        actor=user,
        tenant=rollout.tenant_id,
        obj=rollout,
        details=_summary(rollout, nodes_total=rollout.plan.count()),
    )
    jobs.wake_rollout_after_commit(rollout.pk, debounce=False)
    return rollout


@transaction.atomic
def rollout_approve(*, rollout: Rollout, user: Any) -> Rollout:
    """Promote a canary to its next stage: a responder's or operator's call."""
    _transition(rollout, (R.AWAITING_APPROVAL,), R.RUNNING)
    _decide(rollout, "approved", user, to_stage=rollout.current_stage + 1)
    Rollout.objects.filter(pk=rollout.pk).update(current_stage=rollout.current_stage + 1)
    rollout.refresh_from_db()
    event_log(
        verb="rollout.promoted",
        actor=user,
        tenant=rollout.tenant_id,
        obj=rollout,
        details=_summary(rollout, approved_by=user.get_username()),
    )
    jobs.wake_rollout_after_commit(rollout.pk, debounce=False)
    return rollout


@transaction.atomic
def rollout_pause(*, rollout: Rollout, user: Any) -> Rollout:
    return _operator_action(
        rollout, user, (R.RUNNING, R.AWAITING_APPROVAL), R.PAUSED, "paused", drive=False
    )


@transaction.atomic
def rollout_resume(*, rollout: Rollout, user: Any) -> Rollout:
    return _operator_action(rollout, user, (R.PAUSED,), R.RUNNING, "resumed")


@transaction.atomic
def rollout_cancel(*, rollout: Rollout, user: Any) -> Rollout:
    """Stop starting nodes; those in flight finish (or roll back) on their own."""
    allowed = (R.PLANNED, R.RUNNING, R.AWAITING_APPROVAL, R.PAUSED)
    return _operator_action(rollout, user, allowed, R.CANCELLING, "cancelled")


@transaction.atomic
def rollout_abort(*, rollout: Rollout, user: Any, reason: str = "aborted by operator") -> Rollout:
    """Stop, and roll back every node the rollout touched."""
    allowed = (R.PLANNED, R.RUNNING, R.AWAITING_APPROVAL, R.PAUSED, R.CANCELLING)
    return _operator_action(
        rollout, user, allowed, R.ABORTING, "aborted", error_message=reason, reason=reason
    )


@transaction.atomic
def rollout_retry_failed(*, rollout: Rollout, user: Any) -> int:
    """Give the failed nodes of a finished rollout another go."""
    failed = RolloutNode.objects.filter(rollout=rollout, state__in=[RN.FAILED, RN.ROLLED_BACK])
    count = failed.count()
    if not count:
        raise RolloutError("no failed nodes to retry")
    _transition(
        rollout, (R.FAILED, R.COMPLETED, R.CANCELLED), R.RUNNING, finished_at=None, error_message=""
    )
    stages = failed.values_list("stage", flat=True)
    for row in failed:
        RolloutNode.objects.filter(pk=row.pk).update(
            state=RN.PENDING, job=None, attempts=row.attempts + 1
        )
    RolloutNode.objects.filter(rollout=rollout, state=RN.SKIPPED, job__isnull=True).update(
        state=RN.PENDING
    )
    Rollout.objects.filter(pk=rollout.pk).update(current_stage=min(stages, default=0))
    _decide(rollout, "retry", user, nodes=count)
    event_log(
        verb="rollout.retried",
        actor=user,
        tenant=rollout.tenant_id,
        obj=rollout,
        details=_summary(rollout, nodes=count),
    )
    jobs.wake_rollout_after_commit(rollout.pk, debounce=False)
    return count


# ------------------------------------------------------------------- the driver


def _claim(rollout_id: int, owner: str, now: datetime) -> bool:
    free = Q(lease_owner="") | Q(lease_expires__lt=now) | Q(lease_owner=owner)
    return bool(
        Rollout.objects.filter(Q(pk=rollout_id) & free).update(
            lease_owner=owner, lease_expires=now + timedelta(seconds=LEASE_SECONDS)
        )
    )


def _release(rollout_id: int, owner: str) -> None:
    Rollout.objects.filter(pk=rollout_id, lease_owner=owner).update(
        lease_owner="", lease_expires=None
    )


def rollout_drive(rollout_id: int, *, ctx: DriveContext | None = None) -> str:
    """Take the next steps of a rollout. Returns the rollout's state afterwards,
    or 'BUSY' when another coordinator holds its lease."""
    ctx = ctx or DriveContext()
    now = ctx.now or timezone.now()
    owner = f"drive-{uuid.uuid4().hex[:12]}"
    if not _claim(rollout_id, owner, now):
        return "BUSY"
    try:
        rollout = Rollout.objects.select_related("release").get(pk=rollout_id)
        _sync_rows(rollout)
        handler = _HANDLERS.get(rollout.state)
        if handler is not None:
            handler(rollout, ctx, now)
        rollout.refresh_from_db(fields=["state"])
        return rollout.state
    finally:
        _release(rollout_id, owner)


JOB_TO_ROW = {
    UpdateJob.State.DONE: RN.DONE,
    UpdateJob.State.FAILED: RN.FAILED,
    UpdateJob.State.ROLLED_BACK: RN.ROLLED_BACK,
    UpdateJob.State.CANCELLED: RN.FAILED,
}


def _sync_rows(rollout: Rollout) -> None:
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


FINISHED_ROWS = (RN.DONE, RN.SKIPPED, RN.FAILED, RN.ROLLED_BACK)


def _drive_running(rollout: Rollout, ctx: DriveContext, now: datetime) -> None:
    # Targeted queries, not the whole plan: one drive per finished job must
    # cost the same for a 10-node and a 10,000-node rollout.
    plan = RolloutNode.objects.filter(rollout=rollout)
    if rollout.options.get("rollback_on_failure", True):
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


def _in_flight(rows: list[RolloutNode]) -> list[RolloutNode]:
    return [r for r in rows if r.state in (RN.RUNNING, RN.WAITING)]


def _start_next(
    rollout: Rollout,
    plan: Any,
    stage_plan: Any,
    ctx: DriveContext,
    now: datetime,
) -> None:
    opts = rollout.options
    per_cluster = max(1, int(opts.get("max_unavailable", 1)))
    in_flight = plan.filter(state__in=[RN.RUNNING, RN.WAITING])
    busy = Counter(c for c in in_flight.values_list("node__cluster_id", flat=True) if c)
    if rollout.strategy == Rollout.Strategy.ROLLING and not opts.get("parallel"):
        budget = per_cluster - in_flight.filter(stage=rollout.current_stage).count()
    else:
        budget = stage_plan.filter(state=RN.PENDING).count()
    max_parallel = int(opts.get("max_parallel") or 0)
    if max_parallel:
        # Fleet-wide cap on nodes updating at once, whatever the stage allows.
        budget = min(budget, max_parallel - in_flight.count())
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


def _cached_gate(gate: GateFn | None) -> GateFn | None:
    """Windows, blackouts and consent are per tenant: ask once per tenant per drive."""
    if gate is None:
        return None
    decisions: dict[int, Any] = {}

    def cached(*, node: Node, release: Release, at: datetime) -> Any:
        if node.tenant_id not in decisions:
            decisions[node.tenant_id] = gate(node=node, release=release, at=at)
        return decisions[node.tenant_id]

    return cached


def _leader_must_wait(leader: RolloutNode, plan: Any) -> bool:
    """The Raft leader goes last: every other node of its cluster first."""
    return bool(
        plan.filter(node__cluster_id=leader.node.cluster_id, is_leader=False)
        .exclude(state__in=[RN.DONE, RN.SKIPPED])
        .exists()
    )


def _start_row(
    rollout: Rollout, row: RolloutNode, ctx: DriveContext, now: datetime, gate: GateFn | None
) -> bool:
    if rollout.strategy == Rollout.Strategy.ROLLBACK:
        return _start_rollback_row(rollout, row, ctx)
    opts = rollout.options
    try:
        job = jobs.job_start_update(
            node=row.node,
            release=rollout.release,
            user=None,
            transport=ctx.transport,
            rollout=rollout,
            gate=gate,
            now=now,
            options={"health_timeout": opts.get("health_timeout", 30)},
        )
    except jobs.JobConflict as conflict:
        log.info("rollout %s: %s; will retry", rollout.pk, conflict)
        return False
    state = RN.WAITING if job.state in UpdateJob.WAITING_STATES else RN.RUNNING
    RolloutNode.objects.filter(pk=row.pk, state=RN.PENDING).update(state=state, job=job)
    row.state = state
    return True


def _stage_complete(
    rollout: Rollout, rows: list[RolloutNode], ctx: DriveContext, now: datetime
) -> None:
    stage = rollout.current_stage
    last_stage = max(r.stage for r in rows)
    if not StageDecision.objects.filter(
        rollout=rollout, stage=stage, decision="stage_completed"
    ).exists():
        _decide(rollout, "stage_completed", None, "coordinator")
        done = sum(r.state == RN.DONE for r in rows)
        event_log(
            verb="rollout.stage_completed",
            tenant=rollout.tenant_id,
            obj=rollout,
            details=_summary(rollout, nodes_done=done, nodes_total=len(rows)),
        )
    if stage >= last_stage:
        _finish(rollout, rows, ctx, now)
        return
    if rollout.strategy != Rollout.Strategy.CANARY:
        Rollout.objects.filter(pk=rollout.pk).update(current_stage=stage + 1)
        return
    if _baking(rollout, stage, now):
        return  # metrics of freshly updated nodes need time to mean something
    verdict = canary_gate(rollout, [r for r in rows if r.stage <= stage and r.state == RN.DONE])
    if not verdict.passed:
        _decide(rollout, "gate_failed", None, "gate", **verdict.as_dict())
        _fail(
            rollout,
            rows,
            f"health gate failed after stage {stage + 1}: {verdict.reason}",
            ctx,
            now,
            roll_back=True,
        )
        return
    _decide(rollout, "gate_passed", None, "gate", **verdict.as_dict())
    next_is_final = stage + 1 >= last_stage
    gate = rollout.options.get("gate", {})
    stages = rollout.options.get("stages", [])
    auto = (
        bool(gate.get("automatic"))
        if next_is_final
        else bool(stages[stage + 1].get("auto_promote") if stage + 1 < len(stages) else False)
    )
    if auto:
        _decide(rollout, "auto_promoted", None, "gate", to_stage=stage + 1)
        Rollout.objects.filter(pk=rollout.pk).update(current_stage=stage + 1)
        event_log(
            verb="rollout.promoted",
            tenant=rollout.tenant_id,
            obj=rollout,
            details=_summary(rollout, approved_by="gate (automatic)"),
        )
        return
    if Rollout.objects.filter(pk=rollout.pk, state=R.RUNNING).update(state=R.AWAITING_APPROVAL):
        event_log(
            verb="rollout.awaiting_approval",
            tenant=rollout.tenant_id,
            obj=rollout,
            details=_summary(rollout, next_stage=stage + 1, final=next_is_final),
        )


def _baking(rollout: Rollout, stage: int, now: datetime) -> bool:
    bake = int(rollout.options.get("gate", {}).get("bake_seconds") or 0)
    if bake <= 0:
        return False
    completed = (
        StageDecision.objects.filter(rollout=rollout, stage=stage, decision="stage_completed")
        .values_list("created_at", flat=True)
        .first()
    )
    return completed is not None and now < completed + timedelta(seconds=bake)


@dataclass(frozen=True)
class GateVerdict:
    passed: bool
    reason: str
    error_rate: float | None
    p99_ms: float | None
    unhealthy: list[str]

    def as_dict(self) -> dict[str, Any]:
        return {
            "reason": self.reason,
            "error_rate": self.error_rate,
            "p99_ms": self.p99_ms,
            "unhealthy": self.unhealthy,
        }


def canary_gate(rollout: Rollout, rows: list[RolloutNode]) -> GateVerdict:
    """Node-reported metrics of the updated canary nodes against the thresholds."""
    gate = rollout.options.get("gate", {})
    nodes = Node.objects.filter(pk__in=[r.node_id for r in rows])
    rates = [n.error_rate for n in nodes if n.error_rate is not None]
    p99s = [n.p99_latency_ms for n in nodes if n.p99_latency_ms is not None]
    unhealthy = [n.node_id for n in nodes if n.service_healthy is False or n.status != "online"]
    rate = max(rates) if rates else None
    p99 = max(p99s) if p99s else None
    problems = []
    if rate is not None and rate > float(gate.get("max_error_rate", 0.05)):
        problems.append(f"error rate {rate:.1%} above {float(gate['max_error_rate']):.1%}")
    if p99 is not None and p99 > float(gate.get("max_p99_ms", 500)):
        problems.append(f"p99 latency {p99:.0f} ms above {float(gate['max_p99_ms']):.0f} ms")
    if unhealthy:
        problems.append("unhealthy: " + ", ".join(unhealthy))
    reason = "; ".join(problems) or "within thresholds"
    return GateVerdict(not problems, reason, rate, p99, unhealthy)


def _finish(rollout: Rollout, rows: list[RolloutNode], ctx: DriveContext, now: datetime) -> None:
    if rollout.strategy == Rollout.Strategy.BLUE_GREEN and rollout.cluster_id:
        blue_green_switch(rollout=rollout, switch=ctx.switch, user=None)
    failed = [r for r in rows if r.state in (RN.FAILED, RN.ROLLED_BACK)]
    final = R.FAILED if failed else R.COMPLETED
    if Rollout.objects.filter(pk=rollout.pk, state=R.RUNNING).update(state=final, finished_at=now):
        verb = "rollout.failed" if failed else "rollout.completed"
        event_log(
            verb=verb,
            tenant=rollout.tenant_id,
            obj=rollout,
            details=_summary(
                rollout,
                nodes_done=sum(r.state == RN.DONE for r in rows),
                nodes_failed=len(failed),
                nodes_total=len(rows),
            ),
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
        moved = Rollout.objects.filter(pk=rollout.pk, state=R.RUNNING).update(
            state=R.ABORTING, error_message=reason
        )
        if moved:
            event_log(
                verb="rollout.failed",
                tenant=rollout.tenant_id,
                obj=rollout,
                details=_summary(rollout, reason=reason, rolling_back=True),
            )
        rollout.refresh_from_db()
        _drive_aborting(rollout, ctx, now)
        return
    if Rollout.objects.filter(pk=rollout.pk, state=R.RUNNING).update(
        state=R.FAILED, error_message=reason, finished_at=now
    ):
        event_log(
            verb="rollout.failed",
            tenant=rollout.tenant_id,
            obj=rollout,
            details=_summary(
                rollout,
                reason=reason,
                nodes_failed=sum(r.state in (RN.FAILED, RN.ROLLED_BACK) for r in rows),
            ),
        )


def _stop_starting(rollout: Rollout) -> list[RolloutNode]:
    """No new node starts: pending rows are skipped, parked jobs cancelled.
    Returns the plan as it stands afterwards."""
    RolloutNode.objects.filter(rollout=rollout, state=RN.PENDING).update(state=RN.SKIPPED)
    for row in _rows(rollout):
        if row.state == RN.WAITING and row.job_id:
            jobs.job_cancel(job=row.job, user=None)
    _sync_rows(rollout)
    return _rows(rollout)


def _drive_cancelling(rollout: Rollout, ctx: DriveContext, now: datetime) -> None:
    if not _in_flight(_stop_starting(rollout)) and Rollout.objects.filter(
        pk=rollout.pk, state=R.CANCELLING
    ).update(state=R.CANCELLED, finished_at=now):
        event_log(
            verb="rollout.cancelled_done",
            tenant=rollout.tenant_id,
            obj=rollout,
            details=_summary(rollout),
        )


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
    gate_failed = StageDecision.objects.filter(rollout=rollout, decision="gate_failed").exists()
    was_failure = (
        gate_failed
        or not StageDecision.objects.filter(rollout=rollout, decision="aborted").exists()
    )
    final = R.FAILED if was_failure else R.ABORTED
    if Rollout.objects.filter(pk=rollout.pk, state=R.ABORTING).update(state=final, finished_at=now):
        event_log(
            verb="rollout.rolled_back",
            tenant=rollout.tenant_id,
            obj=rollout,
            details=_summary(
                rollout,
                final_state=final,
                nodes_rolled_back=RolloutNode.objects.filter(
                    rollout=rollout, state=RN.ROLLED_BACK
                ).count(),
            ),
        )


_HANDLERS: dict[str, Callable[[Rollout, DriveContext, datetime], None]] = {
    R.RUNNING: _drive_running,
    R.CANCELLING: _drive_cancelling,
    R.ABORTING: _drive_aborting,
}


# ------------------------------------------------------------------ blue/green


def default_switch(cluster: Cluster, color: str, rollout: Rollout | None) -> None:
    """Record the switch and tell every node of the cluster its new role."""

    transport = default_transport()
    for node in cluster.nodes.all():
        role = "active" if node.color == color else "standby"
        transaction.on_commit(
            lambda n=node.node_id, r=role: transport.set_traffic_role(n, r)  # type: ignore[attr-defined]
        )


def blue_green_switch(
    *,
    rollout: Rollout | None,
    switch: SwitchFn | None,
    user: Any,
    cluster: Cluster | None = None,
    to_color: str | None = None,
) -> str:
    """Make the other colour active (after its update, or to switch back)."""
    cluster = cluster or rollout.cluster if rollout else cluster
    assert cluster is not None
    old = cluster.active_color
    new = to_color or ("green" if old == "blue" else "blue")
    (switch or default_switch)(cluster, new, rollout)
    Cluster.objects.filter(pk=cluster.pk).update(active_color=new)
    event_log(
        verb="bluegreen.switched",
        actor=user,
        tenant=cluster.tenant_id,
        obj=cluster,
        details={"from": old, "to": new, "rollout_id": rollout.pk if rollout else None},
    )
    return new


# ------------------------------------------------------------------ read helpers


def rollout_progress(rollout: Rollout) -> dict[str, Any]:
    """Nodes updated / total, current node, status (the seed's progress callback)."""
    counts = Counter(RolloutNode.objects.filter(rollout=rollout).values_list("state", flat=True))
    current = (
        RolloutNode.objects.filter(rollout=rollout, state__in=[RN.RUNNING, RN.WAITING])
        .select_related("node")
        .order_by("position")
        .first()
    )
    return {
        "nodes_updated": counts.get(RN.DONE, 0),
        "nodes_total": sum(counts.values()),
        "current_node": current.node.node_id if current else None,
        "status": rollout.state,
        "counts": dict(counts),
    }


def active_rollout_ids() -> list[int]:
    return list(
        Rollout.objects.filter(state__in=Rollout.ACTIVE_STATES).values_list("pk", flat=True)
    )


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


@transaction.atomic
def tenant_rollback_start(*, tenant: Any, user: Any) -> Rollout:
    """Roll every node of a tenant back to its previous release: a rolling
    rollout of rollback jobs (one node per cluster at a time, leaders last)."""

    steps = [s for s in tenant_rollback_plan(tenant) if s.restore_point]
    if not steps:
        raise PlanError(f"no node of {tenant.name} has an earlier release to go back to")
    versions = Counter(s.installed_version for s in steps)
    current = Release.objects.filter(version=versions.most_common(1)[0][0]).first()
    if current is None:
        raise PlanError("the installed version is not a published release here")
    rollout = Rollout.objects.create(
        release=current,
        strategy=Rollout.Strategy.ROLLBACK,
        tenant=tenant,
        name=f"roll back {tenant.name}",
        target={"tenant": tenant.name},
        options=merged_options({"max_unavailable": 1}),
        created_by=user,
    )
    RolloutNode.objects.bulk_create(
        RolloutNode(
            rollout=rollout,
            node=s.node,
            position=i,
            stage=0,
            is_leader=s.node.raft_role == Node.RaftRole.LEADER,
            version_before=s.installed_version,
        )
        for i, s in enumerate(steps)
    )
    event_log(
        verb="rollout.created",
        actor=user,
        tenant=tenant,
        obj=rollout,
        details=_summary(rollout, nodes_total=len(steps), rollback=True),
    )
    return rollout_start(rollout=rollout, user=user)
