"""A node's components in heartbeats: stored per product when reported, the primary one
also as `installed_version`; a malformed list is ignored and counted, the rest of the
heartbeat is taken, nothing a node sends can raise."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from django.utils import timezone

from tests.conftest import Fleet
from tests.security.signing import signed_report
from updates.engine.reports import ReportType
from updates.fleet import tasks as fleet_tasks
from updates.fleet.services import Heartbeat
from updates.fleet.validation import MAX_COMPONENTS
from updates.models import Node, NodeComponent, ReportRejection

pytestmark = pytest.mark.django_db

COMPONENTS = [
    {"product": "themisdb", "version": "1.4.0"},
    {"product": "themis-storage", "version": "1.3.0"},
    {"product": "themis-query", "version": "1.4.5"},
]


def _send(report: dict[str, Any]) -> None:
    fleet_tasks.record_heartbeat(envelope=signed_report("a-1", ReportType.HEARTBEAT, report))


def _components(node_id: str = "a-1") -> dict[str, str]:
    return dict(
        NodeComponent.objects.filter(node__node_id=node_id).values_list("product", "version")
    )


def test_a_heartbeat_stores_each_component_and_the_primary_version(fleet: Fleet) -> None:
    _send({"installed_version": "1.4.0", "components": COMPONENTS})
    assert _components() == {
        "themisdb": "1.4.0",
        "themis-storage": "1.3.0",
        "themis-query": "1.4.5",
    }
    assert Node.objects.get(node_id="a-1").installed_version == "1.4.0"


def test_a_component_no_longer_listed_is_removed_and_versions_move(fleet: Fleet) -> None:
    _send({"installed_version": "1.4.0", "components": COMPONENTS})
    _send(
        {
            "installed_version": "1.5.0",
            "components": [
                {"product": "themisdb", "version": "1.5.0"},
                {"product": "themis-storage", "version": "1.4.2"},
            ],
        }
    )
    assert _components() == {"themisdb": "1.5.0", "themis-storage": "1.4.2"}


def test_the_primary_component_is_added_from_installed_version(fleet: Fleet) -> None:
    _send(
        {"installed_version": "1.4.0", "components": [{"product": "themis-query", "version": "2"}]}
    )
    assert _components() == {"themisdb": "1.4.0", "themis-query": "2"}


def test_a_heartbeat_without_components_keeps_what_the_node_had(fleet: Fleet) -> None:
    _send({"installed_version": "1.4.0", "components": COMPONENTS})
    _send({"installed_version": "1.4.0"})
    assert len(_components()) == 3


@pytest.mark.parametrize(
    "components",
    [
        "themisdb 1.4.0",
        {"themisdb": "1.4.0"},
        [["themisdb", "1.4.0"]],
        [{"product": "ThemisDB", "version": "1.4.0"}],
        [{"product": "../etc", "version": "1.4.0"}],
        [{"product": "themis-storage", "version": "not a version"}],
        [{"product": "themis-storage", "version": 14}],
        [{"product": "themis-storage"}],
        [{"product": "themis-storage", "version": None}],
        [{"product": "a", "version": ""}, {"product": "a", "version": "2.0"}],
        [{"product": "x" * 65, "version": "1.0"}],
        [{"product": "themis-storage", "version": "1" * 65}],
        [{"product": "themis-storage", "version": "1.0\x00"}],
        [{"product": "a", "version": "1.0"}, {"product": "a", "version": "2.0"}],
        [{"product": f"p{i}", "version": "1.0"} for i in range(MAX_COMPONENTS + 1)],
    ],
)
def test_a_malformed_components_field_is_ignored_and_counted(fleet: Fleet, components: Any) -> None:
    _send({"installed_version": "1.4.0", "components": COMPONENTS})
    _send({"installed_version": "1.5.0", "load_1m": 0.25, "components": components})
    node = Node.objects.get(node_id="a-1")
    # The rest of the heartbeat counts; the node keeps the components it had.
    assert (node.installed_version, node.load_1m) == ("1.5.0", 0.25)
    assert _components()["themis-storage"] == "1.3.0"
    refused = ReportRejection.objects.get(source="a-1", reason=ReportRejection.Reason.INVALID)
    assert refused.count == 1
    assert refused.last_detail.startswith("heartbeat components ignored: components")


def test_a_component_never_installed_is_not_stored(fleet: Fleet) -> None:
    # The agent lists every component it is set up for; "" is one it never installed.
    listed = [*COMPONENTS[:2], {"product": "themis-geo", "version": ""}]
    _send({"installed_version": "1.4.0", "components": listed})
    assert _components() == {"themisdb": "1.4.0", "themis-storage": "1.3.0"}
    assert not ReportRejection.objects.exists()


def test_sixty_four_components_are_taken(fleet: Fleet) -> None:
    listed = [{"product": f"plugin-{i}", "version": "1.0"} for i in range(MAX_COMPONENTS)]
    _send({"installed_version": "1.4.0", "components": listed})
    # The primary one is added on top of what the agent listed.
    assert len(_components()) == MAX_COMPONENTS + 1
    assert not ReportRejection.objects.exists()


def test_parsing_never_raises_on_components() -> None:
    heartbeat = Heartbeat.from_payload({"node_id": "x", "components": [None, 1.5]})
    assert heartbeat.components is None
    assert heartbeat.components_refused == "components: each entry must be an object"


def test_updated_at_says_when_the_version_last_changed(fleet: Fleet) -> None:
    _send({"installed_version": "1.4.0", "components": COMPONENTS})
    NodeComponent.objects.update(updated_at=timezone.now() - timedelta(days=1))
    before = dict(NodeComponent.objects.values_list("product", "updated_at"))
    moved = [dict(c) for c in COMPONENTS]
    moved[1]["version"] = "1.4.2"
    _send({"installed_version": "1.4.0", "components": moved})
    after = dict(NodeComponent.objects.values_list("product", "updated_at"))
    assert after["themisdb"] == before["themisdb"]
    assert after["themis-query"] == before["themis-query"]
    assert after["themis-storage"] > before["themis-storage"]
