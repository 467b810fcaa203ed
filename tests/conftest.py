"""Shared fixtures: personas (as in healthchecks' alice/bob/charlie) and a
small fleet with two tenants."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from django.contrib.auth.models import Group
from django.test import Client

from tenants.roles import OPERATOR, RESPONDER, TENANT_ADMIN, ensure_role_groups
from tests.factories import ClusterFactory, NodeFactory, TenantFactory, UserFactory


@dataclass
class Fleet:
    tenant_a: object
    tenant_b: object
    cluster_a: object
    node_a: object
    node_a_standalone: object
    node_b: object


@pytest.fixture
def roles(db: None) -> None:
    ensure_role_groups()


def _user(username: str, role: str | None):
    user = UserFactory(username=username)
    if role:
        user.groups.add(Group.objects.get(name=role))
    return user


@pytest.fixture
def fleet(db: None) -> Fleet:
    tenant_a = TenantFactory(name="Tenant A", slug="tenant-a")
    tenant_b = TenantFactory(name="Tenant B", slug="tenant-b")
    cluster_a = ClusterFactory(tenant=tenant_a, name="a-main")
    return Fleet(
        tenant_a=tenant_a,
        tenant_b=tenant_b,
        cluster_a=cluster_a,
        node_a=NodeFactory(node_id="a-1", tenant=tenant_a, cluster=cluster_a, raft_role="leader"),
        node_a_standalone=NodeFactory(node_id="a-solo", tenant=tenant_a),
        node_b=NodeFactory(node_id="b-1", tenant=tenant_b),
    )


@pytest.fixture
def personas(roles: None, fleet: Fleet) -> dict[str, Client | None]:
    """Logged-in clients: operator, admin of tenant A, admin of tenant B,
    responder, and an anonymous client."""
    operator = _user("olivia", OPERATOR)
    admin_a = _user("alice", TENANT_ADMIN)
    admin_b = _user("bob", TENANT_ADMIN)
    responder = _user("rita", RESPONDER)
    fleet.tenant_a.admins.add(admin_a)
    fleet.tenant_b.admins.add(admin_b)
    clients: dict[str, Client | None] = {}
    for name, user in {
        "operator": operator,
        "admin_a": admin_a,
        "admin_b": admin_b,
        "responder": responder,
    }.items():
        client = Client()
        client.force_login(user)
        clients[name] = client
    clients["anonymous"] = Client()
    return clients
