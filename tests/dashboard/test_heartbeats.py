"""Heartbeats and liveness, at the service level."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone

from updates.models import Event, Node
from updates.services import Heartbeat, node_record_heartbeat, nodes_mark_offline
from workers import tasks

pytestmark = pytest.mark.django_db


def test_heartbeat_updates_node_and_logs_online(fleet):
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
    node.refresh_from_db()
    assert (node.status, node.installed_version, node.raft_role) == ("online", "1.6.0", "leader")
    assert node.disk_free_bytes == 10_000 and node.load_1m == 0.5
    assert Event.objects.filter(verb="node.online", object_id=str(node.pk)).count() == 1


def test_unknown_node_is_rejected_and_logged(fleet):
    count = Node.objects.count()
    tasks.record_heartbeat({"node_id": "ghost-9", "installed_version": "9.9"})
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
def test_untrusted_fields_are_sanitised(field, value):
    hb = Heartbeat.from_payload({"node_id": "x", field: value})
    assert getattr(hb, field) in ("", None)


def test_silent_nodes_marked_offline_once(fleet):
    now = timezone.now()
    Node.objects.update(last_heartbeat=now)
    Node.objects.filter(pk=fleet.node_b.pk).update(last_heartbeat=now - timedelta(seconds=31))
    assert nodes_mark_offline(silence_seconds=30, now=now) == ["b-1"]
    assert nodes_mark_offline(silence_seconds=30, now=now) == []
    fleet.node_b.refresh_from_db()
    fleet.node_a.refresh_from_db()
    assert fleet.node_b.status == "offline" and fleet.node_a.status == "online"
    assert Event.objects.filter(verb="node.offline").count() == 1


def test_offline_marking_skips_a_node_that_just_reported(fleet, monkeypatch):
    """The claim is conditional on the heartbeat seen: a fresh one wins the race."""
    now = timezone.now()
    old = now - timedelta(seconds=60)
    Node.objects.update(last_heartbeat=now)
    Node.objects.filter(pk=fleet.node_b.pk).update(last_heartbeat=old)
    original = Node.objects.filter

    def racing_filter(*args, **kwargs):
        if kwargs.get("last_heartbeat") == old:
            Node.objects.filter(pk=fleet.node_b.pk).update(last_heartbeat=now)
        return original(*args, **kwargs)

    monkeypatch.setattr(Node.objects, "filter", racing_filter)
    assert nodes_mark_offline(silence_seconds=30, now=now) == []
    assert not Event.objects.filter(verb="node.offline").exists()
