"""The drive when the fleet is not as the plan found it: a node busy with someone else's
job, a row another process took between two steps, a node with no restore point left
to roll back to, a parked job when the rollout is cancelled, a blue/green rollout
recorded without its target colour. Simulated agents play the nodes (tests.fakes)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import pytest
from django.utils import timezone

from tenants.gate import GateDecision
from tests.factories import make_cluster, make_node, make_release, make_tenant
from tests.fakes import NullTransport, answer_queued_jobs
from updates.jobs import services as jobs
from updates.models import (
    Cluster,
    Event,
    Node,
    NodeCommand,
    Release,
    Rollout,
    RolloutNode,
    UpdateJob,
)
from updates.releases import services as releases
from updates.rollouts import coordinator
from updates.rollouts import services as rollouts
from updates.rollouts.coordinator import DriveContext, DriveStep

pytestmark = pytest.mark.django_db

R = Rollout.State
S = UpdateJob.State


@pytest.fixture
def release(db: None) -> Release:
    return make_release(version="1.7.0", sha256="ab" * 32, artifact="releases/x.tar")


@pytest.fixture(autouse=True)
def _no_agents(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(jobs, "default_transport", NullTransport)


def _standalone(n: int, **fields: Any) -> list[Node]:
    """Nodes outside any cluster: no cluster budget keeps a busy one out of the plan's way."""
    tenant = make_tenant()
    return [
        make_node(node_id=f"s{i}", tenant=tenant, installed_version="1.6.0", **fields)
        for i in range(n)
    ]


def _start(
    release: Release, nodes: list[Node], strategy: str = "rolling", **options: Any
) -> Rollout:
    rollout = rollouts.rollout_create(
        release=release, strategy=strategy, nodes=nodes, user=None, options=options
    )
    return rollouts.rollout_start(rollout=rollout, user=None)


def _settle(rollout: Rollout, rounds: int = 30) -> str:
    for _ in range(rounds):
        coordinator.rollout_drive(rollout.pk)
        if not answer_queued_jobs():
            coordinator.rollout_drive(rollout.pk)
            break
    rollout.refresh_from_db()
    return str(rollout.state)


def _rows(rollout: Rollout) -> dict[str, str]:
    return dict(RolloutNode.objects.filter(rollout=rollout).values_list("node__node_id", "state"))


def test_a_node_busy_with_another_job_waits_and_the_next_one_goes_first(
    release: Release,
) -> None:
    s0, s1 = _standalone(2)
    other = UpdateJob.objects.create(node=s0, release=release, state=S.APPLYING)
    rollout = _start(release, [s0, s1])
    coordinator.rollout_drive(rollout.pk)
    # s0 would go first but has a job in progress: it waits, s1 starts meanwhile
    assert list(
        UpdateJob.objects.filter(rollout=rollout).values_list("node__node_id", flat=True)
    ) == ["s1"]
    assert _rows(rollout) == {"s0": "PENDING", "s1": "RUNNING"}
    answer_queued_jobs()
    coordinator.rollout_drive(rollout.pk)
    assert _rows(rollout)["s0"] == "PENDING"  # still busy: still waiting, not failed
    jobs.job_finish(job_id=other.pk, node_id="s0", ok=True)
    assert _settle(rollout) == R.COMPLETED
    assert _rows(rollout) == {"s0": "DONE", "s1": "DONE"}


def test_a_row_taken_between_two_steps_undoes_only_its_own_start(
    release: Release,
) -> None:
    nodes = _standalone(3)
    rollout = _start(release, nodes, parallel=True)
    rows = {r.node.node_id: r for r in RolloutNode.objects.filter(rollout=rollout)}

    def another_process_takes_s1(step: DriveStep) -> None:
        if step == DriveStep.START_NODE:
            RolloutNode.objects.filter(pk=rows["s1"].pk).update(state=RolloutNode.State.SKIPPED)

    coordinator.rollout_drive(rollout.pk, ctx=DriveContext(after_commit=another_process_takes_s1))
    # s0 started alone in the first step; in the next, s1's row was no longer pending:
    # its job and command were undone, and s2 started beside it in the same step.
    started = UpdateJob.objects.filter(rollout=rollout)
    assert sorted(started.values_list("node__node_id", flat=True)) == ["s0", "s2"]
    assert not UpdateJob.objects.filter(node=nodes[1]).exists()
    assert not NodeCommand.objects.filter(node=nodes[1]).exists()
    assert not Event.objects.filter(verb="job.update.queued", details__node_id="s1").exists()
    assert _rows(rollout) == {"s0": "RUNNING", "s1": "SKIPPED", "s2": "RUNNING"}
    assert _settle(rollout) == R.COMPLETED
    assert _rows(rollout) == {"s0": "DONE", "s1": "SKIPPED", "s2": "DONE"}


def _on_17_with_points() -> list[Node]:
    """Two nodes on 1.7.0 (the `release` fixture) with a restore point back to 1.6.0."""
    points = [{"id": "p-1.6.0", "version": "1.6.0", "created": "2026-11-20T00:00:00Z"}]
    nodes = _standalone(2, restore_points=points)
    Node.objects.filter(pk__in=[n.pk for n in nodes]).update(installed_version="1.7.0")
    return nodes


def test_a_tenant_rollback_skips_a_node_whose_restore_point_is_gone(release: Release) -> None:
    s0, s1 = _on_17_with_points()
    rollout = rollouts.tenant_rollback_start(tenant=s0.tenant, user=None)
    # Before the drive reaches it, s0's agent pruned its points (its heartbeat says so).
    Node.objects.filter(pk=s0.pk).update(restore_points=[])
    assert _settle(rollout) == R.COMPLETED
    assert _rows(rollout) == {"s0": "SKIPPED", "s1": "DONE"}
    assert not UpdateJob.objects.filter(node=s0).exists()
    assert Node.objects.get(pk=s1.pk).installed_version == "1.6.0"


def test_a_tenant_rollback_waits_for_a_node_busy_with_another_job(release: Release) -> None:
    s0, s1 = _on_17_with_points()
    other = UpdateJob.objects.create(node=s0, release=release, state=S.APPLYING)
    rollout = rollouts.tenant_rollback_start(tenant=s0.tenant, user=None)
    coordinator.rollout_drive(rollout.pk)
    assert _rows(rollout) == {"s0": "PENDING", "s1": "RUNNING"}
    jobs.job_finish(job_id=other.pk, node_id="s0", ok=True)
    assert _settle(rollout) == R.COMPLETED
    assert _rows(rollout) == {"s0": "DONE", "s1": "DONE"}
    assert UpdateJob.objects.filter(node=s0, kind="rollback", state=S.DONE).count() == 1


def test_cancelling_cancels_a_job_parked_for_its_window(release: Release) -> None:
    nodes = _standalone(2)
    rollout = _start(release, nodes)

    def closed(*, node: Node, release: Release | None, at: datetime | None = None) -> GateDecision:
        return GateDecision(False, "WAITING_FOR_WINDOW", "outside maintenance windows", None, "")

    coordinator.rollout_drive(rollout.pk, ctx=DriveContext(gate=closed))
    parked = UpdateJob.objects.get(rollout=rollout)
    assert parked.state == S.WAITING_FOR_WINDOW
    rollouts.rollout_cancel(rollout=rollout, user=None)
    coordinator.rollout_drive(rollout.pk)
    rollout.refresh_from_db()
    parked.refresh_from_db()
    assert rollout.state == R.CANCELLED and rollout.finished_at is not None
    assert parked.state == S.CANCELLED  # never sent: it ends now
    assert sorted(_rows(rollout).values()) == ["FAILED", "SKIPPED"]
    assert Event.objects.filter(verb="rollout.cancelled_done", object_id=str(rollout.pk)).exists()


def test_a_release_deprecated_mid_rollout_ends_it_cancelled_once_the_node_in_flight_is_done(
    release: Release,
) -> None:
    nodes = _standalone(3)
    rollout = _start(release, nodes)
    coordinator.rollout_drive(rollout.pk)
    assert _rows(rollout) == {"s0": "RUNNING", "s1": "PENDING", "s2": "PENDING"}
    releases.release_deprecate(release=release, user=None)
    # Every further start would be refused: the rollout must not wait for them forever.
    assert _settle(rollout) == R.CANCELLED
    rollout.refresh_from_db()
    assert rollout.error_message == "release 1.7.0 was deprecated mid-rollout"
    assert rollout.finished_at is not None
    assert _rows(rollout) == {"s0": "DONE", "s1": "SKIPPED", "s2": "SKIPPED"}
    assert list(
        UpdateJob.objects.filter(rollout=rollout).values_list("node__node_id", "state")
    ) == [("s0", S.DONE)]
    decision = rollout.decisions.get(decision="cancelled")
    assert decision.decided_by_label == "coordinator"
    assert decision.details == {"reason": "release 1.7.0 was deprecated mid-rollout"}
    # What the notification channels and the audit page show.
    cancelled = Event.objects.filter(
        verb="rollout.cancelled", object_type="rollout", object_id=str(rollout.pk)
    )
    assert [e.details for e in cancelled] == [
        {
            "rollout_id": rollout.pk,
            "strategy": "rolling",
            "release_version": "1.7.0",
            "stage": 0,
            "reason": "release 1.7.0 was deprecated mid-rollout",
        }
    ]


def test_a_rollout_started_on_a_deprecated_release_cancels_before_any_node(
    release: Release,
) -> None:
    nodes = _standalone(2)
    rollout = rollouts.rollout_create(release=release, strategy="rolling", nodes=nodes, user=None)
    releases.release_deprecate(release=release, user=None)
    rollouts.rollout_start(rollout=rollout, user=None)
    assert _settle(rollout) == R.CANCELLED
    assert not UpdateJob.objects.filter(rollout=rollout).exists()
    assert not NodeCommand.objects.filter(node__in=nodes).exists()


def _blue_green_without_target(release: Release, colors: list[str]) -> tuple[Cluster, Rollout]:
    """A blue/green rollout whose target colour was never recorded (made before it was)."""
    cluster = make_cluster(tenant=make_tenant(), active_color="blue")
    nodes = [
        make_node(
            node_id=f"bg{i}",
            tenant=cluster.tenant,
            cluster=cluster,
            installed_version="1.6.0",
            color=color,
        )
        for i, color in enumerate(["blue", "green", "green"])
    ]
    rollout = _start(release, nodes, strategy="blue_green")
    Rollout.objects.filter(pk=rollout.pk).update(target_color="")
    for node, color in zip(
        RolloutNode.objects.filter(rollout=rollout).order_by("position"), colors, strict=True
    ):
        Node.objects.filter(pk=node.node_id).update(color=color)
    return cluster, rollout


def test_a_blue_green_rollout_without_a_target_colour_takes_its_plans_colour(
    release: Release,
) -> None:
    cluster, rollout = _blue_green_without_target(release, ["green", "green"])
    rolling = _start(release, _standalone(1))  # another rollout, with no colour of its own
    switched: list[str] = []
    ctx = DriveContext(switch=lambda c, color, r: switched.append(color))
    for _ in range(10):
        coordinator.rollout_drive(rollout.pk, ctx=ctx)
        answer_queued_jobs()
    rollout.refresh_from_db()
    assert rollout.state == R.COMPLETED and rollout.target_color == "green"
    assert switched == ["green"]
    assert Cluster.objects.get(pk=cluster.pk).active_color == "green"
    assert Rollout.objects.get(pk=rolling.pk).target_color == ""


def test_a_blue_green_rollout_switches_to_its_recorded_colour_after_a_node_changed_colour(
    release: Release,
) -> None:
    cluster = make_cluster(tenant=make_tenant(), active_color="blue")
    nodes = [
        make_node(
            node_id=f"bg{i}",
            tenant=cluster.tenant,
            cluster=cluster,
            installed_version="1.6.0",
            color=color,
        )
        for i, color in enumerate(["blue", "green", "green"])
    ]
    rollout = _start(release, nodes, strategy="blue_green")
    assert rollout.target_color == "green"
    # Mid-rollout, one of the updated nodes is re-labelled: the colour recorded at the
    # rollout's creation still decides the switch, the plan's colours are not read again.
    Node.objects.filter(node_id="bg1").update(color="blue")
    switched: list[str] = []
    ctx = DriveContext(switch=lambda c, color, r: switched.append(color))
    for _ in range(10):
        coordinator.rollout_drive(rollout.pk, ctx=ctx)
        answer_queued_jobs()
    rollout.refresh_from_db()
    assert rollout.state == R.COMPLETED and rollout.error_message == ""
    assert switched == ["green"]
    assert Cluster.objects.get(pk=cluster.pk).active_color == "green"


def test_a_blue_green_plan_of_mixed_colours_fails_instead_of_switching(
    release: Release,
) -> None:
    cluster, rollout = _blue_green_without_target(release, ["green", "blue"])
    switched: list[str] = []
    ctx = DriveContext(switch=lambda c, color, r: switched.append(color))
    for _ in range(10):
        coordinator.rollout_drive(rollout.pk, ctx=ctx)
        answer_queued_jobs()
    rollout.refresh_from_db()
    assert rollout.state == R.FAILED
    assert rollout.error_message == "blue/green: the plan's nodes are not all of one colour"
    assert switched == [] and Cluster.objects.get(pk=cluster.pk).active_color == "blue"
    assert rollout.finished_at is not None and rollout.finished_at <= timezone.now()
