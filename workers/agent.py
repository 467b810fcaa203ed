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
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
from celery import signals

from themis_dashboard.celery import app
from updates.engine import apply as engine
from updates.engine.delta_bundle import FullBundleFallback, delta_rebuilder
from updates.engine.errors import EngineError, ManifestInvalid
from updates.engine.reports import sign_report
from updates.engine.restore import points_root
from updates.engine.state import load_state, write_json_atomic
from workers.download import DownloadCorrupt, DownloadFailed, download_resumable

log = logging.getLogger("themis.agent")

HEARTBEAT_TASK = "workers.tasks.record_heartbeat"
LAST_JOB_FILE = "last-job.json"
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
    drain_cmd: str | None = None
    rejoin_cmd: str | None = None
    metrics_file: Path | None = None
    report_key: bytes | None = None

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
            drain_cmd=env.get("THEMIS_DRAIN_CMD") or None,
            rejoin_cmd=env.get("THEMIS_REJOIN_CMD") or None,
            report_key=_report_key(env.get("THEMIS_NODE_KEY", "")),
            metrics_file=Path(env["THEMIS_METRICS_FILE"])
            if env.get("THEMIS_METRICS_FILE")
            else None,
        )


def _report_key(text: str) -> bytes | None:
    if not text:
        log.error("THEMIS_NODE_KEY is not set: the dashboard will refuse this agent's reports")
        return None
    try:
        return bytes.fromhex(text)
    except ValueError:
        raise RuntimeError(
            "THEMIS_NODE_KEY: expected the hex key from `manage.py node_key`"
        ) from None


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
        **read_service_metrics(config.metrics_file),
        "last_job": _last_job(config.state_dir),
    }


def _last_job(state_dir: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((state_dir / LAST_JOB_FILE).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def read_service_metrics(path: Path | None) -> dict[str, Any]:
    """Error rate, p99 latency and health as the managed service last wrote them."""
    if path is None:
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {"service_healthy": False}
    if not isinstance(data, dict):
        return {"service_healthy": False}
    return {
        "error_rate": data.get("error_rate"),
        "p99_latency_ms": data.get("p99_ms"),
        "service_healthy": bool(data.get("healthy", True)),
    }


# (points dir, its mtime) -> summaries: points are written once and only
# added or pruned, which changes the directory, so a heartbeat does not re-read
# every point's manifest and stat every saved file each few seconds.
_points_cache: dict[str, tuple[int, list[dict[str, Any]]]] = {}


def _restore_points(state_dir: Path) -> list[dict[str, Any]]:
    root = points_root(state_dir)
    try:
        stamp = root.stat().st_mtime_ns
    except OSError:
        return []
    cached = _points_cache.get(str(root))
    if cached is not None and cached[0] == stamp:
        return cached[1]
    try:
        points = engine.list_points(state_dir)
    except (OSError, ValueError, EngineError):
        return []
    keys = ("id", "version", "created", "file_count", "size")
    summaries = [{k: p.get(k) for k in keys} for p in points]
    _points_cache[str(root)] = (stamp, summaries)
    return summaries


def send_report(task: str, content: dict[str, Any], key: bytes | None, *, wrap: str = "") -> None:
    """Send a report to the coordinator, signed with this node's key. Without
    a key it goes unsigned, which the dashboard refuses unless told otherwise."""
    if key:
        kwargs: dict[str, Any] = {"envelope": sign_report(key, content)}
    else:
        kwargs = {wrap: content} if wrap else dict(content)
    app.send_task(task, kwargs=kwargs, queue="dashboard")


def send_heartbeat(config: AgentConfig) -> None:
    send_report(HEARTBEAT_TASK, collect_heartbeat(config), config.report_key, wrap="payload")


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


@app.task(name="agent.set_traffic_role", ignore_result=True)
def set_traffic_role(node_id: str, role: str, **_extra: Any) -> None:
    """Blue/green: record whether this node takes traffic, for its service and
    load balancer to read (the file sits next to the Raft status file)."""
    config = AgentConfig.from_env()
    if node_id != config.node_id or role not in {"active", "standby"}:
        log.error("traffic role %r for node %r refused by %r", role, node_id, config.node_id)
        return
    write_json_atomic(config.state_dir / "traffic-role.json", {"role": role})
    send_heartbeat(config)


@app.task(name="agent.heartbeat_now", ignore_result=True)
def heartbeat_now(**_extra: Any) -> None:
    send_heartbeat(AgentConfig.from_env())


class JobReporter:
    """Reports a job's steps and outcome back to the coordinator. A broker
    hiccup while reporting never breaks the update itself."""

    def __init__(self, job_id: str, node_id: str, key: bytes | None = None) -> None:
        self.job_id, self.node_id, self.key = job_id, node_id, key

    def _send(self, task: str, **kwargs: Any) -> None:
        try:
            send_report(task, {"job_id": self.job_id, "node_id": self.node_id, **kwargs}, self.key)
        except Exception:
            log.exception("job %s: could not report %s", self.job_id, task)

    def step(self, step: str, percent: int, detail: dict[str, Any] | None = None) -> None:
        self._send(PROGRESS_TASK, step=step, percent=percent)

    def download_progress(self) -> Any:
        """A throttled byte-progress callback: at most a report every half second."""
        last = [0.0]

        def report(done: int, total: int) -> None:
            now = time.monotonic()
            if now - last[0] < 0.5 and done != total:
                return
            last[0] = now
            percent = 2 + int(18 * done / total) if total else 2
            self._send(
                PROGRESS_TASK,
                step="DOWNLOADING",
                percent=percent,
                bytes_done=done,
                bytes_total=total,
            )

        return report

    def finish(
        self,
        *,
        ok: bool,
        error: EngineError | Exception | None = None,
        result: dict[str, Any] | None = None,
        state_dir: Path | None = None,
    ) -> None:
        code = getattr(error, "code", "UNEXPECTED") if error is not None else ""
        report = {
            "ok": ok,
            "error_code": code,
            "error_message": str(error) if error else "",
            "result": result or {},
        }
        if state_dir is not None:
            # Kept on disk and repeated in every heartbeat: a final report lost
            # with a dying coordinator still reaches the dashboard.
            write_json_atomic(state_dir / LAST_JOB_FILE, {"job_id": self.job_id, **report})
        self._send(FINISHED_TASK, **report)


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


class FullBundleFetch:
    """The delta hook's fallback: the release's full bundle, downloaded only
    when a file cannot be rebuilt from this node's base, then verified and
    staged by the engine (FullBundleFallback) like any other bundle."""

    def __init__(
        self, config: AgentConfig, url: str, token: str, sha256: str, size: int | None
    ) -> None:
        self.config, self.url, self.token = config, url, token
        self.sha256, self.size = sha256, size
        self.downloaded: Path | None = None
        self._fallback: FullBundleFallback | None = None

    def __call__(self, rel: str) -> Path:
        if self._fallback is None:
            path = self.config.state_dir / "downloads" / f"{self.sha256}.bundle"
            path.parent.mkdir(parents=True, exist_ok=True)
            self.downloaded = path
            log.info("delta: %s needs the full bundle; downloading it", rel)
            download_resumable(self.url, self.token, path, sha256=self.sha256, size=self.size)
            self._fallback = FullBundleFallback(
                path,
                self.config.trust_anchor,
                self.config.state_dir / "delta-fallback",
                product=self.config.product,
            )
        return self._fallback(rel)

    def cleanup(self) -> None:
        if self._fallback is not None:
            self._fallback.cleanup()
        if self.downloaded is not None:
            self.downloaded.unlink(missing_ok=True)


@app.task(name="agent.apply", ignore_result=True, acks_late=True)
def apply_release(
    job_id: str,
    node_id: str,
    sha256: str,
    artifact_url: str | None = None,
    download_token: str = "",
    size: int | None = None,
    bundle_path: str | None = None,
    allow_downgrade: bool = False,
    health_timeout: float = 30,
    full_artifact_url: str | None = None,
    full_sha256: str = "",
    full_size: int | None = None,
    **_extra: Any,
) -> None:
    """Fetch, verify and install a release bundle through the engine, reporting
    each step. The signature is checked here against this node's own trust
    anchor: the message that asked for the update proves nothing.

    With `full_*` the bundle is a delta bundle: files whose base on this node
    is not the expected one come from the full bundle, fetched only then."""
    config = AgentConfig.from_env()
    if not _mine(config, node_id, job_id):
        return
    reporter = JobReporter(job_id, node_id, config.report_key)
    reporter.step("PREFLIGHT", 2)
    downloaded: Path | None = None
    full: FullBundleFetch | None = None
    if full_artifact_url and full_sha256:
        full = FullBundleFetch(config, full_artifact_url, download_token, full_sha256, full_size)
    try:
        if artifact_url:
            downloaded = config.state_dir / "downloads" / f"{sha256}.bundle"
            downloaded.parent.mkdir(parents=True, exist_ok=True)
            try:
                download_resumable(
                    artifact_url,
                    download_token,
                    downloaded,
                    sha256=sha256,
                    size=size,
                    progress=reporter.download_progress(),
                )
            except (DownloadFailed, DownloadCorrupt) as err:
                if full is None:
                    raise
                # The delta is gone or damaged: the full bundle does the job
                # (a job that is over is refused that one too).
                log.warning(
                    "job %s: delta download failed (%s); using the full bundle", job_id, err
                )
                downloaded, full = _download_full(full, reporter), None
            bundle = downloaded
        elif bundle_path:
            bundle = Path(bundle_path)
            check_sha256(bundle, sha256)
        else:
            raise ManifestInvalid("job names no bundle to install")
        run_hook(config.drain_cmd, "drain", reporter, "DRAINING", 3)
        result = engine.apply_bundle(
            bundle,
            target=config.install_dir,
            state_dir=config.state_dir,
            trust_anchor=config.trust_anchor,
            health_cmd=config.health_cmd,
            health_url=config.health_url,
            health_timeout=float(health_timeout),
            allow_downgrade=allow_downgrade,
            product=config.product,
            progress=reporter.step,
            rebuild_deltas=delta_rebuilder(full) if full is not None else None,
        )
        run_hook(config.rejoin_cmd, "rejoin", reporter, "REJOINING", 95)
    except Exception as err:  # every failure is reported, with its engine code
        log.warning("job %s failed: %s", job_id, err)
        reporter.finish(ok=False, error=err, state_dir=config.state_dir)
    else:
        reporter.finish(ok=True, result=result.to_dict(), state_dir=config.state_dir)
    finally:
        if downloaded is not None:
            downloaded.unlink(missing_ok=True)
        if full is not None:
            full.cleanup()
    send_heartbeat(config)


def _download_full(full: FullBundleFetch, reporter: JobReporter) -> Path:
    path = full.config.state_dir / "downloads" / f"{full.sha256}.bundle"
    download_resumable(
        full.url,
        full.token,
        path,
        sha256=full.sha256,
        size=full.size,
        progress=reporter.download_progress(),
    )
    return path


def run_hook(
    command: str | None, what: str, reporter: JobReporter, step: str, percent: int
) -> None:
    """Drain before and rejoin after an update: the node's own commands."""
    if not command:
        return
    reporter.step(step, percent)
    result = subprocess.run(command, shell=True, capture_output=True, text=True, timeout=300)  # noqa: S602 - operator-configured command
    if result.returncode != 0:
        raise ApplyHookFailed(
            f"{what} command failed ({result.returncode}): {result.stderr.strip()[:200]}"
        )


class ApplyHookFailed(EngineError):
    code = "HOOK_FAILED"


@app.task(name="agent.rollback", ignore_result=True, acks_late=True)
def rollback_node(job_id: str, node_id: str, point_id: str | None = None, **_extra: Any) -> None:
    config = AgentConfig.from_env()
    if not _mine(config, node_id, job_id):
        return
    reporter = JobReporter(job_id, node_id, config.report_key)
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
        reporter.finish(ok=False, error=err, state_dir=config.state_dir)
    else:
        reporter.finish(ok=True, result=result, state_dir=config.state_dir)
    send_heartbeat(config)
