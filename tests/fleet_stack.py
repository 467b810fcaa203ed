"""A real fleet for end-to-end tests: one Celery agent per node (with its own
install and state dirs, a base version installed through the engine, healthy
service metrics), a coordinator with beat, all on the suite's Redis, agents
downloading from the live dashboard."""

from __future__ import annotations

import json
from collections.abc import Collection, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import pytest
from django.db import connection
from pytest_django.fixtures import Settings
from pytest_django.live_server_helper import LiveServer

from tests import procs
from tests.helpers import MakeBundle
from updates.engine.apply import apply_bundle
from updates.engine.devpki import Pki
from updates.models import Node

BASE = {"bin/themisd": b"themisd 1.6.0", "share/VERSION": b"1.6.0\n"}
NEW = {"bin/themisd": b"themisd 1.7.0", "share/VERSION": b"1.7.0\n"}
DEMO_SERVICE = (procs.ROOT / "themis_dashboard" / "demo" / "service.py").read_bytes()


def service_release(version: str) -> dict[str, bytes]:
    """A release of the demo service: a real program serving its own version."""
    return {"bin/themisd": DEMO_SERVICE, "share/VERSION": f"{version}\n".encode()}


@dataclass
class RealFleet:
    tmp: Path
    env: dict[str, str]
    nodes: list[Node]
    agents: dict[str, procs.Proc] = field(default_factory=dict)
    coordinator: procs.Proc | None = None
    # With services: each node's supervised demo service, and its port.
    services: dict[str, procs.Proc] = field(default_factory=dict)
    service_ports: dict[str, int] = field(default_factory=dict)

    def install(self, node: Node) -> Path:
        return self.tmp / node.node_id / "install"

    def start_coordinator(self) -> None:
        self.coordinator = procs.coordinator(self.env, self.tmp)

    def logs(self) -> str:
        parts = [self.coordinator.output()[-2500:] if self.coordinator else ""]
        parts += [a.output()[-1200:] for a in self.agents.values()]
        return "\n".join(parts)

    def stop(self) -> None:
        coordinator = [self.coordinator] if self.coordinator else []
        procs.stop_all([*self.agents.values(), *coordinator, *self.services.values()])


class StartFleet(Protocol):
    """The `real_fleet` fixture: starts agents for `nodes` and a coordinator."""

    def __call__(
        self,
        nodes: list[Node],
        *,
        failing: Collection[str] = ...,
        drain_cmd: str = ...,
        services: bool = ...,
        base_version: str = ...,
    ) -> RealFleet: ...


@pytest.fixture
def real_fleet(
    tmp_path: Path,
    redis_url: str,
    live_server: LiveServer,
    settings: Settings,
    trusted: Pki,
    make_bundle: MakeBundle,
) -> Iterator[StartFleet]:
    settings.THEMIS_PUBLIC_URL = live_server.url
    started: list[RealFleet] = []

    def start(
        nodes: list[Node],
        *,
        failing: Collection[str] = frozenset(),
        drain_cmd: str = "",
        services: bool = False,
        base_version: str = "1.6.0",
    ) -> RealFleet:
        files = service_release(base_version) if services else BASE
        base_bundle = make_bundle(
            base_version, files=files, name=f"themisdb-{base_version}-base.tar"
        )
        env = procs.dashboard_env(
            redis_url,
            connection.settings_dict["NAME"],
            THEMIS_VAR_DIR=str(tmp_path),
            THEMIS_PUBLIC_URL=live_server.url,
            THEMIS_ROLLOUT_REAPER_SECONDS="1",
            # The dashboard's anchor is the releases' (it verifies a bundle before storing
            # its parts for delivery by parts).
            THEMIS_TRUST_ANCHOR=str(trusted.root),
        )
        real = RealFleet(tmp_path, env, nodes)
        started.append(real)
        for node in nodes:
            node_dir = tmp_path / node.node_id
            apply_bundle(
                base_bundle,
                target=node_dir / "install",
                state_dir=node_dir / "state",
                trust_anchor=trusted.root,
            )
            if services:
                port = procs.free_port()
                real.service_ports[node.node_id] = port
                real.services[node.node_id] = procs.supervised_service(
                    f"service-{node.node_id}",
                    port,
                    node_dir / "install",
                    node_dir / "state",
                    tmp_path,
                )
            metrics = node_dir / "metrics.json"
            metrics.write_text(json.dumps({"error_rate": 0.001, "p99_ms": 80, "healthy": True}))
            agent_env = procs.agent_env(
                redis_url,
                node.node_id,
                node_dir,
                THEMIS_HEARTBEAT_SECONDS="1",
                THEMIS_TRUST_ANCHOR=str(trusted.root),
                THEMIS_METRICS_FILE=str(metrics),
                THEMIS_HEALTH_CMD="false" if node.node_id in failing else "true",
                THEMIS_DRAIN_CMD=drain_cmd,
            )
            real.agents[node.node_id] = procs.agent(node.node_id, agent_env, tmp_path)
        real.start_coordinator()
        return real

    yield start
    for real in started:
        real.stop()
