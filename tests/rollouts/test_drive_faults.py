"""The rollout drive under faults: a drive cut mid-step, a drive that lost its
lease, an operator acting between two steps, failed and blocked rollbacks, a
paused rollout's parked jobs, a repeated blue/green switch, a late approval
and stale metrics. Simulated agents play the nodes (tests.fakes); faults come
in through the drive's seams (DriveContext, the node transport)."""

from __future__ import annotations

import contextlib
from collections import Counter
from datetime import datetime, timedelta
from typing import Any

import pytest
from django.conf import settings
from django.db import connection
from django.db.models import ExpressionWrapper
from django.db.models.fields import DateTimeField
from django.db.models.functions import Now
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from tenants.gate import GateDecision
from tenants.models import Tenant
from tenants.services import waiting_jobs_release
from tests.factories import make_cluster, make_node, make_release, make_tenant, make_user
from tests.fakes import NullTransport, answer_queued_jobs, report_metrics
from updates.jobs import services as jobs
from updates.models import (
    Cluster,
    Event,
    Node,
    NodeCommand,
    Release,
    Rollout,
    RolloutNode,
    StageDecision,
    UpdateJob,
)
from updates.rollouts import bluegreen, coordinator
from updates.rollouts import services as rollouts
from updates.rollouts.coordinator import DriveContext, DriveOutcome, DriveStep
from updates.rollouts.gate import fresh_metrics_wait

R = Rollout.State
S = UpdateJob.State


@pytest.fixture
def release(db: None) -> Release:
    return make_release(version="1.7.0", sha256="ab" * 32, artifact="releases/x.tar")


def _cluster(n: int, *, tenant: Tenant | None = None) -> tuple[Cluster, list[Node]]:
    """n nodes of one cluster, the first one its leader (so it goes last)."""
    tenant = tenant or make_tenant()
    cluster = make_cluster(tenant=tenant)
    nodes = [
        make_node(
            node_id=f"{cluster.name}-n{i}",
            tenant=tenant,
            cluster=cluster,
            installed_version="1.6.0",
            raft_role="leader" if i == 0 else "follower",
        )
        for i in range(n)
    ]
    return cluster, nodes


def _start(
    release: Release, nodes: list[Node], strategy: str = "rolling", **options: Any
) -> Rollout:
    rollout = rollouts.rollout_create(
        release=release, strategy=strategy, nodes=nodes, user=None, options=options
    )
    return rollouts.rollout_start(rollout=rollout, user=None)


def _state(obj: Rollout | UpdateJob) -> str:
    obj.refresh_from_db()
    return str(obj.state)


def _heartbeat(job: UpdateJob) -> None:
    Node.objects.filter(pk=job.node_id).update(last_heartbeat=timezone.now())


def _drive_until_settled(rollout: Rollout, *, heartbeats: bool = True, rounds: int = 50) -> str:
    for _ in range(rounds):
        coordinator.rollout_drive(rollout.pk)
        if not answer_queued_jobs(on_done=_heartbeat if heartbeats else None):
            coordinator.rollout_drive(rollout.pk)
            break
    return _state(rollout)


def _db_time(seconds: int) -> ExpressionWrapper[Any]:
    return ExpressionWrapper(Now() + timedelta(seconds=seconds), output_field=DateTimeField())


# ------------------------------------------------------------------ the lease


@pytest.mark.django_db
def test_lease_expiry_is_read_on_the_database_clock(release: Release) -> None:
    _, nodes = _cluster(3)
    rollout = _start(release, nodes)
    other = coordinator.claim_lease(rollout.pk, "other-coordinator")
    assert other is not None
    # A coordinator whose own clock runs an hour ahead must not think the lease is over.
    skewed = DriveContext(now=timezone.now() + timedelta(hours=1))
    assert coordinator.rollout_drive(rollout.pk, ctx=skewed) == DriveOutcome.BUSY
    assert not UpdateJob.objects.exists()
    # Expired by the database's clock: taken over, with a newer generation.
    Rollout.objects.filter(pk=rollout.pk).update(lease_expires=_db_time(-1))
    assert coordinator.rollout_drive(rollout.pk) == DriveOutcome.RUNNING
    assert UpdateJob.objects.count() == 1
    rollout.refresh_from_db()
    assert rollout.lease_generation == other.generation + 1
    assert rollout.lease_owner == ""  # released at the end of the drive


@pytest.mark.django_db
def test_every_step_renews_the_lease(release: Release) -> None:
    _, nodes = _cluster(4)
    rollout = _start(release, nodes, parallel=True, max_unavailable=3)
    renewed: list[bool] = []

    def after(step: DriveStep) -> None:
        # What the step just committed must hold the lease a full term from now...
        expires = Rollout.objects.values_list("lease_expires", flat=True).get(pk=rollout.pk)
        assert expires is not None
        renewed.append(expires > timezone.now() + timedelta(seconds=20))
        # ...and the next step renews it again even from nearly expired.
        Rollout.objects.filter(pk=rollout.pk).update(lease_expires=_db_time(1))

    coordinator.rollout_drive(rollout.pk, ctx=DriveContext(after_commit=after))
    assert len(renewed) >= 4  # the sync step, then three nodes started
    assert all(renewed)
    assert UpdateJob.objects.count() == 3


@pytest.mark.django_db
def test_a_drive_that_lost_its_lease_writes_nothing_more(release: Release) -> None:
    _, nodes = _cluster(4)
    rollout = _start(release, nodes, parallel=True, max_unavailable=3)
    newer: list[coordinator.Lease] = []

    def take_over(step: DriveStep) -> None:
        if step == DriveStep.START_NODE and not newer:
            # This drive stalls past its lease; another coordinator claims the rollout.
            Rollout.objects.filter(pk=rollout.pk).update(lease_expires=_db_time(-1))
            lease = coordinator.claim_lease(rollout.pk, "newer-coordinator")
            assert lease is not None
            newer.append(lease)

    coordinator.rollout_drive(rollout.pk, ctx=DriveContext(after_commit=take_over))
    assert UpdateJob.objects.count() == 1  # the one node started before the takeover
    assert RolloutNode.objects.filter(rollout=rollout, state="PENDING").count() == 3
    rollout.refresh_from_db()
    # The stale drive did not even release the newer holder's lease.
    assert rollout.lease_owner == "newer-coordinator"
    assert rollout.lease_generation == newer[0].generation
    assert Event.objects.filter(verb="job.update.queued").count() == 1


@pytest.mark.django_db
def test_a_renewed_lease_runs_a_full_term_and_one_taken_over_is_not_renewed(
    release: Release,
) -> None:
    _, nodes = _cluster(2)
    rollout = _start(release, nodes)
    lease = coordinator.claim_lease(rollout.pk, "coordinator-a")
    assert lease is not None
    Rollout.objects.filter(pk=rollout.pk).update(lease_expires=_db_time(1))
    assert coordinator.renew_lease(lease) is True
    expires = Rollout.objects.values_list("lease_expires", flat=True).get(pk=rollout.pk)
    assert expires is not None and expires > timezone.now() + timedelta(seconds=20)
    # Expired and claimed by another coordinator: the old holder renews nothing.
    Rollout.objects.filter(pk=rollout.pk).update(lease_expires=_db_time(-1))
    newer = coordinator.claim_lease(rollout.pk, "coordinator-b")
    assert newer is not None
    assert coordinator.renew_lease(lease) is False
    rollout.refresh_from_db()
    assert (rollout.lease_owner, rollout.lease_generation) == ("coordinator-b", newer.generation)


# ------------------------------------------------------------------ scenario 3


class FailingTransport(NullTransport):
    """The broker refuses the first message."""

    def __init__(self) -> None:
        self.calls = 0

    def update_node(self, node_id: str, job_id: str, **options: object) -> None:
        self.calls += 1
        if self.calls == 1:
            raise ConnectionError("broker connection reset")


# Scenario 3: a drive cut while sending a job leaves no job outside the plan
@pytest.mark.django_db(transaction=True)
def test_a_drive_cut_while_sending_leaves_no_orphan_job(release: Release) -> None:
    _, nodes = _cluster(3)
    rollout = _start(release, nodes)
    # A drive may die here; what it committed must still be whole.
    with contextlib.suppress(ConnectionError):
        coordinator.rollout_drive(rollout.pk, ctx=DriveContext(transport=FailingTransport()))
    for job in UpdateJob.objects.all():
        row = RolloutNode.objects.get(rollout=rollout, node_id=job.node_id)
        assert row.job_id == job.pk, f"job {job.pk} is not in the plan"

    def one_node_at_a_time() -> None:
        assert UpdateJob.objects.filter(state__in=UpdateJob.ACTIVE_STATES).count() <= 1

    for _ in range(20):
        coordinator.rollout_drive(rollout.pk, ctx=DriveContext(transport=NullTransport()))
        one_node_at_a_time()
        if not answer_queued_jobs():
            break
    assert _state(rollout) == R.COMPLETED
    per_node = {n.pk: UpdateJob.objects.filter(node=n).count() for n in nodes}
    assert per_node == {n.pk: 1 for n in nodes}  # no node got a second job


# Scenario 3: a drive cut after creating a job, before linking it, leaves nothing
@pytest.mark.django_db
def test_a_drive_cut_before_its_step_commits_leaves_nothing(release: Release) -> None:
    _, nodes = _cluster(3)
    rollout = _start(release, nodes)

    def crash(step: DriveStep) -> None:
        if step == DriveStep.START_NODE:
            raise RuntimeError("coordinator killed")

    with pytest.raises(RuntimeError):
        coordinator.rollout_drive(rollout.pk, ctx=DriveContext(before_commit=crash))
    assert not UpdateJob.objects.exists()
    assert set(RolloutNode.objects.values_list("state", flat=True)) == {"PENDING"}
    assert Rollout.objects.get(pk=rollout.pk).lease_owner == ""
    assert _drive_until_settled(rollout) == R.COMPLETED
    assert UpdateJob.objects.count() == 3


# ------------------------------------------------------------ starts in batches


def _standalone(n: int, **fields: Any) -> list[Node]:
    """Nodes outside any cluster: nothing but the rollout's own options limits them."""
    tenant = make_tenant()
    return [
        make_node(node_id=f"s{i:03d}", tenant=tenant, installed_version="1.6.0", **fields)
        for i in range(n)
    ]


def _jobs_per_start_step(rollout: Rollout, ctx: DriveContext | None = None) -> list[int]:
    """Drive once; the number of jobs each committed START_NODE step added."""
    counts: list[int] = []

    def after(step: DriveStep) -> None:
        if step == DriveStep.START_NODE:
            counts.append(UpdateJob.objects.count())

    ctx = ctx or DriveContext()
    ctx.after_commit = after
    coordinator.rollout_drive(rollout.pk, ctx=ctx)
    return [b - a for a, b in zip([0, *counts], counts, strict=False)]


@pytest.mark.django_db
def test_a_large_stage_starts_in_batches_that_double_up_to_the_limit(release: Release) -> None:
    rollout = _start(release, _standalone(200), parallel=True)
    assert _jobs_per_start_step(rollout) == [1, 2, 4, 8, 16, 32, 64, 64, 9]
    rows = RolloutNode.objects.filter(rollout=rollout)
    assert rows.filter(state="RUNNING").count() == 200
    # One command and one audit event per node, each job tied to its own row.
    assert NodeCommand.objects.filter(kind="apply").count() == 200
    assert Event.objects.filter(verb="job.update.queued").count() == 200
    assert all(r.job is not None and r.job.node_id == r.node_id for r in rows.select_related("job"))


@pytest.mark.django_db
def test_a_budget_caps_the_batches(release: Release) -> None:
    rollout = _start(release, _standalone(20), parallel=True, max_parallel=6)
    assert _jobs_per_start_step(rollout) == [1, 2, 3]
    assert UpdateJob.objects.filter(state=S.QUEUED).count() == 6


@pytest.mark.django_db
def test_a_clusters_budget_holds_across_reads_of_candidates(
    release: Release, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Candidates read one at a time: each read counts the cluster's active jobs afresh.
    monkeypatch.setattr(coordinator, "CANDIDATE_BATCH", 1)
    _, nodes = _cluster(5)
    rollout = _start(release, nodes, parallel=True, max_unavailable=3)
    coordinator.rollout_drive(rollout.pk)
    assert UpdateJob.objects.filter(state=S.QUEUED).count() == 3


@pytest.mark.django_db
def test_a_drive_cut_in_a_batch_undoes_that_batch_alone(release: Release) -> None:
    nodes = _standalone(20)
    rollout = _start(release, nodes, parallel=True)
    steps: list[DriveStep] = []

    def crash_in_the_third_batch(step: DriveStep) -> None:
        steps.append(step)
        if steps.count(DriveStep.START_NODE) == 3:
            raise RuntimeError("coordinator killed")

    with pytest.raises(RuntimeError):
        coordinator.rollout_drive(
            rollout.pk, ctx=DriveContext(before_commit=crash_in_the_third_batch)
        )
    # The first two batches (1 + 2 nodes) committed whole; nothing of the third (4 nodes).
    assert UpdateJob.objects.count() == 3
    assert NodeCommand.objects.count() == 3
    assert Event.objects.filter(verb="job.update.queued").count() == 3
    rows = RolloutNode.objects.filter(rollout=rollout)
    assert rows.filter(state="RUNNING", job__isnull=False).count() == 3
    assert rows.filter(state="PENDING", job__isnull=True).count() == 17
    assert Rollout.objects.get(pk=rollout.pk).lease_owner == ""
    assert _drive_until_settled(rollout) == R.COMPLETED
    per_node = Counter(UpdateJob.objects.values_list("node_id", flat=True))
    assert per_node == {n.pk: 1 for n in nodes}


@pytest.mark.django_db
def test_a_refused_plan_in_a_batch_keeps_its_earlier_starts_and_starts_no_more(
    release: Release,
) -> None:
    nodes = _standalone(12)
    # The fifth node's version cannot be read: no plan takes it to 1.7.0. It falls in the
    # third batch (nodes 3-6), after one start of that batch.
    Node.objects.filter(pk=nodes[4].pk).update(installed_version="not-a-version")
    rollout = _start(release, nodes, parallel=True, rollback_on_failure=True)
    assert _jobs_per_start_step(rollout) == [1, 2, 1]
    started = set(UpdateJob.objects.values_list("node__node_id", flat=True))
    assert started == {"s000", "s001", "s002", "s003"}
    row = RolloutNode.objects.get(rollout=rollout, node=nodes[4])
    assert (row.state, row.job) == ("FAILED", None)
    assert Event.objects.filter(verb="rollout.node_plan_refused").count() == 1
    # A canary-less rolling rollout with rollback_on_failure: failed, the rest skipped.
    assert _state(rollout) == R.FAILED
    assert RolloutNode.objects.filter(rollout=rollout, state="SKIPPED").count() == 7


@pytest.mark.django_db
def test_a_batch_writes_its_jobs_events_and_commands_with_one_insert_each(
    release: Release,
) -> None:
    rollout = _start(release, _standalone(16), parallel=True, health_timeout=45)
    with CaptureQueriesContext(connection) as queries:
        assert _jobs_per_start_step(rollout) == [1, 2, 4, 8, 1]
    inserts = Counter(
        table
        for q in queries.captured_queries
        for table in ("updates_updatejob", "updates_event", "updates_nodecommand")
        if q["sql"].startswith(f'INSERT INTO "{table}"')
    )
    # A node alone goes one by one (steps of 1), a batch of 2, 4 or 8 with one INSERT each.
    assert inserts == {"updates_updatejob": 5, "updates_event": 5, "updates_nodecommand": 5}
    rows = RolloutNode.objects.filter(rollout=rollout).select_related("job", "node")
    assert {r.state for r in rows} == {"RUNNING"}
    for row in rows:
        job = row.job
        assert job is not None and (job.node_id, job.rollout_id) == (row.node_id, rollout.pk)
        assert (job.state, job.created_by, job.plan[0]["version"]) == ("QUEUED", None, "1.7.0")
        event = Event.objects.get(verb="job.update.queued", object_id=str(job.pk))
        assert event.object_type == "updatejob" and event.actor_label == "system"
        assert event.details["node_id"] == row.node.node_id
        assert (event.details["version"], event.details["rollout_id"]) == ("1.7.0", rollout.pk)
        command = NodeCommand.objects.get(job=job)
        assert (command.kind, command.node_id) == ("apply", row.node_id)
        assert command.args == {"options": {"health_timeout": 45}}


@pytest.mark.django_db
def test_a_batch_with_a_node_already_updating_starts_the_others_one_by_one(
    release: Release,
) -> None:
    nodes = _standalone(8)
    busy = jobs.job_start_update(node=nodes[5], release=release, user=make_user())
    rollout = _start(release, nodes, parallel=True)
    # The batch of four (rows 3-6) meets the busy node: undone whole, then one by one, and
    # the next row takes its place. (The first count includes the busy node's own job.)
    assert _jobs_per_start_step(rollout) == [1 + 1, 2, 4]
    assert UpdateJob.objects.filter(node=nodes[5]).get() == busy
    row = RolloutNode.objects.get(rollout=rollout, node=nodes[5])
    assert (row.state, row.job) == ("PENDING", None)  # tried again by a later drive
    others = RolloutNode.objects.filter(rollout=rollout).exclude(node=nodes[5])
    assert {r.state for r in others} == {"RUNNING"}
    # One job, one audit entry and one command each: nothing of the undone batch stays.
    assert UpdateJob.objects.count() == NodeCommand.objects.count() == 8
    assert Event.objects.filter(verb="job.update.queued").count() == 8


@pytest.mark.django_db
def test_a_batch_parks_the_nodes_its_gate_holds_and_queues_the_others(release: Release) -> None:
    # Each node in a tenant of its own: the drive asks the gate once per tenant.
    nodes = [
        make_node(node_id=f"s{i:03d}", tenant=make_tenant(), installed_version="1.6.0")
        for i in range(4)
    ]

    def gate(*, node: Node, release: Release | None, at: datetime | None = None) -> GateDecision:
        held = node.node_id in ("s001", "s003")
        return GateDecision(not held, reason="outside the window" if held else "")

    rollout = _start(release, nodes, parallel=True)
    assert _jobs_per_start_step(rollout, DriveContext(gate=gate)) == [1, 2, 1]
    rows = {r.node.node_id: r for r in RolloutNode.objects.filter(rollout=rollout)}
    assert {n: r.state for n, r in rows.items()} == {
        "s000": "RUNNING", "s001": "WAITING", "s002": "RUNNING", "s003": "WAITING"
    }  # fmt: skip
    waiting = UpdateJob.objects.filter(state=S.WAITING_FOR_WINDOW)
    assert {j.node.node_id for j in waiting} == {"s001", "s003"}
    assert {j.wait_reason for j in waiting} == {"outside the window"}
    assert Event.objects.filter(verb="job.update.waiting").count() == 2
    # Only the queued ones get a command.
    assert set(NodeCommand.objects.values_list("job__node__node_id", flat=True)) == {
        "s000", "s002"
    }  # fmt: skip


@pytest.mark.django_db
def test_a_node_that_must_wait_in_a_batch_leaves_its_place_to_the_next(release: Release) -> None:
    # A leader goes last in its cluster: the plan is each cluster's followers, then its
    # leader. The second batch meets the first leader (its followers are not done) and
    # starts the next cluster's first follower in its place.
    tenant = make_tenant()
    clusters = [_cluster(3, tenant=tenant)[1], _cluster(4, tenant=tenant)[1]]
    rollout = _start(release, [*clusters[0], *clusters[1]], parallel=True, max_unavailable=3)
    plan = RolloutNode.objects.filter(rollout=rollout).order_by("position")
    assert [r.node_id for r in plan][2:4] == [clusters[0][0].pk, clusters[1][1].pk]
    assert _jobs_per_start_step(rollout) == [1, 2, 2]
    leaders = {nodes[0].pk for nodes in clusters}
    assert not UpdateJob.objects.filter(node__in=leaders).exists()
    assert UpdateJob.objects.count() == 5


class TakingGate:
    """Allows every node; asked for `trigger`'s tenant, it marks `taken`'s row started, as
    another drive would between this drive's read of the candidates and its start."""

    def __init__(self, trigger: Node, taken: RolloutNode) -> None:
        self.trigger, self.taken = trigger, taken

    def __call__(
        self, *, node: Node, release: Release | None, at: datetime | None = None
    ) -> GateDecision:
        if node.pk == self.trigger.pk:
            RolloutNode.objects.filter(pk=self.taken.pk).update(state=RolloutNode.State.RUNNING)
        return GateDecision(True)


@pytest.mark.django_db
def test_a_node_another_drive_started_mid_batch_is_passed_over_for_the_next(
    release: Release,
) -> None:
    # Each node in a tenant of its own, so the gate is asked for every node.
    nodes = [
        make_node(node_id=f"t{i}", tenant=make_tenant(), installed_version="1.6.0")
        for i in range(7)
    ]
    rollout = _start(release, nodes, parallel=True)
    rows = list(RolloutNode.objects.filter(rollout=rollout).order_by("position"))
    # In the third batch (rows 3-6), the first node's gate marks the second taken.
    gate = TakingGate(trigger=rows[3].node, taken=rows[4])
    assert _jobs_per_start_step(rollout, DriveContext(gate=gate)) == [1, 2, 3]
    taken = RolloutNode.objects.get(pk=rows[4].pk)
    assert (taken.state, taken.job) == (RolloutNode.State.RUNNING, None)
    # Its job and command were undone with its savepoint; every other node started once.
    assert not UpdateJob.objects.filter(node=rows[4].node).exists()
    assert NodeCommand.objects.count() == UpdateJob.objects.count() == 6


# ------------------------------------------------------------------ scenario 10


class ActingTransport(NullTransport):
    """Sends nothing; the first send lets an operator act, as if at that instant."""

    def __init__(self, act: Any) -> None:
        self.act = act
        self.sent: list[str] = []

    def update_node(self, node_id: str, job_id: str, **options: object) -> None:
        self.sent.append(node_id)
        if len(self.sent) == 1:
            self.act()


# Scenario 10: an abort committed while a drive runs stops it starting nodes
@pytest.mark.django_db(transaction=True)
def test_abort_committed_during_a_drive_starts_no_more_nodes(release: Release) -> None:
    _, nodes = _cluster(5)
    rollout = _start(release, nodes, parallel=True, max_unavailable=4)
    operator = make_user(username="olivia")
    transport = ActingTransport(lambda: rollouts.rollout_abort(rollout=rollout, user=operator))
    coordinator.rollout_drive(rollout.pk, ctx=DriveContext(transport=transport))
    aborted_at = Event.objects.get(verb="rollout.aborted").pk
    assert UpdateJob.objects.filter(kind="update").count() == 1
    assert not Event.objects.filter(pk__gt=aborted_at, verb="job.update.queued").exists()
    assert _state(rollout) == R.ABORTING
    assert RolloutNode.objects.filter(rollout=rollout, state="SKIPPED").count() == 4
    assert _drive_until_settled(rollout) == R.ABORTED
    assert set(Node.objects.values_list("installed_version", flat=True)) == {"1.6.0"}


# Scenario 10: a pause committed between two steps holds the drive
@pytest.mark.django_db
def test_pause_committed_between_steps_starts_no_more_nodes(release: Release) -> None:
    _, nodes = _cluster(5)
    rollout = _start(release, nodes, parallel=True, max_unavailable=4)

    def pause(step: DriveStep) -> None:
        if step == DriveStep.START_NODE and _state(rollout) == R.RUNNING:
            rollouts.rollout_pause(rollout=rollout, user=None)

    assert coordinator.rollout_drive(rollout.pk, ctx=DriveContext(after_commit=pause)) == (
        DriveOutcome.PAUSED
    )
    assert UpdateJob.objects.count() == 1
    rollouts.rollout_resume(rollout=rollout, user=None)
    assert _drive_until_settled(rollout) == R.COMPLETED


# ------------------------------------------------------------------ scenario 6


def _canary_awaiting_final_approval(release: Release) -> tuple[Rollout, list[RolloutNode]]:
    """A canary over ten nodes with three updated, waiting for the 100 % approval."""
    tenant = make_tenant()
    nodes = [
        make_node(node_id=f"c{i:02d}", tenant=tenant, installed_version="1.6.0") for i in range(10)
    ]
    rollout = _start(release, nodes, strategy="canary")
    report_metrics([n.node_id for n in nodes], error_rate=0.0, p99_ms=10)
    assert _drive_until_settled(rollout) == R.AWAITING_APPROVAL
    rollouts.rollout_approve(rollout=rollout, user=make_user())
    assert _drive_until_settled(rollout) == R.AWAITING_APPROVAL
    done = list(
        RolloutNode.objects.filter(rollout=rollout, state="DONE")
        .select_related("node")
        .order_by("position")
    )
    assert len(done) == 3
    return rollout, done


# Scenario 6: an abort ends only when every rollback has ended, and names the failed ones
@pytest.mark.django_db
def test_abort_waits_for_every_rollback_and_retries_a_blocked_one(release: Release) -> None:
    rollout, (blocked, running, failing) = _canary_awaiting_final_approval(release)
    # Someone else's job holds the first node: its rollback must wait, not be dropped.
    other = UpdateJob.objects.create(node=blocked.node, release=release, state=S.APPLYING)
    rollouts.rollout_abort(rollout=rollout, user=make_user(username="olivia"))
    coordinator.rollout_drive(rollout.pk)
    rollback = UpdateJob.objects.filter(rollout=rollout, kind="rollback")
    assert set(rollback.values_list("node_id", flat=True)) == {running.node_id, failing.node_id}
    # The last row's rollback fails while the other is still running.
    last = rollback.get(node=failing.node)
    jobs.job_finish(job_id=last.pk, node_id=failing.node.node_id, ok=False, error_code="BOOM")
    coordinator.rollout_drive(rollout.pk)
    assert _state(rollout) == R.ABORTING
    # The blocking job ends: the next drive starts the rollback it held back.
    jobs.job_finish(job_id=other.pk, node_id=blocked.node.node_id, ok=True)
    coordinator.rollout_drive(rollout.pk)
    assert rollback.filter(node=blocked.node).count() == 1
    assert _state(rollout) == R.ABORTING
    answer_queued_jobs()
    for job in rollback.filter(state__in=UpdateJob.ACTIVE_STATES):
        jobs.job_finish(job_id=job.pk, node_id=job.node.node_id, ok=True)
    coordinator.rollout_drive(rollout.pk)
    assert _state(rollout) == R.ABORTED
    assert not UpdateJob.objects.filter(state__in=UpdateJob.ACTIVE_STATES).exists()
    event = Event.objects.get(verb="rollout.rolled_back", object_id=str(rollout.pk))
    assert event.details["rollback_failed"] == [failing.node.node_id]
    assert failing.node.node_id in rollout.error_message
    states = dict(RolloutNode.objects.filter(rollout=rollout).values_list("node_id", "state"))
    assert states[blocked.node_id] == states[running.node_id] == "ROLLED_BACK"
    assert states[failing.node_id] == "DONE"  # still on the new version


# ------------------------------------------------------------------ scenario 7


# Scenario 7: a paused rollout's jobs parked for a window stay parked when it opens
@pytest.mark.django_db
def test_window_opening_does_not_release_a_paused_rollouts_jobs(release: Release) -> None:
    _, nodes = _cluster(2)
    rollout = _start(release, nodes)

    def closed(*, node: Node, release: Release | None, at: datetime | None = None) -> GateDecision:
        return GateDecision(False, "WAITING_FOR_WINDOW", "outside maintenance windows", None, "")

    coordinator.rollout_drive(rollout.pk, ctx=DriveContext(gate=closed))
    job = UpdateJob.objects.get(rollout=rollout)
    assert job.state == S.WAITING_FOR_WINDOW
    rollouts.rollout_pause(rollout=rollout, user=None)
    started: list[UpdateJob] = []
    # The tenant has no window rules, so the real gate now says "go".
    assert waiting_jobs_release(start_job=started.append) == []
    assert _state(job) == S.WAITING_FOR_WINDOW
    assert job.wait_reason == "outside maintenance windows"
    assert not started
    rollouts.rollout_resume(rollout=rollout, user=None)
    assert waiting_jobs_release(start_job=started.append) == [job.pk]
    assert _state(job) == S.QUEUED


# ------------------------------------------------------------------ scenario 8


def _blue_green(release: Release) -> tuple[Cluster, Rollout]:
    cluster, nodes = _cluster(4)
    for node, color in zip(nodes, ["blue", "blue", "green", "green"], strict=True):
        Node.objects.filter(pk=node.pk).update(color=color)
    Cluster.objects.filter(pk=cluster.pk).update(active_color="blue")
    rollout = _start(release, list(Node.objects.filter(cluster=cluster)), strategy="blue_green")
    return cluster, rollout


def _update_the_idle_colour(rollout: Rollout) -> None:
    """Drive until both green nodes have finished their jobs (the switch comes next)."""
    for _ in range(10):
        if UpdateJob.objects.filter(rollout=rollout, state="DONE").count() == 2:
            return
        coordinator.rollout_drive(rollout.pk, ctx=DriveContext(switch=_no_switch))
        answer_queued_jobs()
    raise AssertionError("the green nodes were not updated")


def _no_switch(cluster: Cluster, color: str, rollout: Rollout | None) -> None:
    raise AssertionError("no switch before both green nodes are updated")


# Scenario 8: a drive cut after the traffic switch never flips traffic back
@pytest.mark.django_db
def test_blue_green_cut_after_the_switch_does_not_flip_back(release: Release) -> None:
    cluster, rollout = _blue_green(release)
    switched: list[str] = []

    def switch_then_die(c: Cluster, color: str, r: Rollout | None) -> None:
        switched.append(color)
        Cluster.objects.filter(pk=c.pk).update(active_color=color)  # the switch took effect
        raise RuntimeError("coordinator killed after the switch")

    _update_the_idle_colour(rollout)
    with pytest.raises(RuntimeError):
        coordinator.rollout_drive(rollout.pk, ctx=DriveContext(switch=switch_then_die))
    assert _state(rollout) == R.RUNNING
    again = DriveContext(switch=lambda c, color, r: switched.append(color))
    coordinator.rollout_drive(rollout.pk, ctx=again)
    coordinator.rollout_drive(rollout.pk, ctx=again)
    assert _state(rollout) == R.COMPLETED
    assert set(switched) == {"green"}
    assert rollout.target_color == "green"
    assert Cluster.objects.get(pk=cluster.pk).active_color == "green"
    # Switching for the rollout again sets its colour again: nothing flips.
    bluegreen.blue_green_switch(rollout=rollout, switch=again.switch, user=None)
    assert Cluster.objects.get(pk=cluster.pk).active_color == "green"
    assert Event.objects.filter(verb="bluegreen.switched").count() == 1


# Scenario 8: two overlapping drives both finishing a blue/green rollout switch to one colour
@pytest.mark.django_db
def test_overlapping_blue_green_drives_set_one_colour(release: Release) -> None:
    cluster, rollout = _blue_green(release)
    switched: list[str] = []
    record = DriveContext(switch=lambda c, color, r: switched.append(color))
    _update_the_idle_colour(rollout)

    def overlap(step: DriveStep) -> None:
        if step == DriveStep.SYNC and not switched:
            # The first drive stalls; a second one takes over and finishes.
            Rollout.objects.filter(pk=rollout.pk).update(lease_expires=_db_time(-1))
            coordinator.rollout_drive(rollout.pk, ctx=record)

    coordinator.rollout_drive(
        rollout.pk, ctx=DriveContext(switch=record.switch, after_commit=overlap)
    )
    coordinator.rollout_drive(rollout.pk, ctx=record)
    assert _state(rollout) == R.COMPLETED
    assert switched == ["green"]
    assert Cluster.objects.get(pk=cluster.pk).active_color == "green"


# ------------------------------------------------------------------ scenarios 9, 11


def _canary_at_gate(release: Release, **gate: Any) -> tuple[Rollout, Node]:
    """A canary whose first node has just finished its update (no heartbeat since)."""
    tenant = make_tenant()
    nodes = [
        make_node(node_id=f"k{i:02d}", tenant=tenant, installed_version="1.6.0") for i in range(10)
    ]
    # Metrics from before the update: healthy.
    report_metrics([n.node_id for n in nodes], error_rate=0.0, p99_ms=10)
    Node.objects.update(last_heartbeat=timezone.now())
    rollout = _start(release, nodes, strategy="canary", gate=gate)
    coordinator.rollout_drive(rollout.pk)
    assert answer_queued_jobs() == 1
    canary = RolloutNode.objects.select_related("node").get(rollout=rollout, stage=0).node
    return rollout, canary


# Scenario 11: the gate waits for metrics reported after the update, and reads those
@pytest.mark.django_db
def test_gate_ignores_metrics_from_before_the_update(release: Release) -> None:
    rollout, canary = _canary_at_gate(release)
    coordinator.rollout_drive(rollout.pk)
    assert _state(rollout) == R.RUNNING  # waiting: only old metrics so far
    assert not StageDecision.objects.filter(rollout=rollout, decision__startswith="gate").exists()
    # The restarted node's first heartbeat: it is not well.
    Node.objects.filter(pk=canary.pk).update(error_rate=0.3, last_heartbeat=timezone.now())
    coordinator.rollout_drive(rollout.pk)
    rollout.refresh_from_db()
    assert rollout.state in (R.ABORTING, R.FAILED)
    assert "error rate 30.0%" in rollout.error_message


# Scenario 11: a node silent since its update fails the gate once the wait is over
@pytest.mark.django_db
def test_gate_fails_when_no_fresh_metrics_arrive_in_time(release: Release) -> None:
    rollout, canary = _canary_at_gate(release, bake_seconds=30)
    soon = DriveContext(now=timezone.now() + timedelta(seconds=31))
    coordinator.rollout_drive(rollout.pk, ctx=soon)
    assert _state(rollout) == R.RUNNING
    # The wait is as long as a silent node takes to be declared offline plus its grace.
    assert fresh_metrics_wait(rollout) == timedelta(
        seconds=settings.THEMIS_NODE_OFFLINE_AFTER + rollout.opts.offline_grace
    )
    late = timezone.now() + timedelta(seconds=31) + fresh_metrics_wait(rollout)
    coordinator.rollout_drive(rollout.pk, ctx=DriveContext(now=late))
    rollout.refresh_from_db()
    assert rollout.state in (R.ABORTING, R.FAILED)
    assert f"no metrics reported after the update from {canary.node_id}" in rollout.error_message
    assert StageDecision.objects.filter(rollout=rollout, decision="gate_failed").exists()


# Scenario 9: an approval given after the canary breached is refused with the reason
@pytest.mark.django_db
def test_approval_after_a_breach_is_refused(release: Release) -> None:
    rollout, canary = _canary_at_gate(release)
    Node.objects.filter(pk=canary.pk).update(last_heartbeat=timezone.now())
    coordinator.rollout_drive(rollout.pk)
    assert _state(rollout) == R.AWAITING_APPROVAL
    # After the gate passed, the canary's metrics go bad.
    Node.objects.filter(pk=canary.pk).update(p99_latency_ms=2000, last_heartbeat=timezone.now())
    with pytest.raises(rollouts.RolloutError, match="p99 latency 2000 ms above 500 ms"):
        rollouts.rollout_approve(rollout=rollout, user=make_user(username="rita"))
    rollout.refresh_from_db()
    assert rollout.state == R.AWAITING_APPROVAL and rollout.current_stage == 0
    refused = StageDecision.objects.get(rollout=rollout, decision="approval_refused")
    assert refused.decided_by_label == "rita"
    assert "p99 latency" in refused.details["reason"]
    assert not StageDecision.objects.filter(rollout=rollout, decision="approved").exists()
    coordinator.rollout_drive(rollout.pk)
    assert UpdateJob.objects.filter(rollout=rollout).count() == 1  # nothing promoted


# ------------------------------------------------------------------ LOST jobs


@pytest.mark.django_db
def test_a_lost_job_fails_its_row_and_the_rollout(release: Release) -> None:
    _, nodes = _cluster(3)
    rollout = _start(release, nodes)
    coordinator.rollout_drive(rollout.pk)
    job = UpdateJob.objects.get(rollout=rollout)
    UpdateJob.objects.filter(pk=job.pk).update(state=S.LOST, finished_at=timezone.now())
    coordinator.rollout_drive(rollout.pk)
    rollout.refresh_from_db()
    assert rollout.state == R.FAILED
    assert RolloutNode.objects.get(rollout=rollout, job=job).state == "FAILED"
    assert UpdateJob.objects.count() == 1  # no further node started
