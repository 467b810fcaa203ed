"""Shared fixtures: personas (as in healthchecks' alice/bob/charlie) and a
small fleet with two tenants."""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from django.contrib.auth.models import Group, User
from django.test import Client
from pytest_django.fixtures import Settings

from tenants.models import Tenant
from tenants.roles import OPERATOR, RESPONDER, TENANT_ADMIN, ensure_role_groups
from tests.factories import make_cluster, make_node, make_tenant, make_user
from tests.helpers import MakeBundle
from updates.engine.devpki import KeyPair, Pki
from updates.models import Cluster, Node

# A PKI directory shared by many test sessions (see `test_pki`).
TEST_PKI_DIR_ENV = "THEMIS_TEST_PKI_DIR"
# Set by the PostgreSQL pass (tests/project/test_postgres_suite.py): run only the tests
# that touch the database; the others would run the same code a second time for nothing.
DATABASE_TESTS_ONLY = "THEMIS_TEST_DATABASE_TESTS_ONLY"
_DATABASE_FIXTURES = frozenset(
    {"db", "transactional_db", "django_db_reset_sequences", "live_server"}
)


def _touches_the_database(item: pytest.Item) -> bool:
    if item.get_closest_marker("django_db") is not None:
        return True
    return bool(_DATABASE_FIXTURES & set(getattr(item, "fixturenames", ())))


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked `first` go first, whatever the random order: each runs for minutes in
    a process of its own, which the other test process (xdist) works beside; last, it
    would run alone at the end."""
    if os.environ.get(DATABASE_TESTS_ONLY) == "1":
        touching = {id(item): _touches_the_database(item) for item in items}
        config.hook.pytest_deselected(items=[i for i in items if not touching[id(i)]])
        items[:] = [item for item in items if touching[id(item)]]
    items.sort(key=lambda item: item.get_closest_marker("first") is None)


@dataclass
class Fleet:
    tenant_a: Tenant
    tenant_b: Tenant
    cluster_a: Cluster
    node_a: Node
    node_a_standalone: Node
    node_b: Node


@pytest.fixture
def roles(db: None) -> None:
    ensure_role_groups()


def _user(username: str, role: str | None) -> User:
    user = make_user(username=username)
    if role:
        user.groups.add(Group.objects.get(name=role))
    return user


@pytest.fixture
def fleet(db: None) -> Fleet:
    tenant_a = make_tenant(name="Tenant A", slug="tenant-a")
    tenant_b = make_tenant(name="Tenant B", slug="tenant-b")
    cluster_a = make_cluster(tenant=tenant_a, name="a-main")
    return Fleet(
        tenant_a=tenant_a,
        tenant_b=tenant_b,
        cluster_a=cluster_a,
        node_a=make_node(node_id="a-1", tenant=tenant_a, cluster=cluster_a, raft_role="leader"),
        node_a_standalone=make_node(node_id="a-solo", tenant=tenant_a),
        node_b=make_node(node_id="b-1", tenant=tenant_b),
    )


@pytest.fixture
def personas(roles: None, fleet: Fleet) -> dict[str, Client]:
    """Logged-in clients: operator, admin of tenant A, admin of tenant B,
    responder, and an anonymous client."""
    operator = _user("olivia", OPERATOR)
    admin_a = _user("alice", TENANT_ADMIN)
    admin_b = _user("bob", TENANT_ADMIN)
    responder = _user("rita", RESPONDER)
    fleet.tenant_a.admins.add(admin_a)
    fleet.tenant_b.admins.add(admin_b)
    clients: dict[str, Client] = {}
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


@pytest.fixture(scope="session")
def _session_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One real redis-server for the suite, on the port the test settings name."""
    from django.conf import settings

    from tests import procs

    with procs.redis_server(tmp_path_factory.mktemp("redis"), settings.TEST_REDIS_PORT) as url:
        yield url


@pytest.fixture
def redis_url(_session_redis: str) -> Iterator[str]:
    """The suite's broker, emptied before and after: no message of an earlier test is left,
    and nothing this test leaves (liveness times, queued heartbeats) reaches a later one
    that reads Redis without asking for it (an offline check does)."""
    import redis

    client = redis.Redis.from_url(_session_redis)
    client.flushall()
    yield _session_redis
    client.flushall()


@pytest.fixture(autouse=True)
def _isolated_media(settings: Settings, tmp_path: Path) -> None:
    """Every test stores artifacts in its own folder."""
    settings.MEDIA_ROOT = tmp_path / "media"


@pytest.fixture(scope="session")
def test_pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """A real PKI made with the openssl CLI, once per session; or, under THEMIS_TEST_PKI_DIR,
    once for many sessions (`make mutate` runs a session per mutant and makes it beforehand:
    some twenty keys each time were most of a mutant's time)."""
    from updates.engine.devpki import make_pki

    shared = os.environ.get(TEST_PKI_DIR_ENV)
    return make_pki(Path(shared) if shared else tmp_path_factory.mktemp("pki"))


@pytest.fixture
def trusted(settings: Settings, test_pki: Pki) -> Pki:
    settings.THEMIS_TRUST_ANCHOR = test_pki.root
    return test_pki


@pytest.fixture
def make_bundle(tmp_path: Path, test_pki: Pki) -> MakeBundle:
    """Build a real signed bundle from a small source tree."""
    from updates.engine.bundle import create_bundle

    def build(
        version: str = "1.7.0",
        *,
        signer: KeyPair | None = None,
        chain: Path | None = None,
        files: Mapping[str, bytes] | None = None,
        name: str | None = None,
        extra_manifest: dict[str, Any] | None = None,
    ) -> Path:
        src = tmp_path / f"src-{version}"
        for rel, content in (
            files or {"bin/themisd": b"#!/bin/sh\necho " + version.encode()}
        ).items():
            path = src / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(content)
        leaf = signer or test_pki.leaf
        out = tmp_path / (name or f"themisdb-{version}.tar")
        create_bundle(
            src,
            product="themisdb",
            version=version,
            key_path=leaf.key,
            cert_path=leaf.cert,
            chain_path=chain or test_pki.chain,
            out_path=out,
            extra_manifest=extra_manifest,
        )
        return out

    return build


from tests.browser_fixtures import browser, page  # noqa: E402,F401 - one per module
from tests.fleet_stack import real_fleet  # noqa: E402,F401 - fixture for end-to-end tests
