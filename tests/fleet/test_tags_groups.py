"""Tags on nodes and saved fleet filters (dynamic groups): put on one node or many, found by
the fleet filter, a group's nodes targeted by a rollout as they are when its plan is made;
operators only, audited; a bad tag named."""

from __future__ import annotations

import pytest
from django.test import Client
from django.urls import reverse

from tests.conftest import Fleet
from tests.factories import make_node, make_release
from tests.fakes import NullTransport
from updates.fleet import services
from updates.jobs import services as jobs
from updates.models import Event, Node, NodeGroup, Release, Rollout, Tag

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def _no_agents(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(jobs, "default_transport", NullTransport)


def _tiles(client: Client, **query: str) -> list[str]:
    body = client.get(reverse("fleet"), query).content.decode()
    tiles = body.split('class="tile status-')[1:]
    return sorted(tile.split('data-node="', 1)[1].split('"', 1)[0] for tile in tiles)


def _tag_names(node_id: str) -> list[str]:
    return sorted(Node.objects.get(node_id=node_id).tags.values_list("name", flat=True))


def test_an_operator_tags_a_node_and_finds_it_by_the_tag(
    personas: dict[str, Client], fleet: Fleet
) -> None:
    client = personas["operator"]
    url = reverse("node_tags", args=["a-1"])
    assert client.post(url, {"add": "eu-west, ssd  ssd"}).status_code == 302
    assert _tag_names("a-1") == ["eu-west", "ssd"]
    page = client.get(reverse("node_detail", args=["a-1"])).content.decode()
    assert 'data-tag="eu-west"' in page and 'name="remove" value="ssd"' in page
    assert _tiles(client, tag="ssd") == ["a-1"]
    assert client.post(url, {"remove": "ssd"}).status_code == 302
    assert _tag_names("a-1") == ["eu-west"]
    assert Tag.objects.filter(name="ssd").exists()  # kept for next time
    assert Event.objects.filter(verb="nodes.tagged").count() == 2


@pytest.mark.parametrize("bad", ["-x", "a b/c", "x" * 41, "été"])
def test_a_bad_tag_is_named_and_nothing_changes(
    personas: dict[str, Client], fleet: Fleet, bad: str
) -> None:
    response = personas["operator"].post(
        reverse("node_tags", args=["a-1"]), {"add": f"good {bad}"}, follow=True
    )
    assert "is not a tag" in response.content.decode()
    assert _tag_names("a-1") == [] and not Tag.objects.exists()


@pytest.mark.parametrize("persona", ["responder", "admin_a"])
def test_only_operators_tag(personas: dict[str, Client], fleet: Fleet, persona: str) -> None:
    response = personas[persona].post(reverse("node_tags", args=["a-1"]), {"add": "x"})
    assert response.status_code == 403
    assert _tag_names("a-1") == []


def test_many_nodes_are_tagged_and_untagged_at_once(
    personas: dict[str, Client], fleet: Fleet
) -> None:
    client = personas["operator"]
    confirm = client.get(
        reverse("fleet_bulk"), {"action": "tag", "tag": "canary-hosts", "node": ["a-1", "b-1"]}
    ).content.decode()
    assert "adds tag canary-hosts" in confirm
    done = client.post(
        reverse("fleet_bulk"), {"action": "tag", "tag": "canary-hosts", "node": ["a-1", "b-1"]}
    )
    assert done.status_code == 200 and done.content.decode().count('data-started="yes"') == 2
    assert _tag_names("a-1") == _tag_names("b-1") == ["canary-hosts"]
    client.post(reverse("fleet_bulk"), {"action": "untag", "tag": "canary-hosts", "node": ["b-1"]})
    assert _tag_names("b-1") == [] and _tag_names("a-1") == ["canary-hosts"]
    nameless = client.post(reverse("fleet_bulk"), {"action": "tag", "tag": "", "node": ["a-1"]})
    assert nameless.status_code == 400


def test_a_saved_group_brings_its_filter_back(personas: dict[str, Client], fleet: Fleet) -> None:
    client = personas["operator"]
    services.nodes_tag(nodes=[fleet.node_a, fleet.node_b], add=["ssd"], remove=[], user=None)
    saved = client.post(
        reverse("fleet_group_save"), {"name": "fast disks", "tag": "ssd", "status": "online"}
    )
    group = NodeGroup.objects.get()
    assert group.query == {"tag": "ssd", "status": "online"}
    assert saved.status_code == 302 and "tag=ssd" in saved["Location"]
    fleet_page = client.get(reverse("fleet")).content.decode()
    assert 'data-group="fast disks"' in fleet_page
    empty = client.post(reverse("fleet_group_save"), {"name": "everything"}, follow=True)
    assert "would be the whole fleet" in empty.content.decode()
    assert NodeGroup.objects.count() == 1


def test_a_group_is_a_rollout_target_as_it_matches_when_planned(
    personas: dict[str, Client], fleet: Fleet
) -> None:
    # One minor version on from what the fleet's nodes run (no version skew in a cluster).
    release = make_release(version="1.1.0", sha256="ab" * 32, state=Release.State.PUBLISHED)
    extra = make_node(node_id="b-2", tenant=fleet.tenant_b)
    services.nodes_tag(nodes=[fleet.node_a, extra], add=["wave-1"], remove=[], user=None)
    group = services.node_group_save(name="wave one", query={"tag": "wave-1"}, user=None)
    response = personas["operator"].post(
        reverse("rollout_new"),
        {
            "release": release.pk,
            "strategy": "rolling",
            "group": group.pk,
            "stages": "100",
            "max_error_rate": "5",
            "max_p99_ms": "500",
            "max_unavailable": "1",
            "health_timeout": "30",
            "start": "1",
        },
    )
    body = response.content.decode()
    assert response.status_code == 302, body[body.find('id="form-errors"') :][:800]
    rollout = Rollout.objects.get()
    planned = sorted(rollout.plan.values_list("node__node_id", flat=True))
    assert planned == ["a-1", "b-2"]
    assert rollout.target["group"] == "wave one"
    assert rollout.target["group_filter"] == {"tag": "wave-1"}


def test_a_group_whose_tenant_is_gone_matches_nothing(fleet: Fleet) -> None:
    group = NodeGroup.objects.create(name="old", query={"tenant": "no-such-tenant"})
    assert not group.nodes(Node.objects.all()).exists()
    assert not NodeGroup(name="x", query={"cluster": "abc"}).nodes(Node.objects.all()).exists()
