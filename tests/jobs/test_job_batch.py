"""A rollout's drive starts many nodes' jobs at once (job_updates_prepare, then
job_updates_store): the same jobs, events and commands as one job_start_update per node,
written together, all or none; and a download's byte figures, ordered by their own sequence."""

from __future__ import annotations

from datetime import datetime, timedelta

import pytest
from django.db import transaction
from django.utils import timezone
from pytest_django import DjangoCaptureOnCommitCallbacks

from tenants.gate import GateDecision
from tests.conftest import Fleet
from tests.factories import make_release
from tests.jobs.test_outbox import RecordingTransport
from updates.jobs import services as jobs
from updates.models import Event, Node, NodeCommand, Release, Rollout, UpdateJob

pytestmark = pytest.mark.django_db

S = UpdateJob.State


@pytest.fixture
def release(db: None) -> Release:
    return make_release(version="1.7.0", sha256="ab" * 32, artifact="releases/x.tar")


def _rollout(release: Release) -> Rollout:
    return Rollout.objects.create(release=release, name="batch")


def test_a_batch_is_prepared_with_its_rollout_its_time_and_each_nodes_gate(
    fleet: Fleet, release: Release
) -> None:
    asked: list[tuple[str, datetime | None]] = []

    def gate(*, node: Node, release: Release | None, at: datetime | None = None) -> GateDecision:
        asked.append((node.node_id, at))
        if node == fleet.node_b:
            return GateDecision(allowed=False, reason="outside its window")
        return GateDecision(allowed=True)

    rollout = _rollout(release)
    at = timezone.now() - timedelta(hours=2)
    new = jobs.job_updates_prepare(
        [fleet.node_a, fleet.node_b], release=release, rollout=rollout, gate=gate, now=at
    )
    assert asked == [("a-1", at), ("b-1", at)]
    assert [(j.node, j.rollout, j.kind, j.state) for j in new] == [
        (fleet.node_a, rollout, UpdateJob.Kind.UPDATE, S.QUEUED),
        (fleet.node_b, rollout, UpdateJob.Kind.UPDATE, S.WAITING_FOR_WINDOW),
    ]
    assert new[1].wait_reason == "outside its window"
    assert not UpdateJob.objects.exists()  # prepared, not written
    asked.clear()
    before = timezone.now()
    jobs.job_updates_prepare([fleet.node_a], release=release, rollout=rollout, gate=gate)
    ((_, when),) = asked
    assert when is not None and when >= before  # no time given: now


def test_a_stored_batch_has_its_events_and_commands_for_the_queued_jobs_only(
    fleet: Fleet,
    release: Release,
    django_capture_on_commit_callbacks: DjangoCaptureOnCommitCallbacks,
) -> None:
    def gate(*, node: Node, release: Release | None, at: datetime | None = None) -> GateDecision:
        return GateDecision(allowed=node == fleet.node_a, reason="outside its window")

    rollout = _rollout(release)
    new = jobs.job_updates_prepare(
        [fleet.node_a, fleet.node_b], release=release, rollout=rollout, gate=gate
    )
    transport = RecordingTransport()
    with django_capture_on_commit_callbacks(execute=True), transaction.atomic():
        created = jobs.job_updates_store(new, transport=transport, options={"health_timeout": 99})
    queued, waiting = created
    assert (queued.state, waiting.state) == (S.QUEUED, S.WAITING_FOR_WINDOW)
    assert [(c.job_id, c.args) for c in NodeCommand.objects.all()] == [
        (queued.pk, {"options": {"health_timeout": 99}})
    ]
    assert [entry[:3] for entry in transport.sent] == [("update", "a-1", str(queued.pk))]
    events = Event.objects.filter(object_id__in=[str(queued.pk), str(waiting.pk)])
    assert sorted(e.object_id for e in events) == sorted([str(queued.pk), str(waiting.pk)])


def test_a_batch_with_a_node_already_updating_writes_nothing(
    fleet: Fleet, release: Release
) -> None:
    jobs.job_start_update(
        node=fleet.node_b, release=release, user=None, transport=RecordingTransport()
    )
    before = (UpdateJob.objects.count(), Event.objects.count(), NodeCommand.objects.count())
    new = jobs.job_updates_prepare(
        [fleet.node_a, fleet.node_b], release=release, rollout=_rollout(release)
    )
    with (
        pytest.raises(
            jobs.JobConflict, match="^a node of the batch already has an update in progress$"
        ),
        transaction.atomic(),  # the caller's: what was written is undone with it
    ):
        jobs.job_updates_store(new, transport=RecordingTransport())
    after = (UpdateJob.objects.count(), Event.objects.count(), NodeCommand.objects.count())
    assert after == before


def _download(job: UpdateJob, done: int, sequence: int, step: str = "DOWNLOADING") -> None:
    jobs.job_record_progress(
        job_id=job.pk,
        node_id="a-1",
        step=step,
        bytes_done=done if step == "DOWNLOADING" else None,
        bytes_total=100 if step == "DOWNLOADING" else None,
        sequence=sequence,
    )


def test_byte_figures_follow_their_own_sequence_through_later_steps(
    fleet: Fleet, release: Release
) -> None:
    job = jobs.job_start_update(
        node=fleet.node_a, release=release, user=None, transport=RecordingTransport()
    )
    _download(job, 40, sequence=10)
    _download(job, 0, sequence=13, step="STAGED")
    _download(job, 100, sequence=12)  # overtaken by the next step's report
    _download(job, 70, sequence=11)  # older still: moves nothing back
    job.refresh_from_db()
    assert (job.state, job.bytes_done, job.bytes_sequence, job.progress_sequence) == (
        S.VERIFYING,
        100,
        12,
        13,
    )
