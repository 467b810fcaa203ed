"""Job services at their edges: a report or heartbeat counts only for the job of the node
it names, a cancel touches only its own job and command, an operator's end of a job says
who and why, a late report is recorded on the job it names."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

import pytest
from django.contrib.auth.models import User
from django.utils import timezone

from tenants.gate import GateDecision, GateFn
from tests.conftest import Fleet
from tests.factories import make_release, make_user
from tests.jobs.test_outbox import RecordingTransport
from updates.jobs import services as jobs
from updates.models import Event, Node, NodeCommand, Release, Rollout, UpdateJob

pytestmark = pytest.mark.django_db

S = UpdateJob.State
C = NodeCommand


@pytest.fixture
def release(db: None) -> Release:
    return make_release(version="1.7.0", sha256="ab" * 32, artifact="releases/x.tar")


def _start(fleet: Fleet, release: Release, *, node: str = "a") -> UpdateJob:
    target = fleet.node_a if node == "a" else fleet.node_b
    return jobs.job_start_update(
        node=target, release=release, user=None, transport=RecordingTransport()
    )


def _lost(job: UpdateJob) -> None:
    assert jobs.job_end_by_operator(job=job, user=None, reason="")


def test_a_heartbeat_keeps_alive_only_the_job_it_names_on_its_own_node(
    fleet: Fleet, release: Release
) -> None:
    mine = _start(fleet, release)
    other = _start(fleet, release, node="b")
    now = timezone.now()
    # Node a names node b's job: nothing. Node a names its own: only that job.
    assert not jobs.job_heartbeat_refresh(job_id=other.pk, node=fleet.node_a, now=now)
    assert jobs.job_heartbeat_refresh(job_id=mine.pk, node=fleet.node_a, now=now)
    assert UpdateJob.objects.get(pk=mine.pk).last_report_at == now
    assert UpdateJob.objects.get(pk=other.pk).last_report_at is None
    # A finished job is not kept alive.
    _lost(mine)
    assert not jobs.job_heartbeat_refresh(job_id=mine.pk, node=fleet.node_a, now=now)


def test_a_heartbeat_naming_a_job_the_node_does_not_have_refreshes_nothing(
    fleet: Fleet, release: Release
) -> None:
    mine = _start(fleet, release)
    assert not jobs.job_heartbeat_refresh(
        job_id=mine.pk + 1000, node=fleet.node_a, now=timezone.now()
    )
    assert UpdateJob.objects.get(pk=mine.pk).last_report_at is None


def test_cancelling_a_job_never_sent_ends_it_now_and_only_it(
    fleet: Fleet, release: Release
) -> None:
    job = _start(fleet, release)
    other = _start(fleet, release, node="b")
    C.objects.filter(job=other).update(attempts=1)  # another job's command went out
    before = timezone.now()
    assert jobs.job_cancel(job=job, user=None) == S.CANCELLED
    job.refresh_from_db()
    assert job.state == S.CANCELLED
    assert job.finished_at is not None and job.finished_at >= before
    assert UpdateJob.objects.get(pk=other.pk).state == S.QUEUED
    (command,) = C.objects.filter(job=job)
    assert (command.state, command.last_error) == (C.State.ABANDONED, "job cancelled")
    assert C.objects.get(job=other).state != C.State.ABANDONED


def test_cancelling_a_sent_job_asks_the_agent_and_leaves_it_open(
    fleet: Fleet, release: Release
) -> None:
    job = _start(fleet, release)
    C.objects.filter(job=job).update(attempts=1)
    # Another job's sent command does not make this one sent.
    other = _start(fleet, release, node="b")
    C.objects.filter(job=other).update(attempts=1)
    assert jobs.job_cancel(job=job, user=None) == S.CANCELLING
    job.refresh_from_db()
    assert (job.state, job.finished_at) == (S.CANCELLING, None)


def test_a_job_whose_only_sent_command_is_not_its_apply_is_cancelled_at_once(
    fleet: Fleet, release: Release
) -> None:
    job = _start(fleet, release)
    # A traffic-role command of the same job went out: its apply never did.
    C.objects.create(
        job=job,
        node=fleet.node_a,
        kind=C.Kind.TRAFFIC_ROLE,
        attempts=1,
        args={},
        next_attempt_at=timezone.now(),
    )
    assert jobs.job_cancel(job=job, user=None) == S.CANCELLED


@pytest.mark.parametrize(
    ("user", "reason", "message"),
    [
        (None, "", "ended by an operator"),
        ("olivia", "", "ended by olivia"),
        ("olivia", "node decommissioned", "ended by olivia: node decommissioned"),
    ],
)
def test_an_operator_ends_a_job_lost_saying_who_and_why(
    fleet: Fleet, release: Release, user: str | None, reason: str, message: str
) -> None:
    job = _start(fleet, release)
    actor: User | None = make_user(username=user) if user else None
    assert jobs.job_end_by_operator(job=job, user=actor, reason=reason) is True
    job.refresh_from_db()
    assert (job.state, job.error_message) == (S.LOST, message)
    # Already ended: nothing more to end.
    assert jobs.job_end_by_operator(job=job, user=actor, reason=reason) is False


def _late(job: UpdateJob) -> list[dict[str, Any]]:
    return [
        {"actor": e.actor_label, "tenant": e.tenant_id, **e.details}
        for e in Event.objects.filter(verb="job.late_report", object_id=str(job.pk))
    ]


def test_a_late_report_is_recorded_on_the_lost_job_it_names(fleet: Fleet, release: Release) -> None:
    job = _start(fleet, release)
    _lost(job)
    assert not jobs.job_record_progress(job_id=job.pk, node_id="a-1", step="VERIFYING")
    assert _late(job) == [
        {
            "actor": "node:a-1",
            "tenant": fleet.tenant_a.pk,
            "node_id": "a-1",
            "report": "progress VERIFYING",
            "step": "VERIFYING",
        }
    ]


def test_a_late_report_is_recorded_only_for_a_lost_job_of_the_node_it_names(
    fleet: Fleet, release: Release
) -> None:
    lost_a = _start(fleet, release)
    _lost(lost_a)
    lost_b = _start(fleet, release, node="b")
    _lost(lost_b)
    # Node b reports on node a's job; node a on a job id that is not its own.
    assert jobs.job_finish(job_id=lost_a.pk, node_id="b-1", ok=True) is None
    assert not jobs.job_record_progress(job_id=lost_b.pk, node_id="a-1", step="VERIFYING")
    assert _late(lost_a) == [] and _late(lost_b) == []
    # A report for a job that finished normally is not a late report of a LOST job.
    done = _start(fleet, release)
    jobs.job_finish(job_id=done.pk, node_id="a-1", ok=True, result={"version_to": "1.7.0"})
    assert jobs.job_finish(job_id=done.pk, node_id="a-1", ok=True) is None
    assert _late(done) == []


@pytest.mark.parametrize(
    ("result", "installed", "rolled_back"),
    [
        # Recovery reports what the node runs: back on 1.6.0, where the job started.
        ({"version_from": "1.6.0", "installed_version": "1.6.0"}, "9.9.9", True),
        ({"version_from": "1.6.0", "installed_version": "1.7.0"}, "1.6.0", False),
        # Not reported: the node's last known version decides.
        ({"version_from": "1.6.0"}, "1.6.0", True),
        ({"version_from": "1.6.0"}, "1.7.0", False),
    ],
)
def test_an_interrupted_job_is_rolled_back_when_the_node_is_where_it_started(
    fleet: Fleet,
    release: Release,
    result: dict[str, str],
    installed: str,
    rolled_back: bool,
) -> None:
    fleet.node_a.installed_version = installed
    fleet.node_a.save()
    job = _start(fleet, release)
    jobs.job_record_progress(job_id=job.pk, node_id="a-1", step="PREFLIGHT")
    jobs.job_finish(
        job_id=job.pk, node_id="a-1", ok=False, error_code=jobs.INTERRUPTED_CODE, result=result
    )
    job.refresh_from_db()
    assert job.state == (S.ROLLED_BACK if rolled_back else S.FAILED)


def test_a_rollback_job_records_who_asked_for_it(fleet: Fleet) -> None:
    fleet.node_a.restore_points = [{"id": "p1", "version": "1.6.0"}]
    fleet.node_a.save()
    olivia = make_user(username="olivia")
    job = jobs.job_start_rollback(
        node=fleet.node_a, point_id="p1", user=olivia, transport=RecordingTransport()
    )
    assert job.created_by == olivia
    queued = Event.objects.get(verb="job.rollback.queued", object_id=str(job.pk))
    assert queued.actor == olivia


def test_progress_never_moves_a_job_back_by_a_single_step(fleet: Fleet, release: Release) -> None:
    job = _start(fleet, release)
    steps = ["PREFLIGHT", "DOWNLOADING", "STAGED", "RESTORE_POINT", "VERIFYING"]
    for earlier, later in zip(steps, steps[1:], strict=False):
        assert jobs.job_record_progress(job_id=job.pk, node_id="a-1", step=later)
        state = UpdateJob.objects.get(pk=job.pk).state
        # The report of the step just before, arriving late, does not move it back.
        jobs.job_record_progress(job_id=job.pk, node_id="a-1", step=earlier)
        assert UpdateJob.objects.get(pk=job.pk).state == state


@pytest.mark.parametrize(
    ("percent", "stored"), [(None, 0), (0, 0), (-5, 0), (42, 42), (100, 100), (150, 100)]
)
def test_progress_percent_is_kept_between_0_and_100(
    fleet: Fleet, release: Release, percent: int | None, stored: int
) -> None:
    job = _start(fleet, release)
    if percent is None:
        jobs.job_record_progress(job_id=job.pk, node_id="a-1", step="PREFLIGHT")
    else:
        jobs.job_record_progress(job_id=job.pk, node_id="a-1", step="PREFLIGHT", percent=percent)
    assert UpdateJob.objects.get(pk=job.pk).progress_percent == stored


def test_download_progress_records_its_bytes_and_other_steps_leave_them(
    fleet: Fleet, release: Release
) -> None:
    job = _start(fleet, release)
    jobs.job_record_progress(job_id=job.pk, node_id="a-1", step="PREFLIGHT")
    assert UpdateJob.objects.values_list("bytes_done", "bytes_total").get(pk=job.pk) == (
        None,
        None,
    )
    jobs.job_record_progress(
        job_id=job.pk, node_id="a-1", step="DOWNLOADING", bytes_done=10, bytes_total=40
    )
    jobs.job_record_progress(job_id=job.pk, node_id="a-1", step="STAGED")
    assert UpdateJob.objects.values_list("bytes_done", "bytes_total").get(pk=job.pk) == (10, 40)


def test_the_first_progress_starts_the_job_and_each_move_is_an_event(
    fleet: Fleet, release: Release
) -> None:
    job = _start(fleet, release)
    before = timezone.now()
    assert jobs.job_record_progress(job_id=job.pk, node_id="a-1", step="PREFLIGHT", percent=5)
    job.refresh_from_db()
    assert job.started_at is not None and job.started_at >= before
    assert (job.state, job.step, job.progress_percent) == (S.PREFLIGHT, "PREFLIGHT", 5)
    fleet.node_a.refresh_from_db()
    assert fleet.node_a.status == fleet.node_a.Status.UPDATING
    moved = Event.objects.get(verb="job.preflight", object_id=str(job.pk))
    assert (moved.actor_label, moved.tenant_id, moved.details) == (
        "node:a-1",
        fleet.tenant_a.pk,
        {"step": "PREFLIGHT", "percent": 5},
    )


def test_a_repeated_step_updates_the_progress_without_moving(
    fleet: Fleet, release: Release
) -> None:
    job = _start(fleet, release)
    jobs.job_record_progress(
        job_id=job.pk, node_id="a-1", step="DOWNLOADING", bytes_done=1, bytes_total=40
    )
    assert jobs.job_record_progress(
        job_id=job.pk, node_id="a-1", step="DOWNLOADING", percent=9, bytes_done=30, bytes_total=40
    )
    job.refresh_from_db()
    assert (job.state, job.progress_percent, job.bytes_done) == (S.DOWNLOADING, 9, 30)
    assert Event.objects.filter(verb="job.downloading", object_id=str(job.pk)).count() == 1


def test_a_clean_finish_has_no_error_and_sets_the_version(fleet: Fleet, release: Release) -> None:
    job = _start(fleet, release)
    version = "1.7.0+" + "b" * 64
    finished = jobs.job_finish(
        job_id=job.pk, node_id="a-1", ok=True, result={"version_to": version}
    )
    assert finished is not None
    assert (finished.state, finished.error_code, finished.error_message) == (S.DONE, "", "")
    fleet.node_a.refresh_from_db()
    assert fleet.node_a.installed_version == version[:64]


def test_a_failed_job_leaves_the_installed_version_alone(fleet: Fleet, release: Release) -> None:
    job = _start(fleet, release)
    jobs.job_finish(
        job_id=job.pk, node_id="a-1", ok=False, error_code="X", result={"version_to": "1.7.0"}
    )
    fleet.node_a.refresh_from_db()
    assert (fleet.node_a.installed_version, fleet.node_a.status) == ("1.0.0", "failed")


def test_a_late_final_report_is_recorded_with_what_it_said(fleet: Fleet, release: Release) -> None:
    job = _start(fleet, release)
    _lost(job)
    code = "E" * 70
    jobs.job_finish(
        job_id=job.pk, node_id="a-1", ok=False, error_code=code, result={"version_to": "1.7.0"}
    )
    assert _late(job) == [
        {
            "actor": "node:a-1",
            "tenant": fleet.tenant_a.pk,
            "node_id": "a-1",
            "report": "final report",
            "ok": False,
            "error_code": code[:64],
            "version_to": "1.7.0",
        }
    ]


def test_the_gate_is_asked_about_this_node_this_release_at_this_time(
    fleet: Fleet, release: Release
) -> None:
    asked: list[tuple[Node, Release | None, datetime | None]] = []

    def gate(*, node: Node, release: Release | None, at: datetime | None = None) -> GateDecision:
        asked.append((node, release, at))
        return GateDecision(allowed=True)

    at = timezone.now() - timedelta(hours=3)
    jobs.job_start_update(
        node=fleet.node_a,
        release=release,
        user=None,
        transport=RecordingTransport(),
        gate=gate,
        now=at,
    )
    assert asked == [(fleet.node_a, release, at)]
    asked.clear()
    before = timezone.now()
    jobs.job_start_update(
        node=fleet.node_b, release=release, user=None, transport=RecordingTransport(), gate=gate
    )
    ((_, _, when),) = asked
    assert when is not None and when >= before


def test_a_report_acknowledges_the_jobs_command_at_the_reports_time(
    fleet: Fleet, release: Release
) -> None:
    job = _start(fleet, release)
    at = timezone.now() + timedelta(seconds=7)
    jobs.job_record_progress(job_id=job.pk, node_id="a-1", step="ACCEPTED", now=at)
    command = C.objects.get(job=job)
    assert (command.state, command.acked_at) == (C.State.ACKED, at)


@pytest.mark.parametrize(("ok", "percent"), [(True, 100), (False, 0)])
def test_a_finished_job_shows_100_percent_only_when_it_succeeded(
    fleet: Fleet, release: Release, ok: bool, percent: int
) -> None:
    job = _start(fleet, release)
    jobs.job_record_progress(job_id=job.pk, node_id="a-1", step="DOWNLOADING", percent=50)
    finished = jobs.job_finish(job_id=job.pk, node_id="a-1", ok=ok, error_code="" if ok else "X")
    assert finished is not None and finished.progress_percent == percent


def test_a_finish_records_its_error_within_the_columns_and_in_an_event(
    fleet: Fleet, release: Release
) -> None:
    job = _start(fleet, release)
    code, message = "C" * 70, "m" * 5000
    finished = jobs.job_finish(
        job_id=job.pk,
        node_id="a-1",
        ok=False,
        error_code=code,
        error_message=message,
        result={"version_from": "1.0.0"},
    )
    assert finished is not None
    assert (finished.error_code, finished.error_message) == (code[:64], message[:4000])
    event = Event.objects.get(verb="job.failed", object_id=str(job.pk))
    assert (event.actor_label, event.tenant_id) == ("node:a-1", fleet.tenant_a.pk)
    assert event.details == {
        "node_id": "a-1",
        "kind": "update",
        "error_code": code,
        "error": message[:500],
        "version_from": "1.0.0",
        "version_to": None,
        "rollout_id": None,
    }


def test_a_finished_rollout_job_wakes_its_rollout_debounced(
    fleet: Fleet, release: Release, monkeypatch: pytest.MonkeyPatch
) -> None:
    woken: list[tuple[int, bool]] = []
    monkeypatch.setattr(
        jobs, "wake_rollout_after_commit", lambda rid, *, debounce: woken.append((rid, debounce))
    )
    rollout = Rollout.objects.create(release=release, strategy=Rollout.Strategy.ROLLING)
    job = _start(fleet, release)
    UpdateJob.objects.filter(pk=job.pk).update(rollout=rollout)
    jobs.job_finish(job_id=job.pk, node_id="a-1", ok=True, result={"version_to": "1.7.0"})
    assert woken == [(rollout.pk, True)]
    event = Event.objects.get(verb="job.done", object_id=str(job.pk))
    assert event.details["rollout_id"] == rollout.pk
    assert event.details["version_to"] == "1.7.0"


def _refusing(wait_state: str | None, reason: str) -> GateFn:
    def gate(*, node: Node, release: Release | None, at: datetime | None = None) -> GateDecision:
        return GateDecision(allowed=False, wait_state=wait_state, reason=reason)

    return gate


def test_a_job_the_gate_holds_waits_with_its_reason_and_no_command(
    fleet: Fleet, release: Release
) -> None:
    reason = "outside the window " + "x" * 300
    job = jobs.job_start_update(
        node=fleet.node_a,
        release=release,
        user=None,
        transport=RecordingTransport(),
        gate=_refusing(S.WAITING_FOR_CONSENT, reason),
    )
    assert (job.state, job.wait_reason) == (S.WAITING_FOR_CONSENT, reason[:255])
    assert not C.objects.filter(job=job).exists()
    waiting = Event.objects.get(verb="job.update.waiting", object_id=str(job.pk))
    assert waiting.details["wait_reason"] == reason[:255]
    # A hold that names no waiting state waits for a window.
    other = jobs.job_start_update(
        node=fleet.node_b,
        release=release,
        user=None,
        transport=RecordingTransport(),
        gate=_refusing(None, "blackout"),
    )
    assert (other.state, other.wait_reason) == (S.WAITING_FOR_WINDOW, "blackout")


def test_a_queued_job_has_no_wait_reason_and_an_event_saying_what_and_who(
    fleet: Fleet, release: Release
) -> None:
    olivia = make_user(username="olivia")
    job = jobs.job_start_update(
        node=fleet.node_a, release=release, user=olivia, transport=RecordingTransport()
    )
    assert (job.wait_reason, job.restore_point, job.created_by) == ("", "", olivia)
    queued = Event.objects.get(verb="job.update.queued", object_id=str(job.pk))
    assert (queued.actor, queued.tenant_id) == (olivia, fleet.tenant_a.pk)
    assert queued.details == {
        "node_id": "a-1",
        "version": "1.7.0",
        "restore_point": None,
        "rollout_id": None,
        "wait_reason": None,
    }


def test_a_rollback_job_names_its_point_in_its_event(fleet: Fleet) -> None:
    fleet.node_a.restore_points = [{"id": "p1", "version": "1.6.0"}]
    fleet.node_a.save()
    job = jobs.job_start_rollback(
        node=fleet.node_a, point_id="p1", user=None, transport=RecordingTransport()
    )
    assert (job.restore_point, job.wait_reason, job.release_id) == ("p1", "", None)
    assert job.restore_version == "1.6.0"
    queued = Event.objects.get(verb="job.rollback.queued", object_id=str(job.pk))
    assert queued.details == {
        "node_id": "a-1",
        "version": None,
        "restore_point": "p1",
        "restore_version": "1.6.0",
        "rollout_id": None,
        "wait_reason": None,
    }


def test_update_options_travel_in_the_jobs_command(fleet: Fleet, release: Release) -> None:
    job = jobs.job_start_update(
        node=fleet.node_a,
        release=release,
        user=None,
        transport=RecordingTransport(),
        options={"health_timeout": 99},
    )
    assert C.objects.get(job=job).args == {"options": {"health_timeout": 99}}


def test_a_cancel_is_an_event_by_whom_on_the_job(fleet: Fleet, release: Release) -> None:
    olivia = make_user(username="olivia")
    never_sent = _start(fleet, release)
    jobs.job_cancel(job=never_sent, user=olivia)
    sent = _start(fleet, release, node="b")
    C.objects.filter(job=sent).update(attempts=1)
    jobs.job_cancel(job=sent, user=olivia)
    events = Event.objects.filter(verb__in=["job.cancelled", "job.cancelling"]).order_by("id")
    assert [(e.verb, e.actor, e.tenant_id, e.object_id) for e in events] == [
        ("job.cancelled", olivia, fleet.tenant_a.pk, str(never_sent.pk)),
        ("job.cancelling", olivia, fleet.tenant_b.pk, str(sent.pk)),
    ]


def test_a_cancel_after_the_agent_accepted_leaves_the_acknowledged_command_alone(
    fleet: Fleet, release: Release
) -> None:
    job = _start(fleet, release)
    C.objects.filter(job=job).update(attempts=1)
    # The agent took the command (ACCEPTED acknowledges it without moving the job).
    assert jobs.job_record_progress(job_id=job.pk, node_id="a-1", step="ACCEPTED")
    assert jobs.job_cancel(job=job, user=None) == S.CANCELLING
    apply = C.objects.get(job=job, kind=C.Kind.APPLY)
    assert (apply.state, apply.last_error) == (C.State.ACKED, "")
    assert C.objects.filter(job=job, kind=C.Kind.CANCEL).exists()


def test_an_operator_can_end_a_job_still_waiting_for_its_window_and_is_named(
    fleet: Fleet, release: Release
) -> None:
    job = jobs.job_start_update(
        node=fleet.node_a,
        release=release,
        user=None,
        transport=RecordingTransport(),
        gate=_refusing(S.WAITING_FOR_WINDOW, "outside the window"),
    )
    olivia = make_user(username="olivia")
    assert jobs.job_end_by_operator(job=job, user=olivia, reason="plan changed") is True
    job.refresh_from_db()
    assert (job.state, job.error_message) == (S.LOST, "ended by olivia: plan changed")
    assert Event.objects.get(verb="job.lost", object_id=str(job.pk)).actor == olivia


def test_a_rollout_job_names_its_rollout_when_queued(fleet: Fleet, release: Release) -> None:
    rollout = Rollout.objects.create(release=release, strategy=Rollout.Strategy.ROLLING)
    job = jobs.job_start_update(
        node=fleet.node_a,
        release=release,
        user=None,
        transport=RecordingTransport(),
        rollout=rollout,
    )
    queued = Event.objects.get(verb="job.update.queued", object_id=str(job.pk))
    assert queued.details["rollout_id"] == rollout.pk
