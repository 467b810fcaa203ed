"""The chaos stack, started once for the module's test: a persistent private Redis, the
live dashboard, two coordinators, beat and six nodes (agent + demo service each) on
two clusters, every node on the base version installed through the engine."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from django.db import connection
from pytest_django.fixtures import Settings
from pytest_django.live_server_helper import LiveServer

from tests import procs
from tests.chaos.runner import BASE_VERSION, SEED, Chaos, Lane, bundle_files
from tests.chaos.stack import FAST_SETTINGS, ChaosStack, NodeSpec, broker_of_this_process
from tests.factories import make_cluster, make_node, make_tenant
from tests.helpers import MakeBundle
from themis_dashboard.celery import app as celery_app
from updates.engine.apply import apply_bundle
from updates.engine.devpki import Pki
from updates.models import Node

# Drop and duplicate rates of the agents' message fault hook.
AGENT_FAULTS = {"drop": 0.05, "duplicate": 0.1}

LANES: dict[str, tuple[tuple[str, ...], list[NodeSpec]]] = {
    # Rolling and canary (automatic gate) over a Raft cluster with its leader last.
    "chaos-a": (
        ("rolling", "canary"),
        [
            NodeSpec("a-1", "chaos-a", "follower"),
            NodeSpec("a-2", "chaos-a", "leader"),
            NodeSpec("a-3", "chaos-a", "follower"),
        ],
    ),
    # Blue/green: each run updates the idle colour and switches traffic to it.
    "chaos-b": (
        ("blue_green",),
        [
            NodeSpec("b-1", "chaos-b", "follower", "blue"),
            NodeSpec("b-2", "chaos-b", "leader", "green"),
            NodeSpec("b-3", "chaos-b", "follower", "green"),
        ],
    ),
}


@pytest.fixture
def chaos(
    tmp_path: Path,
    live_server: LiveServer,
    settings: Settings,
    trusted: Pki,
    make_bundle: MakeBundle,
    transactional_db: None,
) -> Iterator[Chaos]:
    settings.THEMIS_PUBLIC_URL = live_server.url
    # The app reads its configuration from the settings the first time it is used:
    # switch it first, so what it restores afterwards is the suite's broker.
    with (
        procs.persistent_redis(tmp_path / "redis") as redis,
        broker_of_this_process(celery_app, redis.url),
    ):
        settings.REDIS_URL = settings.CELERY_BROKER_URL = redis.url
        env = procs.dashboard_env(
            redis.url,
            connection.settings_dict["NAME"],
            THEMIS_VAR_DIR=str(tmp_path),
            THEMIS_MEDIA_ROOT=str(settings.MEDIA_ROOT),
            THEMIS_PUBLIC_URL=live_server.url,
            **FAST_SETTINGS,
        )
        stack = ChaosStack(tmp_path, redis, env, SEED, trusted.root, AGENT_FAULTS)
        try:
            lanes = _start_fleet(stack, make_bundle)
            yield Chaos(stack, lanes, make_bundle)
        finally:
            stack.stop()


def _start_fleet(stack: ChaosStack, make_bundle: MakeBundle) -> list[Lane]:
    base = make_bundle(BASE_VERSION, files=bundle_files(BASE_VERSION))
    tenant = make_tenant(name="Chaos", slug="chaos")
    lanes = []
    for name, (strategies, specs) in LANES.items():
        colours = {s.color for s in specs if s.color}
        cluster = make_cluster(tenant=tenant, name=name, active_color="blue" if colours else "")
        nodes = []
        for spec in specs:
            make_node(
                node_id=spec.node_id,
                tenant=tenant,
                cluster=cluster,
                raft_role=spec.raft_role,
                color=spec.color,
                installed_version=BASE_VERSION,
            )
            node = stack.add_node(spec)
            apply_bundle(
                base,
                target=node.install_dir,
                state_dir=node.state_dir,
                trust_anchor=stack.trust_anchor,
            )
            nodes.append(node)
        lanes.append(Lane(name, cluster, nodes, strategies))
    for node in stack.nodes.values():
        stack.start_service(node)
        stack.start_agent(node)
    stack.start_dashboard_workers()

    def online() -> bool:
        rows = Node.objects.filter(status=Node.Status.ONLINE, installed_version=BASE_VERSION)
        return rows.count() == len(stack.nodes)

    assert procs.wait_until(online, 90, 0.5), f"the fleet did not come up\n{stack.log_tail()}"
    return lanes
