"""Coordinator rules that a rollout of default options never exercises: the Raft leader
waits for the rest of its cluster even when the budget would start it at once, and a
rollout with rollback_on_failure off goes on past a failed node."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

import pytest
from django.utils import timezone

from tenants.gate import GateDecision
from tenants.models import MaintenanceWindow, Tenant
from tenants.services import waiting_jobs_release
from tests.factories import make_cluster, make_node, make_release, make_tenant
from tests.fakes import NullTransport, answer_queued_jobs
from updates.jobs import services as jobs
from updates.models import Event, Node, Release, Rollout, RolloutNode, StageDecision, UpdateJob
from updates.releases.services import release_deprecate
from updates.rollouts import coordinator
from updates.rollouts import services as rollouts

pytestmark = pytest.mark.django_db

R = Rollout.State


@pytest.fixture
def release(db: None) -> Release:
    return make_release(version="1.7.0", sha256="ab" * 32, artifact="releases/x.tar")


@pytest.fixture(autouse=True)
def _no_agents(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(jobs, "default_transport", NullTransport)


def _nodes(n: int, *, tenant: Tenant, clustered: bool = True, prefix: str = "n") -> list[Node]:
    """n nodes on 1.6.0, the first the leader; in one cluster, or standalone."""
    cluster = make_cluster(tenant=tenant) if clustered else None
    return [
        make_node(
            node_id=f"{prefix}{i}",
            tenant=tenant,
            cluster=cluster,
            installed_version="1.6.0",
            raft_role="leader" if i == 0 else "follower",
        )
        for i in range(n)
    ]


def _start(release: Release, nodes: list[Node], **options: Any) -> Rollout:
    rollout = rollouts.rollout_create(
        release=release, strategy="rolling", nodes=nodes, user=None, options=options
    )
    return rollouts.rollout_start(rollout=rollout, user=None)


def _queued() -> set[str]:
    return set(
        UpdateJob.objects.filter(state=UpdateJob.State.QUEUED).values_list(
            "node__node_id", flat=True
        )
    )


def _row_states(rollout: Rollout) -> dict[str, str]:
    return dict(RolloutNode.objects.filter(rollout=rollout).values_list("node__node_id", "state"))


@pytest.mark.parametrize("clustered", [True, False], ids=["cluster", "standalone"])
def test_in_parallel_mode_the_leader_waits_for_every_other_node(
    release: Release, clustered: bool
) -> None:
    nodes = _nodes(3, tenant=make_tenant(), clustered=clustered)
    # The budget would start all three at once; the leader must still go last.
    rollout = _start(release, nodes, parallel=True, max_unavailable=3)
    coordinator.rollout_drive(rollout.pk)
    assert _queued() == {"n1", "n2"}
    # One follower done, the other still updating: the leader keeps waiting.
    UpdateJob.objects.filter(node__node_id="n2").update(state=UpdateJob.State.APPLYING)
    assert answer_queued_jobs() == 1
    coordinator.rollout_drive(rollout.pk)
    assert not UpdateJob.objects.filter(node=nodes[0]).exists()
    UpdateJob.objects.filter(node__node_id="n2").update(state=UpdateJob.State.QUEUED)
    assert answer_queued_jobs() == 1
    coordinator.rollout_drive(rollout.pk)
    assert _queued() == {"n0"}
    assert answer_queued_jobs() == 1
    coordinator.rollout_drive(rollout.pk)
    rollout.refresh_from_db()
    assert rollout.state == R.COMPLETED


def test_a_leader_waits_only_for_its_own_cluster(release: Release) -> None:
    tenant = make_tenant()
    first = _nodes(2, tenant=tenant, prefix="a")
    second = _nodes(2, tenant=tenant, prefix="b")
    rollout = _start(release, first + second, parallel=True, max_unavailable=2)
    coordinator.rollout_drive(rollout.pk)
    assert _queued() == {"a1", "b1"}
    # Cluster a's follower is done; cluster b's is still updating.
    UpdateJob.objects.filter(node__node_id="b1").update(state=UpdateJob.State.APPLYING)
    answer_queued_jobs()
    coordinator.rollout_drive(rollout.pk)
    assert _queued() == {"a0"}


def test_without_rollback_on_failure_a_failed_node_does_not_stop_the_rollout(
    release: Release,
) -> None:
    nodes = _nodes(4, tenant=make_tenant())
    rollout = _start(release, nodes, rollback_on_failure=False)
    for _ in range(20):
        coordinator.rollout_drive(rollout.pk)
        if not answer_queued_jobs(failures={"n2": "health check failed"}):
            break
    coordinator.rollout_drive(rollout.pk)
    rollout.refresh_from_db()
    # Every other node, the leader included, was updated; the rollout says one failed.
    assert _row_states(rollout) == {"n0": "DONE", "n1": "DONE", "n2": "ROLLED_BACK", "n3": "DONE"}
    assert rollout.state == R.FAILED
    assert set(Node.objects.exclude(node_id="n2").values_list("installed_version", flat=True)) == {
        "1.7.0"
    }


def test_with_rollback_on_failure_a_failed_node_stops_the_rollout(release: Release) -> None:
    nodes = _nodes(4, tenant=make_tenant())
    rollout = _start(release, nodes)
    for _ in range(20):
        coordinator.rollout_drive(rollout.pk)
        if not answer_queued_jobs(failures={"n1": "health check failed"}):
            break
    coordinator.rollout_drive(rollout.pk)
    rollout.refresh_from_db()
    assert rollout.state == R.FAILED
    assert rollout.error_message == (
        "node n1 failed its update (HEALTH_CHECK_FAILED_ROLLED_BACK: health check failed)"
    )
    assert rollout.finished_at is not None
    assert _row_states(rollout) == {
        "n0": "SKIPPED",
        "n1": "ROLLED_BACK",
        "n2": "SKIPPED",
        "n3": "SKIPPED",
    }


def test_each_drive_step_is_named_for_what_it_commits(release: Release) -> None:
    # The step kinds are what the fault-injection seams (before_commit, after_commit) key on.
    nodes = _nodes(2, tenant=make_tenant())
    rollout = _start(release, nodes)
    kinds: list[str] = []
    ctx = coordinator.DriveContext(after_commit=kinds.append)
    coordinator.rollout_drive(rollout.pk, ctx=ctx)
    assert kinds == [coordinator.DriveStep.SYNC, coordinator.DriveStep.START_NODE]
    answer_queued_jobs(failures={"n1": "health check failed"})
    kinds.clear()
    coordinator.rollout_drive(rollout.pk, ctx=ctx)
    assert kinds == [coordinator.DriveStep.SYNC, coordinator.DriveStep.FAIL]

    other = _start(release, _nodes(1, tenant=make_tenant(), prefix="m"))
    coordinator.rollout_drive(other.pk)
    answer_queued_jobs()
    kinds.clear()
    coordinator.rollout_drive(other.pk, ctx=ctx)
    assert kinds == [coordinator.DriveStep.SYNC, coordinator.DriveStep.STAGE]


def test_cancelling_and_aborting_steps_are_named_for_what_they_commit(release: Release) -> None:
    S = coordinator.DriveStep
    kinds: list[str] = []
    ctx = coordinator.DriveContext(after_commit=kinds.append)
    cancelled = _start(release, _nodes(2, tenant=make_tenant(), clustered=False))
    coordinator.rollout_drive(cancelled.pk)
    answer_queued_jobs()
    rollouts.rollout_cancel(rollout=cancelled, user=None)
    coordinator.rollout_drive(cancelled.pk, ctx=ctx)
    assert kinds == [S.SYNC, S.STOP_STARTING, S.END]

    aborted = _start(release, _nodes(2, tenant=make_tenant(), clustered=False, prefix="m"))
    coordinator.rollout_drive(aborted.pk)
    answer_queued_jobs()
    rollouts.rollout_abort(rollout=aborted, user=None)
    kinds.clear()
    coordinator.rollout_drive(aborted.pk, ctx=ctx)
    assert kinds == [S.SYNC, S.STOP_STARTING, S.START_ROLLBACK]
    answer_queued_jobs()
    kinds.clear()
    coordinator.rollout_drive(aborted.pk, ctx=ctx)
    assert kinds == [S.SYNC, S.STOP_STARTING, S.ROLLED_BACK, S.END]
    assert Rollout.objects.get(pk=aborted.pk).state == R.ABORTED

    withdrawn = _start(release, _nodes(2, tenant=make_tenant(), clustered=False, prefix="w"))
    release_deprecate(release=release, user=None)
    kinds.clear()
    coordinator.rollout_drive(withdrawn.pk, ctx=ctx)
    # The coordinator's own cancel is the drive's FAIL step; the cancelling that follows ends it.
    assert kinds == [S.SYNC, S.FAIL, S.STOP_STARTING, S.END]
    assert Rollout.objects.get(pk=withdrawn.pk).state == R.CANCELLED


def test_a_stage_step_for_a_stage_no_longer_current_does_nothing(release: Release) -> None:
    tenant = make_tenant()
    nodes = [
        make_node(node_id=f"c{i}", tenant=tenant, installed_version="1.6.0") for i in range(10)
    ]
    rollout = rollouts.rollout_create(
        release=release, strategy="canary", nodes=nodes, user=None, options={}
    )
    rollout = rollouts.rollout_start(rollout=rollout, user=None)
    coordinator.rollout_drive(rollout.pk)
    assert answer_queued_jobs() == 1  # the one canary of stage 0 is done
    kinds: list[str] = []

    def stage_moves_on(kind: str) -> None:
        kinds.append(kind)
        if kind == coordinator.DriveStep.SYNC:
            # Between the drive's read and its stage step, the rollout's stage moves on.
            Rollout.objects.filter(pk=rollout.pk).update(current_stage=1)

    coordinator.rollout_drive(rollout.pk, ctx=coordinator.DriveContext(after_commit=stage_moves_on))
    assert kinds == [coordinator.DriveStep.SYNC]
    assert not StageDecision.objects.filter(rollout=rollout).exclude(decision="started").exists()


def test_a_node_busy_with_another_job_holds_back_only_its_own_cluster(release: Release) -> None:
    tenant = make_tenant()
    first = _nodes(3, tenant=tenant, prefix="a")
    second = _nodes(3, tenant=tenant, prefix="b")
    # Someone else's update is running on b1: cluster b has no node to spare.
    other = UpdateJob.objects.create(
        node=second[1], release=release, state=UpdateJob.State.APPLYING
    )
    rollout = _start(release, first + second, parallel=True, max_unavailable=1)
    coordinator.rollout_drive(rollout.pk)
    assert _queued() == {"a1"}
    assert _row_states(rollout) == {
        "a0": "PENDING",
        "a1": "RUNNING",
        "a2": "PENDING",
        "b0": "PENDING",
        "b1": "PENDING",
        "b2": "PENDING",
    }
    jobs.job_finish(job_id=other.pk, node_id="b1", ok=True)
    for _ in range(20):
        coordinator.rollout_drive(rollout.pk)
        if not answer_queued_jobs():
            break
    coordinator.rollout_drive(rollout.pk)
    assert Rollout.objects.get(pk=rollout.pk).state == R.COMPLETED


def test_a_rolling_rollout_of_standalone_nodes_starts_the_next_only_after_the_one_in_flight(
    release: Release,
) -> None:
    rollout = _start(release, _nodes(3, tenant=make_tenant(), clustered=False))
    coordinator.rollout_drive(rollout.pk)
    coordinator.rollout_drive(rollout.pk)  # the first node has not answered yet
    assert UpdateJob.objects.filter(rollout=rollout).count() == 1
    assert sorted(_row_states(rollout).values()) == ["PENDING", "PENDING", "RUNNING"]
    answer_queued_jobs()
    coordinator.rollout_drive(rollout.pk)
    coordinator.rollout_drive(rollout.pk)
    assert sorted(_row_states(rollout).values()) == ["DONE", "PENDING", "RUNNING"]


def test_a_start_step_for_a_stage_no_longer_current_starts_nothing(release: Release) -> None:
    tenant = make_tenant()
    nodes = [
        make_node(node_id=f"c{i}", tenant=tenant, installed_version="1.6.0") for i in range(10)
    ]
    rollout = rollouts.rollout_create(
        release=release, strategy="canary", nodes=nodes, user=None, options={}
    )
    rollout = rollouts.rollout_start(rollout=rollout, user=None)

    def stage_moves_on(kind: str) -> None:
        if kind == coordinator.DriveStep.SYNC:
            # Between the drive's read and the step that would start stage 0's node.
            Rollout.objects.filter(pk=rollout.pk).update(current_stage=1)

    coordinator.rollout_drive(rollout.pk, ctx=coordinator.DriveContext(after_commit=stage_moves_on))
    assert not UpdateJob.objects.filter(rollout=rollout).exists()
    assert set(_row_states(rollout).values()) == {"PENDING"}


def _window_in_12_hours(tenant: Tenant) -> datetime:
    """A daily two-hour UTC window starting 12 to 13 hours from now; returns a moment
    30 minutes into it."""
    opens = (timezone.now() + timedelta(hours=13)).replace(minute=0, second=0, microsecond=0)
    MaintenanceWindow.objects.create(
        tenant=tenant,
        days="0123456",
        start_time=opens.time(),
        end_time=(opens + timedelta(hours=2)).time(),
        timezone="UTC",
    )
    return opens + timedelta(minutes=30)


def test_the_drives_clock_decides_whether_a_node_is_inside_its_tenants_window(
    release: Release,
) -> None:
    inside_tenant, outside_tenant = make_tenant(), make_tenant()
    inside = _window_in_12_hours(inside_tenant)
    _window_in_12_hours(outside_tenant)
    in_window = _start(release, _nodes(1, tenant=inside_tenant, clustered=False))
    out_of_window = _start(release, _nodes(1, tenant=outside_tenant, clustered=False, prefix="m"))
    coordinator.rollout_drive(in_window.pk, ctx=coordinator.DriveContext(now=inside))
    later = timezone.now() + timedelta(hours=1)
    coordinator.rollout_drive(out_of_window.pk, ctx=coordinator.DriveContext(now=later))
    started = UpdateJob.objects.get(rollout=in_window)
    assert (started.state, started.wait_reason) == (UpdateJob.State.QUEUED, "")
    parked = UpdateJob.objects.get(rollout=out_of_window)
    assert parked.state == UpdateJob.State.WAITING_FOR_WINDOW
    assert parked.wait_reason
    assert _row_states(in_window) == {"n0": "RUNNING"}
    assert _row_states(out_of_window) == {"m0": "WAITING"}


def test_a_parked_node_shows_running_once_its_window_releases_its_job(release: Release) -> None:
    rollout = _start(release, _nodes(2, tenant=make_tenant(), clustered=False))

    def closed(*, node: Node, release: Release | None, at: datetime | None = None) -> GateDecision:
        return GateDecision(False, "WAITING_FOR_WINDOW", "outside maintenance windows", None, "")

    coordinator.rollout_drive(rollout.pk, ctx=coordinator.DriveContext(gate=closed))
    assert _row_states(rollout) == {"n1": "WAITING", "n0": "PENDING"}
    # The window opens: the beat releases the job (the tenant has no window rules).
    started: list[UpdateJob] = []
    assert len(waiting_jobs_release(start_job=started.append)) == 1
    coordinator.rollout_drive(rollout.pk)
    assert _row_states(rollout) == {"n1": "RUNNING", "n0": "PENDING"}
    for _ in range(10):
        answer_queued_jobs()
        coordinator.rollout_drive(rollout.pk)
    assert _row_states(rollout) == {"n1": "DONE", "n0": "DONE"}
    assert Rollout.objects.get(pk=rollout.pk).state == R.COMPLETED


def test_a_contract_job_on_a_node_does_not_hold_back_its_clusters_updates(
    release: Release,
) -> None:
    nodes = _nodes(3, tenant=make_tenant())
    # n1 runs a contract job (schema change under a serving node): it takes no node away.
    UpdateJob.objects.create(
        node=nodes[1], release=release, kind=UpdateJob.Kind.CONTRACT, state=UpdateJob.State.APPLYING
    )
    rollout = _start(release, nodes, parallel=True, max_unavailable=1)
    coordinator.rollout_drive(rollout.pk)
    assert _queued() == {"n2"}  # n1 itself is busy with its own job
    assert _row_states(rollout) == {"n0": "PENDING", "n1": "PENDING", "n2": "RUNNING"}


# ------------------------------------------------------------------ the contract step's fences

MIGRATIONS = [{"version": "0001", "phase": "expand"}, {"version": "0002", "phase": "contract"}]


def _with_contract(release: Release) -> Release:
    Release.objects.filter(pk=release.pk).update(
        manifest={"version": "1.7.0", "migrations": MIGRATIONS}
    )
    release.refresh_from_db()
    return release


def _settle(rollout: Rollout, ctx: coordinator.DriveContext | None = None) -> str:
    for _ in range(20):
        coordinator.rollout_drive(rollout.pk, ctx=ctx)
        if not answer_queued_jobs():
            coordinator.rollout_drive(rollout.pk, ctx=ctx)
            break
    return str(Rollout.objects.get(pk=rollout.pk).state)


def _contract_states(rollout: Rollout) -> dict[str, str]:
    return dict(
        RolloutNode.objects.filter(rollout=rollout).values_list("node__node_id", "contract_state")
    )


@pytest.mark.parametrize("due", ["deciding", "starting", "skipping"])
def test_a_contract_step_for_a_stage_no_longer_current_does_nothing(
    release: Release, due: str
) -> None:
    release = _with_contract(release)
    nodes = _nodes(1, tenant=make_tenant(), clustered=False)
    rollout = _start(release, nodes, contract_delay=0 if due == "deciding" else 60)
    later = timezone.now() + timedelta(seconds=61)
    if due == "deciding":
        coordinator.rollout_drive(rollout.pk)
        assert answer_queued_jobs() == 1  # updated; the next drive decides the contract
    else:
        assert _settle(rollout) == R.RUNNING  # decided: the contract waits for its delay
        if due == "skipping":  # n0 went back during the delay: its contract is to be skipped
            Node.objects.filter(node_id="n0").update(installed_version="1.6.0")
    before = _contract_states(rollout)
    kinds: list[str] = []

    def stage_moves_on(kind: str) -> None:
        kinds.append(kind)
        if kind == coordinator.DriveStep.STAGE:
            # Between the stage step and the contract's, the rollout's stage moves on.
            Rollout.objects.filter(pk=rollout.pk).update(current_stage=1)

    ctx = coordinator.DriveContext(now=later, after_commit=stage_moves_on)
    coordinator.rollout_drive(rollout.pk, ctx=ctx)
    assert kinds == [coordinator.DriveStep.SYNC, coordinator.DriveStep.STAGE]
    assert _contract_states(rollout) == before
    assert not UpdateJob.objects.filter(kind=UpdateJob.Kind.CONTRACT).exists()
    assert (
        not Event.objects.filter(verb__startswith="rollout.contract_", object_id=str(rollout.pk))
        .exclude(verb="rollout.contract_scheduled")
        .exists()
    )


def test_a_contract_start_for_a_row_taken_between_two_steps_leaves_nothing(
    release: Release,
) -> None:
    release = _with_contract(release)
    nodes = _nodes(2, tenant=make_tenant(), clustered=False)
    rollout = _start(release, nodes, contract_delay=60)
    assert _settle(rollout) == R.RUNNING
    second = RolloutNode.objects.get(rollout=rollout, node__node_id="n0")  # the leader: last

    def another_process_takes_n0(step: str) -> None:
        if step == coordinator.DriveStep.START_CONTRACT:
            RolloutNode.objects.filter(pk=second.pk).update(
                contract_state=RolloutNode.ContractState.SKIPPED
            )

    later = timezone.now() + timedelta(seconds=61)
    ctx = coordinator.DriveContext(now=later, after_commit=another_process_takes_n0)
    coordinator.rollout_drive(rollout.pk, ctx=ctx)
    contract = UpdateJob.objects.filter(kind=UpdateJob.Kind.CONTRACT)
    assert list(contract.values_list("node__node_id", flat=True)) == ["n1"]
    assert _contract_states(rollout) == {"n0": "SKIPPED", "n1": "RUNNING"}


def test_a_drive_skipping_a_due_contract_names_the_step(release: Release) -> None:
    release = _with_contract(release)
    rollout = _start(release, _nodes(1, tenant=make_tenant(), clustered=False), contract_delay=60)
    assert _settle(rollout) == R.RUNNING
    Node.objects.filter(node_id="n0").update(installed_version="1.6.0")
    kinds: list[str] = []
    later = timezone.now() + timedelta(seconds=61)
    ctx = coordinator.DriveContext(now=later, after_commit=kinds.append)
    coordinator.rollout_drive(rollout.pk, ctx=ctx)
    S = coordinator.DriveStep
    assert kinds == [S.SYNC, S.STAGE, S.CONTRACT, S.END]
    assert _contract_states(rollout) == {"n0": "SKIPPED"}


def test_one_rollouts_drive_leaves_anothers_contract_rows_as_they_were(release: Release) -> None:
    release = _with_contract(release)
    first = _start(release, _nodes(1, tenant=make_tenant(), clustered=False, prefix="a"))
    second = _start(release, _nodes(1, tenant=make_tenant(), clustered=False, prefix="b"))
    for rollout in (first, second):
        coordinator.rollout_drive(rollout.pk)
    answer_queued_jobs()  # both updates
    for rollout in (first, second):
        coordinator.rollout_drive(rollout.pk)  # both contracts start
    assert answer_queued_jobs() == 2  # both contracts end
    coordinator.rollout_drive(first.pk)
    assert Rollout.objects.get(pk=first.pk).state == R.COMPLETED
    assert _contract_states(second) == {"b0": "RUNNING"}  # synced by its own drive only
    coordinator.rollout_drive(second.pk)
    assert _contract_states(second) == {"b0": "DONE"}
