"""Rollouts through real processes: Redis, a coordinator worker with beat, one
Celery agent per node applying real signed bundles into its own install dir,
downloading them from the live dashboard."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import pytest

from tests import procs
from tests.factories import make_cluster, make_node, make_tenant, make_user
from tests.fleet_stack import BASE, NEW, RealFleet, StartFleet
from tests.helpers import MakeBundle, publish_bundle, tree
from updates.models import Event, Node, Release, Rollout, RolloutNode, UpdateJob
from updates.rollouts import services as rollouts

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]


def _cluster(n: int, leader: int) -> list[Node]:
    tenant = make_tenant()
    cluster = make_cluster(tenant=tenant, name="main")
    return [
        make_node(
            node_id=f"db-{i}",
            tenant=tenant,
            cluster=cluster,
            installed_version="1.6.0",
            raft_role="leader" if i == leader else "follower",
        )
        for i in range(n)
    ]


def _wait_state(
    rollout: Rollout, states: set[str], real: RealFleet, timeout: float = 120
) -> Rollout:
    reached = procs.wait_until(
        lambda: Rollout.objects.get(pk=rollout.pk).state in states, timeout, 0.3
    )
    rollout.refresh_from_db()
    assert reached, f"rollout stuck in {rollout.state}\n{real.logs()}"
    return rollout


def _start(
    release: Release, nodes: list[Node], strategy: str = "rolling", **options: Any
) -> Rollout:
    rollout = rollouts.rollout_create(
        release=release, strategy=strategy, nodes=nodes, user=None, options=options
    )
    return rollouts.rollout_start(rollout=rollout, user=None)


def _done_order(rollout: Rollout) -> list[str]:
    events = Event.objects.filter(verb="job.done", details__rollout_id=rollout.pk).order_by("id")
    return [e.details["node_id"] for e in events]


def test_rolling_cluster_update_leader_last(
    real_fleet: StartFleet, make_bundle: MakeBundle
) -> None:
    nodes = _cluster(3, leader=0)
    real = real_fleet(nodes)
    release = publish_bundle(make_bundle("1.7.0", files=NEW), "1.7.0")
    rollout = _wait_state(_start(release, nodes), {"COMPLETED", "FAILED"}, real)
    assert rollout.state == "COMPLETED", rollout.error_message
    assert _done_order(rollout) == ["db-1", "db-2", "db-0"]  # leader last
    for node in nodes:
        assert tree(real.install(node)) == NEW
    assert set(Node.objects.values_list("installed_version", flat=True)) == {"1.7.0"}


def test_failing_health_check_rolls_node_back_and_spares_the_rest(
    real_fleet: StartFleet, make_bundle: MakeBundle
) -> None:
    nodes = _cluster(3, leader=2)  # order db-0, db-1, db-2 (leader)
    real = real_fleet(nodes, failing={"db-1"})
    release = publish_bundle(make_bundle("1.7.0", files=NEW), "1.7.0")
    rollout = _wait_state(_start(release, nodes), {"COMPLETED", "FAILED"}, real)
    assert rollout.state == "FAILED"
    states = dict(RolloutNode.objects.values_list("node__node_id", "state"))
    assert states == {"db-0": "DONE", "db-1": "ROLLED_BACK", "db-2": "SKIPPED"}
    assert tree(real.install(nodes[0])) == NEW
    assert tree(real.install(nodes[1])) == BASE  # rolled back, byte for byte
    assert tree(real.install(nodes[2])) == BASE  # never touched
    assert not UpdateJob.objects.filter(node=nodes[2]).exists()


def test_canary_on_ten_nodes_with_approval_then_abort_rolls_back(
    real_fleet: StartFleet, make_bundle: MakeBundle
) -> None:
    tenant = make_tenant()
    nodes = [
        make_node(node_id=f"c{i}", tenant=tenant, installed_version="1.6.0") for i in range(10)
    ]
    real = real_fleet(nodes)
    release = publish_bundle(make_bundle("1.7.0", files=NEW), "1.7.0")
    rollout = _start(release, nodes, strategy="canary")
    allowed = {0: 1, 1: 3, 2: 10}  # 1 %, 25 %, 100 % of 10 (5 % adds no node)

    def within_stage() -> bool:
        current = Rollout.objects.get(pk=rollout.pk)
        touched = UpdateJob.objects.filter(rollout=rollout, kind="update").count()
        assert touched <= allowed[current.current_stage]
        return current.state == "AWAITING_APPROVAL"

    assert procs.wait_until(within_stage, 120, 0.2), real.logs()
    assert UpdateJob.objects.filter(rollout=rollout, state="DONE").count() == 1
    responder = make_user(username="rita")
    rollouts.rollout_approve(rollout=rollout, user=responder)
    assert procs.wait_until(
        lambda: (
            within_stage() and UpdateJob.objects.filter(rollout=rollout, state="DONE").count() == 3
        ),
        120,
        0.2,
    ), real.logs()
    rollout.refresh_from_db()
    assert rollout.current_stage == 1  # 100 % still needs an approval
    rollouts.rollout_abort(rollout=rollout, user=responder)
    rollout = _wait_state(rollout, {"ABORTED", "FAILED"}, real)
    assert rollout.state == "ABORTED"
    rolled = RolloutNode.objects.filter(rollout=rollout, state="ROLLED_BACK")
    assert rolled.count() == 3
    for row in rolled.select_related("node"):
        assert tree(real.install(row.node)) == BASE
    assert set(Node.objects.values_list("installed_version", flat=True)) == {"1.6.0"}


def test_coordinator_killed_mid_rollout_is_replaced(
    real_fleet: StartFleet, make_bundle: MakeBundle, tmp_path: Path
) -> None:
    nodes = _cluster(3, leader=1)  # order db-0, db-2, db-1 (leader)
    # Each node's drain hook waits until the test opens that node's gate (60 s at most),
    # so the rollout is exactly where the test wants it when the coordinator dies.
    gates = tmp_path / "gates"
    gates.mkdir()
    drain = (
        f"touch {gates}/held-$THEMIS_NODE_ID; i=0; "
        f"while [ ! -e {gates}/open-$THEMIS_NODE_ID ] && [ $i -lt 1200 ]; "
        f"do sleep 0.05; i=$((i+1)); done; [ -e {gates}/open-$THEMIS_NODE_ID ]"
    )
    real = real_fleet(nodes, drain_cmd=drain)
    release = publish_bundle(make_bundle("1.7.0", files=NEW), "1.7.0")
    rollout = _start(release, nodes)

    assert procs.wait_until((gates / "held-db-0").exists, 120), real.logs()
    (gates / "open-db-0").touch()
    first_done = procs.wait_until(
        lambda: RolloutNode.objects.filter(rollout=rollout, state="DONE").exists(), 120, 0.2
    )
    assert first_done, real.logs()
    # The second node is held in its drain: its job is in flight when the coordinator dies.
    assert procs.wait_until((gates / "held-db-2").exists, 120), real.logs()

    assert real.coordinator is not None
    real.coordinator.kill(signal.SIGKILL)
    # Unfinished at the kill: running, one node done, one in flight, one not started.
    rollout.refresh_from_db()
    assert rollout.state == "RUNNING", rollout.state
    plan = dict(RolloutNode.objects.filter(rollout=rollout).values_list("node__node_id", "state"))
    assert plan == {"db-0": "DONE", "db-2": "RUNNING", "db-1": "PENDING"}, plan
    assert UpdateJob.objects.get(rollout=rollout, node__node_id="db-2").state not in (
        UpdateJob.FINAL_STATES
    )
    assert not (gates / "held-db-1").exists()

    for node in ("db-2", "db-1"):
        (gates / f"open-{node}").touch()
    real.start_coordinator()  # a new process picks the rollout up from the database
    rollout = _wait_state(rollout, {"COMPLETED", "FAILED"}, real)
    assert rollout.state == "COMPLETED", rollout.error_message
    assert _done_order(rollout)[-1] == "db-1"
    assert UpdateJob.objects.filter(rollout=rollout).count() == 3  # no node updated twice
