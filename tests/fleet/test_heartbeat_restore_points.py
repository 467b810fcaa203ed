"""The restore points' disk use in heartbeats and on the node page: stored when
reported, checked like every field (a hostile heartbeat is refused whole, never a 500)."""

from __future__ import annotations

from typing import Any

import pytest
from django.test import Client
from django.urls import reverse

from tests.conftest import Fleet
from tests.security.signing import signed_report
from updates.engine.reports import ReportType
from updates.fleet import tasks as fleet_tasks
from updates.fleet.services import Heartbeat, node_record_heartbeat
from updates.fleet.validation import ReportFieldInvalid
from updates.models import Node, ReportRejection

pytestmark = pytest.mark.django_db

POINTS = [{"id": "20261203T050000000000Z-abcdef12", "version": "1.0", "size": 4096}]


def test_a_heartbeat_stores_the_restore_points_disk_use(fleet: Fleet) -> None:
    beat = {"installed_version": "2.0", "restore_points": POINTS, "restore_points_bytes": 6230016}
    fleet_tasks.record_heartbeat(envelope=signed_report("a-1", ReportType.HEARTBEAT, beat))
    node = Node.objects.get(node_id="a-1")
    assert node.restore_points_bytes == 6230016
    assert node.restore_points[0]["id"] == POINTS[0]["id"]


def test_a_heartbeat_without_it_records_it_as_unknown(fleet: Fleet) -> None:
    Node.objects.filter(node_id="a-1").update(restore_points_bytes=5)
    node = node_record_heartbeat(heartbeat=Heartbeat.from_payload({"node_id": "a-1"}))
    assert node is not None
    node.refresh_from_db()
    assert node.restore_points_bytes is None  # an older agent: not reported, not guessed


@pytest.mark.parametrize("value", [-1, "lots", 10**400, 2**63, True, 1.5, float("nan"), [1]])
def test_a_bad_value_refuses_the_heartbeat(value: Any) -> None:
    with pytest.raises(ReportFieldInvalid, match="restore_points_bytes"):
        Heartbeat.from_payload({"node_id": "x", "restore_points_bytes": value})


def test_a_hostile_value_is_refused_whole_and_counted(fleet: Fleet) -> None:
    Node.objects.filter(node_id="a-1").update(restore_points_bytes=7)
    hostile = {"installed_version": "6.6.6", "restore_points_bytes": -(2**70)}
    fleet_tasks.record_heartbeat(envelope=signed_report("a-1", ReportType.HEARTBEAT, hostile))
    node = Node.objects.get(node_id="a-1")
    assert node.installed_version != "6.6.6" and node.restore_points_bytes == 7
    rejected = ReportRejection.objects.get(source="a-1", reason="invalid")
    assert "restore_points_bytes" in rejected.last_detail


def test_the_node_page_shows_it_by_the_restore_points(
    fleet: Fleet, personas: dict[str, Client]
) -> None:
    Node.objects.filter(node_id="a-1").update(restore_points=POINTS, restore_points_bytes=6230016)
    body = personas["admin_a"].get(reverse("node_detail", args=["a-1"])).content.decode()
    section = body[body.index("<h2>Restore points</h2>") : body.index('id="restore-points"')]
    assert '<p id="restore-points-bytes">5.9\xa0MB on disk for all of them together</p>' in section


def test_the_node_page_says_when_it_was_not_reported(
    fleet: Fleet, personas: dict[str, Client]
) -> None:
    body = personas["operator"].get(reverse("node_detail", args=["a-1"])).content.decode()
    assert '<p id="restore-points-bytes">Disk use not reported</p>' in body
