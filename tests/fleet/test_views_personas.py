"""Every page, every persona: status code and what is (not) on the page."""

from __future__ import annotations

import html
import re

import pytest
from django.test import Client
from django.urls import reverse

from tests.conftest import Fleet
from updates.audit import event_log
from updates.models import Event, Node

pytestmark = pytest.mark.django_db

PAGES = [
    reverse("fleet"),
    reverse("node_detail", args=["a-1"]),
    reverse("release_list"),
    reverse("event_list"),
]


@pytest.mark.parametrize("url", PAGES)
def test_anonymous_is_redirected_to_login(personas: dict[str, Client], url: str) -> None:
    response = personas["anonymous"].get(url)
    assert response.status_code == 302
    assert response["Location"].startswith(reverse("login"))


def test_login_page_is_public(personas: dict[str, Client]) -> None:
    response = personas["anonymous"].get(reverse("login"))
    assert response.status_code == 200
    assert b"Sign in" in response.content


@pytest.mark.parametrize(
    ("persona", "visible", "hidden"),
    [
        ("operator", {"a-1", "a-solo", "b-1"}, set()),
        ("responder", {"a-1", "a-solo", "b-1"}, set()),
        ("admin_a", {"a-1", "a-solo"}, {"b-1"}),
        ("admin_b", {"b-1"}, {"a-1", "a-solo"}),
    ],
)
def test_fleet_shows_only_visible_tenants(
    personas: dict[str, Client], persona: str, visible: set[str], hidden: set[str]
) -> None:
    response = personas[persona].get(reverse("fleet"))
    assert response.status_code == 200
    body = response.content.decode()
    for node_id in visible:
        assert f'data-node="{node_id}"' in body
    for node_id in hidden:
        assert f'data-node="{node_id}"' not in body


@pytest.mark.parametrize(
    ("persona", "node_id", "status"),
    [
        ("operator", "b-1", 200),
        ("responder", "b-1", 200),
        ("admin_a", "a-1", 200),
        ("admin_a", "b-1", 404),
        ("admin_b", "a-1", 404),
        ("admin_b", "b-1", 200),
    ],
)
def test_node_detail_scoped(
    personas: dict[str, Client], persona: str, node_id: str, status: int
) -> None:
    before = list(Node.objects.order_by("pk").values())
    response = personas[persona].get(reverse("node_detail", args=[node_id]))
    assert response.status_code == status
    assert list(Node.objects.order_by("pk").values()) == before  # nothing changed
    if status == 200:
        assert node_id.encode() in response.content


def test_node_detail_htmx_returns_only_the_live_partial(personas: dict[str, Client]) -> None:
    response = personas["operator"].get(
        reverse("node_detail", args=["a-1"]), headers={"HX-Request": "true"}
    )
    assert response.status_code == 200
    body = response.content.decode()
    assert body.lstrip().startswith('<div id="node-live"')
    assert "<html" not in body


def test_fleet_htmx_poll_returns_only_the_grid(personas: dict[str, Client]) -> None:
    response = personas["admin_a"].get(reverse("fleet"), headers={"HX-Request": "true"})
    body = response.content.decode()
    assert body.lstrip().startswith('<div id="fleet-grid"')
    assert 'data-node="a-1"' in body and 'data-node="b-1"' not in body


def test_fleet_page_has_plain_links_and_polling(personas: dict[str, Client]) -> None:
    body = personas["operator"].get(reverse("fleet")).content.decode()
    assert 'href="/nodes/a-1/"' in body
    assert 'hx-trigger="every 2s"' in body
    assert "htmx" in body  # the pinned htmx script from django-htmx


@pytest.mark.parametrize("persona", ["operator", "responder", "admin_a", "admin_b"])
def test_release_list_readable_by_every_role(personas: dict[str, Client], persona: str) -> None:
    assert personas[persona].get(reverse("release_list")).status_code == 200


@pytest.fixture
def tenant_events(fleet: Fleet) -> None:
    event_log(verb="node.online", tenant=fleet.tenant_a, obj=fleet.node_a, details={"n": "A"})
    event_log(verb="node.offline", tenant=fleet.tenant_b, obj=fleet.node_b, details={"n": "B"})


@pytest.mark.parametrize(
    ("persona", "sees_a", "sees_b"),
    [
        ("operator", True, True),
        ("responder", True, True),
        ("admin_a", True, False),
        ("admin_b", False, True),
    ],
)
def test_event_log_scoped(
    personas: dict[str, Client], tenant_events: None, persona: str, sees_a: bool, sees_b: bool
) -> None:
    body = personas[persona].get(reverse("event_list")).content.decode()
    assert ("node.online" in body) is sees_a
    assert ("node.offline" in body) is sees_b


def test_event_log_filter_by_other_tenant_reveals_nothing(
    personas: dict[str, Client], fleet: Fleet, tenant_events: None
) -> None:
    response = personas["admin_a"].get(reverse("event_list"), {"tenant": fleet.tenant_b.pk})
    body = response.content.decode()
    assert response.status_code == 200
    assert "node.offline" not in body
    assert "Select a valid choice" in body


def test_event_log_filters(personas: dict[str, Client], fleet: Fleet, tenant_events: None) -> None:
    client = personas["operator"]
    by_verb = client.get(reverse("event_list"), {"verb": "node.off"}).content.decode()
    assert "node.offline" in by_verb and "node.online" not in by_verb
    by_node = client.get(reverse("event_list"), {"node": "a-1"}).content.decode()
    assert "node.online" in by_node and "node.offline" not in by_node
    by_tenant = client.get(reverse("event_list"), {"tenant": fleet.tenant_b.pk}).content.decode()
    assert "node.offline" in by_tenant and "node.online" not in by_tenant
    future = client.get(reverse("event_list"), {"since": "2999-01-01T00:00"}).content.decode()
    assert "No events match" in future


def test_event_log_paginates(personas: dict[str, Client], fleet: Fleet) -> None:
    for i in range(120):
        event_log(verb=f"test.bulk{i:03d}", tenant=fleet.tenant_a)
    client = personas["operator"]
    first = client.get(reverse("event_list")).content.decode()
    assert "test.bulk119" in first and "test.bulk069" not in first
    assert "older ›" in first and "‹ newer" not in first and "« newest" not in first
    second = client.get(reverse("event_list") + _link(first, "next")).content.decode()
    assert "test.bulk069" in second and "test.bulk070" not in second and "« newest" in second
    last = client.get(reverse("event_list") + _link(second, "next")).content.decode()
    assert "test.bulk000" in last and "test.bulk019" in last and "older ›" not in last
    back = client.get(reverse("event_list") + _link(last, "prev")).content.decode()
    assert "test.bulk020" in back and "test.bulk069" in back and "test.bulk070" not in back
    assert Event.objects.count() == 120


def _link(body: str, rel: str) -> str:
    """The query string of the pager link with this rel (next: older, prev: newer)."""
    match = re.search(rf'<a href="(\?[^"]*)" rel="{rel}">', body)
    assert match, f"no {rel} link"
    return html.unescape(match.group(1))


def test_logout_requires_post_and_ends_session(personas: dict[str, Client]) -> None:
    client = personas["operator"]
    assert client.post(reverse("logout")).status_code == 302
    assert client.get(reverse("fleet")).status_code == 302
