"""The node agent: a Celery worker on queue `node.<id>` without database access.

It learns who it is from its environment, reports a heartbeat to the
`dashboard` queue every few seconds from a thread of the worker's main process
(so long tasks in the pool never silence it), and runs node-side work through
the engine. Nothing here imports Django.
"""

from __future__ import annotations

import hashlib
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
from updates.engine import apply as engine
from updates.engine.errors import EngineError, ManifestInvalid
from updates.engine.state import load_state

log = logging.getLogger("themis.agent")

HEARTBEAT_TASK = "workers.tasks.record_heartbeat"
PROGRESS_TASK = "workers.tasks.job_progress"
FINISHED_TASK = "workers.tasks.job_finished"


@dataclass(frozen=True)
class AgentConfig:
    node_id: str
    install_dir: Path
    state_dir: Path
    status_file: Path
    heartbeat_seconds: float
    trust_anchor: Path = Path("/etc/themis/trust/root.pem")
    health_cmd: str | None = None
    health_url: str | None = None
    product: str = "themisdb"

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
        return cls(
            node_id,
            install_dir,
            state_dir,
            status_file,
            seconds,
            trust_anchor=Path(env.get("THEMIS_TRUST_ANCHOR", str(cls.trust_anchor))),
            health_cmd=env.get("THEMIS_HEALTH_CMD") or None,
            health_url=env.get("THEMIS_HEALTH_URL") or None,
            product=env.get("THEMIS_PRODUCT", "themisdb"),
        )


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
        "restore_points": _restore_points(config.state_dir),
    }


def _restore_points(state_dir: Path) -> list[dict[str, Any]]:
    try:
        points = engine.list_points(state_dir)
    except (OSError, ValueError, EngineError):
        return []
    keys = ("id", "version", "created", "file_count", "size")
    return [{k: p.get(k) for k in keys} for p in points]


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


@app.task(name="agent.heartbeat_now", ignore_result=True)
def heartbeat_now(**_extra: Any) -> None:
    send_heartbeat(AgentConfig.from_env())


class JobReporter:
    """Reports a job's steps and outcome back to the coordinator. A broker
    hiccup while reporting never breaks the update itself."""

    def __init__(self, job_id: str, node_id: str) -> None:
        self.job_id, self.node_id = job_id, node_id

    def _send(self, task: str, **kwargs: Any) -> None:
        try:
            app.send_task(
                task,
                kwargs={"job_id": self.job_id, "node_id": self.node_id, **kwargs},
                queue="dashboard",
            )
        except Exception:
            log.exception("job %s: could not report %s", self.job_id, task)

    def step(self, step: str, percent: int, detail: dict[str, Any] | None = None) -> None:
        self._send(PROGRESS_TASK, step=step, percent=percent)

    def finish(
        self,
        *,
        ok: bool,
        error: EngineError | Exception | None = None,
        result: dict[str, Any] | None = None,
    ) -> None:
        code = getattr(error, "code", "UNEXPECTED") if error is not None else ""
        self._send(
            FINISHED_TASK,
            ok=ok,
            error_code=code,
            error_message=str(error) if error else "",
            result=result or {},
        )


def _mine(config: AgentConfig, node_id: str, job_id: str) -> bool:
    # The broker is not trusted: a task addressed to another node is refused.
    if node_id != config.node_id:
        log.error("job %s addressed to node %r refused by %r", job_id, node_id, config.node_id)
        return False
    return True


def check_sha256(path: Path, expected: str) -> None:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    if digest.hexdigest() != expected:
        raise ManifestInvalid(f"bundle {path.name}: SHA-256 differs from the release's")


@app.task(name="agent.apply", ignore_result=True, acks_late=True)
def apply_release(
    job_id: str,
    node_id: str,
    bundle_path: str,
    sha256: str,
    allow_downgrade: bool = False,
    **_extra: Any,
) -> None:
    """Verify and install a release bundle through the engine, reporting each step.
    The signature is checked here against this node's own trust anchor: the
    message that asked for the update proves nothing."""
    config = AgentConfig.from_env()
    if not _mine(config, node_id, job_id):
        return
    reporter = JobReporter(job_id, node_id)
    reporter.step("PREFLIGHT", 2)
    try:
        check_sha256(Path(bundle_path), sha256)
        result = engine.apply_bundle(
            bundle_path,
            target=config.install_dir,
            state_dir=config.state_dir,
            trust_anchor=config.trust_anchor,
            health_cmd=config.health_cmd,
            health_url=config.health_url,
            allow_downgrade=allow_downgrade,
            product=config.product,
            progress=reporter.step,
        )
    except Exception as err:  # every failure is reported, with its engine code
        log.warning("job %s failed: %s", job_id, err)
        reporter.finish(ok=False, error=err)
    else:
        reporter.finish(ok=True, result=result.to_dict())
    send_heartbeat(config)


@app.task(name="agent.rollback", ignore_result=True, acks_late=True)
def rollback_node(job_id: str, node_id: str, point_id: str | None = None, **_extra: Any) -> None:
    config = AgentConfig.from_env()
    if not _mine(config, node_id, job_id):
        return
    reporter = JobReporter(job_id, node_id)
    reporter.step("RESTORE_POINT", 10)
    try:
        result = engine.rollback(
            target=config.install_dir,
            state_dir=config.state_dir,
            point_id=point_id,
            progress=reporter.step,
        )
    except Exception as err:
        log.warning("rollback job %s failed: %s", job_id, err)
        reporter.finish(ok=False, error=err)
    else:
        reporter.finish(ok=True, result=result)
    send_heartbeat(config)
