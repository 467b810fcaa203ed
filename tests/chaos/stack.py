"""The chaos stack: a persistent private Redis, two coordinator workers, one beat, and
six nodes (a Celery agent plus the demo service stand-in each), all real processes in
their own process groups, every one of which can be killed with SIGKILL and started
again the same way. The dashboard is the test's live server."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from celery import Celery
from kombu import pools as kombu_pools

from tests import procs
from updates.engine.state import load_state

DEMO_SERVICE = Path(procs.ROOT / "themis_dashboard" / "demo" / "service.py")

# Job deadlines and cadences short enough for a run to end in seconds after a fault
# (the defaults every rollout takes; the runs also set them in their options).
FAST_SETTINGS = {
    "THEMIS_NODE_OFFLINE_AFTER": "4",
    "THEMIS_OFFLINE_CHECK_SECONDS": "1",
    "THEMIS_ROLLOUT_REAPER_SECONDS": "1",
    "THEMIS_COMMAND_RELAY_SECONDS": "1",
    "THEMIS_JOB_ACK_TIMEOUT": "3",
    "THEMIS_JOB_MAX_SENDS": "5",
    "THEMIS_JOB_PROGRESS_TIMEOUT": "15",
    "THEMIS_JOB_OFFLINE_GRACE": "5",
}


@dataclass(frozen=True)
class NodeSpec:
    node_id: str
    cluster: str
    raft_role: str
    color: str = ""


@dataclass
class ChaosNode:
    spec: NodeSpec
    root: Path
    service_port: int
    agent: procs.Proc | None = None
    service: procs.Proc | None = None
    incarnation: int = 0
    agent_started: float = 0.0

    @property
    def node_id(self) -> str:
        return self.spec.node_id

    @property
    def install_dir(self) -> Path:
        return self.root / "install"

    @property
    def state_dir(self) -> Path:
        return self.root / "state"

    def running_for(self) -> float:
        """Seconds since the agent started; 0 when it is not running."""
        if self.agent is None or not self.agent.alive:
            return 0.0
        return time.monotonic() - self.agent_started

    def installed_version(self) -> str:
        try:
            return load_state(self.state_dir).installed_version or ""
        except (OSError, ValueError):
            return ""

    def version_file(self) -> str:
        try:
            return (self.install_dir / "share" / "VERSION").read_text().strip()
        except OSError:
            return ""


@dataclass
class ChaosStack:
    tmp: Path
    redis: procs.RedisServer
    dashboard_env: dict[str, str]
    seed: int
    trust_anchor: Path
    agent_faults: dict[str, float]
    nodes: dict[str, ChaosNode] = field(default_factory=dict)
    coordinators: list[procs.Proc] = field(default_factory=list)
    beat: procs.Proc | None = None

    @property
    def logs(self) -> Path:
        return self.tmp / "logs"

    # ---------------------------------------------------------------- dashboard side

    def start_dashboard_workers(self) -> None:
        # Not measured for coverage: every process here ends by SIGKILL (its data is
        # lost), and tracing would slow the processes the faults are timed against.
        env = procs.unmeasured(self.dashboard_env)
        for i in range(2):
            name = f"coordinator-{i}"
            self.coordinators.append(procs.coordinator(env, self.logs, beat=False, name=name))
        self.beat = procs.beat(env, self.logs)

    # Start again only what is down, as RedisServer.start does: a restart due for an earlier,
    # overlapping fault finds it back already.
    def restart_coordinator(self, index: int) -> None:
        if not self.coordinators[index].alive:
            self.coordinators[index] = procs.respawn(self.coordinators[index])

    def restart_beat(self) -> None:
        if self.beat is not None and not self.beat.alive:
            self.beat = procs.respawn(self.beat)

    # ---------------------------------------------------------------- nodes

    def add_node(self, spec: NodeSpec) -> ChaosNode:
        node = ChaosNode(spec, self.tmp / "nodes" / spec.node_id, procs.free_port())
        node.state_dir.mkdir(parents=True, exist_ok=True)
        node.install_dir.mkdir(parents=True, exist_ok=True)
        role = {"raft_role": spec.raft_role}
        (node.state_dir / "service-status.json").write_text(json.dumps(role))
        self.nodes[spec.node_id] = node
        return node

    def start_service(self, node: ChaosNode) -> None:
        """The demo service stand-in, as installed by the base bundle."""
        argv = [sys.executable, str(node.install_dir / "bin" / "themisd")]
        argv += ["--port", str(node.service_port), "--install", str(node.install_dir)]
        argv += ["--state", str(node.state_dir)]
        env = {"PATH": os.environ.get("PATH", ""), "PYTHONUNBUFFERED": "1"}
        node.service = procs.spawn(f"service-{node.node_id}", argv, env, self.logs)
        if not procs.wait_until(lambda: procs.port_open(node.service_port), 15, 0.05):
            raise RuntimeError(f"demo service of {node.node_id} did not start")

    def agent_env(self, node: ChaosNode) -> dict[str, str]:
        health = f"http://127.0.0.1:{node.service_port}/health"
        faults: dict[str, float | int] = {**self.agent_faults}
        faults["seed"] = self.seed * 1000 + node.incarnation * 10 + self._index(node)
        # Not measured, as the dashboard workers (start_dashboard_workers).
        env = procs.agent_env(
            self.redis.url,
            node.node_id,
            node.root,
            THEMIS_HEARTBEAT_SECONDS="1",
            THEMIS_TRUST_ANCHOR=str(self.trust_anchor),
            THEMIS_STATUS_FILE=str(node.state_dir / "service-status.json"),
            THEMIS_METRICS_FILE=str(node.state_dir / "service-metrics.json"),
            # A short wait before asking the service keeps the job in HEALTH_CHECK long
            # enough for the injector to kill the agent in the middle of an apply.
            THEMIS_HEALTH_CMD=f"sleep 0.6 && curl -fsS -m 3 {health} >/dev/null",
            THEMIS_DRAIN_CMD="sleep 0.2",
            THEMIS_REJOIN_CMD="sleep 0.1",
            THEMIS_AGENT_FAULTS=json.dumps(faults),
        )
        return procs.unmeasured(env)

    def _index(self, node: ChaosNode) -> int:
        return list(self.nodes).index(node.node_id)

    def start_agent(self, node: ChaosNode) -> None:
        env = self.agent_env(node)
        if node.agent is None:
            node.agent = procs.agent(node.node_id, env, self.logs)
        else:
            # Every incarnation draws its own faults, still fixed by the seed.
            node.agent = procs.respawn(node.agent, env)
        node.incarnation += 1
        node.agent_started = time.monotonic()

    def kill_agent(self, node: ChaosNode) -> None:
        if node.agent is not None:
            node.agent.kill(signal.SIGKILL)

    # ---------------------------------------------------------------- all of it

    def every_proc(self) -> list[procs.Proc]:
        found = [*self.coordinators, *([self.beat] if self.beat else [])]
        for node in self.nodes.values():
            found += [p for p in (node.agent, node.service) if p is not None]
        return found

    def stop(self) -> None:
        # Redis is stopped by whoever started it (procs.persistent_redis).
        for proc in self.every_proc():
            proc.kill(signal.SIGKILL)

    def log_tail(self, chars: int = 1500) -> str:
        parts = []
        for proc in self.every_proc():
            parts.append(f"--- {proc.name}\n{proc.output()[-chars:]}")
        return "\n".join(parts)

    def keep_logs(self, dest: Path) -> Path:
        """Copy every process log and each node's state dir (its drain, apply and ledger
        files) to `dest`, which outlives the test's temporary dir."""
        shutil.rmtree(dest, ignore_errors=True)
        shutil.copytree(self.logs, dest / "logs")
        for node in self.nodes.values():
            shutil.copytree(
                node.state_dir,
                dest / "nodes" / node.node_id,
                ignore=shutil.ignore_patterns("downloads", "points", "staging*", "*.tmp"),
                dirs_exist_ok=True,
            )
        return dest

    def agent_fault_count(self) -> int:
        """Drops and duplicates the agents' fault hook injected (each logs one line)."""
        total = 0
        for node in self.nodes.values():
            if node.agent is not None:
                total += node.agent.output().count("fault injected")
        return total


@contextmanager
def broker_of_this_process(app: Celery, url: str) -> Iterator[None]:
    """Point the test process's Celery app (services enqueue through it) at `url`;
    the connection pools are dropped so the next send connects there."""
    keys = ("broker_url", "broker_read_url", "broker_write_url")
    old: dict[str, Any] = {k: app.conf.get(k) for k in keys}

    def use(values: dict[str, Any]) -> None:
        for key, value in values.items():
            app.conf[key] = value
        # kombu keeps producer pools in a process-wide registry keyed by the connection: a
        # pool closed here would be handed out again after the switch back ("Acquire on
        # closed pool"), so the registry is emptied, not just this app's references.
        kombu_pools.reset()
        app._pool = None  # type: ignore[attr-defined]
        amqp = app.__dict__.get("amqp")
        if amqp is not None:
            amqp._producer_pool = None

    use({"broker_url": url, "broker_read_url": None, "broker_write_url": None})
    try:
        yield
    finally:
        use(old)
