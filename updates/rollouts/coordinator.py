"""The coordinator: `rollout_drive` takes a rollout's next steps from its stored state.
Owns the lease, syncing plan rows with job outcomes, starting nodes, stage
completion, the contract step (expand/contract), finishing, failing, cancelling and
aborting. Calls updates.jobs, `gate`, `bluegreen`, `schema_steps` and `records`; never
the operator actions in `services`.

A drive is fenced: claiming the lease bumps `Rollout.lease_generation`, and each
step of the drive is one transaction that first renews the lease with an UPDATE
conditional on this drive's owner and generation (and on the rollout's state),
then writes everything the step causes (job, outbox command, plan row, decision).
A drive that lost its lease, or whose rollout an operator paused, cancelled or
aborted, stops at its next step having written nothing more.
"""

from __future__ import annotations

import logging
import uuid
from collections import Counter, deque
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import partial
from typing import Any, TypeVar

from django.db import models, transaction
from django.db.models import (
    Case,
    Count,
    ExpressionWrapper,
    F,
    Q,
    QuerySet,
    Subquery,
    Value,
    When,
)
from django.db.models.expressions import CombinedExpression
from django.db.models.functions import Coalesce, Now
from django.utils import timezone

from tenants.gate import GateDecision, GateFn
from updates.jobs import outbox
from updates.jobs import services as jobs
from updates.jobs.selectors import PlanResolver
from updates.jobs.transport import NodeTransport
from updates.models import Cluster, Node, Release, Rollout, RolloutNode, StageDecision, UpdateJob
from updates.rollouts.bluegreen import SwitchFn, blue_green_switch
from updates.rollouts.gate import baking, canary_gate
from updates.rollouts.records import Decision, record_decision, rollout_event
from updates.rollouts.rollback_plan import rollback_step
from updates.rollouts.schema_steps import ContractGroup, contract_versions, runs_at_least

log = logging.getLogger(__name__)

R = Rollout.State
RN = RolloutNode.State
CS = RolloutNode.ContractState
LEASE_SECONDS = 30
FINISHED_ROWS = (RN.DONE, RN.SKIPPED, RN.FAILED, RN.ROLLED_BACK)
# The other states, named rather than excluded: an index on (rollout, stage, state)
# finds them without reading the finished rows.
UNFINISHED_ROWS = (RN.PENDING, RN.WAITING, RN.RUNNING)
# Pending rows read per query when every pending row of the stage may start.
CANDIDATE_BATCH = 256
# The most nodes one step (one transaction) starts.
START_BATCH = 64

JOB_TO_ROW = {
    UpdateJob.State.DONE: RN.DONE,
    UpdateJob.State.FAILED: RN.FAILED,
    UpdateJob.State.ROLLED_BACK: RN.ROLLED_BACK,
    UpdateJob.State.CANCELLED: RN.FAILED,
    # Ended by a deadline or an operator: the rollout's failure policy applies.
    UpdateJob.State.LOST: RN.FAILED,
}

T = TypeVar("T")


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


class DriveStep(models.TextChoices):
    """The kinds of step a drive commits, one transaction each."""

    SYNC = "sync"
    FAIL = "fail"
    START_NODE = "start_node"
    STAGE = "stage"
    STOP_STARTING = "stop_starting"
    START_ROLLBACK = "start_rollback"
    ROLLED_BACK = "rolled_back"
    END = "end"
    # Expand/contract: a group's contract decided (scheduled or skipped), one node's
    # contract job started.
    CONTRACT = "contract"
    START_CONTRACT = "start_contract"


@dataclass
class DriveContext:
    """Hooks a drive uses; tests replace them, None means the real one.

    `before_commit(step)` runs inside each step's transaction just before it
    commits (raising there cuts the drive as a crash would: the step leaves
    nothing behind); `after_commit(step)` runs once a step has committed (another
    process acting between two steps)."""

    transport: NodeTransport | None = None
    now: datetime | None = None
    gate: GateFn | None = None
    switch: SwitchFn | None = None
    before_commit: Callable[[DriveStep], None] | None = None
    after_commit: Callable[[DriveStep], None] | None = None


# --------------------------------------------------------------------- the lease


@dataclass(frozen=True)
class Lease:
    """A drive's hold on a rollout: its owner name and fencing generation."""

    rollout_id: int
    owner: str
    generation: int


def _lease_deadline() -> ExpressionWrapper[CombinedExpression]:
    # The database's clock, never the caller's: coordinators on hosts whose
    # clocks disagree still agree on when a lease ends.
    return ExpressionWrapper(
        Now() + timedelta(seconds=LEASE_SECONDS), output_field=models.DateTimeField()
    )


def claim_lease(rollout_id: int, owner: str) -> Lease | None:
    """Take the rollout's lease if it is free or expired (by the database's clock);
    every claim bumps the generation, fencing off the previous holder."""
    free = (
        Q(lease_owner="")
        | Q(lease_expires__isnull=True)
        | Q(lease_expires__lt=Now())
        | Q(lease_owner=owner)
    )
    claimed = Rollout.objects.filter(Q(pk=rollout_id) & free).update(
        lease_owner=owner,
        lease_generation=F("lease_generation") + 1,
        lease_expires=_lease_deadline(),
    )
    if not claimed:
        return None
    generation = (
        Rollout.objects.filter(pk=rollout_id, lease_owner=owner)
        .values_list("lease_generation", flat=True)
        .first()
    )
    return None if generation is None else Lease(rollout_id, owner, generation)


def _held(lease: Lease) -> QuerySet[Rollout]:
    return Rollout.objects.filter(
        pk=lease.rollout_id, lease_owner=lease.owner, lease_generation=lease.generation
    )


def renew_lease(lease: Lease) -> bool:
    """Extend the lease from now (database clock); False when it is no longer ours."""
    return bool(_held(lease).update(lease_expires=_lease_deadline()))


def release_lease(lease: Lease) -> None:
    _held(lease).update(lease_owner="", lease_expires=None)


class LeaseLost(Exception):
    """Another drive claimed the rollout: this one must write nothing more."""


class _StateMoved(Exception):
    """The rollout is no longer in the state (or stage) this step was for."""


# --------------------------------------------------------------------- the drive


class Drive:
    """One drive of one rollout under one lease."""

    def __init__(self, lease: Lease, ctx: DriveContext, now: datetime) -> None:
        self.lease = lease
        self.ctx = ctx
        self.now = now

    def step(
        self,
        kind: DriveStep,
        states: Collection[str],
        work: Callable[[Rollout], T],
        *,
        stage: int | None = None,
        reread: bool = True,
        rollout: Rollout | None = None,
    ) -> T:
        """Run `work` in one transaction, after renewing the lease with an UPDATE
        conditional on owner, generation, state (and stage): that UPDATE also
        locks the rollout row until the step commits, so an operator's abort
        either lands before (and the step does nothing) or after it."""
        with transaction.atomic():
            fence = Q(state__in=list(states))
            if stage is not None:
                fence &= Q(current_stage=stage)
            if not _held(self.lease).filter(fence).update(lease_expires=_lease_deadline()):
                if not _held(self.lease).exists():
                    raise LeaseLost(f"rollout {self.lease.rollout_id}: lease lost")
                raise _StateMoved
            if reread or rollout is None:
                # Only the rollout's row: locking its release would serialise
                # the drives of every rollout of that release.
                rollout = (
                    Rollout.objects.select_for_update(of=("self",))
                    .select_related("release")
                    .get(pk=self.lease.rollout_id)
                )
            result = work(rollout)
            if self.ctx.before_commit is not None:
                self.ctx.before_commit(kind)
        if self.ctx.after_commit is not None:
            self.ctx.after_commit(kind)
        return result

    def run(self) -> None:
        rollout = self.step(DriveStep.SYNC, R.values, _sync_and_return)
        handled: set[str] = set()
        # A handler may move the rollout on (a failure starts an abort): the
        # next state's handler runs in the same drive, each at most once.
        while (handler := _HANDLERS.get(rollout.state)) and rollout.state not in handled:
            handled.add(rollout.state)
            try:
                handler(self, rollout)
            except _StateMoved:
                log.info("rollout %s moved on during the drive", rollout.pk)
            rollout = Rollout.objects.select_related("release").get(pk=rollout.pk)


def rollout_drive(rollout_id: int, *, ctx: DriveContext | None = None) -> DriveOutcome:
    """Take the next steps of a rollout. Returns the rollout's state afterwards,
    or BUSY when another coordinator holds its lease."""
    ctx = ctx or DriveContext()
    lease = claim_lease(rollout_id, f"drive-{uuid.uuid4().hex[:12]}")
    if lease is None:
        return DriveOutcome.BUSY
    try:
        Drive(lease, ctx, ctx.now or timezone.now()).run()
    except LeaseLost:
        log.warning("rollout %s: lease lost mid-drive; this drive stopped", rollout_id)
    finally:
        release_lease(lease)
    return DriveOutcome(Rollout.objects.values_list("state", flat=True).get(pk=rollout_id))


def _sync_and_return(rollout: Rollout) -> Rollout:
    sync_rows(rollout)
    return rollout


def sync_rows(rollout: Rollout) -> None:
    """Carry job outcomes into the plan, in a few set-wise conditional UPDATEs
    (a row moves once; the database picks the rows, however many are in flight)."""
    active = RolloutNode.objects.filter(rollout=rollout, state__in=[RN.RUNNING, RN.WAITING])
    # One UPDATE per row state, however many job states lead to it.
    by_row_state: dict[str, list[str]] = {}
    for job_state, row_state in JOB_TO_ROW.items():
        by_row_state.setdefault(row_state.value, []).append(job_state.value)
    for target, job_states in by_row_state.items():
        active.filter(job__state__in=job_states).update(state=target)
    active.filter(state=RN.RUNNING, job__state__in=UpdateJob.WAITING_STATES).update(
        state=RN.WAITING
    )
    active.filter(state=RN.WAITING).exclude(job__state__in=UpdateJob.WAITING_STATES).exclude(
        job__state__in=list(JOB_TO_ROW)
    ).update(state=RN.RUNNING)
    contracting = RolloutNode.objects.filter(rollout=rollout, contract_state=CS.RUNNING)
    contracting.filter(contract_job__state=UpdateJob.State.DONE).update(contract_state=CS.DONE)
    ended_badly = [s for s in UpdateJob.FINAL_STATES if s != UpdateJob.State.DONE]
    contracting.filter(contract_job__state__in=ended_badly).update(contract_state=CS.FAILED)


def _in_flight(rollout: Rollout) -> bool:
    """Whether a node has this rollout's job in hand: an update (or rollback) or a contract."""
    plan = RolloutNode.objects.filter(rollout=rollout)
    return (
        plan.filter(state__in=[RN.RUNNING, RN.WAITING]).exists()
        or plan.filter(contract_state=CS.RUNNING).exists()
    )


def _drive_running(d: Drive, rollout: Rollout) -> None:
    # Targeted queries, not the whole plan: one drive per finished job must
    # cost the same for a 10-node and a 10,000-node rollout.
    plan = RolloutNode.objects.filter(rollout=rollout)
    if _release_withdrawn(rollout):
        reason = f"release {rollout.release.version} was {rollout.release.state} mid-rollout"
        d.step(DriveStep.FAIL, (R.RUNNING,), lambda r: _cancel(r, reason))
        return
    if rollout.opts.rollback_on_failure:
        failed = (
            plan.filter(state__in=[RN.FAILED, RN.ROLLED_BACK]).select_related("node", "job").first()
        )
        if failed is not None:
            reason = _failure_reason(failed)
            d.step(DriveStep.FAIL, (R.RUNNING,), lambda r: _fail(r, reason, d.now))
            return
    stage_plan = plan.filter(stage=rollout.current_stage)
    _start_next(d, rollout, plan, stage_plan)
    if not stage_plan.filter(state__in=UNFINISHED_ROWS).exists():
        contract_next = d.step(
            DriveStep.STAGE,
            (R.RUNNING,),
            lambda r: _stage_complete(d, r),
            stage=rollout.current_stage,
        )
        if contract_next:
            _drive_contract(d, rollout)


def _failure_reason(row: RolloutNode) -> str:
    """Why the rollout stops, with what the node's agent reported: the operator reads it on
    the rollout's page without going to the node's."""
    reason = f"node {row.node.node_id} failed its update"
    job = row.job
    if job is None or not (job.error_code or job.error_message):
        return reason
    said = ": ".join(part for part in (job.error_code, job.error_message.strip()) if part)
    return f"{reason} ({said[:300]})"


# ---------------------------------------------------------------- starting nodes


def _start_next(
    d: Drive,
    rollout: Rollout,
    plan: QuerySet[RolloutNode],
    stage_plan: QuerySet[RolloutNode],
) -> None:
    opts = rollout.opts
    per_cluster = max(1, opts.max_unavailable)
    in_flight = plan.filter(state__in=[RN.RUNNING, RN.WAITING])
    # None: every pending row of the stage may start (read in batches, never counted).
    budget: int | None = None
    if rollout.strategy == Rollout.Strategy.ROLLING and not opts.parallel:
        budget = per_cluster - in_flight.filter(stage=rollout.current_stage).count()
    if opts.max_parallel:
        # Fleet-wide cap on nodes updating at once, whatever the stage allows.
        cap = opts.max_parallel - in_flight.count()
        budget = cap if budget is None else min(budget, cap)
    if budget is not None and budget <= 0:
        return
    starts = _Starts(
        plan=plan,
        budget=budget,
        per_cluster=per_cluster,
        gate=_cached_gate(d.ctx.gate or jobs.default_gate()),
        plans=PlanResolver(rollout.release),
        # One transport for the drive: the commands of a step go out together.
        transport=d.ctx.transport or jobs.default_transport(),
    )
    pending = (
        stage_plan.filter(state=RN.PENDING)
        # Rows whose cluster is already at its limit cannot start: the database leaves
        # them out, so a drive reads only rows it may act on however many wait.
        .exclude(node__cluster_id__in=_full_clusters(per_cluster))
        .select_related("node", "node__tenant")
        .order_by("position")
    )
    after = -1
    while True:
        # A few more candidates than the budget: some may wait for their leader or node.
        size = CANDIDATE_BATCH if starts.budget is None else starts.budget + 64
        candidates = list(pending.filter(position__gt=after)[:size])
        _start_candidates(d, rollout, candidates, starts)
        if starts.budget is not None or len(candidates) < size or starts.stopped:
            return
        after = candidates[-1].position


@dataclass
class _Starts:
    """What a drive may still start, and what it decides with: the budget left (None: no
    limit), active jobs per cluster, the tenants' gate and the nodes' plans (each asked
    once per tenant or combination of versions per drive)."""

    plan: QuerySet[RolloutNode]
    budget: int | None
    per_cluster: int
    gate: GateFn
    plans: PlanResolver
    transport: NodeTransport
    busy: Counter[int] = field(default_factory=Counter)
    # A start failed the rollout (its plan refused, rollback_on_failure): start no more.
    stopped: bool = False
    # Nodes per step: one at first, doubling up to START_BATCH (see `_start_candidates`).
    batch: int = 1

    def exhausted(self) -> bool:
        return self.stopped or (self.budget is not None and self.budget <= 0)

    def may_start(self, row: RolloutNode) -> bool:
        cluster = row.node.cluster_id
        if cluster and self.busy[cluster] >= self.per_cluster:
            return False
        return not (row.is_leader and _leader_must_wait(row, self.plan))

    def took(self, row: RolloutNode) -> None:
        if self.budget is not None:
            self.budget -= 1
        if row.node.cluster_id:
            self.busy[row.node.cluster_id] += 1


class _Start(models.TextChoices):
    STARTED = "started"
    NOT_STARTED = "not_started"
    # The start failed the rollout: nothing more may start in this drive.
    ROLLOUT_FAILED = "rollout_failed"


def _start_candidates(
    d: Drive, rollout: Rollout, candidates: list[RolloutNode], starts: _Starts
) -> None:
    """Start candidates in plan order while the budget lasts, several per step: one lease
    renewal and one commit for a batch of nodes instead of one each. A drive's first step
    starts one node and each next one twice as many, up to START_BATCH: a small rollout
    (or the one node a finished job frees) goes a node per step as before, a stage of
    thousands goes in batches. A pause, abort or takeover lands between two steps, so it
    stops the drive after at most one batch (the step holds the rollout's row meanwhile:
    the operator's action waits for it, and no node starts after that action commits)."""
    # Counted afresh for each read of candidates (the starts before it are committed, so
    # counted too): adding to the last count would count them twice.
    starts.busy = _busy_clusters({r.node.cluster_id for r in candidates if r.node.cluster_id})
    starts.plans.prefetch([row.node for row in candidates])
    queue = deque(candidates)
    while queue and not starts.exhausted():
        d.step(
            DriveStep.START_NODE,
            (R.RUNNING,),
            partial(_start_batch, d, queue=queue, starts=starts, size=starts.batch),
            stage=rollout.current_stage,
            reread=False,
            rollout=rollout,
        )
        starts.batch = min(2 * starts.batch, START_BATCH)


def _start_batch(
    d: Drive, rollout: Rollout, *, queue: deque[RolloutNode], starts: _Starts, size: int
) -> None:
    """One step's starts: up to `size` nodes off the front of `queue`. Each node in a
    savepoint of its own: one that cannot start undoes only its own writes."""
    started = 0
    with outbox.relays_in_bulk():
        if rollout.strategy != Rollout.Strategy.ROLLBACK:
            started = _start_together(d, rollout, queue=queue, starts=starts, size=size)
        while queue and started < size and not starts.exhausted():
            row = queue.popleft()
            if not starts.may_start(row):
                continue
            try:
                with transaction.atomic():
                    outcome = _start_row(d, rollout, row=row, starts=starts)
            except _StateMoved:
                continue  # no longer pending: another drive started it
            if outcome == _Start.STARTED:
                starts.took(row)
                started += 1
            elif outcome == _Start.ROLLOUT_FAILED:
                starts.stopped = True


def _start_together(
    d: Drive, rollout: Rollout, *, queue: deque[RolloutNode], starts: _Starts, size: int
) -> int:
    """Up to `size` nodes off the front of `queue` started with one INSERT each for their
    jobs, audit entries and commands and one UPDATE for their plan rows, in one savepoint;
    returns how many. When one of them cannot start (its plan refused, an update already in
    progress, its row no longer pending) nothing of the batch stays and every row goes back
    to the queue: the caller then starts them one by one, each with its own outcome."""
    budget, busy = starts.budget, starts.busy.copy()
    taken: list[RolloutNode] = []  # every row looked at: they go back if the batch does not
    rows: list[RolloutNode] = []  # those that may start (the others wait, as one by one)
    while queue and len(rows) < size and not starts.exhausted():
        row = queue.popleft()
        taken.append(row)
        if starts.may_start(row):
            starts.took(row)
            rows.append(row)
    # One node: the one-by-one path is the same work.
    if len(rows) >= 2 and _write_together(d, rollout, rows, starts):
        return len(rows)
    starts.budget, starts.busy = budget, busy
    queue.extendleft(reversed(taken))
    return 0


def _write_together(d: Drive, rollout: Rollout, rows: list[RolloutNode], starts: _Starts) -> bool:
    """The batch's jobs, entries, commands and row links, or (False) nothing of them."""
    try:
        # Decided before the savepoint: what the gate and plans read is not undone with it.
        new = jobs.job_updates_prepare(
            [row.node for row in rows],
            release=rollout.release,
            rollout=rollout,
            gate=starts.gate,
            now=d.now,
            plans=starts.plans,
        )
        with transaction.atomic():
            options = {"health_timeout": rollout.opts.health_timeout}
            created = jobs.job_updates_store(new, transport=starts.transport, options=options)
            _link_all(rows, created)
    except (jobs.PlanRefused, jobs.JobConflict, _StateMoved):
        return False
    return True


def _link_all(rows: list[RolloutNode], created: list[UpdateJob]) -> None:
    """`_link` for a batch, in one UPDATE: any row no longer pending undoes the batch."""
    pairs = list(zip(rows, created, strict=True))
    states = {
        row.pk: RN.WAITING if job.state in UpdateJob.WAITING_STATES else RN.RUNNING
        for row, job in pairs
    }
    linked = RolloutNode.objects.filter(pk__in=states, state=RN.PENDING).update(
        state=Case(*(When(pk=pk, then=Value(state)) for pk, state in states.items())),
        job=Case(*(When(pk=row.pk, then=Value(job.pk)) for row, job in pairs)),
    )
    if linked != len(rows):
        raise _StateMoved


def _active_jobs() -> QuerySet[UpdateJob]:
    # A contract job changes the schema under a serving node: it takes none away.
    return UpdateJob.objects.filter(state__in=UpdateJob.ACTIVE_STATES).exclude(
        kind=UpdateJob.Kind.CONTRACT
    )


def _full_clusters(per_cluster: int) -> QuerySet[Any, Any]:
    """The clusters with `per_cluster` or more active jobs (a subquery)."""
    return (
        _active_jobs()
        .filter(node__cluster_id__isnull=False)
        .values("node__cluster_id")
        .annotate(active=Count("pk"))
        .filter(active__gte=per_cluster)
        .values("node__cluster_id")
    )


def _busy_clusters(clusters: set[int]) -> Counter[int]:
    """Active jobs per cluster, whatever started them (this rollout, another, a
    person): max_unavailable counts every node that is not serving."""
    if not clusters:
        return Counter()
    return Counter(
        c
        for c in _active_jobs()
        .filter(node__cluster_id__in=clusters)
        .values_list("node__cluster_id", flat=True)
        if c is not None
    )


def _cached_gate(gate: GateFn) -> GateFn:
    """Windows, blackouts and consent are per tenant: ask once per tenant per drive."""
    decisions: dict[int, GateDecision] = {}

    def cached(*, node: Node, release: Release | None, at: datetime | None = None) -> GateDecision:
        if node.tenant_id not in decisions:
            decisions[node.tenant_id] = gate(node=node, release=release, at=at)
        return decisions[node.tenant_id]

    return cached


def _leader_must_wait(leader: RolloutNode, plan: QuerySet[RolloutNode]) -> bool:
    """The Raft leader goes last: every other node of its cluster first. A node whose
    turn is over counts as gone first whatever its outcome: with rollback_on_failure off
    a failed follower does not stop the rollout, so it must not hold the leader forever."""
    cluster_id = leader.node.cluster_id
    # A leader outside any cluster waits for the other nodes outside any cluster.
    same_cluster = (
        Q(node__cluster__isnull=True) if cluster_id is None else Q(node__cluster_id=cluster_id)
    )
    return plan.filter(same_cluster, is_leader=False, state__in=UNFINISHED_ROWS).exists()


def _link(row: RolloutNode, state: RolloutNode.State, job: UpdateJob) -> None:
    """Tie the job to its plan row in the step that created it; a row that is no
    longer pending undoes the whole step (job and command included)."""
    if not RolloutNode.objects.filter(pk=row.pk, state=RN.PENDING).update(state=state, job=job):
        raise _StateMoved


def _start_row(d: Drive, rollout: Rollout, *, row: RolloutNode, starts: _Starts) -> _Start:
    if rollout.strategy == Rollout.Strategy.ROLLBACK:
        return _start_rollback_row(rollout, row, starts)
    try:
        job = jobs.job_start_update(
            node=row.node,
            release=rollout.release,
            user=None,
            transport=starts.transport,
            rollout=rollout,
            gate=starts.gate,
            now=d.now,
            options={"health_timeout": rollout.opts.health_timeout},
            plans=starts.plans,
        )
    except jobs.PlanRefused as refused:
        # Retrying cannot help while the published releases stay as they are: the node
        # fails its turn and the audit log says why; with rollback_on_failure the rollout
        # stops here, before the drive starts the next node.
        if RolloutNode.objects.filter(pk=row.pk, state=RN.PENDING).update(state=RN.FAILED):
            node_id = row.node.node_id
            reason = refused.explanation[:500]
            rollout_event(rollout, "rollout.node_plan_refused", node_id=node_id, reason=reason)
            # On the rollout's page too, beside the other decisions.
            record_decision(
                rollout,
                Decision.NODE_PLAN_REFUSED,
                None,
                "coordinator",
                node_id=node_id,
                reason=reason,
            )
            if rollout.opts.rollback_on_failure:
                _fail(rollout, f"node {node_id} has no update plan: {reason}", d.now)
                return _Start.ROLLOUT_FAILED
        return _Start.NOT_STARTED
    except jobs.JobConflict as conflict:
        log.info("rollout %s: %s; will retry", rollout.pk, conflict)
        return _Start.NOT_STARTED
    _link(row, RN.WAITING if job.state in UpdateJob.WAITING_STATES else RN.RUNNING, job)
    return _Start.STARTED


def _start_rollback_row(rollout: Rollout, row: RolloutNode, starts: _Starts) -> _Start:
    step = rollback_step(row.node, busy=False)
    if step.restore_point is None:
        RolloutNode.objects.filter(pk=row.pk, state=RN.PENDING).update(state=RN.SKIPPED)
        return _Start.NOT_STARTED
    try:
        job = jobs.job_start_rollback(
            node=row.node,
            point_id=step.restore_point,
            user=None,
            transport=starts.transport,
            rollout=rollout,
        )
    except jobs.JobConflict as conflict:
        log.info("rollout %s: %s; will retry", rollout.pk, conflict)
        return _Start.NOT_STARTED
    _link(row, RN.RUNNING, job)
    return _Start.STARTED


# -------------------------------------------------------------- stage completion


def _stage_complete(d: Drive, rollout: Rollout) -> bool:
    """One step: the stage's decision, then the gate, promotion or the finish. True when
    the last stage is complete and the release's contract step comes before the finish."""
    counts = _PlanCounts.of(rollout)
    stage = rollout.current_stage
    last_stage = counts.last_stage
    if not StageDecision.objects.filter(
        rollout=rollout, stage=stage, decision=Decision.STAGE_COMPLETED
    ).exists():
        record_decision(rollout, Decision.STAGE_COMPLETED, None, "coordinator")
        rollout_event(
            rollout,
            "rollout.stage_completed",
            nodes_done=counts.state(RN.DONE),
            nodes_total=counts.total,
        )
    if stage >= last_stage:
        if _has_contract_step(rollout):
            return True
        _finish(d, rollout, counts)
        return False
    if rollout.strategy != Rollout.Strategy.CANARY:
        Rollout.objects.filter(pk=rollout.pk).update(current_stage=stage + 1)
        return False
    if baking(rollout, stage, d.now):
        return False
    updated = RolloutNode.objects.filter(rollout=rollout, stage__lte=stage, state=RN.DONE)
    verdict = canary_gate(rollout, list(updated.select_related("job").order_by("position")), d.now)
    if verdict.waiting:
        log.info("rollout %s: gate %s", rollout.pk, verdict.reason)
        return False
    if not verdict.passed:
        record_decision(rollout, Decision.GATE_FAILED, None, "gate", **verdict.as_dict())
        reason = f"health gate failed after stage {stage + 1}: {verdict.reason}"
        _fail(rollout, reason, d.now, roll_back=True)
        return False
    record_decision(rollout, Decision.GATE_PASSED, None, "gate", **verdict.as_dict())
    next_is_final = stage + 1 >= last_stage
    if _promotes_itself(rollout, stage + 1, final=next_is_final):
        record_decision(rollout, Decision.AUTO_PROMOTED, None, "gate", to_stage=stage + 1)
        Rollout.objects.filter(pk=rollout.pk).update(current_stage=stage + 1)
        rollout_event(rollout, "rollout.promoted", approved_by="gate (automatic)")
        return False
    if Rollout.objects.transition(rollout.pk, (R.RUNNING,), R.AWAITING_APPROVAL):
        rollout_event(
            rollout, "rollout.awaiting_approval", next_stage=stage + 1, final=next_is_final
        )
    return False


def _promotes_itself(rollout: Rollout, next_stage: int, *, final: bool) -> bool:
    """Into the final stage only with the automatic gate; into the others when
    that stage is marked auto_promote."""
    opts = rollout.opts
    if final:
        return opts.gate.automatic
    return next_stage < len(opts.stages) and opts.stages[next_stage].auto_promote


# ------------------------------------------------------------- finishing, failing


@dataclass(frozen=True)
class _PlanCounts:
    """How many plan rows per (stage, state, contract state): one GROUP BY, however
    large the plan."""

    counts: dict[tuple[int, str, str], int]

    @classmethod
    def of(cls, rollout: Rollout) -> _PlanCounts:
        grouped = (
            RolloutNode.objects.filter(rollout=rollout)
            .order_by()
            .values_list("stage", "state", "contract_state")
            .annotate(n=Count("pk"))
        )
        return cls({(stage, state, c): n for stage, state, c, n in grouped})

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    @property
    def last_stage(self) -> int:
        return max(stage for stage, _, _ in self.counts)

    def state(self, *states: str) -> int:
        return sum(n for (_, state, _), n in self.counts.items() if state in states)

    def contract(self, *states: str) -> int:
        return sum(n for (_, _, c), n in self.counts.items() if c in states)


def _finish(d: Drive, rollout: Rollout, counts: _PlanCounts) -> None:
    failed = counts.state(RN.FAILED, RN.ROLLED_BACK)
    blue_green = rollout.strategy == Rollout.Strategy.BLUE_GREEN and rollout.cluster_id
    if blue_green and not _switch_to_target(d, rollout):
        return
    final = R.FAILED if failed else R.COMPLETED
    contract: dict[str, int] = {}
    if counts.total - counts.contract(CS.NONE):
        contract = {
            "contract_done": counts.contract(CS.DONE),
            "contract_skipped": counts.contract(CS.SKIPPED),
        }
    if Rollout.objects.transition(rollout.pk, (R.RUNNING,), final, finished_at=d.now):
        details: dict[str, Any] = {
            "nodes_done": counts.state(RN.DONE),
            "nodes_failed": failed,
            "nodes_total": counts.total,
            **contract,
        }
        rollout_event(rollout, "rollout.failed" if failed else "rollout.completed", **details)


# ------------------------------------------------------------ the contract step


def _has_contract_step(rollout: Rollout) -> bool:
    """The release lists contract migrations (a rollback rollout installs nothing)."""
    return rollout.strategy != Rollout.Strategy.ROLLBACK and bool(
        contract_versions(rollout.release.manifest)
    )


@dataclass(frozen=True)
class _Group:
    """The plan rows whose contract waits for the same cluster (or standalone node)."""

    cluster_id: int | None
    rows: tuple[RolloutNode, ...]

    def describe(self) -> ContractGroup:
        cluster = self.rows[0].node.cluster if self.cluster_id is not None else None
        return ContractGroup(
            cluster.name if cluster is not None else None,
            tuple(r.node.node_id for r in self.rows),
        )


def _contract_groups(rows: list[RolloutNode]) -> list[_Group]:
    by_cluster: dict[int, list[RolloutNode]] = {}
    groups: list[_Group] = []
    for row in rows:
        if row.node.cluster_id is None:
            groups.append(_Group(None, (row,)))
        else:
            by_cluster.setdefault(row.node.cluster_id, []).append(row)
    groups += [_Group(c, tuple(members)) for c, members in by_cluster.items()]
    return groups


def _not_ready(group: _Group, version: str) -> str:
    """Why the group may not be contracted (now), or "" when it may: every row of the
    group finished its update here, and every node of the cluster (not only those in this
    rollout) runs the release or a newer one."""
    unfinished = [r for r in group.rows if r.state != RN.DONE]
    if unfinished:
        names = ", ".join(f"{r.node.node_id} ({r.state.lower()})" for r in unfinished[:10])
        return f"not every node reached {version} in this rollout: {names}"
    if group.cluster_id is None:
        nodes = Node.objects.filter(pk=group.rows[0].node_id)
    else:
        nodes = Node.objects.filter(cluster_id=group.cluster_id)
    behind = [
        f"{node_id} ({installed or 'unknown'})"
        for node_id, installed in nodes.order_by("node_id").values_list(
            "node_id", "installed_version"
        )
        if not runs_at_least(installed, version)
    ]
    if behind:
        return f"nodes that do not run {version}: {', '.join(behind[:10])}"
    return ""


def _drive_contract(d: Drive, rollout: Rollout) -> None:
    """After the last stage: per cluster (or standalone node), decide its contract once
    (scheduled after the delay, or skipped with the reason), start each node's contract job
    when due, then end the rollout once every contract job has ended. A failed one fails
    the rollout naming its node; a contract is never rolled back automatically."""
    version = rollout.release.version
    plan = RolloutNode.objects.filter(rollout=rollout)
    # The whole plan only while some group is undecided (the drive that reaches the
    # contract step); afterwards only the groups with a contract due.
    if plan.filter(contract_state=CS.NONE).exists():
        for group in _contract_groups(_contract_rows(plan)):
            if any(r.contract_state == CS.NONE for r in group.rows):
                d.step(
                    DriveStep.CONTRACT,
                    (R.RUNNING,),
                    partial(_decide_contract, d, group=group, version=version),
                    stage=rollout.current_stage,
                )
    if not plan.filter(contract_state=CS.FAILED).exists():
        due = plan.filter(contract_state=CS.WAITING, contract_due_at__lte=d.now)
        due_groups = Q(node__cluster_id__in=due.values("node__cluster_id")) | Q(
            pk__in=due.filter(node__cluster_id__isnull=True).values("pk")
        )
        for group in _contract_groups(_contract_rows(plan.filter(due_groups))):
            _start_due_contracts(d, rollout, group, version)
    _contract_end(d, rollout)


def _contract_rows(rows: QuerySet[RolloutNode]) -> list[RolloutNode]:
    return list(rows.select_related("node", "node__cluster", "contract_job").order_by("position"))


def _start_due_contracts(d: Drive, rollout: Rollout, group: _Group, version: str) -> None:
    due = [
        r
        for r in group.rows
        if r.contract_state == CS.WAITING
        and r.contract_due_at is not None
        and r.contract_due_at <= d.now
    ]
    if not due:
        return
    reason = _not_ready(group, version)
    if reason:
        # Something changed since it was decided (a node rolled back, a node joined).
        d.step(
            DriveStep.CONTRACT,
            (R.RUNNING,),
            partial(_skip_contract, group=group, reason=reason),
            stage=rollout.current_stage,
        )
        return
    for row in due:
        d.step(
            DriveStep.START_CONTRACT,
            (R.RUNNING,),
            partial(_start_contract_row, d, row=row),
            stage=rollout.current_stage,
            reread=False,
            rollout=rollout,
        )


def _decide_contract(d: Drive, rollout: Rollout, *, group: _Group, version: str) -> None:
    """One group's contract, decided once (conditional on its rows being undecided)."""
    reason = _not_ready(group, version)
    if reason:
        _skip_contract(rollout, group=group, reason=reason, states=(CS.NONE,))
        return
    delay = rollout.opts.contract_delay
    due = d.now + timedelta(seconds=delay)
    scheduled = RolloutNode.objects.filter(
        pk__in=[r.pk for r in group.rows], contract_state=CS.NONE
    ).update(contract_state=CS.WAITING, contract_due_at=due, contract_note="")
    if scheduled:
        described = group.describe()
        rollout_event(
            rollout,
            "rollout.contract_scheduled",
            group=described.label,
            nodes=list(described.node_ids),
            migrations=list(contract_versions(rollout.release.manifest)),
            delay_seconds=delay,
            due_at=due.isoformat(),
        )


def _skip_contract(
    rollout: Rollout,
    *,
    group: _Group,
    reason: str,
    states: tuple[str, ...] = (CS.WAITING,),
) -> None:
    note = f"contract not run: {reason}"[:255]
    skipped = RolloutNode.objects.filter(
        pk__in=[r.pk for r in group.rows], contract_state__in=list(states)
    ).update(contract_state=CS.SKIPPED, contract_note=note)
    if skipped:
        described = group.describe()
        rollout_event(
            rollout,
            "rollout.contract_skipped",
            group=described.label,
            nodes=list(described.node_ids),
            reason=reason,
            hint="run `themis-update migrate contract` on each node once its cluster runs"
            f" {rollout.release.version}, or retry this rollout's contract step",
        )


def _start_contract_row(d: Drive, rollout: Rollout, *, row: RolloutNode) -> bool:
    """Create the node's contract job (and its command) and tie it to the row in the
    same step: a row that is no longer waiting undoes the whole step, so a drive that
    crashed after starting one never starts a second."""
    try:
        job = jobs.job_start_contract(
            node=row.node,
            release=rollout.release,
            user=None,
            transport=d.ctx.transport,
            rollout=rollout,
        )
    except jobs.JobConflict as conflict:
        log.info("rollout %s: contract on %s waits: %s", rollout.pk, row.node, conflict)
        return False
    linked = RolloutNode.objects.filter(
        pk=row.pk, contract_state=CS.WAITING, contract_job__isnull=True
    ).update(contract_state=CS.RUNNING, contract_job=job)
    if not linked:
        raise _StateMoved
    row.contract_state, row.contract_job = CS.RUNNING, job
    return True


def _contract_end(d: Drive, rollout: Rollout) -> None:
    """Once no contract job runs: fail the rollout if one failed (the nodes still waiting
    are not started), else finish it when every group's contract has ended."""
    states = Counter(
        dict(
            RolloutNode.objects.filter(rollout=rollout)
            .order_by()
            .values_list("contract_state")
            .annotate(n=Count("pk"))
        )
    )
    if states[CS.FAILED]:
        if states[CS.WAITING]:
            d.step(DriveStep.CONTRACT, (R.RUNNING,), _skip_after_failure)
        if states[CS.RUNNING]:
            return
        d.step(DriveStep.FAIL, (R.RUNNING,), lambda r: _contract_failed(r, d.now))
        return
    if states[CS.NONE] or states[CS.WAITING] or states[CS.RUNNING]:
        return
    d.step(DriveStep.END, (R.RUNNING,), lambda r: _finish(d, r, _PlanCounts.of(r)))


def _skip_after_failure(rollout: Rollout) -> None:
    RolloutNode.objects.filter(rollout=rollout, contract_state=CS.WAITING).update(
        contract_state=CS.SKIPPED,
        contract_note="contract not run: a contract failed on another node of this rollout",
    )


def _contract_failed(rollout: Rollout, now: datetime) -> None:
    """A contract job failed: the rollout fails naming its node(s). The schema is left as
    the engine left it (it undoes a failed migration itself); nothing is rolled back: a
    contract is past the point of no easy return, so no node's release is undone either."""
    failed = list(
        RolloutNode.objects.filter(rollout=rollout, contract_state=CS.FAILED)
        .select_related("node", "contract_job")
        .order_by("position")
    )
    details = []
    for row in failed[:10]:
        job = row.contract_job
        why = f"{job.error_code}: {job.error_message[:160]}" if job is not None else "no job"
        details.append(f"{row.node.node_id} ({why})")
    reason = f"contract migrations failed on {'; '.join(details)}"
    if Rollout.objects.transition(
        rollout.pk, (R.RUNNING,), R.FAILED, error_message=reason[:4000], finished_at=now
    ):
        RolloutNode.objects.filter(pk__in=[r.pk for r in failed], contract_note="").update(
            contract_note="contract migrations failed"
        )
        rollout_event(
            rollout,
            "rollout.failed",
            reason=reason[:1000],
            contract_failed=[r.node.node_id for r in failed],
            rolling_back=False,
            note="contract migrations are past the point of no easy return: nothing is"
            " rolled back automatically; fix the cause, then retry the contract step"
            " (or run `themis-update migrate contract` on the node)",
        )


def _switch_to_target(d: Drive, rollout: Rollout) -> bool:
    """Blue/green: record the colour this rollout makes active (once), set it,
    and say whether the cluster now serves from it. Setting is idempotent, so a
    drive that repeats this after a crash never flips traffic back."""
    target = rollout.target_color
    if not target:
        # The plan holds only nodes of the colour that was idle when it was made.
        colors = set(
            RolloutNode.objects.filter(rollout=rollout)
            .order_by()
            .values_list("node__color", flat=True)
            .distinct()
        )
        if len(colors) != 1 or not next(iter(colors)):
            _fail(rollout, "blue/green: the plan's nodes are not all of one colour", d.now)
            return False
        target = next(iter(colors))
        Rollout.objects.filter(pk=rollout.pk, target_color="").update(target_color=target)
        rollout.target_color = target
    blue_green_switch(rollout=rollout, switch=d.ctx.switch, user=None, to_color=target)
    cluster = Cluster.objects.filter(pk=rollout.cluster_id or 0)
    return cluster.values_list("active_color", flat=True).first() == target


def _fail(rollout: Rollout, reason: str, now: datetime, *, roll_back: bool = False) -> None:
    """Stop starting nodes. A canary (or an abort) also rolls back what it
    touched: the rollout goes to ABORTING, whose handler runs next."""
    RolloutNode.objects.filter(rollout=rollout, state=RN.PENDING).update(state=RN.SKIPPED)
    if roll_back or rollout.strategy == Rollout.Strategy.CANARY:
        if Rollout.objects.transition(rollout.pk, (R.RUNNING,), R.ABORTING, error_message=reason):
            rollout_event(rollout, "rollout.failed", reason=reason, rolling_back=True)
        return
    if Rollout.objects.transition(
        rollout.pk, (R.RUNNING,), R.FAILED, error_message=reason, finished_at=now
    ):
        failed = RolloutNode.objects.filter(rollout=rollout, state__in=[RN.FAILED, RN.ROLLED_BACK])
        rollout_event(rollout, "rollout.failed", reason=reason, nodes_failed=failed.count())


def _release_withdrawn(rollout: Rollout) -> bool:
    """No node may start the release any more: left running, every start would be
    refused and the rollout would wait forever. A rollback rollout installs nothing."""
    return (
        rollout.strategy != Rollout.Strategy.ROLLBACK
        and rollout.release.state != Release.State.PUBLISHED
    )


def _cancel(rollout: Rollout, reason: str) -> None:
    """The coordinator's own cancel: nodes in flight finish, no other starts."""
    if Rollout.objects.transition(rollout.pk, (R.RUNNING,), R.CANCELLING, error_message=reason):
        record_decision(rollout, Decision.CANCELLED, None, "coordinator", reason=reason)
        rollout_event(rollout, "rollout.cancelled", reason=reason)


# ---------------------------------------------------------- cancelling, aborting


def _stop_starting(d: Drive, states: tuple[str, ...]) -> bool:
    """No new node starts: pending rows are skipped, parked jobs cancelled.
    Returns whether a node still has this rollout's job in hand afterwards."""

    def stop(rollout: Rollout) -> bool:
        RolloutNode.objects.filter(rollout=rollout, state=RN.PENDING).update(state=RN.SKIPPED)
        RolloutNode.objects.filter(rollout=rollout, contract_state=CS.WAITING).update(
            contract_state=CS.SKIPPED, contract_note=f"contract not run: rollout {rollout.state}"
        )
        waiting = RolloutNode.objects.filter(rollout=rollout, state=RN.WAITING, job__isnull=False)
        for row in waiting.select_related("job", "job__node"):
            assert row.job is not None
            jobs.job_cancel(job=row.job, user=None)
        sync_rows(rollout)
        return _in_flight(rollout)

    return d.step(DriveStep.STOP_STARTING, states, stop)


def _drive_cancelling(d: Drive, rollout: Rollout) -> None:
    if _stop_starting(d, (R.CANCELLING,)):
        return

    def end(r: Rollout) -> None:
        if Rollout.objects.transition(r.pk, (R.CANCELLING,), R.CANCELLED, finished_at=d.now):
            rollout_event(r, "rollout.cancelled_done")

    d.step(DriveStep.END, (R.CANCELLING,), end)


def _drive_aborting(d: Drive, rollout: Rollout) -> None:
    """Wait for nodes in flight, then roll back every node this rollout updated;
    end once every rollback job has ended, naming those that failed."""
    if _stop_starting(d, (R.ABORTING,)):
        return
    # A rollback rollout that is stopped keeps what it restored. Only the rows still to
    # undo: those restored already are ROLLED_BACK.
    rows: list[RolloutNode] = []
    if rollout.strategy != Rollout.Strategy.ROLLBACK:
        done = RolloutNode.objects.filter(rollout=rollout, state=RN.DONE)
        rows = list(done.select_related("node", "job").order_by("position"))
    rollbacks = UpdateJob.objects.filter(
        rollout=rollout, kind=UpdateJob.Kind.ROLLBACK, node_id__in=[r.node_id for r in rows]
    )
    latest = {job.node_id: job for job in rollbacks.order_by("pk")}
    pending = False
    restored: list[int] = []
    failed: list[str] = []
    for row in rows:
        rollback_job = latest.get(row.node_id)
        if rollback_job is None:
            # Not started yet, or refused last time (the node was busy): try now.
            d.step(DriveStep.START_ROLLBACK, (R.ABORTING,), partial(_undo, d, row=row))
            pending = True
        elif rollback_job.state == UpdateJob.State.DONE:
            restored.append(row.pk)
        elif rollback_job.is_active:
            pending = True
        else:
            failed.append(row.node.node_id)
    if restored:

        def mark(r: Rollout) -> None:
            RolloutNode.objects.filter(pk__in=restored, state=RN.DONE).update(state=RN.ROLLED_BACK)

        d.step(DriveStep.ROLLED_BACK, (R.ABORTING,), mark)
    if pending:
        return
    d.step(DriveStep.END, (R.ABORTING,), lambda r: _aborted(r, failed, d.now))


def _undo(d: Drive, rollout: Rollout, *, row: RolloutNode) -> bool:
    point = (row.job.result or {}).get("restore_point", "") if row.job else ""
    try:
        jobs.job_start_rollback(
            node=row.node,
            point_id=point,
            user=None,
            transport=d.ctx.transport,
            rollout=rollout,
            require_known_point=False,
        )
    except jobs.JobConflict as conflict:
        log.info("rollout %s: rollback of %s waits: %s", rollout.pk, row.node, conflict)
        return False
    return True


def _aborted(rollout: Rollout, rollback_failed: list[str], now: datetime) -> None:
    # A rollback the operator asked for ends ABORTED; one the gate or a failed node caused
    # ends FAILED. Only this run's decisions count: a gate that failed before a retry did
    # not cause an abort after it.
    decisions = StageDecision.objects.filter(rollout=rollout)
    retried = decisions.filter(decision=Decision.RETRY).order_by("-pk").values("pk")[:1]
    decisions = decisions.filter(pk__gt=Coalesce(Subquery(retried), 0))
    was_failure = (
        decisions.filter(decision=Decision.GATE_FAILED).exists()
        or not decisions.filter(decision=Decision.ABORTED).exists()
    )
    final = R.FAILED if was_failure else R.ABORTED
    fields: dict[str, object] = {"finished_at": now}
    if rollback_failed:
        note = "rollback failed on " + ", ".join(rollback_failed)
        fields["error_message"] = "; ".join(m for m in (rollout.error_message, note) if m)
    if Rollout.objects.transition(rollout.pk, (R.ABORTING,), final, **fields):
        rollout_event(
            rollout,
            "rollout.rolled_back",
            final_state=final,
            nodes_rolled_back=RolloutNode.objects.filter(
                rollout=rollout, state=RN.ROLLED_BACK
            ).count(),
            rollback_failed=rollback_failed,
        )


_HANDLERS: dict[str, Callable[[Drive, Rollout], None]] = {
    R.RUNNING: _drive_running,
    R.CANCELLING: _drive_cancelling,
    R.ABORTING: _drive_aborting,
}
