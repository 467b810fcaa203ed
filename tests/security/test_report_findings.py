"""Agent reports in, as an attacker on the broker would send them: replayed as another
type, replayed later, forged in bulk, or carrying hostile values. Each is refused whole,
counted, and nothing in the database moves."""

from __future__ import annotations

from typing import Any

import pytest
from django.test import Client

from tests.conftest import Fleet
from tests.factories import make_release
from tests.security.signing import signed_report
from updates.engine.reports import ReportType
from updates.fleet import tasks as fleet_tasks
from updates.models import Event, Node, ReportRejection, UpdateJob

pytestmark = pytest.mark.django_db

HB, PROGRESS, FINISHED = ReportType.HEARTBEAT, ReportType.JOB_PROGRESS, ReportType.JOB_FINISHED
POINTS = [{"id": "p-1", "version": "1.5.0", "created": "2026-01-01", "file_count": 3, "size": 10}]
UNHEALTHY: dict[str, Any] = {
    "installed_version": "1.6.0",
    "restore_points": POINTS,
    "error_rate": 0.5,
    "p99_latency_ms": 900.0,
    "service_healthy": False,
    "load_1m": 0.5,
    "disk_free_bytes": 1000,
}
NODE_FIELDS = (
    "installed_version",
    "restore_points",
    "error_rate",
    "p99_latency_ms",
    "service_healthy",
    "load_1m",
    "disk_free_bytes",
    "report_sequence",
    "last_heartbeat",
)
JOB_FIELDS = ("state", "step", "progress_percent", "bytes_done", "error_code", "result")


def _node_state(node_id: str = "a-1") -> dict[str, Any]:
    return dict(Node.objects.filter(node_id=node_id).values(*NODE_FIELDS).get())


def _job_state(job: UpdateJob) -> dict[str, Any]:
    return dict(UpdateJob.objects.filter(pk=job.pk).values(*JOB_FIELDS).get())


def _counted(reason: str, source: str = "a-1") -> int:
    row = ReportRejection.objects.filter(source=source, reason=reason).first()
    return row.count if row is not None else 0


@pytest.fixture
def unhealthy_a1(fleet: Fleet) -> Node:
    """a-1 as its latest heartbeat left it: restore points, failing metrics."""
    fleet_tasks.record_heartbeat(envelope=signed_report("a-1", HB, UNHEALTHY))
    node = Node.objects.get(node_id="a-1")
    assert node.service_healthy is False and node.restore_points == POINTS
    return node


# Scenario 2: a node's own job report replayed as a heartbeat is refused; nothing is wiped
def test_job_report_replayed_as_heartbeat_is_refused(unhealthy_a1: Node) -> None:
    job = UpdateJob.objects.create(node=unhealthy_a1, release=make_release(version="1.7.0"))
    final = {"job_id": str(job.pk), "ok": True, "error_code": "", "result": {}}
    captured = signed_report("a-1", FINISHED, final)
    before = _node_state()
    fleet_tasks.record_heartbeat(envelope=captured)
    assert _node_state() == before
    assert _counted("wrong_type") == 1


# Scenario 3: an old healthy heartbeat replayed within the timestamp window is refused
def test_old_heartbeat_replayed_is_refused_by_sequence(fleet: Fleet) -> None:
    healthy = signed_report("a-1", HB, {**UNHEALTHY, "error_rate": 0.0, "service_healthy": True})
    fleet_tasks.record_heartbeat(envelope=healthy)
    fleet_tasks.record_heartbeat(envelope=signed_report("a-1", HB, UNHEALTHY))
    before = _node_state()
    assert before["service_healthy"] is False
    fleet_tasks.record_heartbeat(envelope=healthy)  # replayed 1 s later
    assert _node_state() == before
    assert _counted("replayed") == 1


def test_sequence_numbers_must_increase(fleet: Fleet) -> None:
    fleet_tasks.record_heartbeat(envelope=signed_report("a-1", HB, UNHEALTHY, seq=50))
    before = _node_state()
    for seq in (50, 49, 1):
        fleet_tasks.record_heartbeat(envelope=signed_report("a-1", HB, {}, seq=seq))
    assert _node_state() == before
    fleet_tasks.record_heartbeat(envelope=signed_report("a-1", HB, UNHEALTHY, seq=51))
    assert _node_state()["report_sequence"] == 51


# Scenario 10: a flood of forged reports leaves a bounded audit log and counts every one
def test_forged_report_flood_writes_a_bounded_number_of_events(fleet: Fleet) -> None:
    events = Event.objects.count()
    forged_key = b"f" * 32
    for n in range(500):
        forged = signed_report("a-1", HB, {"installed_version": "6.6.6"}, key=forged_key)
        fleet_tasks.record_heartbeat(envelope=forged)
        ghost = signed_report(f"ghost-{n}", PROGRESS, {"job_id": "1", "step": "X"}, key=forged_key)
        fleet_tasks.job_progress(envelope=ghost)
    assert Node.objects.get(node_id="a-1").installed_version != "6.6.6"
    # One Event for a-1 and one for every unknown id together, per interval.
    assert Event.objects.count() - events == 2
    assert _counted("bad_signature") == 500
    assert _counted("unknown_node", ReportRejection.UNKNOWN_SOURCE) == 500
    assert ReportRejection.objects.count() == 4  # (a-1, unknown) x (reason, all)


def test_revoked_node_reports_are_refused(fleet: Fleet) -> None:
    envelope = signed_report("a-1", HB, UNHEALTHY)
    Node.objects.filter(node_id="a-1").update(agent_key_revoked=True)
    before = _node_state()
    fleet_tasks.record_heartbeat(envelope=envelope)
    assert _node_state() == before
    assert _counted("key_revoked") == 1


HOSTILE_HEARTBEATS: list[dict[str, Any]] = [
    {"disk_free_bytes": 10**400},
    {"disk_free_bytes": 2**63},
    {"memory_available_bytes": -1},
    {"load_1m": float("nan")},
    {"error_rate": float("inf")},
    {"p99_latency_ms": float("-inf")},
    {"restore_points": [{"id": "p-2", "size": 10**400}]},
    {"restore_points": [{"id": "p-2", "file_count": -5}]},
    {"restore_points": [{"id": "x" * 10_000}]},
    {"installed_version": "v" * 10_000},
    {"installed_version": "1.0\x00"},
    {"service_healthy": "yes"},
    {"last_job": {"job_id": "1", "ok": True, "result": {"n": float("nan")}}},
    {"active_job_id": 10**400},
]


# Scenario 11: hostile heartbeat values are refused whole; the task does not raise
@pytest.mark.parametrize("hostile", HOSTILE_HEARTBEATS)
def test_hostile_heartbeat_is_refused_and_writes_nothing(
    unhealthy_a1: Node, hostile: dict[str, Any], admin_client: Client
) -> None:
    before = _node_state()
    fleet_tasks.record_heartbeat(envelope=signed_report("a-1", HB, {**UNHEALTHY, **hostile}))
    assert _node_state() == before
    assert _counted("invalid") == 1
    assert admin_client.get("/nodes/a-1/").status_code == 200


HOSTILE_PROGRESS: list[dict[str, Any]] = [
    {"percent": 1000},
    {"percent": -1},
    {"percent": float("nan")},
    {"percent": True},
    {"bytes_done": 10, "bytes_total": 5},
    {"bytes_done": 10**400, "bytes_total": 10**401},
    {"bytes_done": 5},
    {"job_id": "1; drop table"},
]


# Scenario 11: hostile job progress is refused; the job does not move
@pytest.mark.parametrize("hostile", HOSTILE_PROGRESS)
def test_hostile_job_progress_is_refused_and_writes_nothing(
    fleet: Fleet, hostile: dict[str, Any]
) -> None:
    job = UpdateJob.objects.create(node=fleet.node_a, release=make_release(version="1.7.0"))
    before = _job_state(job)
    report = {"job_id": str(job.pk), "step": "DOWNLOADING", "percent": 50, **hostile}
    fleet_tasks.job_progress(envelope=signed_report("a-1", PROGRESS, report))
    assert _job_state(job) == before
    assert _counted("invalid") == 1


@pytest.mark.parametrize("bad", [{"step": "S" * 10_000}, {"job_id": 10**400}])
def test_overlong_step_and_huge_job_id_are_refused(fleet: Fleet, bad: dict[str, Any]) -> None:
    job = UpdateJob.objects.create(node=fleet.node_a, release=make_release(version="1.7.0"))
    before = _job_state(job)
    report = {"job_id": str(job.pk), "step": "DOWNLOADING", "percent": 50, **bad}
    fleet_tasks.job_progress(envelope=signed_report("a-1", PROGRESS, report))
    assert _job_state(job) == before
    assert _counted("invalid") == 1


HOSTILE_FINALS: list[dict[str, Any]] = [
    {"result": {"version_to": "1.7.0", "size": 10**400}},
    {"result": {"version_to": "1.7.0", "rate": float("nan")}},
    {"result": {"version_to": "v" * 1000}},
    {"result": "done"},
    {"ok": "true"},
    {"error_message": "e" * 1_000_000},
]


# Scenario 11: a hostile final report is refused; the job stays as it was
@pytest.mark.parametrize("hostile", HOSTILE_FINALS)
def test_hostile_final_report_is_refused_and_writes_nothing(
    fleet: Fleet, hostile: dict[str, Any]
) -> None:
    job = UpdateJob.objects.create(
        node=fleet.node_a, release=make_release(version="1.7.0"), state=UpdateJob.State.VERIFYING
    )
    before, node_before = _job_state(job), _node_state()
    final = {"job_id": str(job.pk), "ok": True, "error_code": "", **hostile}
    fleet_tasks.job_finished(envelope=signed_report("a-1", FINISHED, final))
    assert _job_state(job) == before and _node_state() == node_before
    assert _counted("invalid") == 1


def test_a_valid_final_report_still_closes_the_job(fleet: Fleet) -> None:
    job = UpdateJob.objects.create(
        node=fleet.node_a, release=make_release(version="1.7.0"), state=UpdateJob.State.VERIFYING
    )
    final = {"job_id": str(job.pk), "ok": True, "result": {"version_to": "1.7.0"}}
    fleet_tasks.job_finished(envelope=signed_report("a-1", FINISHED, final))
    job.refresh_from_db()
    assert job.state == UpdateJob.State.DONE
    assert Node.objects.get(node_id="a-1").installed_version == "1.7.0"
