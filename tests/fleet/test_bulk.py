"""Actions on many nodes from the fleet page: a confirmation that names what each node will
do, then each node through the same service as its own page, one refusal leaving the others
going; only operators; every selected node checked to be visible."""

from __future__ import annotations

from typing import Any

import pytest
from django.test import Client
from django.urls import reverse

from tests.conftest import Fleet
from tests.factories import make_release
from tests.fakes import NullTransport
from updates.fleet import services
from updates.jobs import services as jobs
from updates.models import Event, Node, Release, UpdateJob

pytestmark = pytest.mark.django_db

URL = reverse("fleet_bulk")


@pytest.fixture(autouse=True)
def _no_agents(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(jobs, "default_transport", NullTransport)


@pytest.fixture
def points(fleet: Fleet) -> None:
    """a-1 and b-1 can go back to 1.6.0; a-solo has only a point of what it runs."""
    for node_id in ("a-1", "b-1"):
        Node.objects.filter(node_id=node_id).update(
            installed_version="1.7.0",
            restore_points=[
                {"id": f"{node_id}-p160", "version": "1.6.0", "created": "2026-11-01T00:00:00"},
                {"id": f"{node_id}-p170", "version": "1.7.0", "created": "2026-11-20T00:00:00"},
            ],
        )
    Node.objects.filter(node_id="a-solo").update(
        installed_version="1.7.0",
        restore_points=[{"id": "s-p170", "version": "1.7.0", "created": "2026-11-20T00:00:00"}],
    )


def _rows(body: str, table: str) -> dict[str, str]:
    section = body[body.index(f'id="{table}"') :]
    section = section[: section.index("</table>")]
    rows = {}
    for chunk in section.split('<tr data-node="')[1:]:
        node_id, rest = chunk.split('"', 1)
        rows[node_id] = rest[: rest.index("</tr>")]
    return rows


def _confirm(client: Client, **params: Any) -> Any:
    return client.get(URL, params)


def test_a_rollback_of_three_nodes_lists_each_then_starts_each_that_can(
    personas: dict[str, Client], fleet: Fleet, points: None
) -> None:
    client = personas["operator"]
    confirm = _confirm(client, action="rollback", node=["a-1", "a-solo", "b-1"])
    assert confirm.status_code == 200
    steps = _rows(confirm.content.decode(), "bulk-steps")
    assert "1.7.0 → 1.6.0 (point a-1-p160)" in steps["a-1"]
    assert "1.7.0 → 1.6.0 (point b-1-p160)" in steps["b-1"]
    assert "left out: no earlier version to restore" in steps["a-solo"]
    assert not UpdateJob.objects.exists()  # the confirmation writes nothing

    done = client.post(
        URL,
        {
            "action": "rollback",
            "node": ["a-1", "b-1"],
            "point-a-1": "a-1-p160",
            "point-b-1": "b-1-p160",
        },
    )
    assert done.status_code == 200
    outcomes = _rows(done.content.decode(), "bulk-outcomes")
    assert set(outcomes) == {"a-1", "b-1"} and all("queued" in o for o in outcomes.values())
    started = UpdateJob.objects.order_by("node__node_id")
    assert [(j.node.node_id, j.kind, j.restore_point) for j in started] == [
        ("a-1", "rollback", "a-1-p160"),
        ("b-1", "rollback", "b-1-p160"),
    ]
    assert all(j.created_by is not None and j.created_by.username == "olivia" for j in started)
    event = Event.objects.get(verb="nodes.bulk_rollback")
    assert event.details["started"] == ["a-1", "b-1"] and event.actor_label == "olivia"


def test_a_point_that_changed_since_the_confirmation_leaves_its_node_out(
    personas: dict[str, Client], fleet: Fleet, points: None
) -> None:
    done = personas["operator"].post(
        URL,
        {"action": "rollback", "node": ["a-1", "b-1"], "point-a-1": "a-1-p160", "point-b-1": "x"},
    )
    outcomes = _rows(done.content.decode(), "bulk-outcomes")
    assert "queued" in outcomes["a-1"]
    assert "changed since you confirmed" in outcomes["b-1"]
    assert list(UpdateJob.objects.values_list("node__node_id", flat=True)) == ["a-1"]


def test_a_busy_node_is_refused_and_the_others_start(
    personas: dict[str, Client], fleet: Fleet, points: None
) -> None:
    busy = make_release(version="1.8.0", sha256="ef" * 32)
    UpdateJob.objects.create(node=fleet.node_b, release=busy, state=UpdateJob.State.DOWNLOADING)
    done = personas["operator"].post(
        URL,
        {
            "action": "rollback",
            "node": ["a-1", "b-1"],
            "point-a-1": "a-1-p160",
            "point-b-1": "b-1-p160",
        },
    )
    outcomes = _rows(done.content.decode(), "bulk-outcomes")
    assert "queued" in outcomes["a-1"]
    assert "refused: node b-1 already has an update in progress" in outcomes["b-1"]
    assert UpdateJob.objects.filter(kind="rollback").count() == 1


def test_an_update_of_many_names_the_release_and_skips_nodes_that_run_it(
    personas: dict[str, Client], fleet: Fleet
) -> None:
    release = make_release(version="1.7.0", sha256="ab" * 32, state=Release.State.PUBLISHED)
    Node.objects.filter(node_id="b-1").update(installed_version="1.7.0")
    client = personas["operator"]
    unchosen = _confirm(client, action="update", node=["a-1", "b-1"]).content.decode()
    assert "Choose a release above." in unchosen and 'id="bulk-confirm"' not in unchosen
    confirm = _confirm(client, action="update", node=["a-1", "b-1"], release=release.pk)
    steps = _rows(confirm.content.decode(), "bulk-steps")
    assert "→ 1.7.0" in steps["a-1"] and "left out: runs 1.7.0 already" in steps["b-1"]
    done = client.post(URL, {"action": "update", "node": ["a-1", "b-1"], "release": release.pk})
    outcomes = _rows(done.content.decode(), "bulk-outcomes")
    assert "queued" in outcomes["a-1"] and "left out" in outcomes["b-1"]
    job = UpdateJob.objects.get()
    assert (job.node.node_id, job.kind, job.release_id) == ("a-1", "update", release.pk)


@pytest.mark.parametrize("persona", ["responder", "admin_a"])
def test_only_operators_act_on_many_nodes(
    personas: dict[str, Client], fleet: Fleet, points: None, persona: str
) -> None:
    client = personas[persona]
    assert _confirm(client, action="rollback", node=["a-1"]).status_code == 403
    posted = client.post(URL, {"action": "rollback", "node": ["a-1"], "point-a-1": "a-1-p160"})
    assert posted.status_code == 403
    assert not UpdateJob.objects.exists()
    fleet_page = client.get(reverse("fleet")).content.decode()
    assert 'class="tile-pick"' not in fleet_page and 'id="bulk"' not in fleet_page


@pytest.mark.parametrize(
    ("params", "reason"),
    [
        ({"node": ["a-1"]}, "Choose an action"),
        ({"action": "delete", "node": ["a-1"]}, "Choose an action"),
        ({"action": "rollback"}, "Select at least one node"),
        (
            {"action": "rollback", "node": [f"n{i}" for i in range(services.MAX_BULK_NODES + 5)]},
            f"At most {services.MAX_BULK_NODES} nodes",
        ),
    ],
)
def test_a_request_that_names_no_action_or_no_node_or_too_many_is_refused(
    personas: dict[str, Client], fleet: Fleet, params: dict[str, Any], reason: str
) -> None:
    for send in (personas["operator"].get, personas["operator"].post):
        response = send(URL, params)
        assert response.status_code == 400
        assert reason in response.content.decode()
    assert not UpdateJob.objects.exists()


def test_an_unknown_node_is_named_and_not_acted_on(
    personas: dict[str, Client], fleet: Fleet, points: None
) -> None:
    body = _confirm(personas["operator"], action="rollback", node=["a-1", "zz-9"]).content.decode()
    assert "Not found: zz-9" in body
    assert set(_rows(body, "bulk-steps")) == {"a-1"}


def test_the_fleet_page_offers_the_selection_to_operators(
    personas: dict[str, Client], fleet: Fleet
) -> None:
    body = personas["operator"].get(reverse("fleet")).content.decode()
    assert 'form="bulk" name="node" value="a-1"' in body
    assert f'action="{URL}"' in body


def test_ending_the_jobs_of_many_nodes_ends_only_the_confirmed_ones(
    personas: dict[str, Client], fleet: Fleet
) -> None:
    release = make_release(version="1.8.0", sha256="ef" * 32)
    stuck_a = UpdateJob.objects.create(node=fleet.node_a, release=release, state="DOWNLOADING")
    stuck_b = UpdateJob.objects.create(node=fleet.node_b, release=release, state="APPLYING")
    client = personas["operator"]
    confirm = _confirm(client, action="end_job", node=["a-1", "a-solo", "b-1"]).content.decode()
    steps = _rows(confirm, "bulk-steps")
    assert f"ends job {stuck_a.pk} (Update, DOWNLOADING) as lost" in steps["a-1"]
    assert f"ends job {stuck_b.pk} (Update, APPLYING) as lost" in steps["b-1"]
    assert "left out: no job in progress" in steps["a-solo"]
    assert f'name="job-a-1" value="{stuck_a.pk}"' in confirm and 'name="reason"' in confirm
    assert UpdateJob.objects.filter(state="LOST").count() == 0  # the confirmation writes nothing

    # b-1's job ended and a new one started after the confirmation: it is left alone.
    UpdateJob.objects.filter(pk=stuck_b.pk).update(state="FAILED")
    newer = UpdateJob.objects.create(node=fleet.node_b, release=release, state="PREFLIGHT")
    done = client.post(
        URL,
        {
            "action": "end_job",
            "node": ["a-1", "b-1"],
            "job-a-1": str(stuck_a.pk),
            "job-b-1": str(stuck_b.pk),
            "reason": "agent wedged",
        },
    )
    outcomes = _rows(done.content.decode(), "bulk-outcomes")
    assert f"ended job {stuck_a.pk} as lost" in outcomes["a-1"]
    assert "its job changed since you confirmed" in outcomes["b-1"]
    stuck_a.refresh_from_db()
    newer.refresh_from_db()
    assert stuck_a.state == "LOST" and newer.state == "PREFLIGHT"
    lost = Event.objects.get(verb="job.lost")
    assert lost.details["reason"] == "ended by olivia: agent wedged"
    summary = Event.objects.get(verb="nodes.bulk_end_job")
    assert summary.details["ended"] == {"a-1": stuck_a.pk}
    assert summary.details["reason"] == "agent wedged"
    assert set(summary.details["left_out"]) == {"b-1"}


def test_only_operators_end_the_jobs_of_many_nodes(
    personas: dict[str, Client], fleet: Fleet
) -> None:
    release = make_release(version="1.8.0", sha256="ef" * 32)
    stuck_b = UpdateJob.objects.create(node=fleet.node_b, release=release, state="APPLYING")
    done = personas["admin_a"].post(
        URL, {"action": "end_job", "node": ["b-1"], "job-b-1": str(stuck_b.pk)}
    )
    assert done.status_code == 403  # a tenant admin may not act on nodes at all
    stuck_b.refresh_from_db()
    assert stuck_b.state == "APPLYING"
