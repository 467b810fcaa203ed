"""Page queries stay constant in the number of nodes."""

from __future__ import annotations

import html
import re

import pytest
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from pytest_django import DjangoAssertNumQueries

from tests.factories import NodeFactory, make_cluster, make_tenant
from updates.fleet.selectors import FLEET_PAGE_SIZE
from updates.models import Event, Node

pytestmark = pytest.mark.django_db

# An operator's fleet page filtered by tenant: session, user, two permission reads, visible
# tenants, the fleet's version (two), the tenant's clusters, count, tiles, summary, roles, the
# header's inbox badge, and the saved groups. None of them grows with the fleet (checked
# against a 20 times larger one below).
MAX_QUERIES = 14


def _make_fleet(n_nodes: int) -> None:
    tenants = [make_tenant() for _ in range(3)]
    clusters = [make_cluster(tenant=tenants[i % 3]) for i in range(6)]
    nodes = []
    for i in range(n_nodes):
        cluster = clusters[i % 7] if i % 7 < 6 else None
        tenant = cluster.tenant if cluster else tenants[i % 3]
        nodes.append(
            NodeFactory.build(node_id=f"n{i:04d}", tenant=tenant, cluster=cluster, status="online")
        )
    Node.objects.bulk_create(nodes)
    Event.objects.bulk_create(
        Event(
            verb="node.online",
            actor_label="system",
            tenant=n.tenant,
            object_type="node",
            object_id=str(i),
        )
        for i, n in enumerate(nodes)
    )


@pytest.mark.parametrize("n_nodes", [10, 500])
@pytest.mark.parametrize("page", ["fleet", "event_list", "release_list"])
def test_page_queries_are_constant(
    personas: dict[str, Client],
    django_assert_max_num_queries: DjangoAssertNumQueries,
    n_nodes: int,
    page: str,
) -> None:
    _make_fleet(n_nodes)
    for persona in ("operator", "admin_a"):
        with django_assert_max_num_queries(MAX_QUERIES):
            response = personas[persona].get(reverse(page))
        assert response.status_code == 200


@pytest.mark.parametrize("n_nodes", [10, 500])
def test_fleet_shows_at_most_a_page_of_tiles(personas: dict[str, Client], n_nodes: int) -> None:
    _make_fleet(n_nodes)
    body = personas["operator"].get(reverse("fleet")).content.decode()
    assert body.count('class="tile ') == min(Node.objects.count(), FLEET_PAGE_SIZE)


def _poll_url(body: str) -> str:
    found = re.search(r'id="fleet-poll" hx-get="([^"]+)"', body)
    assert found
    return html.unescape(found.group(1))


def _fleet_queries(client: Client, query: dict[str, str]) -> tuple[int, int, int]:
    """Queries of the page, of an idle poll and of a poll after a node changed."""
    with CaptureQueriesContext(connection) as page:
        body = client.get(reverse("fleet"), query).content.decode()
    poll = _poll_url(body)
    with CaptureQueriesContext(connection) as idle:
        assert client.get(poll).status_code == 204
    Node.objects.filter(node_id="a-1").update(status=Node.Status.FAILED)
    with CaptureQueriesContext(connection) as changed:
        response = client.get(poll)
    assert response.status_code == 200
    Node.objects.filter(node_id="a-1").update(status=Node.Status.ONLINE)
    return len(page), len(idle), len(changed)


@pytest.mark.parametrize(
    "query",
    [
        {},
        {"q": "n0", "status": "online", "sort": "-heartbeat", "page": "2", "version": "1.0.0"},
        {"tenant": "tenant-a", "sort": "status"},
    ],
)
def test_fleet_page_and_poll_queries_do_not_grow_with_the_fleet(
    personas: dict[str, Client], query: dict[str, str]
) -> None:
    _make_fleet(50)
    small = {}
    for persona in ("operator", "admin_a"):
        small[persona] = _fleet_queries(personas[persona], query)
        assert max(small[persona]) <= MAX_QUERIES
    # Into the tenant both personas see.
    tenant = Node.objects.get(node_id="a-1").tenant
    Node.objects.bulk_create(
        NodeFactory.build(node_id=f"m{i:04d}", tenant=tenant, status="online") for i in range(950)
    )
    assert Node.objects.count() == 1_000 + 3
    for persona in ("operator", "admin_a"):
        assert _fleet_queries(personas[persona], query) == small[persona]


@pytest.mark.parametrize("n_nodes", [10, 500])
def test_node_detail_queries_are_constant(
    personas: dict[str, Client], django_assert_max_num_queries: DjangoAssertNumQueries, n_nodes: int
) -> None:
    _make_fleet(n_nodes)
    with django_assert_max_num_queries(MAX_QUERIES):
        response = personas["operator"].get(reverse("node_detail", args=["n0001"]))
    assert response.status_code == 200
