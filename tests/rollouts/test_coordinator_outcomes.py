"""What a rollout's end leaves for the people who read it: the final state, its error
message and finish time, the audit events (which the notification channels and the audit
page show) with their details, the stage decisions, and the rollback jobs an abort starts.
Each test keeps another rollout beside the one it ends, to show that an end touches only
its own rollout. Simulated agents play the nodes (tests.fakes)."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from datetime import datetime, timedelta
from typing import Any

import pytest
from django.utils import timezone

from tenants.gate import GateDecision
from tenants.models import Tenant
from tests.factories import make_cluster, make_node, make_release, make_tenant, make_user
from tests.fakes import Failures, NullTransport, answer_queued_jobs, report_metrics
from updates.jobs import services as jobs
from updates.models import Event, Node, Release, Rollout, RolloutNode, StageDecision, UpdateJob
from updates.rollouts import coordinator
from updates.rollouts import services as rollouts
from updates.rollouts.coordinator import DriveContext, DriveOutcome, DriveStep

pytestmark = pytest.mark.django_db

R = Rollout.State
S = UpdateJob.State
CaptureOnCommit = Callable[..., AbstractContextManager[list[Callable[[], Any]]]]


@pytest.fixture
def release(db: None) -> Release:
    return make_release(version="1.7.0", sha256="ab" * 32, artifact="releases/x.tar")


@pytest.fixture(autouse=True)
def _no_agents(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(jobs, "default_transport", NullTransport)


@pytest.fixture
def now() -> datetime:
    """The coordinator's clock for the drives of a test: what finished_at must read."""
    return timezone.now().replace(microsecond=0) + timedelta(seconds=5)


def _nodes(prefix: str, n: int, tenant: Tenant | None = None) -> list[Node]:
    """n standalone nodes on 1.6.0, named prefix0, prefix1, ..."""
    tenant = tenant or make_tenant()
    return [
        make_node(node_id=f"{prefix}{i}", tenant=tenant, installed_version="1.6.0")
        for i in range(n)
    ]


def _start(
    release: Release, nodes: list[Node], strategy: str = "rolling", **options: Any
) -> Rollout:
    rollout = rollouts.rollout_create(
        release=release, strategy=strategy, nodes=nodes, user=None, options=options
    )
    return rollouts.rollout_start(rollout=rollout, user=None)


def _settle(
    rollout: Rollout,
    *,
    ctx: DriveContext | None = None,
    failures: Failures | None = None,
    contract_failures: Failures | None = None,
    rounds: int = 30,
) -> str:
    """Drive and answer every queued job until nothing is left to answer."""
    for _ in range(rounds):
        coordinator.rollout_drive(rollout.pk, ctx=ctx)
        if not answer_queued_jobs(failures=failures, contract_failures=contract_failures):
            coordinator.rollout_drive(rollout.pk, ctx=ctx)
            break
    rollout.refresh_from_db()
    return str(rollout.state)


def _rows(rollout: Rollout) -> dict[str, str]:
    return dict(RolloutNode.objects.filter(rollout=rollout).values_list("node__node_id", "state"))


def _events(rollout: Rollout, verb: str) -> list[dict[str, Any]]:
    """The details of the rollout's events of one verb, oldest first."""
    return list(
        Event.objects.filter(object_type="rollout", object_id=str(rollout.pk), verb=verb)
        .order_by("pk")
        .values_list("details", flat=True)
    )


def _summary(rollout: Rollout, strategy: str = "rolling", stage: int = 0) -> dict[str, Any]:
    """What every rollout event carries before its own details."""
    return {
        "rollout_id": rollout.pk,
        "strategy": strategy,
        "release_version": "1.7.0",
        "stage": stage,
    }


def _rollbacks(rollout: Rollout) -> list[tuple[str, str]]:
    """(node, restore point) of the rollback jobs the rollout started, in order."""
    return list(
        UpdateJob.objects.filter(rollout=rollout, kind=UpdateJob.Kind.ROLLBACK)
        .order_by("pk")
        .values_list("node__node_id", "restore_point")
    )


def _update_point(rollout: Rollout, node_id: str) -> str:
    """The restore point the node's update job reported (the fake agent's rp-<node>-<job>)."""
    job = UpdateJob.objects.get(rollout=rollout, kind=UpdateJob.Kind.UPDATE, node__node_id=node_id)
    return str((job.result or {})["restore_point"])


def _closed(*, node: Node, release: Release | None, at: datetime | None = None) -> GateDecision:
    return GateDecision(False, "WAITING_FOR_WINDOW", "outside maintenance windows", None, "")


class RecordingTransport(NullTransport):
    """Sends nothing; records the rollback commands the drive sends."""

    def __init__(self) -> None:
        self.rollbacks: list[tuple[str, str | None]] = []

    def rollback_node(self, node_id: str, job_id: str, point_id: str | None = None) -> None:
        self.rollbacks.append((node_id, point_id))


# ------------------------------------------------------------------ failing


def test_a_failed_rolling_rollout_reports_only_its_own_failed_node_and_spares_other_rollouts(
    release: Release, now: datetime
) -> None:
    ctx = DriveContext(now=now)
    # Another rollout, going on past a failed node of its own: t0 failed, t1 in flight.
    other = _start(release, _nodes("t", 3), rollback_on_failure=False)
    coordinator.rollout_drive(other.pk, ctx=ctx)
    answer_queued_jobs(failures={"t0": "health check failed"})
    coordinator.rollout_drive(other.pk, ctx=ctx)
    assert _rows(other) == {"t0": "ROLLED_BACK", "t1": "RUNNING", "t2": "PENDING"}

    rollout = _start(release, _nodes("s", 3))
    coordinator.rollout_drive(rollout.pk, ctx=ctx)
    answer_queued_jobs(failures={"s0": "health check failed"})  # t1's update succeeds
    assert coordinator.rollout_drive(rollout.pk, ctx=ctx) == DriveOutcome.FAILED
    rollout.refresh_from_db()
    reason = "node s0 failed its update (HEALTH_CHECK_FAILED_ROLLED_BACK: health check failed)"
    assert rollout.error_message == reason
    assert rollout.finished_at == now
    assert _rows(rollout) == {"s0": "ROLLED_BACK", "s1": "SKIPPED", "s2": "SKIPPED"}
    assert _events(rollout, "rollout.failed") == [
        {**_summary(rollout), "reason": reason, "nodes_failed": 1}
    ]
    assert not _events(rollout, "rollout.completed")
    # The other rollout's plan is its own drives' business: t1's finished update is not even
    # synced into it, and its pending node was not skipped with this rollout's.
    assert _rows(other) == {"t0": "ROLLED_BACK", "t1": "RUNNING", "t2": "PENDING"}
    assert _settle(other, ctx=ctx) == R.FAILED
    assert _rows(other) == {"t0": "ROLLED_BACK", "t1": "DONE", "t2": "DONE"}


def test_a_rollout_that_ran_every_node_ends_failed_with_counts_when_one_failed(
    release: Release, now: datetime
) -> None:
    rollout = _start(release, _nodes("t", 3), rollback_on_failure=False)
    ctx = DriveContext(now=now)
    assert _settle(rollout, ctx=ctx, failures={"t1": "health check failed"}) == R.FAILED
    assert rollout.finished_at == now
    assert rollout.error_message == ""
    assert _rows(rollout) == {"t0": "DONE", "t1": "ROLLED_BACK", "t2": "DONE"}
    assert _events(rollout, "rollout.failed") == [
        {**_summary(rollout), "nodes_done": 2, "nodes_failed": 1, "nodes_total": 3}
    ]
    assert not _events(rollout, "rollout.completed")


def test_a_completed_rollout_records_when_it_finished_and_how_many_nodes_it_updated(
    release: Release, now: datetime
) -> None:
    rollout = _start(release, _nodes("s", 2))
    assert _settle(rollout, ctx=DriveContext(now=now)) == R.COMPLETED
    assert rollout.finished_at == now
    assert _events(rollout, "rollout.completed") == [
        {**_summary(rollout), "nodes_done": 2, "nodes_failed": 0, "nodes_total": 2}
    ]
    assert not _events(rollout, "rollout.failed")


# ------------------------------------------------------------------ a canary's failure


def _canary_with_two_first(release: Release) -> tuple[Rollout, str, str]:
    """A canary over ten nodes whose first stage updates two of them (in plan order)."""
    stages = [{"fraction": 0.2, "auto_promote": False}, {"fraction": 1.0, "auto_promote": False}]
    rollout = _start(release, _nodes("c", 10), strategy="canary", stages=stages)
    first, second = (
        RolloutNode.objects.filter(rollout=rollout, stage=0)
        .order_by("position")
        .values_list("node__node_id", flat=True)
    )
    return rollout, first, second


def test_a_failed_canary_node_rolls_back_the_canarys_other_updated_node(
    release: Release, now: datetime
) -> None:
    rollout, first, second = _canary_with_two_first(release)
    ctx = DriveContext(now=now)
    coordinator.rollout_drive(rollout.pk, ctx=ctx)
    # The first canary node (in plan order) fails, the second one is updated.
    answer_queued_jobs(failures={first: "health check failed"})
    assert coordinator.rollout_drive(rollout.pk, ctx=ctx) == DriveOutcome.ABORTING
    reason = (
        f"node {first} failed its update (HEALTH_CHECK_FAILED_ROLLED_BACK: health check failed)"
    )
    assert _events(rollout, "rollout.failed") == [
        {**_summary(rollout, "canary"), "reason": reason, "rolling_back": True}
    ]
    # The second node goes back with the restore point its update reported.
    assert _rollbacks(rollout) == [(second, _update_point(rollout, second))]
    assert _settle(rollout, ctx=ctx) == R.FAILED  # a failure, not an operator's abort
    assert rollout.error_message == reason
    assert rollout.finished_at == now
    rows = _rows(rollout)
    assert (rows.pop(first), rows.pop(second)) == ("ROLLED_BACK", "ROLLED_BACK")
    assert set(rows.values()) == {"SKIPPED"}
    assert Node.objects.get(node_id=second).installed_version == "1.6.0"
    assert _events(rollout, "rollout.rolled_back") == [
        {
            **_summary(rollout, "canary"),
            "final_state": "FAILED",
            "nodes_rolled_back": 2,
            "rollback_failed": [],
        }
    ]


# ------------------------------------------------------------------ an operator's abort


def _rolled_back_elsewhere(release: Release) -> Rollout:
    """Another rollout, over other nodes, that ended with one node rolled back."""
    other = _start(release, _nodes("u", 2))
    assert _settle(other, failures={"u0": "health check failed"}) == R.FAILED
    assert _rows(other) == {"u0": "ROLLED_BACK", "u1": "SKIPPED"}
    return other


def test_an_abort_whose_rollbacks_fail_names_the_nodes_in_its_error_and_event(
    release: Release,
    now: datetime,
    django_capture_on_commit_callbacks: CaptureOnCommit,
) -> None:
    _rolled_back_elsewhere(release)
    rollout = _start(release, _nodes("s", 4))
    for _ in range(3):  # one node at a time: s0, s1 and s2 updated, s3 still pending
        coordinator.rollout_drive(rollout.pk)
        answer_queued_jobs()
    rollouts.rollout_abort(rollout=rollout, user=make_user(username="olivia"))
    transport = RecordingTransport()
    ctx = DriveContext(now=now, transport=transport)
    with django_capture_on_commit_callbacks(execute=True):
        assert coordinator.rollout_drive(rollout.pk, ctx=ctx) == DriveOutcome.ABORTING
    points = {n: _update_point(rollout, n) for n in ("s0", "s1", "s2")}
    # Each rollback is a job of this rollout, sent through the drive's transport.
    assert _rollbacks(rollout) == sorted(points.items())
    assert sorted(transport.rollbacks) == sorted(points.items())
    for job in UpdateJob.objects.filter(rollout=rollout, kind=UpdateJob.Kind.ROLLBACK):
        node_id = job.node.node_id
        jobs.job_finish(job_id=job.pk, node_id=node_id, ok=node_id == "s0", error_code="BOOM")
    assert coordinator.rollout_drive(rollout.pk, ctx=ctx) == DriveOutcome.ABORTED
    rollout.refresh_from_db()
    assert rollout.error_message == "aborted by operator; rollback failed on s1, s2"
    assert rollout.finished_at == now
    assert _rows(rollout) == {"s0": "ROLLED_BACK", "s1": "DONE", "s2": "DONE", "s3": "SKIPPED"}
    assert _events(rollout, "rollout.rolled_back") == [
        {
            **_summary(rollout),
            "final_state": "ABORTED",
            "nodes_rolled_back": 1,
            "rollback_failed": ["s1", "s2"],
        }
    ]


def test_an_abort_rolls_back_a_node_whose_update_reported_no_restore_point(
    release: Release,
) -> None:
    rollout = _start(release, _nodes("s", 2))
    coordinator.rollout_drive(rollout.pk)
    job = UpdateJob.objects.get(rollout=rollout)
    # An agent that names no restore point: the rollback asks for the node's latest one.
    jobs.job_finish(
        job_id=job.pk,
        node_id="s0",
        ok=True,
        result={"version_from": "1.6.0", "version_to": "1.7.0"},
    )
    rollouts.rollout_abort(rollout=rollout, user=make_user(username="olivia"))
    coordinator.rollout_drive(rollout.pk)
    assert _rollbacks(rollout) == [("s0", "")]
    assert _settle(rollout) == R.ABORTED
    assert _rows(rollout) == {"s0": "ROLLED_BACK", "s1": "SKIPPED"}


def test_an_abort_rolls_back_a_node_rolled_back_by_hand_before_the_rollout(
    release: Release,
) -> None:
    s0, s1 = _nodes("s", 2)
    Node.objects.filter(pk=s0.pk).update(
        restore_points=[{"id": "p-1.5.0", "version": "1.5.0", "created": "2026-11-01T00:00:00Z"}]
    )
    s0.refresh_from_db()
    by_hand = jobs.job_start_rollback(node=s0, point_id="p-1.5.0", user=None)
    answer_queued_jobs()
    assert UpdateJob.objects.get(pk=by_hand.pk).state == S.DONE
    Node.objects.filter(pk=s0.pk).update(installed_version="1.6.0")
    rollout = _start(release, [s0, s1])
    coordinator.rollout_drive(rollout.pk)
    answer_queued_jobs()
    rollouts.rollout_abort(rollout=rollout, user=make_user(username="olivia"))
    # The earlier rollback, outside this rollout, does not count as this abort's.
    assert _settle(rollout) == R.ABORTED
    assert _rollbacks(rollout) == [("s0", _update_point(rollout, "s0"))]
    assert Node.objects.get(pk=s0.pk).installed_version == "1.6.0"
    assert _rows(rollout) == {"s0": "ROLLED_BACK", "s1": "SKIPPED"}


# ------------------------------------------------------------------ cancelling


def test_cancelling_one_rollout_leaves_another_rollouts_pending_and_parked_nodes_alone(
    release: Release,
) -> None:
    other = _start(release, _nodes("t", 3))
    coordinator.rollout_drive(other.pk, ctx=DriveContext(gate=_closed))
    parked = UpdateJob.objects.get(rollout=other)
    assert parked.state == S.WAITING_FOR_WINDOW
    rollout = _start(release, _nodes("s", 3))
    coordinator.rollout_drive(rollout.pk)
    rollouts.rollout_cancel(rollout=rollout, user=None)
    assert _settle(rollout) == R.CANCELLED
    assert _rows(rollout) == {"s0": "DONE", "s1": "SKIPPED", "s2": "SKIPPED"}
    parked.refresh_from_db()
    assert parked.state == S.WAITING_FOR_WINDOW
    assert _rows(other) == {"t0": "WAITING", "t1": "PENDING", "t2": "PENDING"}
    # The release has no contract step: no row of either rollout shows one.
    contract = set(RolloutNode.objects.values_list("contract_state", "contract_note"))
    assert contract == {(RolloutNode.ContractState.NONE, "")}


def _with_contract_migrations(release: Release) -> None:
    Release.objects.filter(pk=release.pk).update(
        manifest={
            "version": "1.7.0",
            "migrations": [
                {"version": "0001", "phase": "expand"},
                {"version": "0002", "phase": "contract"},
            ],
        }
    )


def test_cancelling_during_the_contract_delay_skips_only_that_rollouts_contracts(
    release: Release,
) -> None:
    _with_contract_migrations(release)
    other = _start(release, _nodes("t", 1), contract_delay=60)
    rollout = _start(release, _nodes("s", 1), contract_delay=60)
    for each in (other, rollout):
        assert _settle(each) == R.RUNNING  # updated; the contract waits for its delay
    waiting = RolloutNode.ContractState.WAITING
    assert set(RolloutNode.objects.values_list("contract_state", flat=True)) == {waiting}
    rollouts.rollout_cancel(rollout=rollout, user=None)
    assert _settle(rollout) == R.CANCELLED
    assert list(rollout.plan.values_list("contract_state", "contract_note")) == [
        (RolloutNode.ContractState.SKIPPED, "contract not run: rollout CANCELLING")
    ]
    assert list(other.plan.values_list("contract_state", flat=True)) == [waiting]
    later = DriveContext(now=timezone.now() + timedelta(seconds=61))
    assert _settle(other, ctx=later) == R.COMPLETED
    assert UpdateJob.objects.filter(rollout=other, kind=UpdateJob.Kind.CONTRACT).count() == 1
    assert not UpdateJob.objects.filter(rollout=rollout, kind=UpdateJob.Kind.CONTRACT).exists()


# ------------------------------------------------------------------ stage decisions


def test_each_stage_is_recorded_complete_once_per_rollout(release: Release) -> None:
    # A canary whose gate bakes: its drives reach the end of stage 0 again and again.
    nodes = _nodes("c", 10)
    report_metrics([n.node_id for n in nodes], error_rate=0.0, p99_ms=10)
    canary = _start(release, nodes, strategy="canary", gate={"bake_seconds": 600})
    assert _settle(canary) == R.RUNNING
    for _ in range(2):
        coordinator.rollout_drive(canary.pk)
    # Another rollout's stage 0 completes after the canary's did.
    rolling = _start(release, _nodes("s", 2))
    assert _settle(rolling) == R.COMPLETED
    for rollout, strategy, total in ((canary, "canary", 10), (rolling, "rolling", 2)):
        completed = StageDecision.objects.filter(rollout=rollout, decision="stage_completed")
        assert [(d.stage, d.decided_by_label) for d in completed] == [(0, "coordinator")]
        done = 1 if strategy == "canary" else 2
        assert _events(rollout, "rollout.stage_completed") == [
            {**_summary(rollout, strategy), "nodes_done": done, "nodes_total": total}
        ]


# ------------------------------------------------------------------ a canary's stages


def _heartbeat(job: UpdateJob) -> None:
    """The node's first heartbeat after its job: its metrics now count for the gate."""
    Node.objects.filter(pk=job.node_id).update(last_heartbeat=timezone.now())


def _drive_canary(rollout: Rollout, rounds: int = 30) -> str:
    """Drive and answer (with a heartbeat after each job) until no job is left queued."""
    for _ in range(rounds):
        coordinator.rollout_drive(rollout.pk)
        if answer_queued_jobs(on_done=_heartbeat):
            continue
        coordinator.rollout_drive(rollout.pk)
        if not UpdateJob.objects.filter(state=S.QUEUED).exists():
            break
    rollout.refresh_from_db()
    return str(rollout.state)


def _decisions(rollout: Rollout) -> list[tuple[str, int, str, dict[str, Any]]]:
    """The coordinator's and the gate's decisions, in order."""
    return [
        (d.decision, d.stage, d.decided_by_label, d.details)
        for d in StageDecision.objects.filter(rollout=rollout).exclude(
            decision__in=["started", "approved"]
        )
    ]


def test_a_canary_promotes_itself_into_auto_stages_and_asks_a_person_for_the_others(
    release: Release,
) -> None:
    stages = [
        {"fraction": 0.1, "auto_promote": True},
        {"fraction": 0.3, "auto_promote": True},
        {"fraction": 0.6, "auto_promote": False},
        # Into the final stage only the automatic gate promotes, whatever the stage says.
        {"fraction": 1.0, "auto_promote": True},
    ]
    nodes = _nodes("c", 10)
    report_metrics([n.node_id for n in nodes], error_rate=0.001, p99_ms=120)
    rollout = _start(release, nodes, strategy="canary", stages=stages)
    rita = make_user(username="rita")
    assert _drive_canary(rollout) == R.AWAITING_APPROVAL
    assert rollout.current_stage == 1
    rollouts.rollout_approve(rollout=rollout, user=rita)
    assert _drive_canary(rollout) == R.AWAITING_APPROVAL
    assert rollout.current_stage == 2
    rollouts.rollout_approve(rollout=rollout, user=rita)
    assert _drive_canary(rollout) == R.COMPLETED
    healthy = {"reason": "within thresholds", "error_rate": 0.001, "p99_ms": 120.0, "unhealthy": []}
    assert _decisions(rollout) == [
        ("stage_completed", 0, "coordinator", {}),
        ("gate_passed", 0, "gate", healthy),
        ("auto_promoted", 0, "gate", {"to_stage": 1}),
        ("stage_completed", 1, "coordinator", {}),
        ("gate_passed", 1, "gate", healthy),
        ("stage_completed", 2, "coordinator", {}),
        ("gate_passed", 2, "gate", healthy),
        ("stage_completed", 3, "coordinator", {}),
    ]
    by_gate = [e for e in _events(rollout, "rollout.promoted") if e["approved_by"] != "rita"]
    assert by_gate == [{**_summary(rollout, "canary"), "approved_by": "gate (automatic)"}]
    assert _events(rollout, "rollout.awaiting_approval") == [
        {**_summary(rollout, "canary", stage=1), "next_stage": 2, "final": False},
        {**_summary(rollout, "canary", stage=2), "next_stage": 3, "final": True},
    ]
    assert _events(rollout, "rollout.stage_completed") == [
        {**_summary(rollout, "canary", stage=stage), "nodes_done": done, "nodes_total": 10}
        for stage, done in enumerate([1, 3, 6, 10])
    ]


def test_a_canary_gate_breach_is_recorded_with_its_metrics_and_named_in_the_error(
    release: Release,
) -> None:
    nodes = _nodes("c", 10)
    report_metrics([n.node_id for n in nodes], error_rate=0.2, p99_ms=900)
    rollout = _start(release, nodes, strategy="canary")
    assert _drive_canary(rollout) == R.FAILED
    ((decision, stage, label, details),) = [
        d for d in _decisions(rollout) if d[0] != "stage_completed"
    ]
    assert (decision, stage, label) == ("gate_failed", 0, "gate")
    assert details["reason"].startswith("error rate 20.0% above")
    assert "p99 latency 900 ms above" in details["reason"]
    assert {k: details[k] for k in ("error_rate", "p99_ms", "unhealthy")} == {
        "error_rate": 0.2,
        "p99_ms": 900.0,
        "unhealthy": [],
    }
    assert rollout.error_message == f"health gate failed after stage 1: {details['reason']}"
    assert _events(rollout, "rollout.rolled_back")[0]["final_state"] == "FAILED"


def test_the_bake_time_runs_from_the_stages_completion_not_from_the_nodes_update(
    release: Release,
) -> None:
    nodes = _nodes("c", 10)
    report_metrics([n.node_id for n in nodes], error_rate=0.0, p99_ms=10)
    rollout = _start(release, nodes, strategy="canary", gate={"bake_seconds": 60})
    coordinator.rollout_drive(rollout.pk)
    assert answer_queued_jobs() == 1
    # The canary's update ended 100 s before the drive that sees it; its node has reported
    # healthy metrics since (after the end of its update plus the bake time).
    started = timezone.now()
    UpdateJob.objects.filter(rollout=rollout).update(finished_at=started - timedelta(seconds=100))
    Node.objects.update(last_heartbeat=started - timedelta(seconds=30))
    coordinator.rollout_drive(rollout.pk, ctx=DriveContext(now=started))
    rollout.refresh_from_db()
    assert rollout.state == R.RUNNING  # baking: the stage completed just now
    assert [d[0] for d in _decisions(rollout)] == ["stage_completed"]
    baked = started + timedelta(seconds=61)
    Node.objects.update(last_heartbeat=baked)
    coordinator.rollout_drive(rollout.pk, ctx=DriveContext(now=baked))
    rollout.refresh_from_db()
    assert rollout.state == R.AWAITING_APPROVAL
    assert [d[0] for d in _decisions(rollout)] == ["stage_completed", "gate_passed"]


def test_a_canary_gate_judges_only_the_nodes_that_run_the_release(release: Release) -> None:
    stages = [{"fraction": 0.2, "auto_promote": False}, {"fraction": 1.0, "auto_promote": False}]
    nodes = _nodes("c", 10)
    report_metrics([n.node_id for n in nodes], error_rate=0.0, p99_ms=10)
    rollout = _start(release, nodes, strategy="canary", stages=stages, rollback_on_failure=False)
    first, second = (
        RolloutNode.objects.filter(rollout=rollout, stage=0)
        .order_by("position")
        .values_list("node__node_id", flat=True)
    )
    coordinator.rollout_drive(rollout.pk)
    answer_queued_jobs(failures={first: "health check failed"}, on_done=_heartbeat)
    # The failed node went back to 1.6.0 on its own and its service is not well.
    Node.objects.filter(node_id=first).update(service_healthy=False)
    coordinator.rollout_drive(rollout.pk)
    rollout.refresh_from_db()
    assert rollout.state == R.AWAITING_APPROVAL
    ((_, _, _, details),) = [d for d in _decisions(rollout) if d[0] == "gate_passed"]
    assert details["unhealthy"] == []
    assert _rows(rollout)[first] == "ROLLED_BACK" and _rows(rollout)[second] == "DONE"


class ApplyRecorder(NullTransport):
    """Sends nothing; records the arguments of each update command."""

    def __init__(self) -> None:
        self.applies: list[dict[str, object]] = []

    def update_node(self, node_id: str, job_id: str, **options: object) -> None:
        self.applies.append(options)


def test_a_rollouts_update_command_carries_its_health_timeout_and_nothing_unknown(
    release: Release, django_capture_on_commit_callbacks: CaptureOnCommit
) -> None:
    rollout = _start(release, _nodes("s", 1), health_timeout=45)
    transport = ApplyRecorder()
    with django_capture_on_commit_callbacks(execute=True):
        coordinator.rollout_drive(rollout.pk, ctx=DriveContext(transport=transport))
    (sent,) = transport.applies
    # Exactly what the agent's apply accepts (an unknown argument makes it refuse).
    assert set(sent) == {
        "download_token",
        "version",
        "artifact_url",
        "sha256",
        "size",
        "health_timeout",
    }
    assert (sent["version"], sent["health_timeout"]) == ("1.7.0", 45)


def test_a_canarys_contract_step_waits_for_its_last_stage(release: Release) -> None:
    """Baking, waiting for fresh metrics, promoted into the next stage: no contract yet."""
    _with_contract_migrations(release)
    stages = [
        {"fraction": 0.1, "auto_promote": True},
        {"fraction": 0.5, "auto_promote": True},
        {"fraction": 1.0, "auto_promote": False},
    ]
    nodes = _nodes("c", 10)
    report_metrics([n.node_id for n in nodes], error_rate=0.0, p99_ms=10)
    rollout = _start(release, nodes, strategy="canary", stages=stages, gate={"bake_seconds": 60})
    plan = RolloutNode.objects.filter(rollout=rollout)

    def no_contract_yet() -> None:
        assert set(plan.values_list("contract_state", flat=True)) == {
            RolloutNode.ContractState.NONE
        }
        verbs = Event.objects.filter(object_type="rollout", object_id=str(rollout.pk))
        assert not verbs.filter(verb__startswith="rollout.contract_").exists()

    coordinator.rollout_drive(rollout.pk)
    assert answer_queued_jobs() == 1
    coordinator.rollout_drive(rollout.pk)  # stage 0 complete: baking
    assert [d[0] for d in _decisions(rollout)] == ["stage_completed"]
    no_contract_yet()
    baked = timezone.now() + timedelta(seconds=61)
    coordinator.rollout_drive(rollout.pk, ctx=DriveContext(now=baked))  # waits for metrics
    assert [d[0] for d in _decisions(rollout)] == ["stage_completed"]
    no_contract_yet()
    Node.objects.update(last_heartbeat=baked)
    coordinator.rollout_drive(rollout.pk, ctx=DriveContext(now=baked))  # promoted into stage 1
    assert [d[0] for d in _decisions(rollout)] == [
        "stage_completed",
        "gate_passed",
        "auto_promoted",
    ]
    rollout.refresh_from_db()
    assert (rollout.state, rollout.current_stage) == (R.RUNNING, 1)
    no_contract_yet()


# ------------------------------------------------------------------ the contract step

CS = RolloutNode.ContractState
CONTRACT_FAILED_NOTE = (
    "contract migrations are past the point of no easy return: nothing is rolled back"
    " automatically; fix the cause, then retry the contract step (or run"
    " `themis-update migrate contract` on the node)"
)


def _contract_rows(rollout: Rollout) -> dict[str, tuple[str, str]]:
    return {
        node_id: (state, note)
        for node_id, state, note in rollout.plan.values_list(
            "node__node_id", "contract_state", "contract_note"
        )
    }


class ContractRecorder(NullTransport):
    """Sends nothing; records the contract commands the drive sends."""

    def __init__(self) -> None:
        self.contracts: list[tuple[str, str]] = []

    def contract_node(self, node_id: str, job_id: str, version: str) -> None:
        self.contracts.append((node_id, version))


def test_a_contract_is_scheduled_with_its_details_sent_through_the_drive_and_ends_the_rollout(
    release: Release, now: datetime, django_capture_on_commit_callbacks: CaptureOnCommit
) -> None:
    _with_contract_migrations(release)
    rollout = _start(release, _nodes("s", 2), parallel=True, contract_delay=30)
    assert _settle(rollout, ctx=DriveContext(now=now)) == R.RUNNING
    assert _contract_rows(rollout) == {"s0": (CS.WAITING, ""), "s1": (CS.WAITING, "")}
    due = (now + timedelta(seconds=30)).isoformat()
    assert _events(rollout, "rollout.contract_scheduled") == [
        {
            **_summary(rollout),
            "group": f"node {node_id}",
            "nodes": [node_id],
            "migrations": ["0002"],
            "delay_seconds": 30,
            "due_at": due,
        }
        for node_id in ("s0", "s1")
    ]
    kinds: list[str] = []
    transport = ContractRecorder()
    later = DriveContext(
        now=now + timedelta(seconds=31), transport=transport, after_commit=kinds.append
    )
    with django_capture_on_commit_callbacks(execute=True):
        coordinator.rollout_drive(rollout.pk, ctx=later)
    start = DriveStep.START_CONTRACT
    assert kinds == [DriveStep.SYNC, DriveStep.STAGE, start, start]
    assert sorted(transport.contracts) == [("s0", "1.7.0"), ("s1", "1.7.0")]
    answer_queued_jobs()
    kinds.clear()
    assert coordinator.rollout_drive(rollout.pk, ctx=later) == DriveOutcome.COMPLETED
    assert kinds == [DriveStep.SYNC, DriveStep.STAGE, DriveStep.END]


def test_a_failed_contract_fails_only_its_rollout_naming_its_node_and_skips_the_waiting_ones(
    release: Release, now: datetime
) -> None:
    _with_contract_migrations(release)
    # Beside it: a rollout whose contract failed on t0 (t1's ran), one still in its delay.
    failed_before = _start(release, _nodes("t", 2), parallel=True)
    assert _settle(failed_before, contract_failures={"t0": "locked"}) == R.FAILED
    in_delay = _start(release, _nodes("u", 1), contract_delay=600)
    assert _settle(in_delay) == R.RUNNING
    s0, s1, s2 = _nodes("s", 3)
    rollout = _start(release, [s0, s1, s2], parallel=True)
    coordinator.rollout_drive(rollout.pk)
    assert answer_queued_jobs() == 3  # the three updates
    # s2 is busy with someone else's job when its contract is due: it waits.
    UpdateJob.objects.create(node=s2, release=release, state=S.APPLYING)
    kinds: list[str] = []
    ctx = DriveContext(now=now, after_commit=kinds.append)
    coordinator.rollout_drive(rollout.pk, ctx=ctx)
    started = UpdateJob.objects.filter(rollout=rollout, kind=UpdateJob.Kind.CONTRACT)
    assert sorted(started.values_list("node__node_id", flat=True)) == ["s0", "s1"]
    answer_queued_jobs(contract_failures={"s1": "disk full"})
    kinds.clear()
    assert coordinator.rollout_drive(rollout.pk, ctx=ctx) == DriveOutcome.FAILED
    assert kinds == [DriveStep.SYNC, DriveStep.STAGE, DriveStep.CONTRACT, DriveStep.FAIL]
    rollout.refresh_from_db()
    reason = "contract migrations failed on s1 (MIGRATION_FAILED: disk full)"
    assert (rollout.error_message, rollout.finished_at) == (reason, now)
    assert _contract_rows(rollout) == {
        "s0": (CS.DONE, ""),
        "s1": (CS.FAILED, "contract migrations failed"),
        "s2": (CS.SKIPPED, "contract not run: a contract failed on another node of this rollout"),
    }
    assert _events(rollout, "rollout.failed") == [
        {
            **_summary(rollout),
            "reason": reason,
            "contract_failed": ["s1"],
            "rolling_back": False,
            "note": CONTRACT_FAILED_NOTE,
        }
    ]
    # The other rollouts are as they were.
    assert _contract_rows(failed_before) == {
        "t0": (CS.FAILED, "contract migrations failed"),
        "t1": (CS.DONE, ""),
    }
    assert _contract_rows(in_delay) == {"u0": (CS.WAITING, "")}


def test_contract_failures_on_many_nodes_name_ten_with_their_messages_cut(
    release: Release,
) -> None:
    _with_contract_migrations(release)
    nodes = _nodes("s", 11)
    rollout = _start(release, nodes, parallel=True)
    long = "x" * 200
    failures = {n.node_id: long for n in nodes}
    assert _settle(rollout, contract_failures=failures) == R.FAILED
    first_ten = list(rollout.plan.values_list("node__node_id", flat=True))[:10]
    reason = "contract migrations failed on " + "; ".join(
        f"{node_id} (MIGRATION_FAILED: {'x' * 160})" for node_id in first_ten
    )
    assert rollout.error_message == reason
    (event,) = _events(rollout, "rollout.failed")
    assert event["reason"] == reason[:1000]
    assert len(event["contract_failed"]) == 11


HINT = (
    "run `themis-update migrate contract` on each node once its cluster runs 1.7.0,"
    " or retry this rollout's contract step"
)


def test_a_contract_skipped_for_nodes_behind_names_ten_of_them_and_says_what_to_do(
    release: Release,
) -> None:
    _with_contract_migrations(release)
    cluster = make_cluster(tenant=make_tenant(), name="main")
    updated = make_node(
        node_id="updated", tenant=cluster.tenant, cluster=cluster, installed_version="1.6.0"
    )
    for i in range(12):  # cluster nodes outside the rollout, not on the release
        make_node(
            node_id=f"behind-node-{i:02d}",
            tenant=cluster.tenant,
            cluster=cluster,
            installed_version="" if i == 0 else "1.6.0",
        )
    rollout = _start(release, [updated])
    assert _settle(rollout) == R.COMPLETED
    behind = ["behind-node-00 (unknown)"] + [f"behind-node-{i:02d} (1.6.0)" for i in range(1, 10)]
    reason = "nodes that do not run 1.7.0: " + ", ".join(behind)
    assert _contract_rows(rollout) == {"updated": (CS.SKIPPED, f"contract not run: {reason}"[:255])}
    assert _events(rollout, "rollout.contract_skipped") == [
        {
            **_summary(rollout),
            "group": "cluster main",
            "nodes": ["updated"],
            "reason": reason,
            "hint": HINT,
        }
    ]


def test_a_cluster_whose_nodes_did_not_all_update_names_ten_of_them(release: Release) -> None:
    _with_contract_migrations(release)
    cluster = make_cluster(tenant=make_tenant(), name="main")
    nodes = [
        make_node(
            node_id=f"n{i:02d}", tenant=cluster.tenant, cluster=cluster, installed_version="1.6.0"
        )
        for i in range(12)
    ]
    rollout = _start(release, nodes, parallel=True, max_unavailable=12, rollback_on_failure=False)
    failures = {f"n{i:02d}": "health check failed" for i in range(1, 12)}
    assert _settle(rollout, failures=failures) == R.FAILED
    failed = [
        f"{node_id} (rolled_back)"
        for node_id in rollout.plan.exclude(node__node_id="n00").values_list(
            "node__node_id", flat=True
        )
    ]
    reason = "not every node reached 1.7.0 in this rollout: " + ", ".join(failed[:10])
    (skipped,) = _events(rollout, "rollout.contract_skipped")
    assert skipped["reason"] == reason


def test_a_standalone_node_rolled_back_during_the_delay_skips_its_contract(
    release: Release,
) -> None:
    _with_contract_migrations(release)
    (s0,) = _nodes("s", 1)
    rollout = _start(release, [s0], contract_delay=60)
    assert _settle(rollout) == R.RUNNING
    Node.objects.filter(pk=s0.pk).update(installed_version="1.6.0")
    later = DriveContext(now=timezone.now() + timedelta(seconds=61))
    assert _settle(rollout, ctx=later) == R.COMPLETED
    assert not UpdateJob.objects.filter(rollout=rollout, kind=UpdateJob.Kind.CONTRACT).exists()
    reason = "nodes that do not run 1.7.0: s0 (1.6.0)"
    assert _contract_rows(rollout) == {"s0": (CS.SKIPPED, f"contract not run: {reason}")}


def test_a_retried_contract_that_can_no_longer_run_leaves_the_contracted_node_as_it_is(
    release: Release,
) -> None:
    _with_contract_migrations(release)
    cluster = make_cluster(tenant=make_tenant(), name="main")
    nodes = [
        make_node(
            node_id=f"n{i}", tenant=cluster.tenant, cluster=cluster, installed_version="1.6.0"
        )
        for i in range(2)
    ]
    rollout = _start(release, nodes)
    assert _settle(rollout, contract_failures={"n0": "locked"}) == R.FAILED
    assert rollouts.rollout_retry_failed(rollout=rollout, user=None) == 1
    # Before the retry is driven, n1 goes back to 1.6.0 (rolled back by hand).
    Node.objects.filter(node_id="n1").update(installed_version="1.6.0")
    assert _settle(rollout) == R.COMPLETED
    reason = "nodes that do not run 1.7.0: n1 (1.6.0)"
    assert _contract_rows(rollout) == {
        "n0": (CS.SKIPPED, f"contract not run: {reason}"),
        "n1": (CS.DONE, ""),  # its contract ran before: still done
    }
    (completed,) = _events(rollout, "rollout.completed")
    assert (completed["contract_done"], completed["contract_skipped"]) == (1, 1)


@pytest.mark.parametrize(
    ("code", "message", "said"),
    [
        ("APPLY_FAILED", "", " (APPLY_FAILED)"),
        ("", "  disk full  ", " (disk full)"),
        ("", "", ""),
        ("APPLY_FAILED", "x" * 400, " (" + ("APPLY_FAILED: " + "x" * 400)[:300] + ")"),
    ],
)
def test_a_failed_nodes_reason_carries_what_its_agent_said_and_no_more(
    release: Release, code: str, message: str, said: str
) -> None:
    rollout = _start(release, _nodes("f", 1))
    coordinator.rollout_drive(rollout.pk)
    job = UpdateJob.objects.get(rollout=rollout)
    jobs.job_finish(job_id=job.pk, node_id="f0", ok=False, error_code=code, error_message=message)
    assert coordinator.rollout_drive(rollout.pk) == DriveOutcome.FAILED
    rollout.refresh_from_db()
    assert rollout.error_message == f"node f0 failed its update{said}"


def test_a_node_that_failed_without_rolling_back_fails_the_rollout_too(
    release: Release, now: datetime
) -> None:
    rollout = _start(release, _nodes("u", 2), rollback_on_failure=False)
    ctx = DriveContext(now=now)
    for _ in range(6):
        coordinator.rollout_drive(rollout.pk, ctx=ctx)
        for job in UpdateJob.objects.filter(rollout=rollout, state=UpdateJob.State.QUEUED):
            ok = job.node.node_id != "u0"
            # APPLY_FAILED: the agent could not put the node back either (FAILED, not
            # ROLLED_BACK).
            jobs.job_finish(
                job_id=job.pk,
                node_id=job.node.node_id,
                ok=ok,
                error_code="" if ok else "APPLY_FAILED",
                result={"version_to": "1.7.0"} if ok else {},
            )
    rollout.refresh_from_db()
    assert _rows(rollout) == {"u0": "FAILED", "u1": "DONE"}
    assert rollout.state == R.FAILED
    assert _events(rollout, "rollout.failed") == [
        {**_summary(rollout), "nodes_done": 1, "nodes_failed": 1, "nodes_total": 2}
    ]
