"""The outbox and its relay: commands are rows written with the job, sent after commit,
re-sent until acknowledged, abandoned when out of sends. A recording transport is
injected at the NodeTransport seam; clocks are passed in."""

from __future__ import annotations

import contextlib
import threading
from datetime import datetime, timedelta
from typing import Any

import pytest
from django.core import signing
from django.db import connection, transaction
from django.utils import timezone
from pytest_django import DjangoCaptureOnCommitCallbacks, Settings

from tests.conftest import Fleet
from tests.factories import make_node, make_release
from updates.jobs import outbox
from updates.jobs import services as jobs
from updates.models import Event, Node, NodeCommand, Release, UpdateJob
from updates.releases.artifacts import TOKEN_SALT, DownloadRefused, job_for_download

pytestmark = pytest.mark.django_db

C = NodeCommand
T0 = datetime(2030, 1, 1, 12, 0, tzinfo=timezone.get_fixed_timezone(0))


class RecordingTransport:
    """Records every send; `fail` makes the next sends raise as a broker outage would."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, str, str, Any]] = []
        self.fail = 0

    def _record(self, entry: tuple[str, str, str, Any]) -> None:
        if self.fail:
            self.fail -= 1
            raise ConnectionError("broker unreachable")
        self.sent.append(entry)

    def update_node(self, node_id: str, job_id: str, **options: Any) -> None:
        self._record(("update", node_id, job_id, options))

    def rollback_node(self, node_id: str, job_id: str, point_id: str | None = None) -> None:
        self._record(("rollback", node_id, job_id, point_id))

    def set_traffic_role(self, node_id: str, role: str) -> None:
        self._record(("traffic_role", node_id, "", role))

    def cancel_job(self, node_id: str, job_id: str) -> None:
        self._record(("cancel", node_id, job_id, None))

    def health_check(self, node_id: str) -> dict[str, Any]:
        return {}


@pytest.fixture
def release(db: None) -> Release:
    return make_release(version="1.7.0", sha256="ab" * 32, artifact="releases/x.tar")


@pytest.fixture
def transport() -> RecordingTransport:
    return RecordingTransport()


@pytest.fixture
def deadlines(settings: Settings) -> Settings:
    settings.THEMIS_JOB_ACK_TIMEOUT = 30
    settings.THEMIS_JOB_MAX_SENDS = 3
    settings.THEMIS_JOB_PROGRESS_TIMEOUT = 600
    settings.THEMIS_JOB_OFFLINE_GRACE = 120
    return settings


def _start(
    fleet: Fleet,
    release: Release,
    transport: RecordingTransport,
    capture: DjangoCaptureOnCommitCallbacks,
) -> UpdateJob:
    with capture(execute=True):
        return jobs.job_start_update(
            node=fleet.node_a, release=release, user=None, transport=transport
        )


def test_job_and_its_command_are_written_together_and_sent_after_commit(
    fleet: Fleet,
    release: Release,
    transport: RecordingTransport,
    django_capture_on_commit_callbacks: DjangoCaptureOnCommitCallbacks,
) -> None:
    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        job = jobs.job_start_update(
            node=fleet.node_a, release=release, user=None, transport=transport
        )
        command = C.objects.get(job=job)
        assert (command.kind, command.state, command.attempts) == (C.Kind.APPLY, C.State.PENDING, 0)
        assert transport.sent == []
    for callback in callbacks:
        callback()
    assert [s[:3] for s in transport.sent] == [("update", "a-1", str(job.pk))]
    command.refresh_from_db()
    assert (command.state, command.attempts) == (C.State.SENT, 1)
    assert command.last_sent_at is not None


def test_a_refused_job_writes_no_command(
    fleet: Fleet, release: Release, transport: RecordingTransport
) -> None:
    jobs.job_start_update(node=fleet.node_a, release=release, user=None, transport=transport)
    with pytest.raises(jobs.JobConflict):
        jobs.job_start_update(node=fleet.node_a, release=release, user=None, transport=transport)
    assert C.objects.count() == 1


# Scenario 2: a broker error between commit and send leaves the command open; the relay sends it.
# The clock stands still, so "too early" cannot turn into "due" on a slow run.
@pytest.mark.time_machine(T0, tick=False)
def test_broker_error_after_commit_leaves_command_open_and_relay_sends_it_later(
    fleet: Fleet,
    release: Release,
    transport: RecordingTransport,
    django_capture_on_commit_callbacks: DjangoCaptureOnCommitCallbacks,
) -> None:
    transport.fail = 1
    job = _start(fleet, release, transport, django_capture_on_commit_callbacks)
    assert transport.sent == []
    command = C.objects.get(job=job)
    assert command.state == C.State.PENDING and command.attempts == 0
    assert "broker unreachable" in command.last_error
    job.refresh_from_db()
    assert job.state == UpdateJob.State.QUEUED
    # Too early: the retry is a few seconds out.
    assert outbox.relay_due(transport=transport).sent == 0
    assert command.next_attempt_at == T0 + timedelta(seconds=outbox.BROKER_RETRY_SECONDS)
    later = T0 + timedelta(seconds=outbox.BROKER_RETRY_SECONDS)
    assert outbox.relay_due(transport=transport, now=later).sent == 1
    assert [s[:3] for s in transport.sent] == [("update", "a-1", str(job.pk))]
    command.refresh_from_db()
    assert (command.state, command.attempts, command.last_error) == (C.State.SENT, 1, "")


def test_two_relays_send_each_attempt_once(
    fleet: Fleet, release: Release, transport: RecordingTransport, deadlines: Settings
) -> None:
    job = jobs.job_start_update(node=fleet.node_a, release=release, user=None, transport=transport)
    command = C.objects.get(job=job)
    # Both relays read the same due row; only the first claim of the attempt sends.
    stale = C.objects.get(pk=command.pk)
    assert outbox.relay_command(command.pk, transport=transport, now=T0 + timedelta(days=1)) == (
        outbox.RelayOutcome.SENT
    )
    claimed = C.objects.filter(pk=stale.pk, attempts=stale.attempts, state__in=C.OPEN_STATES)
    assert claimed.update(attempts=stale.attempts + 1) == 0  # the loser's conditional UPDATE
    assert outbox.relay_command(command.pk, transport=transport, now=T0 + timedelta(days=1)) == (
        outbox.RelayOutcome.SKIPPED  # not due again before ack_timeout
    )
    assert len(transport.sent) == 1


@pytest.mark.django_db(transaction=True)
def test_concurrent_relays_in_threads_send_each_attempt_once(
    fleet: Fleet, release: Release, transport: RecordingTransport, deadlines: Settings
) -> None:
    deadlines.THEMIS_JOB_MAX_SENDS = 10
    job = jobs.job_start_update(node=fleet.node_a, release=release, user=None, transport=transport)
    command = C.objects.get(job=job)
    for round_ in range(5):
        # the next attempt is due; eight relays race for it
        C.objects.filter(pk=command.pk).update(next_attempt_at=T0)
        before = len(transport.sent)
        barrier = threading.Barrier(8)

        def relay(barrier: threading.Barrier = barrier) -> None:
            barrier.wait(timeout=30)
            try:
                outbox.relay_command(command.pk, transport=transport, now=T0 + timedelta(days=1))
            finally:
                connection.close()

        threads = [threading.Thread(target=relay) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        assert not any(thread.is_alive() for thread in threads), f"round {round_}: a relay hung"
        assert len(transport.sent) - before == 1, f"round {round_}"
    assert C.objects.get(pk=command.pk).attempts == 5 + 1  # with the first send on commit


def test_resend_every_ack_timeout_then_abandon_and_end_lost(
    fleet: Fleet,
    release: Release,
    transport: RecordingTransport,
    deadlines: Settings,
    django_capture_on_commit_callbacks: DjangoCaptureOnCommitCallbacks,
) -> None:
    job = jobs.job_start_update(node=fleet.node_a, release=release, user=None, transport=transport)
    command = C.objects.get(job=job)
    C.objects.filter(pk=command.pk).update(next_attempt_at=T0)
    now = T0
    for attempt in (1, 2, 3):
        assert outbox.relay_due(transport=transport, now=now).sent == 1
        command.refresh_from_db()
        assert command.attempts == attempt
        assert command.next_attempt_at == now + timedelta(seconds=30)
        assert outbox.relay_due(transport=transport, now=now + timedelta(seconds=29)).sent == 0
        now += timedelta(seconds=30)
    assert len(transport.sent) == 3
    with django_capture_on_commit_callbacks(execute=False):
        result = outbox.relay_due(transport=transport, now=now)
    assert (result.sent, result.abandoned) == (0, 1)
    command.refresh_from_db()
    job.refresh_from_db()
    assert command.state == C.State.ABANDONED
    assert (job.state, job.error_code) == (UpdateJob.State.LOST, "LOST")
    assert job.error_message == "not acknowledged after 3 sends"
    assert job.finished_at is not None
    assert Event.objects.filter(verb="job.lost", object_id=str(job.pk)).count() == 1
    # the node is free: a new job is accepted
    again = jobs.job_start_update(
        node=fleet.node_a, release=release, user=None, transport=transport
    )
    assert again.state == UpdateJob.State.QUEUED


def test_command_of_an_ended_job_is_abandoned_not_sent(
    fleet: Fleet, release: Release, transport: RecordingTransport
) -> None:
    job = jobs.job_start_update(node=fleet.node_a, release=release, user=None, transport=transport)
    UpdateJob.objects.filter(pk=job.pk).update(state=UpdateJob.State.FAILED)
    command = C.objects.get(job=job)
    assert outbox.relay_command(command.pk, transport=transport) == outbox.RelayOutcome.ABANDONED
    command.refresh_from_db()
    assert command.state == C.State.ABANDONED and transport.sent == []


def test_cancelled_job_abandons_its_command(
    fleet: Fleet, release: Release, transport: RecordingTransport
) -> None:
    job = jobs.job_start_update(node=fleet.node_a, release=release, user=None, transport=transport)
    assert jobs.job_cancel(job=job, user=None)
    assert C.objects.get(job=job).state == C.State.ABANDONED
    assert outbox.relay_due(transport=transport, now=T0 + timedelta(days=1)).sent == 0


def _cancel_sent_job(
    fleet: Fleet,
    release: Release,
    transport: RecordingTransport,
    capture: DjangoCaptureOnCommitCallbacks,
) -> UpdateJob:
    """A job whose apply command went out, then cancelled by an operator."""
    job = _start(fleet, release, transport, capture)
    with capture(execute=True):
        assert jobs.job_cancel(job=job, user=None, transport=transport)
    job.refresh_from_db()
    return job


def test_cancel_after_the_command_left_asks_the_agent_and_waits_for_its_answer(
    fleet: Fleet,
    release: Release,
    transport: RecordingTransport,
    django_capture_on_commit_callbacks: DjangoCaptureOnCommitCallbacks,
) -> None:
    job = _cancel_sent_job(fleet, release, transport, django_capture_on_commit_callbacks)
    # The apply may sit in the agent's queue: not cancelled until the agent says so.
    assert job.state == UpdateJob.State.CANCELLING and job.is_active
    assert [s[:3] for s in transport.sent] == [
        ("update", "a-1", str(job.pk)),
        ("cancel", "a-1", str(job.pk)),
    ]
    kinds = dict(C.objects.filter(job=job).values_list("kind", "state"))
    assert kinds == {C.Kind.APPLY: C.State.ABANDONED, C.Kind.CANCEL: C.State.SENT}
    with pytest.raises(jobs.JobConflict):
        jobs.job_start_update(node=fleet.node_a, release=release, user=None, transport=transport)

    jobs.job_finish(job_id=job.pk, node_id="a-1", ok=False, error_code="CANCELLED")
    job.refresh_from_db()
    assert job.state == UpdateJob.State.CANCELLED and job.finished_at is not None
    assert C.objects.get(job=job, kind=C.Kind.CANCEL).state == C.State.ACKED
    assert Event.objects.filter(verb="job.cancelling").count() == 1
    assert Event.objects.filter(verb="job.cancelled").count() == 1
    # The node takes new jobs again.
    jobs.job_start_update(node=fleet.node_a, release=release, user=None, transport=transport)


def test_cancel_that_comes_too_late_lets_the_job_go_on(
    fleet: Fleet,
    release: Release,
    transport: RecordingTransport,
    django_capture_on_commit_callbacks: DjangoCaptureOnCommitCallbacks,
) -> None:
    job = _cancel_sent_job(fleet, release, transport, django_capture_on_commit_callbacks)
    # The agent had started: its next step moves the job on and answers the cancel.
    assert jobs.job_record_progress(job_id=job.pk, node_id="a-1", step="DOWNLOADING")
    job.refresh_from_db()
    assert job.state == UpdateJob.State.DOWNLOADING
    assert C.objects.get(job=job, kind=C.Kind.CANCEL).state == C.State.ACKED
    jobs.job_finish(job_id=job.pk, node_id="a-1", ok=True, result={"version_to": "1.7.0"})
    job.refresh_from_db()
    fleet.node_a.refresh_from_db()
    assert job.state == UpdateJob.State.DONE and fleet.node_a.installed_version == "1.7.0"


def test_an_agent_cannot_cancel_a_job_nobody_cancelled(
    fleet: Fleet, release: Release, transport: RecordingTransport
) -> None:
    job = jobs.job_start_update(node=fleet.node_a, release=release, user=None, transport=transport)
    jobs.job_finish(job_id=job.pk, node_id="a-1", ok=False, error_code="CANCELLED")
    job.refresh_from_db()
    assert job.state == UpdateJob.State.FAILED


def test_an_unanswered_cancel_ends_the_job_lost(
    fleet: Fleet,
    release: Release,
    transport: RecordingTransport,
    deadlines: Settings,
    django_capture_on_commit_callbacks: DjangoCaptureOnCommitCallbacks,
) -> None:
    job = _cancel_sent_job(fleet, release, transport, django_capture_on_commit_callbacks)
    now = timezone.now()
    for _ in range(deadlines.THEMIS_JOB_MAX_SENDS):
        now += timedelta(seconds=deadlines.THEMIS_JOB_ACK_TIMEOUT + 1)
        outbox.relay_due(transport=transport, now=now)
    job.refresh_from_db()
    assert job.state == UpdateJob.State.LOST
    assert "not acknowledged after 3 sends" in job.error_message
    assert [s[0] for s in transport.sent] == ["update", "cancel", "cancel", "cancel"]


def test_a_job_whose_command_never_left_is_cancelled_at_once(
    fleet: Fleet, release: Release, transport: RecordingTransport
) -> None:
    job = jobs.job_start_update(node=fleet.node_a, release=release, user=None, transport=transport)
    assert jobs.job_cancel(job=job, user=None, transport=transport)
    job.refresh_from_db()
    assert job.state == UpdateJob.State.CANCELLED
    assert not C.objects.filter(kind=C.Kind.CANCEL).exists()


# Scenario 12: a re-send carries a new, valid download token after the first one expired.
def test_resend_carries_a_fresh_token_after_the_first_expired(
    fleet: Fleet,
    release: Release,
    transport: RecordingTransport,
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings.THEMIS_DOWNLOAD_TOKEN_SECONDS = 60
    clock = [1_900_000_000.0]

    class Clock:
        @staticmethod
        def time() -> float:
            return clock[0]

    monkeypatch.setattr(signing, "time", Clock)
    job = jobs.job_start_update(node=fleet.node_a, release=release, user=None, transport=transport)
    command = C.objects.get(job=job)
    C.objects.filter(pk=command.pk).update(next_attempt_at=T0)
    assert outbox.relay_due(transport=transport, now=T0).sent == 1
    first = transport.sent[0][3]["download_token"]
    clock[0] += 3600  # the agent comes back an hour later: the first token expired
    with pytest.raises(DownloadRefused, match="expired"):
        job_for_download(job_id=job.pk, token=first)
    assert outbox.relay_due(transport=transport, now=T0 + timedelta(seconds=31)).sent == 1
    second = transport.sent[1][3]["download_token"]
    assert second != first
    assert job_for_download(job_id=job.pk, token=second).pk == job.pk


def test_rollback_command_carries_its_point(
    fleet: Fleet,
    transport: RecordingTransport,
    django_capture_on_commit_callbacks: DjangoCaptureOnCommitCallbacks,
) -> None:
    Node.objects.filter(pk=fleet.node_a.pk).update(restore_points=[{"id": "p1", "version": "1.6"}])
    fleet.node_a.refresh_from_db()
    with django_capture_on_commit_callbacks(execute=True):
        job = jobs.job_start_rollback(
            node=fleet.node_a, point_id="p1", user=None, transport=transport
        )
    assert transport.sent == [("rollback", "a-1", str(job.pk), "p1")]
    assert C.objects.get(job=job).kind == C.Kind.ROLLBACK


# ------------------------------------------------------------------ acknowledgements


@pytest.mark.parametrize("step", ["ACCEPTED", "IN_PROGRESS"])
def test_accepted_and_in_progress_ack_without_moving_the_job(
    fleet: Fleet, release: Release, transport: RecordingTransport, step: str
) -> None:
    job = jobs.job_start_update(node=fleet.node_a, release=release, user=None, transport=transport)
    assert jobs.job_record_progress(job_id=job.pk, node_id="a-1", step=step, percent=1, now=T0)
    job.refresh_from_db()
    assert (job.state, job.acked_at, job.last_report_at) == (UpdateJob.State.QUEUED, T0, T0)
    assert C.objects.get(job=job).state == C.State.ACKED
    # a later report refreshes liveness but keeps the first acknowledgement time
    later = T0 + timedelta(seconds=5)
    jobs.job_record_progress(job_id=job.pk, node_id="a-1", step="PREFLIGHT", now=later)
    job.refresh_from_db()
    assert (job.state, job.acked_at, job.last_report_at) == ("PREFLIGHT", T0, later)


def test_a_real_step_acknowledges(
    fleet: Fleet, release: Release, transport: RecordingTransport
) -> None:
    job = jobs.job_start_update(node=fleet.node_a, release=release, user=None, transport=transport)
    jobs.job_record_progress(job_id=job.pk, node_id="a-1", step="DOWNLOADING", now=T0)
    job.refresh_from_db()
    assert (job.state, job.acked_at) == (UpdateJob.State.DOWNLOADING, T0)
    assert C.objects.get(job=job).state == C.State.ACKED


def test_the_final_report_acknowledges(
    fleet: Fleet, release: Release, transport: RecordingTransport
) -> None:
    job = jobs.job_start_update(node=fleet.node_a, release=release, user=None, transport=transport)
    jobs.job_finish(job_id=job.pk, node_id="a-1", ok=True, result={"version_to": "1.7.0"}, now=T0)
    job.refresh_from_db()
    assert (job.state, job.acked_at) == (UpdateJob.State.DONE, T0)
    assert C.objects.get(job=job).state == C.State.ACKED


def test_unknown_step_neither_acks_nor_moves(
    fleet: Fleet, release: Release, transport: RecordingTransport
) -> None:
    job = jobs.job_start_update(node=fleet.node_a, release=release, user=None, transport=transport)
    assert not jobs.job_record_progress(job_id=job.pk, node_id="a-1", step="BOGUS")
    job.refresh_from_db()
    assert job.acked_at is None and job.state == UpdateJob.State.QUEUED
    assert C.objects.get(job=job).state == C.State.PENDING


def test_another_nodes_ack_is_ignored(
    fleet: Fleet, release: Release, transport: RecordingTransport
) -> None:
    job = jobs.job_start_update(node=fleet.node_a, release=release, user=None, transport=transport)
    assert not jobs.job_record_progress(job_id=job.pk, node_id="b-1", step="ACCEPTED")
    job.refresh_from_db()
    assert job.acked_at is None
    assert C.objects.get(job=job).state == C.State.PENDING


@pytest.mark.parametrize(
    ("result", "state"),
    [
        ({"version_from": "1.0.0", "installed_version": "1.0.0"}, UpdateJob.State.ROLLED_BACK),
        ({"version_from": "1.0.0", "installed_version": "1.7.0"}, UpdateJob.State.FAILED),
        ({"version_from": "1.0.0", "version_to": "1.7.0"}, UpdateJob.State.FAILED),
    ],
)
def test_interrupted_job_maps_by_the_version_recovery_left(
    fleet: Fleet,
    release: Release,
    transport: RecordingTransport,
    result: dict[str, str],
    state: str,
) -> None:
    job = jobs.job_start_update(node=fleet.node_a, release=release, user=None, transport=transport)
    jobs.job_finish(job_id=job.pk, node_id="a-1", ok=False, error_code="INTERRUPTED", result=result)
    job.refresh_from_db()
    assert (job.state, job.error_code) == (state, "INTERRUPTED")


# ------------------------------------------------------------------ relays in bulk


def _queued_jobs(count: int, release: Release, transport: RecordingTransport) -> list[UpdateJob]:
    nodes = [make_node(node_id=f"bulk-{i}", installed_version="1.6.0") for i in range(count)]
    return [
        jobs.job_start_update(node=node, release=release, user=None, transport=transport)
        for node in nodes
    ]


def test_commands_relayed_together_are_read_and_claimed_together(
    release: Release,
    transport: RecordingTransport,
    deadlines: Settings,
    django_assert_max_num_queries: Any,
) -> None:
    queued = _queued_jobs(12, release, transport)
    ids = list(C.objects.order_by("pk").values_list("pk", flat=True))
    # The transaction, one read, one claim and one delta lookup for all twelve.
    with django_assert_max_num_queries(6):
        outcomes = outbox.relay_commands(ids, transport=transport, now=T0 + timedelta(days=1))
    assert outcomes == dict.fromkeys(ids, outbox.RelayOutcome.SENT)
    assert sorted(int(job_id) for _, _, job_id, _ in transport.sent) == [j.pk for j in queued]
    assert set(C.objects.values_list("state", "attempts")) == {(C.State.SENT, 1)}
    # Each with its own arguments: its own job's token and bundle address.
    for _, _, job_id, options in transport.sent:
        assert options["artifact_url"].endswith(f"/artifacts/jobs/{job_id}/bundle")
        assert signing.TimestampSigner(salt=TOKEN_SALT).unsign(options["download_token"]) == str(
            job_id
        )


def test_a_bulk_relay_abandons_ended_jobs_and_gives_back_a_failed_send(
    release: Release, transport: RecordingTransport, deadlines: Settings
) -> None:
    first, ended, third = _queued_jobs(3, release, transport)
    UpdateJob.objects.filter(pk=ended.pk).update(state=UpdateJob.State.CANCELLED)
    ids = list(C.objects.order_by("pk").values_list("pk", flat=True))
    transport.fail = 1  # the first send (first's) meets a broker outage
    outcomes = outbox.relay_commands(ids, transport=transport, now=T0 + timedelta(days=1))
    by_job = {C.objects.get(pk=pk).job_id: outcome for pk, outcome in outcomes.items()}
    assert by_job == {
        first.pk: outbox.RelayOutcome.BROKER_ERROR,
        ended.pk: outbox.RelayOutcome.ABANDONED,
        third.pk: outbox.RelayOutcome.SENT,
    }
    assert [int(job_id) for _, _, job_id, _ in transport.sent] == [third.pk]
    rows = {c.job_id: c for c in C.objects.all()}
    assert (rows[first.pk].state, rows[first.pk].attempts) == (C.State.PENDING, 0)
    assert "broker unreachable" in rows[first.pk].last_error
    assert rows[ended.pk].state == C.State.ABANDONED
    assert (rows[third.pk].state, rows[third.pk].attempts) == (C.State.SENT, 1)


def test_a_bulk_relay_leaves_out_what_is_not_due_or_not_there(
    release: Release, transport: RecordingTransport, deadlines: Settings
) -> None:
    due, later = _queued_jobs(2, release, transport)
    C.objects.filter(job=later).update(next_attempt_at=T0 + timedelta(days=2))
    ids = [C.objects.get(job=due).pk, C.objects.get(job=later).pk, 999_999]
    outcomes = outbox.relay_commands(ids, transport=transport, now=T0 + timedelta(days=1))
    assert outcomes == {ids[0]: outbox.RelayOutcome.SENT}
    assert C.objects.get(job=later).attempts == 0


def test_commands_written_in_a_bulk_block_go_out_together_after_commit(
    release: Release,
    transport: RecordingTransport,
    django_capture_on_commit_callbacks: DjangoCaptureOnCommitCallbacks,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    nodes = [make_node(node_id=f"blk-{i}", installed_version="1.6.0") for i in range(4)]
    calls: list[list[int]] = []
    real = outbox.relay_commands

    def recording(ids: list[int], **kwargs: Any) -> dict[int, outbox.RelayOutcome]:
        calls.append(list(ids))
        return real(ids, **kwargs)

    monkeypatch.setattr(outbox, "relay_commands", recording)
    with django_capture_on_commit_callbacks(execute=True), transaction.atomic():
        with outbox.relays_in_bulk():
            for node in nodes[:3]:
                jobs.job_start_update(node=node, release=release, user=None, transport=transport)
            # One start undone by its savepoint: its command is never sent.
            with contextlib.suppress(RuntimeError), transaction.atomic():
                jobs.job_start_update(
                    node=nodes[3], release=release, user=None, transport=transport
                )
                raise RuntimeError("undone")
        assert transport.sent == []  # nothing before the commit
    assert len(calls) == 1 and len(calls[0]) == 4  # the undone one was named, and not found
    assert sorted(node_id for _, node_id, _, _ in transport.sent) == ["blk-0", "blk-1", "blk-2"]
    assert not UpdateJob.objects.filter(node=nodes[3]).exists()
    assert C.objects.filter(state=C.State.SENT).count() == 3


def test_nothing_written_in_a_bulk_block_is_sent_when_its_transaction_rolls_back(
    release: Release,
    transport: RecordingTransport,
    django_capture_on_commit_callbacks: DjangoCaptureOnCommitCallbacks,
) -> None:
    node = make_node(node_id="gone", installed_version="1.6.0")
    with (
        django_capture_on_commit_callbacks(execute=True) as callbacks,
        contextlib.suppress(RuntimeError),
        transaction.atomic(),
        outbox.relays_in_bulk(),
    ):
        jobs.job_start_update(node=node, release=release, user=None, transport=transport)
        raise RuntimeError("the drive died")
    assert callbacks == [] and transport.sent == []
    assert not C.objects.exists() and not UpdateJob.objects.exists()
