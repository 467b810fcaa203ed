"""Heartbeats and liveness, at the service level."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from django.db.models import QuerySet
from django.utils import timezone

from tests.conftest import Fleet
from tests.security.signing import key_of, signed_report
from updates.engine.reports import ReportType
from updates.fleet import tasks as fleet_tasks
from updates.fleet.services import Heartbeat, node_record_heartbeat, nodes_mark_offline
from updates.fleet.validation import ReportFieldInvalid
from updates.models import Event, Node

pytestmark = pytest.mark.django_db


def test_heartbeat_updates_node_and_logs_online(fleet: Fleet) -> None:
    Node.objects.filter(pk=fleet.node_a.pk).update(status=Node.Status.OFFLINE)
    hb = Heartbeat.from_payload(
        {
            "node_id": "a-1",
            "installed_version": "1.6.0",
            "raft_role": "leader",
            "disk_free_bytes": 10_000,
            "disk_total_bytes": 50_000,
            "memory_available_bytes": 2_000,
            "load_1m": 0.5,
        }
    )
    node = node_record_heartbeat(heartbeat=hb)
    assert node is not None
    node.refresh_from_db()
    assert (node.status, node.installed_version, node.raft_role) == ("online", "1.6.0", "leader")
    assert node.disk_free_bytes == 10_000 and node.load_1m == 0.5
    assert Event.objects.filter(verb="node.online", object_id=str(node.pk)).count() == 1


def test_unknown_node_is_rejected_and_logged(fleet: Fleet) -> None:
    count = Node.objects.count()
    report = {"installed_version": "9.9"}
    envelope = signed_report("ghost-9", ReportType.HEARTBEAT, report, key=b"g" * 32)
    fleet_tasks.record_heartbeat(envelope=envelope)
    assert Node.objects.count() == count
    assert not Node.objects.filter(node_id="ghost-9").exists()
    event = Event.objects.get(verb="report.rejected")
    assert event.details["claimed_node_id"] == "ghost-9"
    assert event.details["reason"] == "unknown_node"
    assert event.actor_label == "node:(unknown node)"


def test_an_unknown_raft_role_reads_as_none() -> None:
    assert Heartbeat.from_payload({"node_id": "x", "raft_role": "emperor"}).raft_role == ""


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("disk_free_bytes", -1),
        ("disk_free_bytes", "lots"),
        ("disk_free_bytes", 10**400),
        ("load_1m", float("nan")),
        ("memory_available_bytes", True),
        ("traffic_role", "emperor"),
    ],
)
def test_untrusted_fields_refuse_the_heartbeat(field: str, value: object) -> None:
    with pytest.raises(ReportFieldInvalid, match=field):
        Heartbeat.from_payload({"node_id": "x", field: value})


def test_silent_nodes_marked_offline_once(fleet: Fleet) -> None:
    now = timezone.now()
    Node.objects.update(last_heartbeat=now)
    Node.objects.filter(pk=fleet.node_b.pk).update(last_heartbeat=now - timedelta(seconds=31))
    assert nodes_mark_offline(silence_seconds=30, now=now) == ["b-1"]
    assert nodes_mark_offline(silence_seconds=30, now=now) == []
    fleet.node_b.refresh_from_db()
    fleet.node_a.refresh_from_db()
    assert fleet.node_b.status == "offline" and fleet.node_a.status == "online"
    assert Event.objects.filter(verb="node.offline").count() == 1


def test_offline_marking_skips_a_node_that_just_reported(
    fleet: Fleet, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The claim is conditional on the heartbeat seen: a fresh one wins the race."""
    now = timezone.now()
    old = now - timedelta(seconds=60)
    Node.objects.update(last_heartbeat=now)
    Node.objects.filter(pk=fleet.node_b.pk).update(last_heartbeat=old)
    original = Node.objects.filter

    def racing_filter(*args: Any, **kwargs: Any) -> QuerySet[Node]:
        if kwargs.get("last_heartbeat") == old:
            Node.objects.filter(pk=fleet.node_b.pk).update(last_heartbeat=now)
        return original(*args, **kwargs)

    monkeypatch.setattr(Node.objects, "filter", racing_filter)
    assert nodes_mark_offline(silence_seconds=30, now=now) == []
    assert not Event.objects.filter(verb="node.offline").exists()


def test_unsigned_report_is_refused_and_logged(fleet: Fleet) -> None:
    before = Node.objects.get(node_id="a-1").installed_version
    fleet_tasks.record_heartbeat(payload={"node_id": "a-1", "installed_version": "6.6.6"})
    assert Node.objects.get(node_id="a-1").installed_version == before
    event = Event.objects.get(verb="report.rejected")
    assert (event.details["reason"], event.details["task"]) == ("unsigned", "heartbeat")


def test_a_node_cannot_speak_for_another(fleet: Fleet) -> None:
    """b-1's key signs a heartbeat that claims to be a-1: refused."""
    forged = signed_report(
        "a-1", ReportType.HEARTBEAT, {"installed_version": "6.6.6"}, key=key_of("b-1")
    )
    fleet_tasks.record_heartbeat(envelope=forged)
    assert Node.objects.get(node_id="a-1").installed_version != "6.6.6"
    assert Event.objects.get(verb="report.rejected").details["reason"] == "bad_signature"


def test_signed_job_report_is_accepted(fleet: Fleet) -> None:
    from tests.factories import make_release
    from updates.models import UpdateJob

    job = UpdateJob.objects.create(node=fleet.node_a, release=make_release(version="1.1.0"))
    report = {"job_id": job.pk, "step": "PREFLIGHT", "percent": 2}
    fleet_tasks.job_progress(envelope=signed_report("a-1", ReportType.JOB_PROGRESS, report))
    job.refresh_from_db()
    assert job.state == "PREFLIGHT"
    fleet_tasks.job_finished(job_id=job.pk, node_id="a-1", ok=True)  # unsigned: refused
    job.refresh_from_db()
    assert job.state == "PREFLIGHT"
