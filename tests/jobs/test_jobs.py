"""Update and rollback jobs: the state machine, at the service level, with a
recording transport injected at the NodeTransport seam."""

from __future__ import annotations

from typing import Any

import pytest
from django.test import Client
from django.urls import reverse
from pytest_django import DjangoCaptureOnCommitCallbacks

from tests.conftest import Fleet
from tests.factories import make_release
from updates.jobs import services as jobs
from updates.models import Event, Node, Release, UpdateJob

pytestmark = pytest.mark.django_db


class RecordingTransport:
    def __init__(self) -> None:
        # (kind, node id, job id, update options or restore point id)
        self.sent: list[tuple[str, str, str, Any]] = []

    def update_node(self, node_id: str, job_id: str, **options: Any) -> None:
        self.sent.append(("update", node_id, job_id, options))

    def rollback_node(self, node_id: str, job_id: str, point_id: str | None = None) -> None:
        self.sent.append(("rollback", node_id, job_id, point_id))

    def health_check(self, node_id: str) -> dict[str, Any]:
        return {}


@pytest.fixture
def release(db: None) -> Release:
    return make_release(version="1.7.0", sha256="ab" * 32, artifact="releases/x.tar")


@pytest.fixture
def transport() -> RecordingTransport:
    return RecordingTransport()


def test_start_update_enqueues_only_after_commit(
    fleet: Fleet,
    release: Release,
    transport: RecordingTransport,
    django_capture_on_commit_callbacks: DjangoCaptureOnCommitCallbacks,
) -> None:
    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        job = jobs.job_start_update(
            node=fleet.node_a, release=release, user=None, transport=transport
        )
        assert transport.sent == []  # nothing leaves before the row is committed
    for callback in callbacks:
        callback()
    kind, node_id, job_id, options = transport.sent[0]
    assert (kind, node_id, job_id) == ("update", "a-1", str(job.pk))
    assert options["sha256"] == release.sha256
    assert options["artifact_url"].endswith(f"/artifacts/jobs/{job.pk}/bundle")
    assert options["download_token"] and options["size"] == release.size
    assert Event.objects.filter(verb="job.update.queued", object_id=str(job.pk)).exists()


def test_second_active_job_on_a_node_is_refused(
    fleet: Fleet, release: Release, transport: RecordingTransport
) -> None:
    jobs.job_start_update(node=fleet.node_a, release=release, user=None, transport=transport)
    with pytest.raises(jobs.JobConflict, match="already has an update in progress"):
        jobs.job_start_update(node=fleet.node_a, release=release, user=None, transport=transport)
    assert UpdateJob.objects.filter(node=fleet.node_a).count() == 1


def test_deprecated_release_cannot_start_updates(
    fleet: Fleet, release: Release, transport: RecordingTransport
) -> None:
    Release.objects.filter(pk=release.pk).update(state=Release.State.DEPRECATED)
    release.refresh_from_db()
    with pytest.raises(jobs.JobConflict, match="deprecated"):
        jobs.job_start_update(node=fleet.node_a, release=release, user=None, transport=transport)
    assert not UpdateJob.objects.exists()


def _job(fleet: Fleet, release: Release, transport: RecordingTransport) -> UpdateJob:
    return jobs.job_start_update(node=fleet.node_a, release=release, user=None, transport=transport)


def test_progress_moves_forward_only_and_logs_each_transition(
    fleet: Fleet, release: Release, transport: RecordingTransport
) -> None:
    job = _job(fleet, release, transport)
    for step in ("PREFLIGHT", "LOCKED", "STAGED", "RESTORE_POINT", "SWITCHED", "VERIFYING"):
        jobs.job_record_progress(job_id=job.pk, node_id="a-1", step=step, percent=50)
    job.refresh_from_db()
    assert job.state == UpdateJob.State.HEALTH_CHECK
    # a late, out-of-order report cannot move it back
    assert not jobs.job_record_progress(job_id=job.pk, node_id="a-1", step="PREFLIGHT")
    job.refresh_from_db()
    assert job.state == UpdateJob.State.HEALTH_CHECK
    verbs = list(
        Event.objects.filter(object_type="updatejob", object_id=str(job.pk))
        .order_by("id")
        .values_list("verb", flat=True)
    )
    assert verbs == [
        "job.update.queued",
        "job.preflight",
        "job.verifying",
        "job.applying",
        "job.health_check",
    ]
    fleet.node_a.refresh_from_db()
    assert fleet.node_a.status == Node.Status.UPDATING


def test_report_from_another_node_is_ignored(
    fleet: Fleet, release: Release, transport: RecordingTransport
) -> None:
    job = _job(fleet, release, transport)
    assert not jobs.job_record_progress(job_id=job.pk, node_id="b-1", step="PREFLIGHT")
    assert jobs.job_finish(job_id=job.pk, node_id="b-1", ok=True) is None
    job.refresh_from_db()
    assert job.state == UpdateJob.State.QUEUED


def test_finish_done_records_version_and_stays_final(
    fleet: Fleet, release: Release, transport: RecordingTransport
) -> None:
    job = _job(fleet, release, transport)
    jobs.job_finish(
        job_id=job.pk,
        node_id="a-1",
        ok=True,
        result={"version_from": "1.0.0", "version_to": "1.7.0"},
    )
    job.refresh_from_db()
    fleet.node_a.refresh_from_db()
    assert job.state == UpdateJob.State.DONE and job.finished_at is not None
    assert fleet.node_a.installed_version == "1.7.0"
    assert fleet.node_a.status == Node.Status.ONLINE
    # a duplicate or late final report changes nothing
    assert jobs.job_finish(job_id=job.pk, node_id="a-1", ok=False, error_code="X") is None
    job.refresh_from_db()
    assert job.state == UpdateJob.State.DONE


@pytest.mark.parametrize(
    ("code", "state", "node_status"),
    [
        ("HEALTH_CHECK_FAILED_ROLLED_BACK", "ROLLED_BACK", "online"),
        ("APPLY_FAILED_ROLLED_BACK", "ROLLED_BACK", "online"),
        ("SIGNATURE_INVALID", "FAILED", "failed"),
    ],
)
def test_failure_codes_map_to_final_states(
    fleet: Fleet,
    release: Release,
    transport: RecordingTransport,
    code: str,
    state: str,
    node_status: str,
) -> None:
    job = _job(fleet, release, transport)
    jobs.job_finish(job_id=job.pk, node_id="a-1", ok=False, error_code=code, error_message="why")
    job.refresh_from_db()
    fleet.node_a.refresh_from_db()
    assert (job.state, job.error_code, job.error_message) == (state, code, "why")
    assert fleet.node_a.installed_version == "1.0.0"
    assert fleet.node_a.status == node_status
    assert Event.objects.filter(verb=f"job.{state.lower()}").count() == 1


def test_cancel_only_before_the_agent_starts(
    fleet: Fleet, release: Release, transport: RecordingTransport
) -> None:
    job = _job(fleet, release, transport)
    assert jobs.job_cancel(job=job, user=None)
    job2 = _job(fleet, release, transport)  # the node is free again
    jobs.job_record_progress(job_id=job2.pk, node_id="a-1", step="PREFLIGHT")
    assert not jobs.job_cancel(job=job2, user=None)


def test_rollback_needs_a_reported_point(fleet: Fleet, transport: RecordingTransport) -> None:
    with pytest.raises(jobs.JobConflict, match="no restore point"):
        jobs.job_start_rollback(node=fleet.node_a, point_id="nope", user=None, transport=transport)
    Node.objects.filter(pk=fleet.node_a.pk).update(restore_points=[{"id": "p1", "version": "1.0"}])
    fleet.node_a.refresh_from_db()
    job = jobs.job_start_rollback(node=fleet.node_a, point_id="p1", user=None, transport=transport)
    assert job.kind == UpdateJob.Kind.ROLLBACK and job.restore_point == "p1"


# ---------------------------------------------------------------- views, personas


@pytest.fixture
def no_agents(monkeypatch: pytest.MonkeyPatch, transport: RecordingTransport) -> RecordingTransport:
    monkeypatch.setattr(jobs, "default_transport", lambda: transport)
    return transport


@pytest.mark.parametrize(
    ("persona", "status"),
    [("operator", 302), ("responder", 403), ("admin_a", 403), ("admin_b", 403), ("anonymous", 302)],
)
def test_only_operators_start_updates(
    personas: dict[str, Client],
    fleet: Fleet,
    release: Release,
    no_agents: RecordingTransport,
    persona: str,
    status: int,
) -> None:
    response = personas[persona].post(reverse("node_update", args=["a-1"]), {"release": release.pk})
    assert response.status_code == status
    assert UpdateJob.objects.exists() is (persona == "operator")


def test_operator_update_from_node_page(
    personas: dict[str, Client], fleet: Fleet, release: Release, no_agents: RecordingTransport
) -> None:
    client = personas["operator"]
    page = client.get(reverse("node_detail", args=["a-1"])).content.decode()
    assert "Start update" in page and "1.7.0" in page
    with_callbacks = client.post(reverse("node_update", args=["a-1"]), {"release": release.pk})
    assert with_callbacks.status_code == 302
    job = UpdateJob.objects.get()
    assert job.created_by is not None
    assert job.created_by.username == "olivia"
    again = client.post(reverse("node_update", args=["a-1"]), {"release": release.pk}, follow=True)
    assert "already has an update in progress" in again.content.decode()
    assert UpdateJob.objects.count() == 1


def test_rollback_asks_for_confirmation_then_queues(
    personas: dict[str, Client], fleet: Fleet, no_agents: RecordingTransport
) -> None:
    Node.objects.filter(pk=fleet.node_a.pk).update(
        restore_points=[{"id": "20261130-p1", "version": "1.6.0", "file_count": 2, "size": 10}]
    )
    client = personas["operator"]
    url = reverse("node_rollback", args=["a-1"])
    confirm = client.get(url, {"point": "20261130-p1"})
    assert confirm.status_code == 200 and b"Roll back to 1.6.0 now" in confirm.content
    assert not UpdateJob.objects.exists()  # GET changes nothing
    assert client.post(url, {"point": "20261130-p1"}).status_code == 302
    job = UpdateJob.objects.get()
    assert (job.kind, job.restore_point) == ("rollback", "20261130-p1")
    assert job.restore_version == "1.6.0"
    assert client.get(url, {"point": "unknown"}).status_code == 404
    # The jobs table names the version the node goes back to, the point beside it.
    page = client.get(reverse("node_detail", args=["a-1"])).content.decode()
    row = page[page.index(f'data-job="{job.pk}"') :]
    assert "1.6.0 <small>(point <code>20261130-p1</code>)</small>" in row[: row.index("</tr>")]


def test_a_point_taken_before_the_first_install_is_never_offered_nor_accepted(
    personas: dict[str, Client], fleet: Fleet, no_agents: RecordingTransport
) -> None:
    Node.objects.filter(pk=fleet.node_a.pk).update(
        restore_points=[
            {"id": "p-empty", "version": "", "file_count": 0, "size": 0},
            {"id": "p-160", "version": "1.6.0", "file_count": 2, "size": 10},
        ]
    )
    client = personas["operator"]
    page = client.get(reverse("node_detail", args=["a-1"])).content.decode()
    assert "point=p-160" in page and "Roll back to 1.6.0…" in page
    assert "point=p-empty" not in page and "(before the first install)" in page
    url = reverse("node_rollback", args=["a-1"])
    confirm = client.get(url, {"point": "p-empty"}).content.decode()
    assert "leave the node without ThemisDB" in confirm and "Roll back to" not in confirm
    refused = client.post(url, {"point": "p-empty"})
    assert refused.status_code == 409
    assert "leave the node without ThemisDB" in refused.content.decode()
    assert not UpdateJob.objects.exists()


@pytest.mark.parametrize(("persona", "status"), [("responder", 403), ("admin_a", 403)])
def test_rollback_forbidden_for_non_operators(
    personas: dict[str, Client],
    fleet: Fleet,
    no_agents: RecordingTransport,
    persona: str,
    status: int,
) -> None:
    Node.objects.filter(pk=fleet.node_a.pk).update(restore_points=[{"id": "p1", "version": "1.6"}])
    url = reverse("node_rollback", args=["a-1"])
    assert personas[persona].post(url, {"point": "p1"}).status_code == status
    assert not UpdateJob.objects.exists()


def test_lost_final_report_is_caught_up_from_the_heartbeat(
    fleet: Fleet, release: Release, transport: RecordingTransport
) -> None:
    from updates.fleet.services import Heartbeat, node_record_heartbeat

    job = _job(fleet, release, transport)
    jobs.job_record_progress(job_id=job.pk, node_id="a-1", step="PREFLIGHT")
    report = {
        "job_id": str(job.pk),
        "ok": True,
        "error_code": "",
        "error_message": "",
        "result": {"version_to": "1.7.0"},
    }
    node_record_heartbeat(
        heartbeat=Heartbeat.from_payload(
            {"node_id": "a-1", "installed_version": "1.7.0", "last_job": report}
        )
    )
    job.refresh_from_db()
    assert job.state == UpdateJob.State.DONE
    # the same report again (every heartbeat carries it) changes nothing
    node_record_heartbeat(
        heartbeat=Heartbeat.from_payload({"node_id": "a-1", "last_job": {**report, "ok": False}})
    )
    job.refresh_from_db()
    assert job.state == UpdateJob.State.DONE
    assert Event.objects.filter(verb="job.done", object_id=str(job.pk)).count() == 1


def test_another_nodes_report_in_a_heartbeat_is_ignored(
    fleet: Fleet, release: Release, transport: RecordingTransport
) -> None:
    from updates.fleet.services import Heartbeat, node_record_heartbeat

    job = _job(fleet, release, transport)
    node_record_heartbeat(
        heartbeat=Heartbeat.from_payload(
            {"node_id": "b-1", "last_job": {"job_id": job.pk, "ok": True, "result": {}}}
        )
    )
    job.refresh_from_db()
    assert job.state == UpdateJob.State.QUEUED
