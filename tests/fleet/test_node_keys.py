"""Per-node keys: stored per node, rotated and revoked one node at a time from the node
page (POST, operators only, scoped, audited with who), printed by `manage.py node_key`,
never shown on a page."""

from __future__ import annotations

from io import StringIO

import pytest
from django.core.management import CommandError, call_command
from django.test import Client
from django.urls import reverse

from tests.conftest import Fleet
from tests.factories import make_node
from updates.fleet.node_keys import key_fingerprint, node_key
from updates.models import Event, Node

pytestmark = pytest.mark.django_db


def _key(node_id: str) -> str:
    return Node.objects.values_list("agent_key", flat=True).get(node_id=node_id)


def test_every_node_gets_a_key_of_its_own(fleet: Fleet) -> None:
    keys = [_key(n) for n in ("a-1", "b-1", "a-solo")]
    assert len(set(keys)) == 3 and all(len(bytes.fromhex(k)) == 32 for k in keys)
    assert node_key("a-1") == bytes.fromhex(keys[0])


def test_node_key_command_prints_the_stored_key(fleet: Fleet) -> None:
    out = StringIO()
    call_command("node_key", "a-1", stdout=out)
    assert out.getvalue().strip() == _key("a-1")
    with pytest.raises(CommandError, match="no node"):
        call_command("node_key", "ghost-9")
    Node.objects.filter(node_id="a-1").update(agent_key_revoked=True)
    with pytest.raises(CommandError, match="revoked"):
        call_command("node_key", "a-1")


def test_operator_rotates_a_key_and_it_is_audited(personas: dict[str, Client]) -> None:
    old = _key("a-1")
    page = personas["operator"].get(reverse("node_detail", args=["a-1"])).content.decode()
    assert key_fingerprint(old) in page and old not in page
    response = personas["operator"].post(reverse("node_key_rotate", args=["a-1"]))
    assert response.status_code == 302
    new = _key("a-1")
    assert new != old and _key("b-1") != new
    event = Event.objects.get(verb="node.key_rotated")
    assert event.actor_label == "olivia"
    assert event.details["fingerprint"] == key_fingerprint(new)
    assert old not in str(event.details) and new not in str(event.details)
    follow = personas["operator"].get(reverse("node_detail", args=["a-1"])).content.decode()
    assert new not in follow


def test_operator_revokes_a_key_then_rotating_restores_it(personas: dict[str, Client]) -> None:
    client = personas["operator"]
    assert client.post(reverse("node_key_revoke", args=["a-1"])).status_code == 302
    assert Node.objects.get(node_id="a-1").agent_key_revoked
    assert node_key("a-1") is None and node_key("b-1") is not None
    assert Event.objects.filter(verb="node.key_revoked").count() == 1
    client.post(reverse("node_key_revoke", args=["a-1"]))  # already revoked: no second Event
    assert Event.objects.filter(verb="node.key_revoked").count() == 1
    client.post(reverse("node_key_rotate", args=["a-1"]))
    assert node_key("a-1") is not None


@pytest.mark.parametrize("action", ["node_key_rotate", "node_key_revoke"])
def test_key_actions_are_post_only_scoped_and_for_operators(
    personas: dict[str, Client], action: str
) -> None:
    before = _key("a-1")
    url = reverse(action, args=["a-1"])
    assert personas["operator"].get(url).status_code == 405
    assert personas["admin_b"].post(url).status_code == 404  # cannot see a-1
    assert personas["responder"].post(url).status_code in {403, 404}
    assert personas["anonymous"].post(url).status_code == 302  # to the login page
    node = Node.objects.get(node_id="a-1")
    assert node.agent_key == before and not node.agent_key_revoked
    assert not Event.objects.filter(verb__startswith="node.key_").exists()


def test_a_node_made_anywhere_gets_a_key(fleet: Fleet) -> None:
    node = make_node(node_id="new-1", tenant=fleet.tenant_a)
    assert node_key(node.node_id) is not None and node.agent_key != _key("a-1")
