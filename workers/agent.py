"""The node agent: a Celery worker on queue `node.<id>` without database access.

It learns who it is from its environment, reports a heartbeat to the
`dashboard` queue every few seconds from a thread of the worker's main process
(so long tasks in the pool never silence it), and runs node-side work through
the engine. Nothing here imports Django.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
from celery import signals

from themis_dashboard.celery import app
from updates.engine.state import load_state

log = logging.getLogger("themis.agent")

HEARTBEAT_TASK = "workers.tasks.record_heartbeat"


@dataclass(frozen=True)
class AgentConfig:
    node_id: str
    install_dir: Path
    state_dir: Path
    status_file: Path
    heartbeat_seconds: float

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> AgentConfig:
        env = dict(os.environ if env is None else env)
        node_id = env.get("THEMIS_NODE_ID", "")
        if not node_id:
            raise RuntimeError("THEMIS_NODE_ID: not set; an agent must know its node")
        install_dir = Path(env.get("THEMIS_INSTALL_DIR", f"var/nodes/{node_id}/install"))
        state_dir = Path(env.get("THEMIS_STATE_DIR", f"var/nodes/{node_id}/state"))
        status_file = Path(env.get("THEMIS_STATUS_FILE", str(state_dir / "service-status.json")))
        try:
            seconds = float(env.get("THEMIS_HEARTBEAT_SECONDS", "5"))
        except ValueError:
            raise RuntimeError("THEMIS_HEARTBEAT_SECONDS: expected a number") from None
        if seconds <= 0:
            raise RuntimeError("THEMIS_HEARTBEAT_SECONDS: must be positive")
        return cls(node_id, install_dir, state_dir, status_file, seconds)


def read_raft_role(status_file: Path) -> str:
    """The node's service writes its Raft role to a small JSON status file."""
    try:
        data = json.loads(status_file.read_text())
    except (OSError, ValueError):
        return ""
    role = data.get("raft_role", "") if isinstance(data, dict) else ""
    return role if isinstance(role, str) else ""


def collect_heartbeat(config: AgentConfig) -> dict[str, Any]:
    disk_path = config.install_dir if config.install_dir.exists() else Path("/")
    disk = psutil.disk_usage(str(disk_path))
    try:
        installed = load_state(config.state_dir).installed_version or ""
    except (OSError, ValueError):
        installed = ""
    return {
        "node_id": config.node_id,
        "installed_version": installed,
        "raft_role": read_raft_role(config.status_file),
        "disk_free_bytes": disk.free,
        "disk_total_bytes": disk.total,
        "memory_available_bytes": psutil.virtual_memory().available,
        "load_1m": os.getloadavg()[0],
    }


def send_heartbeat(config: AgentConfig) -> None:
    app.send_task(HEARTBEAT_TASK, kwargs={"payload": collect_heartbeat(config)}, queue="dashboard")


class HeartbeatThread(threading.Thread):
    def __init__(self, config: AgentConfig) -> None:
        super().__init__(name="themis-heartbeat", daemon=True)
        self.config = config
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.is_set():
            try:
                send_heartbeat(self.config)
            except Exception:  # a broker hiccup must not kill the heartbeat
                log.exception("heartbeat failed; retrying")
            self.stopped.wait(self.config.heartbeat_seconds)


_heartbeat: HeartbeatThread | None = None


@signals.worker_ready.connect
def _start_heartbeat(**_kwargs: Any) -> None:
    global _heartbeat
    _heartbeat = HeartbeatThread(AgentConfig.from_env())
    _heartbeat.start()


@signals.worker_shutdown.connect
def _stop_heartbeat(**_kwargs: Any) -> None:
    if _heartbeat is not None:
        _heartbeat.stopped.set()


@app.task(name="agent.ping")
def ping(**_extra: Any) -> dict[str, Any]:
    return collect_heartbeat(AgentConfig.from_env())
