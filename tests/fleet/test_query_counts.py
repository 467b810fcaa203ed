"""Page queries stay constant in the number of nodes."""

from __future__ import annotations

import pytest
from django.test import Client
from django.urls import reverse
from pytest_django import DjangoAssertNumQueries

from tests.factories import NodeFactory, make_cluster, make_tenant
from updates.models import Event, Node

pytestmark = pytest.mark.django_db

MAX_QUERIES = 12


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
def test_fleet_lists_every_node(personas: dict[str, Client], n_nodes: int) -> None:
    _make_fleet(n_nodes)
    body = personas["operator"].get(reverse("fleet")).content.decode()
    assert body.count('class="tile ') == Node.objects.count()


@pytest.mark.parametrize("n_nodes", [10, 500])
def test_node_detail_queries_are_constant(
    personas: dict[str, Client], django_assert_max_num_queries: DjangoAssertNumQueries, n_nodes: int
) -> None:
    _make_fleet(n_nodes)
    with django_assert_max_num_queries(MAX_QUERIES):
        response = personas["operator"].get(reverse("node_detail", args=["n0001"]))
    assert response.status_code == 200
