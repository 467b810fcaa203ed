"""The rollout coordinator against simulated agents (the same services the
real agents' reports go through)."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

import pytest
from django.contrib.auth.models import Group
from django.utils import timezone
from pytest_django import DjangoCaptureOnCommitCallbacks

from tenants.gate import GateDecision
from tenants.models import Tenant
from tenants.roles import RESPONDER
from tests.factories import make_cluster, make_node, make_release, make_tenant, make_user
from tests.fakes import Failures, answer_queued_jobs, report_metrics
from tests.jobs.test_outbox import RecordingTransport
from updates.models import (
    Cluster,
    Event,
    Node,
    Release,
    Rollout,
    RolloutNode,
    StageDecision,
    UpdateJob,
)
from updates.rollouts import bluegreen, coordinator, selectors
from updates.rollouts import services as rollouts
from updates.rollouts.coordinator import DriveOutcome
from updates.rollouts.plan import PlanError

pytestmark = pytest.mark.django_db

R = Rollout.State


@pytest.fixture
def release(db: None) -> Release:
    return make_release(version="1.7.0", sha256="ab" * 32, artifact="releases/x.tar")


def _cluster(
    n: int, *, leader: int = 0, version: str = "1.6.0", tenant: Tenant | None = None
) -> tuple[Cluster, list[Node]]:
    tenant = tenant or make_tenant()
    cluster = make_cluster(tenant=tenant)
    nodes = [
        make_node(
            node_id=f"{cluster.name}-n{i}",
            tenant=tenant,
            cluster=cluster,
            installed_version=version,
            raft_role="leader" if i == leader else "follower",
        )
        for i in range(n)
    ]
    return cluster, nodes


def _heartbeat(job: UpdateJob) -> None:
    """The node's first heartbeat after its job: its metrics now count for the gate."""
    Node.objects.filter(pk=job.node_id).update(last_heartbeat=timezone.now())


def _run(
    rollout: Rollout,
    *,
    failures: Failures | None = None,
    max_rounds: int = 100,
    check: Callable[[], None] | None = None,
) -> Rollout:
    """Drive and answer until nothing moves (the coordinator and agents, in turn)."""
    for _ in range(max_rounds):
        coordinator.rollout_drive(rollout.pk)
        if check:
            check()
        answered = answer_queued_jobs(failures=failures, on_done=_heartbeat)
        rollout.refresh_from_db()
        if not answered and coordinator.rollout_drive(rollout.pk) == rollout.state:
            rollout.refresh_from_db()
            if not UpdateJob.objects.filter(state=UpdateJob.State.QUEUED).exists():
                break
    rollout.refresh_from_db()
    return rollout


def _start(
    release: Release, nodes: list[Node], strategy: str = "rolling", **options: Any
) -> Rollout:
    rollout = rollouts.rollout_create(
        release=release, strategy=strategy, nodes=nodes, user=None, options=options
    )
    return rollouts.rollout_start(rollout=rollout, user=None)


def _job_order(rollout: Rollout) -> list[str]:
    return list(
        UpdateJob.objects.filter(rollout=rollout, kind="update")
        .order_by("pk")
        .values_list("node__node_id", flat=True)
    )


def test_rolling_updates_one_at_a_time_leader_last(release: Release) -> None:
    cluster, nodes = _cluster(3, leader=0)

    def at_most_one_in_flight() -> None:
        active = UpdateJob.objects.filter(state__in=UpdateJob.ACTIVE_STATES).count()
        assert active <= 1

    rollout = _run(_start(release, nodes), check=at_most_one_in_flight)
    assert rollout.state == R.COMPLETED
    order = _job_order(rollout)
    assert order[-1] == nodes[0].node_id  # the leader last
    assert set(Node.objects.values_list("installed_version", flat=True)) == {"1.7.0"}
    verbs = list(
        Event.objects.filter(object_type="rollout").order_by("id").values_list("verb", flat=True)
    )
    assert verbs[:2] == ["rollout.created", "rollout.started"]
    assert verbs[-1] == "rollout.completed"
    assert selectors.rollout_progress(rollout)["nodes_updated"] == 3


def test_failed_health_check_stops_the_rollout_and_spares_the_rest(release: Release) -> None:
    cluster, nodes = _cluster(3, leader=2)  # order: n0, n1, n2 (leader)
    rollout = _run(_start(release, nodes), failures={nodes[1].node_id: "health check failed"})
    assert rollout.state == R.FAILED
    states = dict(RolloutNode.objects.values_list("node__node_id", "state"))
    assert states == {
        nodes[0].node_id: "DONE",
        nodes[1].node_id: "ROLLED_BACK",
        nodes[2].node_id: "SKIPPED",
    }
    assert not UpdateJob.objects.filter(node=nodes[2]).exists()  # node 3 untouched
    assert Node.objects.get(pk=nodes[1].pk).installed_version == "1.6.0"
    assert "failed" in rollout.error_message


def test_parallel_mode_respects_max_unavailable_per_cluster(release: Release) -> None:
    _, nodes_a = _cluster(4, leader=0)
    _, nodes_b = _cluster(4, leader=0, tenant=nodes_a[0].tenant)
    rollout = _start(release, nodes_a + nodes_b, parallel=True, max_unavailable=2)
    coordinator.rollout_drive(rollout.pk)
    in_flight = UpdateJob.objects.filter(state=UpdateJob.State.QUEUED)
    per_cluster: dict[int | None, int] = {}
    for job in in_flight.select_related("node"):
        per_cluster[job.node.cluster_id] = per_cluster.get(job.node.cluster_id, 0) + 1
    assert sorted(per_cluster.values()) == [2, 2]
    assert not in_flight.filter(node__raft_role="leader").exists()
    assert _run(rollout).state == R.COMPLETED


def _canary(release: Release, n: int = 10, **options: Any) -> tuple[Rollout, list[Node]]:
    tenant = make_tenant()
    nodes = [
        make_node(node_id=f"c{i:02d}", tenant=tenant, installed_version="1.6.0") for i in range(n)
    ]
    return _start(release, nodes, strategy="canary", **options), nodes


def test_canary_honours_stage_fractions_and_needs_approval_for_100(release: Release) -> None:
    rollout, nodes = _canary(release, 10)
    sizes = [1, 2, 7]  # 1 %, 5 % (no new node at 10 nodes: dropped), 25 %, 100 %

    def never_more_than_the_stage() -> None:
        rollout.refresh_from_db()
        touched = UpdateJob.objects.filter(rollout=rollout).count()
        assert touched <= sum(sizes[: rollout.current_stage + 1])

    responder = make_user(username="rita")
    Group.objects.get_or_create(name=RESPONDER)
    report_metrics([n.node_id for n in nodes], error_rate=0.001, p99_ms=120)
    rollout = _run(rollout, check=never_more_than_the_stage)
    assert rollout.state == R.AWAITING_APPROVAL
    assert UpdateJob.objects.filter(rollout=rollout, state="DONE").count() == 1
    rollouts.rollout_approve(rollout=rollout, user=responder)
    rollout = _run(rollout, check=never_more_than_the_stage)
    assert rollout.state == R.AWAITING_APPROVAL  # 100 % always needs a person
    assert UpdateJob.objects.filter(rollout=rollout, state="DONE").count() == 3
    rollouts.rollout_approve(rollout=rollout, user=responder)
    rollout = _run(rollout, check=never_more_than_the_stage)
    assert rollout.state == R.COMPLETED
    approvals = StageDecision.objects.filter(rollout=rollout, decision="approved")
    assert [a.decided_by_label for a in approvals] == ["rita", "rita"]
    assert all(a.created_at for a in approvals)


def test_automatic_gate_promotes_without_a_person(release: Release) -> None:
    stages = [{"fraction": 0.1, "auto_promote": True}, {"fraction": 1.0, "auto_promote": True}]
    rollout, nodes = _canary(release, 10, stages=stages, gate={"automatic": True})
    report_metrics([n.node_id for n in nodes], error_rate=0.0, p99_ms=50)
    assert _run(rollout).state == R.COMPLETED
    assert StageDecision.objects.filter(rollout=rollout, decision="auto_promoted").count() == 1


def test_gate_breach_rolls_back_the_canary_nodes(release: Release) -> None:
    rollout, nodes = _canary(release, 10)
    report_metrics([n.node_id for n in nodes], error_rate=0.2, p99_ms=900)
    rollout = _run(rollout)
    assert rollout.state == R.FAILED
    assert "health gate failed" in rollout.error_message
    assert "error rate 20.0%" in rollout.error_message
    canary = RolloutNode.objects.get(rollout=rollout, stage=0)
    assert canary.state == "ROLLED_BACK"
    assert Node.objects.get(pk=canary.node_id).installed_version == "1.6.0"
    assert UpdateJob.objects.filter(rollout=rollout, kind="rollback", state="DONE").count() == 1
    assert UpdateJob.objects.filter(rollout=rollout, kind="update").count() == 1


def test_the_gate_judges_this_rollouts_nodes_only(release: Release) -> None:
    # Another rollout updated a node earlier, and that node is unhealthy now: not this
    # rollout's canary, so not this gate's business.
    other = make_node(node_id="x00", tenant=make_tenant(), installed_version="1.6.0")
    assert _run(_start(release, [other])).state == R.COMPLETED
    rollout, nodes = _canary(release, 10)
    report_metrics(["x00"], error_rate=0.5, p99_ms=5000)
    report_metrics([n.node_id for n in nodes], error_rate=0.0, p99_ms=50)
    assert _run(rollout).state == R.AWAITING_APPROVAL
    passed = StageDecision.objects.get(rollout=rollout, decision="gate_passed")
    assert (passed.details["error_rate"], passed.details["unhealthy"]) == (0.0, [])


def test_abort_rolls_back_every_touched_node(release: Release) -> None:
    rollout, nodes = _canary(release, 10)
    report_metrics([n.node_id for n in nodes], error_rate=0.0, p99_ms=10)
    rollout = _run(rollout)
    rollouts.rollout_approve(rollout=rollout, user=make_user())
    rollout = _run(rollout)  # 3 nodes updated, waiting for the final approval
    rollouts.rollout_abort(rollout=rollout, user=make_user(username="olivia"))
    rollout = _run(rollout)
    assert rollout.state == R.ABORTED
    assert RolloutNode.objects.filter(rollout=rollout, state="ROLLED_BACK").count() == 3
    assert set(Node.objects.values_list("installed_version", flat=True)) == {"1.6.0"}


def test_an_abort_after_a_retry_of_a_failed_gate_ends_aborted(release: Release) -> None:
    # The gate's old failure belongs to the run before the retry: this rollback is the
    # operator's, so the rollout ends ABORTED, not FAILED.
    rollout, nodes = _canary(release, 10)
    report_metrics([n.node_id for n in nodes], error_rate=0.2, p99_ms=900)
    assert _run(rollout).state == R.FAILED
    rollouts.rollout_retry_failed(rollout=rollout, user=None)
    report_metrics([n.node_id for n in nodes], error_rate=0.0, p99_ms=10)
    rollout = _run(rollout)
    assert rollout.state == R.AWAITING_APPROVAL
    rollouts.rollout_abort(rollout=rollout, user=make_user(username="olivia"))
    rollout = _run(rollout)
    assert rollout.state == R.ABORTED
    assert RolloutNode.objects.get(rollout=rollout, stage=0).state == "ROLLED_BACK"


def test_pause_and_resume(release: Release) -> None:
    _, nodes = _cluster(3)
    rollout = _start(release, nodes)
    rollouts.rollout_pause(rollout=rollout, user=None)
    coordinator.rollout_drive(rollout.pk)
    assert not UpdateJob.objects.exists()
    rollouts.rollout_resume(rollout=rollout, user=None)
    assert _run(rollout).state == R.COMPLETED


def test_cancel_lets_the_node_in_flight_finish(release: Release) -> None:
    _, nodes = _cluster(3)
    rollout = _start(release, nodes)
    coordinator.rollout_drive(rollout.pk)  # first node queued
    rollouts.rollout_cancel(rollout=rollout, user=None)
    rollout = _run(rollout)
    assert rollout.state == R.CANCELLED
    states = sorted(RolloutNode.objects.values_list("state", flat=True))
    assert states == ["DONE", "SKIPPED", "SKIPPED"]
    assert not UpdateJob.objects.filter(state__in=UpdateJob.ACTIVE_STATES).exists()


def test_retry_failed_nodes_of_a_finished_rollout(release: Release) -> None:
    _, nodes = _cluster(3, leader=2)
    rollout = _run(_start(release, nodes), failures={nodes[1].node_id: "boom"})
    assert rollout.state == R.FAILED
    assert rollouts.rollout_retry_failed(rollout=rollout, user=None) == 1
    rollout = _run(rollout)
    assert rollout.state == R.COMPLETED
    assert RolloutNode.objects.get(rollout=rollout, node=nodes[1]).attempts == 1


def test_one_drive_at_a_time(release: Release) -> None:
    _, nodes = _cluster(3)
    rollout = _start(release, nodes)
    assert coordinator.claim_lease(rollout.pk, "other-coordinator")
    assert coordinator.rollout_drive(rollout.pk) == DriveOutcome.BUSY
    assert not UpdateJob.objects.exists()
    # an expired lease (its holder died) is taken over
    Rollout.objects.filter(pk=rollout.pk).update(
        lease_expires=timezone.now() - timedelta(seconds=1)
    )
    assert coordinator.rollout_drive(rollout.pk) == DriveOutcome.RUNNING
    assert UpdateJob.objects.count() == 1


def test_actions_in_the_wrong_state_are_refused(release: Release) -> None:
    _, nodes = _cluster(2)
    rollout = _start(release, nodes)
    with pytest.raises(rollouts.RolloutError, match="cannot go to RUNNING"):
        rollouts.rollout_approve(rollout=rollout, user=make_user())
    with pytest.raises(rollouts.RolloutError):
        rollouts.rollout_resume(rollout=rollout, user=None)


def test_deprecated_release_refused(release: Release) -> None:
    _, nodes = _cluster(2)
    release.state = "deprecated"
    release.save()
    with pytest.raises(PlanError, match="no new rollouts"):
        rollouts.rollout_create(release=release, strategy="rolling", nodes=nodes, user=None)


def test_blue_green_updates_idle_colour_then_switches(release: Release) -> None:
    cluster, nodes = _cluster(4, leader=0)
    for node, color in zip(nodes, ["blue", "blue", "green", "green"], strict=True):
        Node.objects.filter(pk=node.pk).update(color=color)
    Cluster.objects.filter(pk=cluster.pk).update(active_color="blue")
    switched = []
    nodes = list(Node.objects.filter(cluster=cluster))
    rollout = rollouts.rollout_create(
        release=release, strategy="blue_green", nodes=nodes, user=None
    )
    rollouts.rollout_start(rollout=rollout, user=None)
    for _ in range(10):
        coordinator.rollout_drive(
            rollout.pk,
            ctx=coordinator.DriveContext(switch=lambda c, color, r: switched.append(color)),
        )
        answer_queued_jobs()
    rollout.refresh_from_db()
    assert rollout.state == R.COMPLETED
    assert switched == ["green"]
    assert Cluster.objects.get(pk=cluster.pk).active_color == "green"
    updated = set(Node.objects.filter(installed_version="1.7.0").values_list("color", flat=True))
    assert updated == {"green"}  # the old colour is kept as it was
    # switching back is a person's click on the cluster
    bluegreen.blue_green_switch(rollout=None, switch=lambda *a: None, user=None, cluster=cluster)
    assert Cluster.objects.get(pk=cluster.pk).active_color == "blue"


def test_max_parallel_caps_nodes_updating_at_once(release: Release) -> None:
    rollout, nodes = _canary(
        release, 10, stages=[{"fraction": 1.0, "auto_promote": False}], max_parallel=3
    )

    def at_most_three() -> None:
        assert UpdateJob.objects.filter(state__in=UpdateJob.ACTIVE_STATES).count() <= 3

    report_metrics([n.node_id for n in nodes], error_rate=0.0, p99_ms=10)
    coordinator.rollout_drive(rollout.pk)
    assert UpdateJob.objects.filter(state="QUEUED").count() == 3
    assert _run(rollout, check=at_most_three).state == R.COMPLETED


def test_max_parallel_caps_a_rolling_rollout_below_its_max_unavailable(
    release: Release,
) -> None:
    """Both limits apply: the cluster's budget (max_unavailable) and the fleet's cap."""
    _, nodes = _cluster(4, leader=0)
    rollout = _start(release, nodes, max_unavailable=2, max_parallel=1)
    coordinator.rollout_drive(rollout.pk)
    assert UpdateJob.objects.filter(state="QUEUED").count() == 1

    def at_most_one() -> None:
        assert UpdateJob.objects.filter(state__in=UpdateJob.ACTIVE_STATES).count() <= 1

    assert _run(rollout, check=at_most_one).state == R.COMPLETED


def test_a_drive_starts_its_batches_at_its_own_time_through_its_own_transport(
    release: Release, django_capture_on_commit_callbacks: DjangoCaptureOnCommitCallbacks
) -> None:
    """The drive's clock is what the tenants' gate is asked at, and its transport carries
    every start, one by one and in batches alike (the first step starts one node, the next
    two, then four)."""
    # A tenant each: the drive asks the gate once per tenant, so every node is asked.
    nodes = [
        make_node(node_id=f"t{i}", tenant=make_tenant(), installed_version="1.6.0")
        for i in range(7)
    ]
    stages = [{"fraction": 1.0, "auto_promote": False}]
    rollout = _start(release, nodes, strategy="canary", stages=stages)
    asked: list[datetime | None] = []

    def gate(*, node: Node, release: Release | None, at: datetime | None = None) -> GateDecision:
        asked.append(at)
        return GateDecision(allowed=True)

    later = timezone.now() + timedelta(days=3)
    transport = RecordingTransport()
    ctx = coordinator.DriveContext(now=later, gate=gate, transport=transport)
    with django_capture_on_commit_callbacks(execute=True):
        coordinator.rollout_drive(rollout.pk, ctx=ctx)
    assert UpdateJob.objects.filter(state="QUEUED").count() == 7
    assert len(asked) == 7 and set(asked) == {later}
    started = sorted(node_id for _, node_id, _, _ in transport.sent)
    assert started == sorted(n.node_id for n in nodes)


def test_bake_time_delays_the_gate(release: Release) -> None:
    rollout, nodes = _canary(release, 10, gate={"bake_seconds": 60})
    report_metrics([n.node_id for n in nodes], error_rate=0.0, p99_ms=10)
    rollout = _run(rollout)
    assert rollout.state == R.RUNNING  # stage 1 done, still baking
    assert not StageDecision.objects.filter(rollout=rollout, decision="gate_passed").exists()
    later = timezone.now() + timedelta(seconds=61)
    # the nodes' heartbeats after the bake time carry the metrics the gate reads
    Node.objects.update(last_heartbeat=later)
    coordinator.rollout_drive(rollout.pk, ctx=coordinator.DriveContext(now=later))
    rollout.refresh_from_db()
    assert rollout.state == R.AWAITING_APPROVAL
    assert StageDecision.objects.filter(rollout=rollout, decision="gate_passed").exists()
