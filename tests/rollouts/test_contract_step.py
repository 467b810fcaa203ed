"""Expand/contract in rollouts: a release's contract migrations run on a node only once
every node of its cluster runs the release (a standalone node: once it does), plus the
rollout's contract delay; the rollout ends only after its contract jobs. Simulated agents
play the nodes (tests.fakes), faults come in through the drive's seams."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
from django.utils import timezone

from tenants.models import Tenant
from tests.factories import make_cluster, make_node, make_release, make_tenant
from tests.fakes import Failures, NullTransport, answer_queued_jobs
from updates.jobs.deadlines import job_end_lost
from updates.jobs.services import job_finish
from updates.models import Cluster, Event, Node, Release, Rollout, RolloutNode, UpdateJob
from updates.rollout_options import OptionsError, RolloutOptions
from updates.rollouts import coordinator
from updates.rollouts import services as rollouts
from updates.rollouts.coordinator import DriveContext, DriveStep

pytestmark = pytest.mark.django_db

R = Rollout.State
CS = RolloutNode.ContractState
CONTRACT = UpdateJob.Kind.CONTRACT
MIGRATIONS = [{"version": "0001", "phase": "expand"}, {"version": "0002", "phase": "contract"}]


@pytest.fixture
def release(db: None) -> Release:
    return make_release(
        version="1.7.0",
        sha256="ab" * 32,
        artifact="releases/x.tar",
        manifest={"version": "1.7.0", "migrations": MIGRATIONS},
    )


def _cluster(
    n: int, *, tenant: Tenant | None = None, name: str | None = None
) -> tuple[Cluster, list[Node]]:
    """n nodes of one cluster on 1.6.0, the first its leader (so it goes last)."""
    tenant = tenant or make_tenant()
    cluster = make_cluster(tenant=tenant, **({"name": name} if name else {}))
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


def _run(
    rollout: Rollout,
    *,
    failures: Failures | None = None,
    contract_failures: Failures | None = None,
    check: Callable[[], None] | None = None,
    ctx: DriveContext | None = None,
    rounds: int = 60,
) -> Rollout:
    """Drive and answer until nothing moves (the coordinator and the agents, in turn)."""
    for _ in range(rounds):
        coordinator.rollout_drive(rollout.pk, ctx=ctx)
        if check is not None:
            check()
        answered = answer_queued_jobs(failures=failures, contract_failures=contract_failures)
        if not answered:
            coordinator.rollout_drive(rollout.pk, ctx=ctx)
            if not UpdateJob.objects.filter(state=UpdateJob.State.QUEUED).exists():
                break
    rollout.refresh_from_db()
    return rollout


def _until_contract_jobs(rollout: Rollout) -> None:
    """Drive and answer the updates until the contract jobs are started (not answered)."""
    for _ in range(30):
        coordinator.rollout_drive(rollout.pk)
        if UpdateJob.objects.filter(rollout=rollout, kind=CONTRACT).exists():
            return
        answer_queued_jobs()
    raise AssertionError("no contract job was started")


def _until_updated(rollout: Rollout, count: int) -> None:
    """Drive and answer until every update job is done: the next drive finds them done."""
    done = UpdateJob.objects.filter(rollout=rollout, kind="update", state="DONE")
    for _ in range(30):
        if done.count() == count:
            assert not UpdateJob.objects.filter(kind=CONTRACT).exists()
            return
        coordinator.rollout_drive(rollout.pk)
        answer_queued_jobs()
    raise AssertionError("the updates did not end")


def _contract_jobs(rollout: Rollout) -> list[UpdateJob]:
    return list(UpdateJob.objects.filter(rollout=rollout, kind=CONTRACT).order_by("pk"))


def _verbs(rollout: Rollout) -> list[str]:
    return list(
        Event.objects.filter(object_type="rollout", object_id=str(rollout.pk))
        .order_by("id")
        .values_list("verb", flat=True)
    )


def test_contract_waits_until_every_node_of_the_cluster_runs_the_release(
    release: Release,
) -> None:
    cluster, nodes = _cluster(3)

    def contract_only_on_a_whole_cluster() -> None:
        if UpdateJob.objects.filter(kind=CONTRACT).exists():
            versions = set(Node.objects.filter(cluster=cluster).values_list("installed_version"))
            assert versions == {("1.7.0",)}
            updates = UpdateJob.objects.filter(kind=UpdateJob.Kind.UPDATE)
            assert set(updates.values_list("state", flat=True)) == {"DONE"}

    rollout = _start(release, nodes)
    rollout = _run(rollout, check=contract_only_on_a_whole_cluster)
    assert rollout.state == R.COMPLETED, rollout.error_message
    contract = _contract_jobs(rollout)
    assert sorted(j.node.node_id for j in contract) == sorted(n.node_id for n in nodes)
    assert {j.state for j in contract} == {"DONE"}
    assert all(j.release_id == release.pk for j in contract)
    # The contract jobs came after the last update (the leader's).
    last_update = UpdateJob.objects.filter(rollout=rollout, kind="update").latest("pk")
    assert min(j.pk for j in contract) > last_update.pk
    rows = RolloutNode.objects.filter(rollout=rollout)
    assert set(rows.values_list("contract_state", flat=True)) == {CS.DONE}
    assert set(Node.objects.values_list("schema_version", flat=True)) == {"0002"}
    verbs = _verbs(rollout)
    assert verbs.index("rollout.stage_completed") < verbs.index("rollout.contract_scheduled")
    assert verbs[-1] == "rollout.completed"
    completed = Event.objects.get(verb="rollout.completed")
    assert completed.details["contract_done"] == 3
    scheduled = Event.objects.get(verb="rollout.contract_scheduled")
    assert scheduled.details["group"] == f"cluster {cluster.name}"
    assert scheduled.details["migrations"] == ["0002"]


def test_the_rollout_is_running_while_its_contract_jobs_run(release: Release) -> None:
    _, nodes = _cluster(2)
    rollout = _start(release, nodes)
    _until_contract_jobs(rollout)
    assert len(_contract_jobs(rollout)) == 2
    coordinator.rollout_drive(rollout.pk)
    coordinator.rollout_drive(rollout.pk)
    rollout.refresh_from_db()
    assert rollout.state == R.RUNNING
    assert len(_contract_jobs(rollout)) == 2  # driving again starts none twice
    answer_queued_jobs()
    assert _run(rollout).state == R.COMPLETED


def test_a_cluster_node_outside_the_rollout_on_the_old_version_skips_the_contract(
    release: Release,
) -> None:
    cluster, nodes = _cluster(3)
    rollout = _start(release, nodes[:2])  # nodes[2] keeps 1.6.0
    rollout = _run(rollout)
    assert rollout.state == R.COMPLETED
    assert not _contract_jobs(rollout)
    rows = RolloutNode.objects.filter(rollout=rollout)
    assert set(rows.values_list("contract_state", flat=True)) == {CS.SKIPPED}
    skipped = Event.objects.get(verb="rollout.contract_skipped")
    assert f"{cluster.name}-n2 (1.6.0)" in skipped.details["reason"]
    assert "themis-update migrate contract" in skipped.details["hint"]
    assert f"{cluster.name}-n2 (1.6.0)" in rows.first().contract_note  # type: ignore[union-attr]
    assert Event.objects.get(verb="rollout.completed").details["contract_skipped"] == 2


def test_a_node_already_on_a_newer_version_does_not_hold_the_contract(
    release: Release,
) -> None:
    cluster, nodes = _cluster(3)
    Node.objects.filter(pk=nodes[2].pk).update(installed_version="1.7.1")
    rollout = _run(_start(release, nodes[:2]))
    assert rollout.state == R.COMPLETED
    assert len(_contract_jobs(rollout)) == 2


def test_standalone_nodes_are_contracted_each_alone(release: Release) -> None:
    tenant = make_tenant()
    alone = [
        make_node(node_id=f"solo-{i}", tenant=tenant, installed_version="1.6.0") for i in range(3)
    ]
    # solo-1 fails its update and the rollout goes on: the others are contracted all the same.
    rollout = _start(release, alone, rollback_on_failure=False)
    rollout = _run(rollout, failures={"solo-1": "health check failed"})
    assert rollout.state == R.FAILED  # its failed node, as before
    contracted = sorted(j.node.node_id for j in _contract_jobs(rollout))
    assert contracted == ["solo-0", "solo-2"]
    states = dict(
        RolloutNode.objects.filter(rollout=rollout).values_list("node__node_id", "contract_state")
    )
    assert states == {"solo-0": CS.DONE, "solo-1": CS.SKIPPED, "solo-2": CS.DONE}
    assert len(Event.objects.filter(verb="rollout.contract_scheduled")) == 2


def test_a_cluster_with_a_failed_node_is_not_contracted(release: Release) -> None:
    cluster_a, nodes_a = _cluster(2, name="alpha")
    _, nodes_b = _cluster(2, tenant=cluster_a.tenant, name="beta")
    rollout = _start(release, nodes_a + nodes_b, rollback_on_failure=False)
    rollout = _run(rollout, failures={"alpha-n1": "health check failed"})
    assert rollout.state == R.FAILED
    assert sorted(j.node.node_id for j in _contract_jobs(rollout)) == ["beta-n0", "beta-n1"]
    skipped = Event.objects.get(verb="rollout.contract_skipped")
    assert skipped.details["group"] == "cluster alpha"
    assert "alpha-n1 (rolled_back)" in skipped.details["reason"]


def test_a_failed_contract_fails_the_rollout_naming_the_node_and_rolls_nothing_back(
    release: Release,
) -> None:
    _, nodes = _cluster(3)
    rollout = _start(release, nodes, strategy="canary", stages=[{"fraction": 1.0}])
    rollout = _run(rollout, contract_failures={nodes[1].node_id: "disk full"})
    assert rollout.state == R.FAILED
    assert nodes[1].node_id in rollout.error_message and "disk full" in rollout.error_message
    assert not UpdateJob.objects.filter(kind=UpdateJob.Kind.ROLLBACK).exists()
    rows = RolloutNode.objects.filter(rollout=rollout)
    assert set(rows.values_list("state", flat=True)) == {"DONE"}  # the release stays
    assert rows.get(node=nodes[1]).contract_state == CS.FAILED
    assert set(Node.objects.values_list("installed_version", flat=True)) == {"1.7.0"}
    failed = Event.objects.get(verb="rollout.failed")
    assert failed.details["contract_failed"] == [nodes[1].node_id]
    assert failed.details["rolling_back"] is False
    assert "no easy return" in failed.details["note"]
    assert "rollout.rolled_back" not in _verbs(rollout)


def test_the_other_contract_jobs_end_before_the_rollout_fails(release: Release) -> None:
    _, nodes = _cluster(2)
    rollout = _start(release, nodes)
    _until_contract_jobs(rollout)
    one, other = _contract_jobs(rollout)

    job_finish(job_id=one.pk, node_id=one.node.node_id, ok=False, error_code="MIGRATION_FAILED")
    coordinator.rollout_drive(rollout.pk)
    rollout.refresh_from_db()
    assert rollout.state == R.RUNNING  # the other one still runs
    job_finish(job_id=other.pk, node_id=other.node.node_id, ok=True, result={})
    coordinator.rollout_drive(rollout.pk)
    rollout.refresh_from_db()
    assert rollout.state == R.FAILED
    assert one.node.node_id in rollout.error_message
    assert other.node.node_id not in rollout.error_message


def test_a_lost_contract_job_fails_the_rollout(release: Release) -> None:
    _, nodes = _cluster(1)
    rollout = _start(release, nodes)
    _until_contract_jobs(rollout)
    (job,) = _contract_jobs(rollout)
    assert job_end_lost(job_id=job.pk, reason="not acknowledged after 3 sends", states=("QUEUED",))
    rollout = _run(rollout)
    assert rollout.state == R.FAILED
    assert "not acknowledged after 3 sends" in rollout.error_message


def test_retry_runs_a_failed_contract_again(release: Release) -> None:
    _, nodes = _cluster(2)
    rollout = _run(_start(release, nodes), contract_failures={nodes[0].node_id: "locked"})
    assert rollout.state == R.FAILED
    assert rollouts.rollout_retry_failed(rollout=rollout, user=None) == 1
    rollout = _run(rollout)
    assert rollout.state == R.COMPLETED, rollout.error_message
    # Only the contract ran again: no node was updated twice.
    assert UpdateJob.objects.filter(rollout=rollout, kind="update").count() == 2
    jobs = UpdateJob.objects.filter(rollout=rollout, kind=CONTRACT)
    assert jobs.filter(node=nodes[0]).count() == 2 and jobs.filter(node=nodes[1]).count() == 1


def test_a_release_without_contract_migrations_completes_as_before(db: None) -> None:
    expand_only = make_release(
        version="1.7.0",
        sha256="ab" * 32,
        artifact="releases/x.tar",
        manifest={"migrations": [{"version": "0001", "phase": "expand"}]},
    )
    _, nodes = _cluster(3)
    rollout = _run(_start(expand_only, nodes))
    assert rollout.state == R.COMPLETED
    assert not _contract_jobs(rollout)
    assert set(RolloutNode.objects.values_list("contract_state", flat=True)) == {CS.NONE}
    completed = Event.objects.get(verb="rollout.completed")
    assert "contract_done" not in completed.details
    assert not [v for v in _verbs(rollout) if "contract" in v]


def test_the_contract_delay_holds_the_jobs_back(release: Release) -> None:
    _, nodes = _cluster(2)
    rollout = _start(release, nodes, contract_delay=600)
    rollout = _run(rollout)
    assert rollout.state == R.RUNNING
    assert not _contract_jobs(rollout)
    rows = RolloutNode.objects.filter(rollout=rollout)
    assert set(rows.values_list("contract_state", flat=True)) == {CS.WAITING}
    due = rows.first().contract_due_at  # type: ignore[union-attr]
    assert due is not None and due > timezone.now() + timedelta(seconds=590)
    assert Event.objects.get(verb="rollout.contract_scheduled").details["delay_seconds"] == 600
    # Still waiting just before the delay is over; the jobs start once it is.
    early = DriveContext(now=due - timedelta(seconds=1))
    assert _run(rollout, ctx=early).state == R.RUNNING and not _contract_jobs(rollout)
    late = DriveContext(now=due + timedelta(seconds=1))
    assert _run(rollout, ctx=late).state == R.COMPLETED
    assert len(_contract_jobs(rollout)) == 2


def test_a_node_rolled_back_during_the_delay_skips_its_clusters_contract(
    release: Release,
) -> None:
    _, nodes = _cluster(2)
    rollout = _run(_start(release, nodes, contract_delay=60))
    Node.objects.filter(pk=nodes[1].pk).update(installed_version="1.6.0")
    later = DriveContext(now=timezone.now() + timedelta(seconds=61))
    rollout = _run(rollout, ctx=later)
    assert rollout.state == R.COMPLETED
    assert not _contract_jobs(rollout)
    assert "1.6.0" in Event.objects.get(verb="rollout.contract_skipped").details["reason"]


def test_cancelling_during_the_delay_starts_no_contract(release: Release) -> None:
    _, nodes = _cluster(2)
    rollout = _run(_start(release, nodes, contract_delay=60))
    rollouts.rollout_cancel(rollout=rollout, user=None)
    later = DriveContext(now=timezone.now() + timedelta(seconds=61))
    rollout = _run(rollout, ctx=later)
    assert rollout.state == R.CANCELLED
    assert not _contract_jobs(rollout)
    assert set(RolloutNode.objects.values_list("contract_state", flat=True)) == {CS.SKIPPED}


def test_cancelling_while_contract_jobs_run_waits_for_them(release: Release) -> None:
    _, nodes = _cluster(2)
    rollout = _start(release, nodes)
    _until_contract_jobs(rollout)
    rollouts.rollout_cancel(rollout=rollout, user=None)
    coordinator.rollout_drive(rollout.pk)
    rollout.refresh_from_db()
    # The nodes are changing their schema: the rollout ends once they are done.
    assert rollout.state == R.CANCELLING
    assert set(RolloutNode.objects.values_list("contract_state", flat=True)) == {CS.RUNNING}
    answer_queued_jobs()
    rollout = _run(rollout)
    assert rollout.state == R.CANCELLED
    assert [job.state for job in _contract_jobs(rollout)] == ["DONE", "DONE"]


@pytest.mark.parametrize("step", [DriveStep.CONTRACT, DriveStep.START_CONTRACT])
def test_a_drive_cut_before_a_contract_step_commits_leaves_nothing(
    release: Release, step: DriveStep
) -> None:
    _, nodes = _cluster(3)
    rollout = _start(release, nodes)
    _until_updated(rollout, len(nodes))

    def crash(at: DriveStep) -> None:
        if at == step:
            raise RuntimeError("coordinator killed")

    with pytest.raises(RuntimeError):
        coordinator.rollout_drive(rollout.pk, ctx=DriveContext(before_commit=crash))
    assert not _contract_jobs(rollout)
    if step == DriveStep.CONTRACT:
        assert not Event.objects.filter(verb="rollout.contract_scheduled").exists()
    assert _run(rollout).state == R.COMPLETED
    per_node = {n.node_id: UpdateJob.objects.filter(node=n, kind=CONTRACT).count() for n in nodes}
    assert per_node == {n.node_id: 1 for n in nodes}
    assert Event.objects.filter(verb="rollout.contract_scheduled").count() == 1


def test_a_drive_killed_between_contract_starts_never_starts_one_twice(
    release: Release,
) -> None:
    _, nodes = _cluster(3)
    rollout = _start(release, nodes)
    _until_updated(rollout, len(nodes))
    started: list[int] = []

    def die_after_first(step: DriveStep) -> None:
        if step == DriveStep.START_CONTRACT:
            started.append(1)
            raise SystemExit("coordinator killed after the step committed")

    with pytest.raises(SystemExit):
        coordinator.rollout_drive(rollout.pk, ctx=DriveContext(after_commit=die_after_first))
    assert len(_contract_jobs(rollout)) == 1
    # The lease is released by the dying drive's finally; a new drive picks up from here.
    transport = NullTransport()
    assert _run(rollout, ctx=DriveContext(transport=transport)).state == R.COMPLETED
    per_node = {n.node_id: UpdateJob.objects.filter(node=n, kind=CONTRACT).count() for n in nodes}
    assert per_node == {n.node_id: 1 for n in nodes}


def test_contract_delay_is_validated_like_the_other_options() -> None:
    assert RolloutOptions.from_json({}).contract_delay == 0
    assert RolloutOptions.from_json({"contract_delay": 90}).contract_delay == 90
    assert RolloutOptions(contract_delay=5).to_json()["contract_delay"] == 5
    for bad in ("60", True, 1.5):
        with pytest.raises(OptionsError, match="contract_delay must be an integer"):
            RolloutOptions.from_json({"contract_delay": bad})
    for out_of_range in (-1, 8 * 24 * 3600):
        with pytest.raises(OptionsError, match="contract_delay must be 0"):
            RolloutOptions.from_json({"contract_delay": out_of_range})
