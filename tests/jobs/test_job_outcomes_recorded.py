"""What a job writes besides its own state: the node's schema version and components after a
successful job, the figures' report number, the point and version a rollback goes to, and
the plan named in the queued event. Each pinned here because a change to it would otherwise
go unnoticed (found by mutation testing of updates/jobs/services.py)."""

from __future__ import annotations

from typing import Any

import pytest
from django.utils import timezone

from tests.conftest import Fleet
from tests.factories import make_release, make_user
from tests.fakes import NullTransport
from updates.jobs import services as jobs
from updates.jobs.selectors import JobPlan
from updates.live.services import Topic
from updates.models import (
    Event,
    JobPlanStep,
    Node,
    NodeCommand,
    NodeComponent,
    Release,
    UpdateJob,
)
from updates.rollouts import services as rollouts

pytestmark = pytest.mark.django_db
S = UpdateJob.State


def _job(fleet: Fleet, **fields: object) -> UpdateJob:
    release = Release.objects.filter(version="1.7.0").first() or make_release(
        version="1.7.0", sha256="ab" * 32
    )
    return UpdateJob.objects.create(
        node=fleet.node_a, release=release, state=S.APPLYING, started_at=timezone.now(), **fields
    )


@pytest.mark.parametrize(("ok", "recorded"), [(True, "0042_orders"), (False, "0041")])
def test_a_successful_job_records_the_schema_it_left_and_a_failed_one_does_not(
    fleet: Fleet, ok: bool, recorded: str
) -> None:
    Node.objects.filter(pk=fleet.node_a.pk).update(schema_version="0041")
    job = _job(fleet)
    jobs.job_finish(
        job_id=job.pk,
        node_id="a-1",
        ok=ok,
        error_code="" if ok else "APPLY_FAILED",
        result={"version_to": "1.7.0", "schema_version": "0042_orders"},
    )
    assert Node.objects.get(pk=fleet.node_a.pk).schema_version == recorded


def test_an_empty_or_non_text_schema_version_changes_nothing(fleet: Fleet) -> None:
    Node.objects.filter(pk=fleet.node_a.pk).update(schema_version="0041")
    for value in ("", 42):
        job = _job(fleet)
        jobs.job_finish(job_id=job.pk, node_id="a-1", ok=True, result={"schema_version": value})
        assert Node.objects.get(pk=fleet.node_a.pk).schema_version == "0041"


def test_a_plan_records_its_steps_and_leaves_the_other_components(fleet: Fleet) -> None:
    now = timezone.now()
    NodeComponent.objects.record(
        node_id=fleet.node_a.pk,
        versions={"themisdb": "1.6.0", "themis-storage": "1.3.0", "themis-query": "2.0.0"},
        now=now,
        replace=True,
    )
    steps = [
        {"product": "themis-storage", "version": "1.4.2", "from_version": "1.3.0", "release_id": 1},
        {"product": "themisdb", "version": "1.7.0", "from_version": "1.6.0", "release_id": 2},
    ]
    job = _job(fleet, plan=steps)
    jobs.job_finish(job_id=job.pk, node_id="a-1", ok=True, result={})
    stored = dict(
        NodeComponent.objects.filter(node_id=fleet.node_a.pk).values_list("product", "version")
    )
    # The plan's steps moved; themis-query, not in the plan, is still there.
    assert stored == {"themisdb": "1.7.0", "themis-storage": "1.4.2", "themis-query": "2.0.0"}
    assert Node.objects.get(pk=fleet.node_a.pk).installed_version == "1.7.0"


def test_progress_figures_record_the_number_of_the_report_they_came_from(fleet: Fleet) -> None:
    job = _job(fleet)
    UpdateJob.objects.filter(pk=job.pk).update(state=S.DOWNLOADING)
    assert jobs.job_record_progress(
        job_id=job.pk, node_id="a-1", step="DOWNLOADING", percent=40, sequence=17
    )
    assert UpdateJob.objects.get(pk=job.pk).progress_sequence == 17
    # An older report of the same state moves nothing back; a newer one moves on.
    assert not jobs.job_record_progress(
        job_id=job.pk, node_id="a-1", step="DOWNLOADING", percent=10, sequence=16
    )
    assert UpdateJob.objects.get(pk=job.pk).progress_percent == 40
    assert jobs.job_record_progress(
        job_id=job.pk, node_id="a-1", step="DOWNLOADING", percent=70, sequence=18
    )
    moved = UpdateJob.objects.get(pk=job.pk)
    assert (moved.progress_percent, moved.progress_sequence) == (70, 18)


def test_a_rollback_takes_the_point_named_not_the_first_one_listed(fleet: Fleet) -> None:
    Node.objects.filter(pk=fleet.node_a.pk).update(
        restore_points=["junk", {"id": "p1", "version": "1.5.0"}, {"id": "p2", "version": "1.6.0"}]
    )
    fleet.node_a.refresh_from_db()
    job = jobs.job_start_rollback(
        node=fleet.node_a, point_id="p2", user=None, transport=NullTransport()
    )
    assert (job.restore_point, job.restore_version) == ("p2", "1.6.0")


def test_a_rollback_to_a_point_the_node_does_not_list_records_no_version(fleet: Fleet) -> None:
    job = jobs.job_start_rollback(
        node=fleet.node_a,
        point_id="from-a-report",
        user=None,
        transport=NullTransport(),
        require_known_point=False,
    )
    assert (job.restore_point, job.restore_version) == ("from-a-report", "")


def test_a_long_version_is_cut_to_what_the_column_holds(fleet: Fleet) -> None:
    Node.objects.filter(pk=fleet.node_a.pk).update(
        restore_points=[{"id": "p1", "version": "1." + "9" * 80}]
    )
    fleet.node_a.refresh_from_db()
    job = jobs.job_start_rollback(
        node=fleet.node_a, point_id="p1", user=None, transport=NullTransport()
    )
    assert job.restore_version == ("1." + "9" * 80)[:64]


def test_a_point_before_the_first_install_is_refused_with_the_reason(fleet: Fleet) -> None:
    Node.objects.filter(pk=fleet.node_a.pk).update(restore_points=[{"id": "p0", "version": ""}])
    fleet.node_a.refresh_from_db()
    with pytest.raises(jobs.JobConflict) as refused:
        jobs.job_start_rollback(
            node=fleet.node_a, point_id="p0", user=None, transport=NullTransport()
        )
    assert str(refused.value) == (
        "restore point 'p0' of node a-1 was taken before anything was installed: "
        "rolling back to it would leave the node without ThemisDB"
    )
    assert not UpdateJob.objects.exists()


@pytest.mark.parametrize(("steps", "named"), [(1, False), (2, True)])
def test_the_queued_event_names_a_plan_of_more_than_the_release_itself(
    fleet: Fleet, steps: int, named: bool
) -> None:
    release = make_release(version="1.7.0", sha256="ab" * 32, state="published")
    plan = JobPlan(tuple(JobPlanStep(f"p{i}", "1.0.0", "", release.pk) for i in range(steps)))

    def resolved(*, node: Node, release: Release) -> JobPlan:
        return plan

    job = jobs.job_start_update(
        node=fleet.node_a, release=release, user=None, transport=NullTransport(), plans=resolved
    )
    details = Event.objects.get(verb="job.update.queued", object_id=str(job.pk)).details
    assert ("plan" in details) is named
    if named:
        assert details["plan"] == ["p0 1.0.0", "p1 1.0.0"]


class _ContractsSent(NullTransport):
    def __init__(self) -> None:
        self.sent: list[tuple[str, str, str]] = []

    def contract_node(self, node_id: str, job_id: str, version: str) -> None:
        self.sent.append((node_id, job_id, version))


def test_a_contract_job_is_queued_with_its_command_and_sent_once_committed(
    fleet: Fleet, django_capture_on_commit_callbacks: Any
) -> None:
    release = make_release(version="1.7.0", sha256="ab" * 32)
    transport = _ContractsSent()
    with django_capture_on_commit_callbacks(execute=True):
        job = jobs.job_start_contract(
            node=fleet.node_a, release=release, user=None, transport=transport
        )
    assert (job.kind, job.state, job.release_id) == (UpdateJob.Kind.CONTRACT, S.QUEUED, release.pk)
    command = NodeCommand.objects.get(job=job)
    assert (command.kind, command.args["version"]) == (NodeCommand.Kind.CONTRACT, "1.7.0")
    assert transport.sent == [("a-1", str(job.pk), "1.7.0")]
    assert Event.objects.filter(verb="job.contract.queued", object_id=str(job.pk)).exists()
    # A second job for a busy node is refused and leaves nothing behind.
    with pytest.raises(jobs.JobConflict, match="already has an update in progress"):
        jobs.job_start_contract(node=fleet.node_a, release=release, user=None, transport=transport)
    assert UpdateJob.objects.count() == NodeCommand.objects.count() == 1


def test_a_schema_version_longer_than_its_column_is_cut_to_it(fleet: Fleet) -> None:
    job = _job(fleet)
    jobs.job_finish(job_id=job.pk, node_id="a-1", ok=True, result={"schema_version": "s" * 100})
    assert Node.objects.get(pk=fleet.node_a.pk).schema_version == "s" * 64


def test_a_contract_job_records_who_started_it_and_for_which_rollout(fleet: Fleet) -> None:
    release = make_release(version="1.1.0", sha256="ab" * 32)
    rollout = rollouts.rollout_create(
        release=release, strategy="rolling", nodes=[fleet.node_a], user=None
    )
    user = make_user(username="ops")
    job = jobs.job_start_contract(
        node=fleet.node_a, release=release, user=user, transport=NullTransport(), rollout=rollout
    )
    stored = UpdateJob.objects.get(pk=job.pk)
    assert (stored.created_by_id, stored.rollout_id) == (user.pk, rollout.pk)
    queued = Event.objects.get(verb="job.contract.queued", object_id=str(job.pk))
    assert queued.actor_id == user.pk


class Announced:
    """Stands in for updates.live's announce: the topics each call named."""

    def __init__(self) -> None:
        self.calls: list[tuple[Topic, ...]] = []

    def __call__(self, *topics: Topic) -> None:
        self.calls.append(topics)


def test_a_rollout_jobs_reports_and_cancel_announce_its_node_and_its_rollout(
    fleet: Fleet, monkeypatch: pytest.MonkeyPatch
) -> None:
    release = make_release(version="1.1.0", sha256="ab" * 32)
    rollout = rollouts.rollout_create(
        release=release, strategy="rolling", nodes=[fleet.node_a], user=None
    )
    announced = Announced()
    monkeypatch.setattr(jobs, "announce", announced)
    both = (Topic.node("a-1"), Topic.rollout(rollout.pk))

    job = _job(fleet, rollout=rollout)
    UpdateJob.objects.filter(pk=job.pk).update(state=S.DOWNLOADING)
    assert jobs.job_record_progress(job_id=job.pk, node_id="a-1", step="VERIFYING", percent=50)
    assert announced.calls == [both]

    jobs.job_finish(job_id=job.pk, node_id="a-1", ok=True, result={"version_to": "1.7.0"})
    assert announced.calls[1] == both

    queued = UpdateJob.objects.create(
        node=fleet.node_a, release=release, state=S.QUEUED, rollout=rollout
    )
    del announced.calls[:]
    assert jobs.job_cancel(job=queued, user=None) == S.CANCELLED
    assert both in announced.calls
