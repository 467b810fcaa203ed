"""Heartbeats and liveness, at the service level."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from django.db.models import QuerySet
from django.utils import timezone
from pytest_django import Settings

from tests.conftest import Fleet
from updates.engine.reports import sign_report
from updates.fleet import tasks as fleet_tasks
from updates.fleet.node_keys import node_key
from updates.fleet.services import Heartbeat, node_record_heartbeat, nodes_mark_offline
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
    report = {"node_id": "ghost-9", "installed_version": "9.9"}
    fleet_tasks.record_heartbeat(envelope=sign_report(node_key("ghost-9"), report))
    assert Node.objects.count() == count
    assert not Node.objects.filter(node_id="ghost-9").exists()
    event = Event.objects.get(verb="heartbeat.rejected")
    assert event.details["node_id"] == "ghost-9"
    assert event.actor_label == "node:ghost-9"


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("raft_role", "emperor"),
        ("disk_free_bytes", -1),
        ("disk_free_bytes", "lots"),
        ("load_1m", float("nan")),
        ("memory_available_bytes", True),
    ],
)
def test_untrusted_fields_are_sanitised(field: str, value: object) -> None:
    hb = Heartbeat.from_payload({"node_id": "x", field: value})
    assert getattr(hb, field) in ("", None)


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
    fleet_tasks.record_heartbeat({"node_id": "a-1", "installed_version": "6.6.6"})
    assert Node.objects.get(node_id="a-1").installed_version == before
    event = Event.objects.get(verb="report.rejected")
    assert event.details == {"node_id": "a-1", "task": "heartbeat", "reason": "unsigned report"}


def test_a_node_cannot_speak_for_another(fleet: Fleet) -> None:
    """b-1's key signs a heartbeat that claims to be a-1: refused."""
    forged = sign_report(node_key("b-1"), {"node_id": "a-1", "installed_version": "6.6.6"})
    fleet_tasks.record_heartbeat(envelope=forged)
    assert Node.objects.get(node_id="a-1").installed_version != "6.6.6"
    assert "signature" in Event.objects.get(verb="report.rejected").details["reason"]


def test_signed_job_report_is_accepted(fleet: Fleet) -> None:
    from tests.factories import make_release
    from updates.models import UpdateJob

    job = UpdateJob.objects.create(node=fleet.node_a, release=make_release(version="1.1.0"))
    report = {"job_id": job.pk, "node_id": "a-1", "step": "PREFLIGHT", "percent": 2}
    fleet_tasks.job_progress(envelope=sign_report(node_key("a-1"), report))
    job.refresh_from_db()
    assert job.state == "PREFLIGHT"
    fleet_tasks.job_finished(job_id=job.pk, node_id="a-1", ok=True)  # unsigned: refused
    job.refresh_from_db()
    assert job.state == "PREFLIGHT"


def test_unsigned_reports_accepted_only_when_allowed(fleet: Fleet, settings: Settings) -> None:
    settings.THEMIS_REQUIRE_SIGNED_REPORTS = False
    fleet_tasks.record_heartbeat({"node_id": "a-1", "installed_version": "1.2.3"})
    assert Node.objects.get(node_id="a-1").installed_version == "1.2.3"
