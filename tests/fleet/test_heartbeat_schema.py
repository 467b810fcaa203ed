"""The node database's schema in heartbeats and on the node page: stored when reported,
kept when not, every field checked (a hostile heartbeat is refused whole, never a 500)."""

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
from updates.fleet.validation import MAX_SCHEMA_HISTORY, ReportFieldInvalid
from updates.models import Node, ReportRejection

pytestmark = pytest.mark.django_db

HISTORY = [
    {
        "version": "0001",
        "phase": "expand",
        "outcome": "applied",
        "started": "2026-12-03T05:00:00Z",
        "duration_ms": 12.5,
    },
    {
        "version": "0002",
        "phase": "contract",
        "outcome": "applied",
        "started": "2026-12-03T05:10:00Z",
        "duration_ms": 3,
    },
]


def _beat(**schema: Any) -> dict[str, Any]:
    return {"installed_version": "1.1.0", "schema": schema}


def test_a_heartbeat_stores_the_schema_version_and_history(fleet: Fleet) -> None:
    envelope = signed_report("a-1", ReportType.HEARTBEAT, _beat(version="0002", history=HISTORY))
    fleet_tasks.record_heartbeat(envelope=envelope)
    node = Node.objects.get(node_id="a-1")
    assert node.schema_version == "0002"
    assert [h["version"] for h in node.schema_history] == ["0001", "0002"]
    assert node.schema_history[0] == HISTORY[0]
    assert node.schema_history[1]["duration_ms"] == 3.0


def test_a_heartbeat_without_schema_keeps_what_the_node_had(fleet: Fleet) -> None:
    Node.objects.filter(node_id="a-1").update(schema_version="0001", schema_history=HISTORY[:1])
    node = node_record_heartbeat(heartbeat=Heartbeat.from_payload({"node_id": "a-1"}))
    assert node is not None
    node.refresh_from_db()
    assert (node.schema_version, len(node.schema_history)) == ("0001", 1)


def test_unknown_history_fields_are_dropped_and_missing_ones_empty() -> None:
    beat = Heartbeat.from_payload(
        {
            "node_id": "x",
            "schema": {
                "version": None,
                "history": [{"version": "0003", "checksum": "ff" * 32, "sql": "DROP TABLE"}],
            },
        }
    )
    assert beat.schema is not None
    assert beat.schema.version == ""
    assert beat.schema.history == (
        {"version": "0003", "phase": "", "outcome": "", "started": "", "duration_ms": None},
    )


@pytest.mark.parametrize(
    ("schema", "field"),
    [
        ("0002", "schema"),
        ({"version": 2}, "schema.version"),
        ({"version": "9" * 65}, "schema.version"),
        ({"history": {"version": "0001"}}, "schema.history"),
        ({"history": [{"version": "1"}] * (MAX_SCHEMA_HISTORY + 1)}, "schema.history"),
        ({"history": ["0001"]}, "schema.history"),
        ({"history": [{"phase": "expand"}]}, "schema.history.version"),
        ({"history": [{"version": ""}]}, "schema.history.version"),
        ({"history": [{"version": "1", "phase": "explode"}]}, "schema.history.phase"),
        ({"history": [{"version": "1", "outcome": "x" * 33}]}, "schema.history.outcome"),
        ({"history": [{"version": "1", "started": 1e300}]}, "schema.history.started"),
        ({"history": [{"version": "1", "duration_ms": float("nan")}]}, "duration_ms"),
        ({"history": [{"version": "1", "duration_ms": -1}]}, "duration_ms"),
        ({"history": [{"version": "1", "duration_ms": "fast"}]}, "duration_ms"),
        ({"history": [{"version": "1\x00"}]}, "schema.history.version"),
    ],
)
def test_a_bad_schema_refuses_the_heartbeat(schema: Any, field: str) -> None:
    with pytest.raises(ReportFieldInvalid, match=field):
        Heartbeat.from_payload({"node_id": "x", "schema": schema})


def test_a_hostile_schema_is_refused_whole_and_counted(fleet: Fleet) -> None:
    before = Node.objects.get(node_id="a-1")
    hostile = {"installed_version": "6.6.6", "schema": {"history": [{"version": ["x"]}]}}
    fleet_tasks.record_heartbeat(envelope=signed_report("a-1", ReportType.HEARTBEAT, hostile))
    node = Node.objects.get(node_id="a-1")
    assert (node.installed_version, node.schema_version) == (before.installed_version, "")
    rejected = ReportRejection.objects.get(source="a-1", reason="invalid")
    assert rejected.count == 1 and "schema.history.version" in rejected.last_detail


def test_the_node_page_shows_schema_version_and_history(
    fleet: Fleet, personas: dict[str, Client]
) -> None:
    Node.objects.filter(node_id="a-1").update(schema_version="0002", schema_history=HISTORY)
    response = personas["admin_a"].get(reverse("node_detail", args=["a-1"]))
    assert response.status_code == 200
    body = response.content.decode()
    assert '<dd id="schema-version">0002</dd>' in body
    table = body[body.index('id="schema-history"') :]
    table = table[: table.index("</table>")]
    assert table.index("0002") < table.index("0001")  # newest first
    for text in ("contract", "expand", "applied", "2026-12-03T05:10:00Z", "13 ms", "3 ms"):
        assert text in table


def test_the_node_page_says_when_no_migration_was_reported(
    fleet: Fleet, personas: dict[str, Client]
) -> None:
    body = personas["operator"].get(reverse("node_detail", args=["a-1"])).content.decode()
    assert '<dd id="schema-version">—</dd>' in body
    assert "The node reports no schema migrations." in body


@pytest.mark.parametrize(
    "stored",
    [
        "not a list",
        [None, 3, "x", {"phase": "expand"}],
        [{"version": "<script>alert(1)</script>", "duration_ms": "slow", "outcome": 7}],
    ],
)
def test_odd_stored_history_never_breaks_the_page(
    fleet: Fleet, personas: dict[str, Client], stored: Any
) -> None:
    Node.objects.filter(node_id="a-1").update(schema_history=stored)
    response = personas["operator"].get(reverse("node_detail", args=["a-1"]))
    assert response.status_code == 200
    assert b"<script>alert(1)" not in response.content
