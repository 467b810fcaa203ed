"""A node's inventory (OS, kernel, architecture, CPUs, memory) as its agent reports it in
heartbeats: bounded and checked, stored by the one-by-one and the batch paths, kept when a
heartbeat leaves it out or sends it malformed, shown on the node page."""

from __future__ import annotations

from typing import Any

import pytest
from django.test import Client
from django.urls import reverse

from tests.conftest import Fleet
from tests.fleet.test_heartbeat_ingest import _beat, _liveness, _online_nodes
from updates.fleet import validation as v
from updates.fleet.ingest import heartbeats_record_batch
from updates.fleet.services import Heartbeat, node_record_heartbeat
from updates.models import Node
from workers.agent import host_inventory

pytestmark = pytest.mark.django_db

HOST = {
    "os": "Debian GNU/Linux 12 (bookworm)",
    "kernel": "6.1.0-18-amd64",
    "arch": "x86_64",
    "cpus": 8,
    "memory_total_bytes": 16 * 2**30,
    "python": "3.11.7",
}


def test_a_known_inventory_is_kept_and_unknown_keys_are_left_out() -> None:
    assert v.inventory({**HOST, "gpu": "none", "rack": 7}) == HOST
    assert v.inventory(None) is None
    assert v.inventory({}) == {}


@pytest.mark.parametrize(
    ("bad", "named"),
    [
        ("a list", "inventory: expected an object"),
        ({"cpus": 0}, "inventory.cpus"),
        ({"cpus": 5000}, "inventory.cpus"),
        ({"cpus": "8"}, "inventory.cpus"),
        ({"os": "x" * 129}, "inventory.os"),
        ({"memory_total_bytes": -1}, "inventory.memory_total_bytes"),
        ({"kernel": 6}, "inventory.kernel"),
    ],
)
def test_a_malformed_inventory_is_refused_naming_the_key(bad: Any, named: str) -> None:
    with pytest.raises(v.ReportFieldInvalid, match=named):
        v.inventory(bad)


def test_a_heartbeat_stores_the_inventory_and_keeps_it_when_left_out_or_malformed(
    fleet: Fleet,
) -> None:
    node_record_heartbeat(heartbeat=Heartbeat.from_payload({"node_id": "a-1", "inventory": HOST}))
    assert Node.objects.get(node_id="a-1").inventory == HOST
    for payload in ({"node_id": "a-1"}, {"node_id": "a-1", "inventory": {"cpus": -3}}):
        beat = Heartbeat.from_payload(payload)
        assert beat.inventory is None  # a malformed one is ignored, the heartbeat taken
        node_record_heartbeat(heartbeat=beat)
        assert Node.objects.get(node_id="a-1").inventory == HOST


def test_the_batch_path_stores_a_changed_inventory(redis_url: str) -> None:
    nodes = _online_nodes(3, prefix="inv")
    first = [_beat(n.node_id, 5, inventory=HOST) for n in nodes]
    assert heartbeats_record_batch(first, liveness=_liveness(redis_url)).stored == 3
    moved = {**HOST, "kernel": "6.1.0-21-amd64"}
    second = [_beat(nodes[0].node_id, 6, inventory=moved), _beat(nodes[1].node_id, 6)]
    assert heartbeats_record_batch(second, liveness=_liveness(redis_url)).stored == 2
    stored = {n.node_id: n.inventory for n in Node.objects.filter(node_id__startswith="inv")}
    assert stored == {"inv-0": moved, "inv-1": HOST, "inv-2": HOST}


def test_the_node_page_shows_the_host(personas: dict[str, Client], fleet: Fleet) -> None:
    Node.objects.filter(node_id="a-1").update(inventory=HOST)
    page = personas["operator"].get(reverse("node_detail", args=["a-1"])).content.decode()
    host = page[page.index('id="inventory"') :]
    host = host[: host.index("</dd>")]
    assert "Debian GNU/Linux 12 (bookworm) · kernel 6.1.0-18-amd64 · x86_64 · 8 CPUs" in host
    assert "17.2\xa0GB memory" in host or "16.0\xa0GB memory" in host
    bare = personas["operator"].get(reverse("node_detail", args=["a-solo"])).content.decode()
    assert "not reported" in bare[bare.index('id="inventory"') :][:200]


def test_the_agent_reports_an_inventory_the_dashboard_accepts() -> None:
    reported = host_inventory()
    assert v.inventory(reported) == reported
    assert int(reported["cpus"]) >= 1 and int(reported["memory_total_bytes"]) > 0
    assert reported["arch"] and reported["kernel"]
