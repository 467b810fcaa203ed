"""The node agent: a Celery worker on queue `node.<id>` without database access.

It learns who it is from its environment, reports a heartbeat to the
`dashboard` queue every few seconds from a thread of the worker's main process
(so long tasks in the pool never silence it), and runs node-side work through
the engine. Nothing here imports Django.
"""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import psutil
import requests
from celery import signals

from themis_dashboard.celery import app
from updates.engine import apply as engine
from updates.engine.commands import (
    CommandRefused,
    CommandType,
    NonceStore,
    SignedCommand,
    verify_command,
)
from updates.engine.delta_bundle import FullBundleFallback, delta_rebuilder
from updates.engine.errors import (
    AlreadyInProgress,
    EngineError,
    ManifestInvalid,
    RecoveryNeeded,
    RestorePointCorrupt,
)
from updates.engine.lock import NodeLock, read_holder
from updates.engine.parts import sweep_abandoned_parts
from updates.engine.reports import ReportSequence, ReportType, sign_report
from updates.engine.restore import points_disk_usage, points_root
from updates.engine.retention import Retention, cleanup_points, parse_duration, parse_size
from updates.engine.schema import node_database_url, run_contract, schema_status
from updates.engine.state import load_state, write_json_atomic
from workers.download import DownloadCorrupt, DownloadFailed, download_resumable
from workers.faults import ENV_VAR as FAULTS_ENV_VAR
from workers.faults import Fault, FaultInjector, FaultSpec
from workers.fetch import DownloadTask, ParallelDownloader, Progress
from workers.ledger import ClaimOutcome, JobKind, Ledger, LedgerEntry, valid_job_id
from workers.parts import PartsResult, fetch_by_parts

log = logging.getLogger("themis.agent")

HEARTBEAT_TASK = "workers.tasks.record_heartbeat"
LAST_JOB_FILE = "last-job.json"
PROGRESS_TASK = "workers.tasks.job_progress"
FINISHED_TASK = "workers.tasks.job_finished"
TRAFFIC_ROLE_FILE = "traffic-role.json"
# The high-water mark of this node's report sequence (survives restarts).
SEQUENCE_FILE = "report-sequence.json"
REPORT_TYPES = {
    HEARTBEAT_TASK: ReportType.HEARTBEAT,
    PROGRESS_TASK: ReportType.JOB_PROGRESS,
    FINISHED_TASK: ReportType.JOB_FINISHED,
}
# One JSON line per drain/rejoin and per engine apply/rollback started: read
# from outside (the chaos suite) to check drains overlap no more than allowed
# and that no job was applied twice.
DRAIN_LOG = "drain.log"
APPLIES_LOG = "applies.log"
# The agent died mid-job; engine recovery has since made the node whole again.
INTERRUPTED = "INTERRUPTED"
# The final report for a job cancelled before this agent started it.
CANCELLED = "CANCELLED"
ACCEPTED_STEP = "ACCEPTED"
# A download's ETA is reported up to this (a stalled one would otherwise say "forever").
MAX_ETA_SECONDS = 30 * 24 * 3600
IN_PROGRESS_STEP = "IN_PROGRESS"


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
    faults: FaultSpec | None = None
    # The service's base URL for a bundle's HTTP checks (default: its supervisor's).
    verify_url: str | None = None
    # Downloads: connections at once, and a limit for all of them together (bytes/s).
    download_concurrency: int = 4
    download_limit_bps: float | None = None
    # Restore point retention: after every update (the count) and in a periodic cleanup
    # (all three), never the point a pending update or a rollback of the installed
    # version needs.
    points_keep: int = 3
    points_max_age: float | None = None  # seconds
    points_max_bytes: int | None = None  # the points' disk use together
    points_cleanup_seconds: float = 300.0

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
            faults=_fault_spec(env.get(FAULTS_ENV_VAR)),
            verify_url=env.get("THEMIS_VERIFY_URL") or None,
            download_concurrency=_positive_int(env, "THEMIS_DOWNLOAD_CONCURRENCY", 4),
            download_limit_bps=_download_limit(env.get("THEMIS_DOWNLOAD_LIMIT_BPS", "")),
            points_keep=_positive_int(env, "THEMIS_RESTORE_POINTS_KEEP", 3),
            points_max_age=_retention_value(env, "THEMIS_RESTORE_POINTS_MAX_AGE", parse_duration),
            points_max_bytes=_retention_value(env, "THEMIS_RESTORE_POINTS_MAX_BYTES", parse_size),
            points_cleanup_seconds=_cleanup_seconds(env),
        )

    @property
    def retention(self) -> Retention:
        return Retention(self.points_keep, self.points_max_age, self.points_max_bytes)


def _positive_int(env: dict[str, str], name: str, default: int) -> int:
    text = env.get(name, "")
    if not text:
        return default
    if not text.isdigit() or int(text) < 1:
        raise RuntimeError(f"{name}: expected a whole number of at least 1")
    return int(text)


def _download_limit(text: str) -> float | None:
    """THEMIS_DOWNLOAD_LIMIT_BPS: bytes per second for all downloads together (unset: none)."""
    if not text:
        return None
    try:
        limit = float(text)
    except ValueError:
        raise RuntimeError("THEMIS_DOWNLOAD_LIMIT_BPS: expected bytes per second") from None
    if not math.isfinite(limit) or limit <= 0:
        raise RuntimeError("THEMIS_DOWNLOAD_LIMIT_BPS: must be a positive number")
    return limit


_Number = TypeVar("_Number", int, float)


def _retention_value(
    env: dict[str, str], name: str, parse: Callable[[str], _Number]
) -> _Number | None:
    """THEMIS_RESTORE_POINTS_MAX_AGE (`30d`, `12h`, seconds) or _MAX_BYTES (`2G`, bytes);
    unset or empty: no such limit."""
    text = env.get(name, "").strip()
    if not text:
        return None
    try:
        return parse(text)
    except ValueError as err:
        raise RuntimeError(f"{name}: {err}") from None


def _cleanup_seconds(env: dict[str, str]) -> float:
    name = "THEMIS_RESTORE_POINTS_CLEANUP_SECONDS"
    try:
        seconds = float(env.get(name, "") or 300)
    except ValueError:
        raise RuntimeError(f"{name}: expected a number of seconds") from None
    if not math.isfinite(seconds) or seconds <= 0:
        raise RuntimeError(f"{name}: must be positive")
    return seconds


def _fault_spec(text: str | None) -> FaultSpec | None:
    try:
        return FaultSpec.parse(text)
    except ValueError as err:
        raise RuntimeError(str(err)) from None


def _report_key(text: str) -> bytes | None:
    if not text:
        log.error(
            "THEMIS_NODE_KEY is not set: the dashboard refuses this agent's reports"
            " and this agent refuses every command"
        )
        return None
    try:
        key = bytes.fromhex(text)
    except ValueError:
        key = b""
    if len(key) < 16:
        raise RuntimeError("THEMIS_NODE_KEY: expected the hex key from `manage.py node_key`")
    return key


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
        "restore_points_bytes": _restore_points_bytes(config.state_dir),
        **read_service_metrics(config.metrics_file),
        "last_job": _last_job(config.state_dir),
        "active_job_id": _active_job_id(config.state_dir),
        "traffic_role": read_traffic_role(config.state_dir),
        **_schema_field(config.state_dir),
    }


# The node database's newest history entries a heartbeat carries.
SCHEMA_HISTORY_ENTRIES = 10
# A PostgreSQL node database has no file to watch: read it at most this often.
SCHEMA_REFRESH_SECONDS = 30.0
# state dir -> (what the reading depends on, the `schema` field it gave)
_schema_cache: dict[str, tuple[object, dict[str, Any]]] = {}


def _schema_field(state_dir: Path) -> dict[str, Any]:
    """`{"schema": {"version", "history"}}` for the heartbeat, or nothing. Cheap: only when
    the node database exists, read again only when it changed (SQLite: its files' times and
    sizes; PostgreSQL: every SCHEMA_REFRESH_SECONDS). Never raises: a heartbeat must go out
    whatever the database does."""
    try:
        stamp = _schema_stamp(state_dir)
        if stamp is None:
            return {}
        cached = _schema_cache.get(str(state_dir))
        if cached is not None and cached[0] == stamp:
            return {"schema": cached[1]}
        summary = schema_summary(schema_status(state_dir))
    except Exception as err:  # the heartbeat goes out without it
        log.warning("heartbeat: node database schema not read: %s", err)
        return {}
    _schema_cache[str(state_dir)] = (stamp, summary)
    return {"schema": summary}


def _schema_stamp(state_dir: Path) -> object | None:
    """What a cached schema reading is good for; None when there is no node database."""
    url = node_database_url(state_dir)
    if not url.startswith("sqlite:///"):
        return ("server", url, int(time.monotonic() // SCHEMA_REFRESH_SECONDS))
    path = Path(url.removeprefix("sqlite:///"))
    stamps: list[tuple[int, int]] = []
    for part in (path, path.with_name(path.name + "-wal")):
        try:
            stat = part.stat()
        except FileNotFoundError:
            if part == path:
                return None
            continue
        stamps.append((stat.st_mtime_ns, stat.st_size))
    return ("sqlite", str(path), tuple(stamps))


def schema_summary(status: dict[str, Any]) -> dict[str, Any]:
    """The engine's schema status, cut to what the dashboard takes (its limits, its fields):
    the version and the newest history entries, oldest first."""
    history = status.get("history")
    entries = history[-SCHEMA_HISTORY_ENTRIES:] if isinstance(history, list) else []
    summary = []
    for entry in entries:
        if not isinstance(entry, dict) or not entry.get("version"):
            continue
        phase = str(entry.get("phase") or "")
        duration = _finite_or_none(entry.get("duration_ms"))
        summary.append(
            {
                "version": str(entry["version"])[:64],
                "phase": phase if phase in {"expand", "contract"} else "",
                "outcome": str(entry.get("outcome") or "")[:32],
                "started": str(entry.get("started_at") or "")[:64],
                "duration_ms": duration,
            }
        )
    version = status.get("schema_version")
    return {"version": str(version)[:64] if version else "", "history": summary}


def _active_job_id(state_dir: Path) -> str | None:
    try:
        return Ledger(state_dir).active_job_id()
    except OSError:
        log.exception("ledger: cannot tell the active job")
        return None


def read_traffic_role(state_dir: Path) -> str:
    """The blue/green role set_traffic_role last wrote ("" if none)."""
    try:
        data = json.loads((state_dir / TRAFFIC_ROLE_FILE).read_text())
    except (OSError, ValueError):
        return ""
    role = data.get("role", "") if isinstance(data, dict) else ""
    return role if role in {"active", "standby"} else ""


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
        "error_rate": _finite_or_none(data.get("error_rate")),
        "p99_latency_ms": _finite_or_none(data.get("p99_ms")),
        "service_healthy": bool(data.get("healthy", True)),
    }


def _finite_or_none(value: Any) -> float | None:
    """A metric the dashboard accepts: a finite, non-negative number (else unknown)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) and number >= 0 else None


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


# (points dir, its mtime, a time slot) -> bytes: points change the directory when added
# or pruned; the slot catches what changes without that (an update replacing a file an
# older point shares its inode with), at most a minute late.
_points_bytes_cache: dict[str, tuple[object, int | None]] = {}
POINTS_BYTES_REFRESH_SECONDS = 60.0


def _restore_points_bytes(state_dir: Path) -> int | None:
    """What the restore points hold on disk together (restore.DiskUse), or None when it
    cannot be told; never raises."""
    root = points_root(state_dir)
    try:
        slot = int(time.monotonic() // POINTS_BYTES_REFRESH_SECONDS)
        stamp: object = (root.stat().st_mtime_ns, slot)
    except FileNotFoundError:
        return 0
    except OSError:
        return None
    cached = _points_bytes_cache.get(str(root))
    if cached is not None and cached[0] == stamp:
        return cached[1]
    try:
        held: int | None = points_disk_usage(state_dir)
    except (OSError, ValueError, EngineError):
        log.warning("heartbeat: restore points' disk use not read", exc_info=True)
        held = None
    _points_bytes_cache[str(root)] = (stamp, held)
    return held


def cleanup_restore_points(config: AgentConfig) -> list[str] | None:
    """The periodic retention (config.retention): the deleted point ids, or None when it
    had to wait for another round (a job runs, or the engine is busy). It holds the
    ledger's lock throughout, so no job of this agent starts meanwhile and none finds
    the node lock taken by it."""
    if not points_root(config.state_dir).is_dir():
        return []
    with Ledger(config.state_dir).while_idle() as idle:
        if not idle:
            return None
        try:
            deleted = cleanup_points(config.state_dir, config.retention)
        except AlreadyInProgress:
            return None  # an operator's command on the node, say
    if deleted:
        log.info("restore points pruned by retention: %s", ", ".join(deleted))
    return deleted


# One sequence per state dir, shared by every thread of the process; reports are
# numbered and published under one lock, so the broker sees them in order.
_sequences: dict[str, ReportSequence] = {}
_send_lock = threading.Lock()


def report_sequence(state_dir: Path | None) -> ReportSequence | None:
    if state_dir is None:
        return None
    with _send_lock:
        path = str(state_dir / SEQUENCE_FILE)
        if path not in _sequences:
            _sequences[path] = ReportSequence(Path(path))
        return _sequences[path]


def send_report(
    task: str, content: dict[str, Any], key: bytes | None, *, state_dir: Path | None = None
) -> None:
    """Send a report to the coordinator, signed with this node's key over its type and
    the next number of the node's report sequence (kept in `state_dir`). Without a
    key nothing is sent: the dashboard refuses unsigned reports."""
    if not key:
        log.error("%s not sent: no THEMIS_NODE_KEY to sign it with", task)
        return
    sequence = report_sequence(state_dir)
    injector = _fault_injector()
    fault = injector.decide() if injector is not None else Fault.NONE
    if fault is not Fault.NONE:
        log.warning("fault injected: %s %s (job %s)", fault.value, task, content.get("job_id", "-"))
    with _send_lock:
        seq = sequence.next() if sequence is not None else None
        kwargs = {"envelope": sign_report(key, REPORT_TYPES[task], content, seq=seq)}
        if fault is Fault.DROP:
            return
        app.send_task(task, kwargs=kwargs, queue="dashboard")
        if fault is Fault.DUPLICATE:
            app.send_task(task, kwargs=kwargs, queue="dashboard")


# The test-only report fault hook (workers/faults.py): read from the
# environment once, or again by install_faults().
_faults: list[FaultInjector | None] = []


def install_faults(spec: FaultSpec | None) -> FaultInjector | None:
    """Start a fresh seeded injector (or none): the same spec replays the same faults."""
    injector = FaultInjector(spec) if spec is not None else None
    _faults[:] = [injector]
    if injector is not None:
        log.warning("fault injection ON for agent reports: %s", spec)
    return injector


def _fault_injector() -> FaultInjector | None:
    if not _faults:
        install_faults(_fault_spec(os.environ.get(FAULTS_ENV_VAR)))
    return _faults[0]


def send_heartbeat(config: AgentConfig) -> None:
    beat = collect_heartbeat(config)
    refused = _take_refusals()
    if refused:
        beat["commands_refused"] = refused
    send_report(HEARTBEAT_TASK, beat, config.report_key, state_dir=config.state_dir)


# Commands refused since the last heartbeat: the next one tells the dashboard, which
# counts them (the audit log shows the attempt). Bounded: a flood keeps the newest.
_refusals: deque[dict[str, str]] = deque(maxlen=20)
_refusals_lock = threading.Lock()


def _take_refusals() -> list[dict[str, str]]:
    with _refusals_lock:
        taken = list(_refusals)
        _refusals.clear()
    return taken


def open_command(
    config: AgentConfig, kind: CommandType, envelope: Any, extra: dict[str, Any]
) -> SignedCommand | None:
    """The command in a task's envelope if it is signed with this node's key, for this
    node and this task's command type, unexpired, never seen before, and carries
    nothing outside its signature; None otherwise (refused: logged and told to the
    dashboard in the next heartbeat; nothing is written, nothing reported on a job)."""
    try:
        if extra:
            raise CommandRefused(f"fields outside the signed envelope: {sorted(extra)[:5]}")
        if not config.report_key:
            raise CommandRefused("this agent has no key to check commands with")
        command = verify_command(config.report_key, envelope, node_id=config.node_id, command=kind)
        if command.job_id is not None and not valid_job_id(command.job_id):
            raise CommandRefused(f"job id {command.job_id!r} is not a plain job id")
        _check_arg_types(command)
        if not NonceStore(config.state_dir).remember(command.nonce, command.expires):
            raise CommandRefused("replayed: this command's nonce was seen before")
    except CommandRefused as err:
        log.error("%s command refused by %s: %s", kind.value, config.node_id, err)
        with _refusals_lock:
            _refusals.append({"command": kind.value, "reason": str(err)[:200]})
        return None
    return command


_ARG_TYPES: dict[str, tuple[type, ...]] = {
    "artifact_url": (str,),
    "download_token": (str,),
    "sha256": (str,),
    "size": (int,),
    "version": (str,),
    "health_timeout": (int, float),
    "full_artifact_url": (str,),
    "full_sha256": (str,),
    "full_size": (int,),
    "parts_url": (str,),
    "allow_downgrade": (bool,),
    "point_id": (str,),
    "role": (str,),
}


def _check_arg_types(command: SignedCommand) -> None:
    for name, value in command.args.items():
        if value is not None and not isinstance(value, _ARG_TYPES[name]):
            raise CommandRefused(f"argument {name}: wrong type")
    if command.command is CommandType.APPLY and not isinstance(command.args.get("sha256"), str):
        raise CommandRefused("an apply without the bundle's sha256")
    if command.command is CommandType.CONTRACT and not command.args.get("version"):
        raise CommandRefused("a contract without the release's version")


class HeartbeatThread(threading.Thread):
    def __init__(self, config: AgentConfig) -> None:
        super().__init__(name="themis-heartbeat", daemon=True)
        self.config = config
        self.stopped = threading.Event()

    def run(self) -> None:
        # The first cleanup waits a whole period: start-up recovery takes the node lock.
        cleanup_due = time.monotonic() + self.config.points_cleanup_seconds
        while not self.stopped.is_set():
            try:
                send_heartbeat(self.config)
            except Exception:  # a broker hiccup must not kill the heartbeat
                log.exception("heartbeat failed; retrying")
            if time.monotonic() >= cleanup_due:
                cleanup_due = time.monotonic() + self.config.points_cleanup_seconds
                try:
                    cleanup_restore_points(self.config)
                except Exception:  # retention must never stop the heartbeat
                    log.exception("restore point cleanup failed; trying again later")
            self.stopped.wait(self.config.heartbeat_seconds)


_heartbeat: HeartbeatThread | None = None


@signals.worker_init.connect
def _check_config(**_kwargs: Any) -> None:
    # Signal handlers' exceptions are only logged: SystemExit is what stops a
    # worker whose environment is wrong before it takes any work.
    try:
        AgentConfig.from_env()
    except RuntimeError as err:
        log.critical("agent refused to start: %s", err)
        raise SystemExit(f"themis agent: {err}") from None


@signals.worker_ready.connect
def _start_agent(**_kwargs: Any) -> None:
    """Heartbeat first (a long recovery must not look like a dead node), then
    engine recovery and the outcome of any job a crash interrupted. The worker
    consumes its queue only after worker_ready's handlers return (Celery sends
    the signal from the consumer's event loop set-up, before the loop runs),
    so no command runs before the node is whole again."""
    global _heartbeat
    config = AgentConfig.from_env()
    install_faults(config.faults)
    _heartbeat = HeartbeatThread(config)
    _heartbeat.start()
    recover_at_start(config)


@signals.worker_shutdown.connect
def _stop_heartbeat(**_kwargs: Any) -> None:
    if _heartbeat is not None:
        _heartbeat.stopped.set()


@app.task(name="agent.set_traffic_role", ignore_result=True)
def set_traffic_role(envelope: Any = None, **extra: Any) -> None:
    """Blue/green: record whether this node takes traffic, for its service and
    load balancer to read (the file sits next to the Raft status file)."""
    config = AgentConfig.from_env()
    command = open_command(config, CommandType.TRAFFIC_ROLE, envelope, extra)
    if command is None:
        return
    role = command.args.get("role")
    if role not in {"active", "standby"}:
        log.error("traffic role %r refused by %r", role, config.node_id)
        return
    write_json_atomic(config.state_dir / TRAFFIC_ROLE_FILE, {"role": role})
    send_heartbeat(config)


@app.task(name="agent.cancel", ignore_result=True)
def cancel_job(envelope: Any = None, **extra: Any) -> None:
    """The dashboard cancels a job it had sent. Not started here: it never will be (the
    ledger records it finished as cancelled, so a delivery of its command still in the
    queue applies nothing) and the answer says so. Started or finished: too late; the
    answer is the job's own progress or final report, and the job goes on."""
    config = AgentConfig.from_env()
    command = open_command(config, CommandType.CANCEL, envelope, extra)
    if command is None:
        return
    ledger = Ledger(config.state_dir)
    reporter = JobReporter(str(command.job_id), config.node_id, config.report_key, ledger=ledger)
    report = {
        "ok": False,
        "error_code": CANCELLED,
        "error_message": "cancelled by the dashboard before this agent started it",
        "result": {"installed_version": _installed(config.state_dir)},
    }
    claim = ledger.cancel(reporter.job_id, JobKind.APPLY, report)
    if claim.outcome is ClaimOutcome.BUSY:
        log.info("job %s: cancel refused, the job is under way here", reporter.job_id)
        reporter.step(IN_PROGRESS_STEP, 0)
        return
    assert claim.entry.report is not None
    if claim.outcome is ClaimOutcome.NEW:
        log.warning("job %s: cancelled before it started", reporter.job_id)
    reporter.resend(claim.entry.report)


@app.task(name="agent.heartbeat_now", ignore_result=True)
def heartbeat_now(envelope: Any = None, **extra: Any) -> None:
    """Health on demand: a heartbeat now. Signed like every command, or anyone on the
    broker could make every agent report at will."""
    config = AgentConfig.from_env()
    if open_command(config, CommandType.HEARTBEAT, envelope, extra) is not None:
        send_heartbeat(config)


class JobReporter:
    """Reports a job's steps and outcome back to the coordinator. A broker
    hiccup while reporting never breaks the update itself. With a ledger, the
    final report is recorded there (durably) before it is sent."""

    def __init__(
        self,
        job_id: str,
        node_id: str,
        key: bytes | None = None,
        *,
        ledger: Ledger | None = None,
        kind: JobKind = JobKind.APPLY,
        state_dir: Path | None = None,
    ) -> None:
        self.job_id, self.node_id, self.key = job_id, node_id, key
        self.ledger, self.kind = ledger, kind
        self.state_dir = (
            state_dir
            if state_dir is not None
            else (ledger.dir.parent if ledger is not None else None)
        )

    def _send(self, task: str, **kwargs: Any) -> None:
        try:
            send_report(
                task,
                {"job_id": self.job_id, "node_id": self.node_id, **kwargs},
                self.key,
                state_dir=self.state_dir,
            )
        except Exception:
            log.exception("job %s: could not report %s", self.job_id, task)

    def step(self, step: str, percent: int, detail: dict[str, Any] | None = None) -> None:
        self._send(PROGRESS_TASK, step=step, percent=percent)

    def download_progress(self) -> Any:
        """A throttled byte-progress callback: at most a report every half second.
        `report(done, total, rate=, eta=)`: rate in bytes/s and ETA in seconds go along
        when known (the job's live progress shows them)."""
        last = [0.0]

        def report(
            done: int, total: int, rate: float | None = None, eta: float | None = None
        ) -> None:
            now = time.monotonic()
            if now - last[0] < 0.5 and done != total:
                return
            last[0] = now
            percent = 2 + int(18 * done / total) if total else 2
            extra: dict[str, Any] = {}
            if rate is not None and math.isfinite(rate) and rate >= 0:
                extra["bytes_per_second"] = int(rate)
            if eta is not None and math.isfinite(eta) and eta >= 0:
                extra["eta_seconds"] = min(int(math.ceil(eta)), MAX_ETA_SECONDS)
            self._send(
                PROGRESS_TASK,
                step="DOWNLOADING",
                percent=percent,
                bytes_done=done,
                bytes_total=total,
                **extra,
            )

        return report

    def fetch_progress(self) -> Any:
        """download_progress for the parallel downloader's Progress snapshots."""
        report = self.download_progress()

        def on_progress(progress: Progress) -> None:
            report(progress.done, progress.total, rate=progress.rate, eta=progress.eta)

        return on_progress

    def finish(
        self,
        *,
        ok: bool,
        error: EngineError | Exception | None = None,
        result: dict[str, Any] | None = None,
        state_dir: Path | None = None,
        error_code: str = "",
    ) -> None:
        code = error_code or (getattr(error, "code", "UNEXPECTED") if error is not None else "")
        report = {
            "ok": ok,
            "error_code": code,
            "error_message": str(error) if error else "",
            "result": result or {},
        }
        if self.ledger is not None:
            self.ledger.finish(self.job_id, self.kind, report)
        if state_dir is not None:
            # Kept on disk and repeated in every heartbeat: a final report lost
            # with a dying coordinator still reaches the dashboard.
            write_json_atomic(state_dir / LAST_JOB_FILE, {"job_id": self.job_id, **report})
        self._send(FINISHED_TASK, **report)

    def resend(self, report: dict[str, Any]) -> None:
        """A finished job's stored final report, again (nothing is applied)."""
        log.info("job %s: finished before; re-sending its final report", self.job_id)
        self._send(FINISHED_TASK, **report)


def _installed(state_dir: Path) -> str | None:
    try:
        return load_state(state_dir).installed_version
    except (OSError, ValueError):
        return None


def _append_line(path: Path, record: dict[str, Any]) -> None:
    """One whole JSON line per event, durable (O_APPEND: writers never interleave)."""
    data = (json.dumps(record, sort_keys=True) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def _log_engine_start(config: AgentConfig, job_id: str, kind: JobKind) -> None:
    _append_line(
        config.state_dir / APPLIES_LOG, {"job": job_id, "kind": kind.value, "t": time.time()}
    )


def _admit(
    config: AgentConfig, reporter: JobReporter, kind: JobKind, target_version: str | None
) -> bool:
    """Whether this delivery of the command does the work. A repeat of a
    finished job re-sends its final report; of a running one, reports it in
    progress; of one a dead agent left RUNNING, settles its outcome."""
    assert reporter.ledger is not None
    claim = reporter.ledger.claim(
        reporter.job_id,
        kind,
        target_version=target_version,
        version_from=_installed(config.state_dir),
    )
    if claim.outcome is ClaimOutcome.FINISHED:
        assert claim.entry.report is not None
        reporter.resend(claim.entry.report)
        return False
    if claim.outcome is ClaimOutcome.BUSY:
        log.info("job %s: already in progress here; delivery answered", reporter.job_id)
        reporter.step(IN_PROGRESS_STEP, 0)
        return False
    if claim.outcome is ClaimOutcome.TAKEN_OVER:
        try:
            settle_interrupted(config, [claim.entry])
        finally:
            reporter.ledger.release(reporter.job_id)
        return False
    reporter.step(ACCEPTED_STEP, 1)
    return True


def _in_progress_elsewhere(config: AgentConfig, reporter: JobReporter) -> bool:
    """The engine lock is held: by this same job (a delivery whose ledger entry
    was lost), unless a live RUNNING entry of another job accounts for it."""
    assert reporter.ledger is not None
    holder = read_holder(config.state_dir).get("pid")
    for entry in reporter.ledger.running():
        if entry.job_id == reporter.job_id or entry.owner is None:
            continue
        if entry.owner.pid == holder and reporter.ledger.owner_alive(entry):
            return False
    return True


def recover_at_start(config: AgentConfig) -> list[str]:
    """Engine recovery, then the outcome of every job a dead agent left
    RUNNING; returns those job ids. Never raises: a worker must start."""
    ledger = Ledger(config.state_dir)
    interrupted: list[LedgerEntry] = []
    try:
        sweep_abandoned_parts(config.state_dir)  # a parts fetch the dead agent left
        interrupted = ledger.take_over_interrupted()
        settle_interrupted(config, interrupted)
        ledger.prune()
    except Exception:
        log.exception("start-up recovery failed")
    finally:
        for entry in interrupted:
            ledger.release(entry.job_id)
    return [entry.job_id for entry in interrupted]


def settle_interrupted(config: AgentConfig, entries: list[LedgerEntry]) -> None:
    """Run engine recovery (it finishes or undoes an interrupted apply), then
    report each job: ok if the node now runs its target version, else
    INTERRUPTED (the node is whole, on the version recovery left)."""
    ledger = Ledger(config.state_dir)
    try:
        recovered: dict[str, Any] = engine.recover(
            target=config.install_dir, state_dir=config.state_dir
        )
    except AlreadyInProgress as err:
        # Someone else (an operator's CLI) holds the node: decide later.
        log.warning("engine recovery deferred: %s", err)
        for entry in entries:
            ledger.release(entry.job_id)
            JobReporter(
                entry.job_id, config.node_id, config.report_key, state_dir=config.state_dir
            ).step(IN_PROGRESS_STEP, 0)
        return
    except EngineError as err:
        log.error("engine recovery failed: %s", err)
        for entry in entries:
            reporter = _reporter(config, entry.job_id, entry.kind)
            reporter.finish(ok=False, error=err, state_dir=config.state_dir)
        return
    if recovered.get("action", "none") != "none":
        log.warning("engine recovery at start: %s", recovered)
    for entry in entries:
        _settle_one(config, entry, recovered)


def _settle_one(config: AgentConfig, entry: LedgerEntry, recovered: dict[str, Any]) -> None:
    if entry.kind is JobKind.CONTRACT:
        # A contract cut short is run again: the migrator resumes or cleans up what was
        # under way, and skips the migrations already applied.
        log.warning("job %s: contract interrupted; running it again", entry.job_id)
        run_contract_job(config, _reporter(config, entry.job_id, entry.kind), entry.target_version)
        return
    installed = _installed(config.state_dir)
    if entry.target_version is not None:
        reached = installed == entry.target_version
    else:  # no target recorded: any change of version is this job's doing
        reached = installed is not None and installed != entry.version_from
    reporter = _reporter(config, entry.job_id, entry.kind)
    if entry.drained:
        _rejoin_quietly(config, reporter)
    recovery = recovered if recovered.get("action", "none") != "none" else None
    if reached:
        log.warning("job %s: interrupted after it took effect; reporting it done", entry.job_id)
        result = {
            "ok": True,
            "version_from": entry.version_from,
            "version_to": installed,
            "recovered": recovery,
            "settled_after_restart": True,
        }
        reporter.finish(ok=True, result=result, state_dir=config.state_dir)
        return
    message = (
        f"the agent stopped during this {entry.kind.value} and it did not take effect;"
        f" after engine recovery ({(recovery or {}).get('action', 'nothing to do')})"
        f" the node runs {installed}"
    )
    log.warning("job %s: %s", entry.job_id, message)
    reporter.finish(
        ok=False,
        error=RuntimeError(message),
        error_code=INTERRUPTED,
        result={
            "installed_version": installed,
            "version_from": entry.version_from,
            "recovered": recovery,
        },
        state_dir=config.state_dir,
    )


def _reporter(config: AgentConfig, job_id: str, kind: JobKind) -> JobReporter:
    return JobReporter(
        job_id, config.node_id, config.report_key, ledger=Ledger(config.state_dir), kind=kind
    )


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
def apply_release(envelope: Any = None, **extra: Any) -> None:
    """Fetch, verify and install a release bundle through the engine, reporting
    each step. The command must be signed with this node's key (open_command);
    the bundle's own signature is checked against this node's trust anchor.

    With `full_*` the bundle is a delta bundle: files whose base on this node
    is not the expected one come from the full bundle, fetched only then.

    Idempotent per job id (see the ledger): only the first delivery applies."""
    config = AgentConfig.from_env()
    command = open_command(config, CommandType.APPLY, envelope, extra)
    if command is None:
        return
    args = command.args
    job_id, node_id = str(command.job_id), config.node_id
    sha256 = str(args["sha256"])
    version = args.get("version")
    ledger = Ledger(config.state_dir)
    reporter = JobReporter(job_id, node_id, config.report_key, ledger=ledger, kind=JobKind.APPLY)
    if not _admit(config, reporter, JobKind.APPLY, version):
        return
    try:
        _apply_admitted(
            config,
            reporter,
            sha256=sha256,
            artifact_url=args.get("artifact_url"),
            download_token=str(args.get("download_token") or ""),
            size=args.get("size"),
            allow_downgrade=bool(args.get("allow_downgrade", False)),
            health_timeout=float(args.get("health_timeout") or 30),
            full_artifact_url=args.get("full_artifact_url"),
            full_sha256=str(args.get("full_sha256") or ""),
            full_size=args.get("full_size"),
            parts_url=args.get("parts_url"),
        )
    finally:
        ledger.release(job_id)
    send_heartbeat(config)


def _apply_admitted(
    config: AgentConfig,
    reporter: JobReporter,
    *,
    sha256: str,
    artifact_url: str | None,
    download_token: str,
    size: int | None,
    allow_downgrade: bool,
    health_timeout: float,
    full_artifact_url: str | None,
    full_sha256: str,
    full_size: int | None,
    parts_url: str | None = None,
) -> None:
    job_id = reporter.job_id
    assert reporter.ledger is not None
    reporter.step("PREFLIGHT", 2)
    downloaded: Path | None = None
    full: FullBundleFetch | None = None
    by_parts: PartsResult | None = None
    drained = False
    if full_artifact_url and full_sha256:
        full = FullBundleFetch(config, full_artifact_url, download_token, full_sha256, full_size)
    try:
        if parts_url and full is None:
            # Only the files this node lacks; any failure falls back to the whole bundle.
            by_parts = _fetch_parts(config, reporter, parts_url, download_token, allow_downgrade)
        if by_parts is not None:
            bundle = by_parts.staged.bundle
        elif artifact_url:
            downloaded = config.state_dir / "downloads" / f"{sha256}.bundle"
            downloaded.parent.mkdir(parents=True, exist_ok=True)
            try:
                fetch_bundle(
                    config, reporter, artifact_url, download_token, downloaded, sha256, size
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
        else:
            raise ManifestInvalid("job names no bundle to install")
        if config.drain_cmd:
            # Never drain a node whose engine is busy: that would be a second
            # drain while some apply runs.
            NodeLock(config.state_dir, command="probe").acquire().release()
            reporter.ledger.set_drained(job_id, True)
            drained = True
        run_hook(config.drain_cmd, "drain", reporter, "DRAINING", 3, state_dir=config.state_dir)
        _log_engine_start(config, job_id, JobKind.APPLY)
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
            verify_url=config.verify_url,
            keep=config.points_keep,
        )
        drained = False
        run_hook(config.rejoin_cmd, "rejoin", reporter, "REJOINING", 95, state_dir=config.state_dir)
    except AlreadyInProgress as err:
        if _in_progress_elsewhere(config, reporter):
            # The node's lock is held for this very job by a delivery this
            # ledger does not know of: it will report; this one must not fail it.
            log.warning("job %s: engine busy with it already (%s)", job_id, err)
            reporter.step(IN_PROGRESS_STEP, 0)
        else:
            reporter.finish(ok=False, error=err, state_dir=config.state_dir)
    except Exception as err:  # every failure is reported, with its engine code
        log.warning("job %s failed: %s", job_id, err)
        if drained and not isinstance(err, RecoveryNeeded | RestorePointCorrupt):
            # The engine put the old version back: the node can serve again.
            _rejoin_quietly(config, reporter)
        # What the engine found on the way (every verification check, say) goes along.
        details = dict(err.details) if isinstance(err, EngineError) else {}
        reporter.finish(ok=False, error=err, result=details, state_dir=config.state_dir)
    else:
        outcome = result.to_dict()
        if by_parts is not None:
            outcome["delivery"] = by_parts.to_dict()
        reporter.finish(ok=True, result=outcome, state_dir=config.state_dir)
    finally:
        if downloaded is not None:
            downloaded.unlink(missing_ok=True)
        if full is not None:
            full.cleanup()
        if by_parts is not None:
            by_parts.staged.discard_if_unused()


def _fetch_parts(
    config: AgentConfig,
    reporter: JobReporter,
    parts_url: str,
    token: str,
    allow_downgrade: bool,
) -> PartsResult | None:
    """The release staged from its parts, or None (logged) when that failed: the caller
    fetches the full bundle instead, and the engine verifies that one from scratch."""
    try:
        return fetch_by_parts(
            parts_url,
            token=token,
            state_dir=config.state_dir,
            target=config.install_dir,
            trust_anchor=config.trust_anchor,
            product=config.product,
            allow_downgrade=allow_downgrade,
            concurrency=config.download_concurrency,
            limit_bps=config.download_limit_bps,
            progress=reporter.fetch_progress(),
        )
    except (EngineError, requests.RequestException, OSError) as err:
        log.warning(
            "job %s: delivery by parts failed (%s); fetching the full bundle", reporter.job_id, err
        )
        return None


# Bundles at least this big come over several connections at once (when the server
# answers ranges).
SPLIT_BYTES = 32 << 20


def fetch_bundle(
    config: AgentConfig,
    reporter: JobReporter,
    url: str,
    token: str,
    dest: Path,
    sha256: str,
    size: int | None,
) -> None:
    """One bundle into `dest`, checked against `sha256`: over parallel ranges within the
    node's download limit when its size is known, resumable either way."""
    if size is None:
        download_resumable(url, token, dest, sha256=sha256, progress=reporter.download_progress())
        return
    downloader = ParallelDownloader(
        concurrency=config.download_concurrency,
        limit_bps=config.download_limit_bps,
        headers={"Authorization": f"Bearer {token}"},
        split_bytes=SPLIT_BYTES,
        progress=reporter.fetch_progress(),
    )
    task = DownloadTask(url=url, size=int(size), sha256=sha256.strip().lower(), dest=dest)
    downloader.run([task])


def _download_full(full: FullBundleFetch, reporter: JobReporter) -> Path:
    path = full.config.state_dir / "downloads" / f"{full.sha256}.bundle"
    fetch_bundle(full.config, reporter, full.url, full.token, path, full.sha256, full.size)
    return path


def run_hook(
    command: str | None,
    what: str,
    reporter: JobReporter,
    step: str,
    percent: int,
    *,
    state_dir: Path | None = None,
) -> None:
    """Drain before and rejoin after an update: the node's own commands. With
    a state dir, each drain (when it starts) and rejoin (when it has run) is
    logged to its drain log."""
    if not command:
        return
    reporter.step(step, percent)
    if state_dir is not None and what == "drain":
        _log_hook(state_dir, reporter, what, ok=None)
    result = subprocess.run(command, shell=True, capture_output=True, text=True, timeout=300)  # noqa: S602 - operator-configured command
    if state_dir is not None and what == "rejoin":
        _log_hook(state_dir, reporter, what, ok=result.returncode == 0)
    if result.returncode != 0:
        raise ApplyHookFailed(
            f"{what} command failed ({result.returncode}): {result.stderr.strip()[:200]}"
        )


def _log_hook(state_dir: Path, reporter: JobReporter, event: str, *, ok: bool | None) -> None:
    record: dict[str, Any] = {
        "node": reporter.node_id,
        "job": reporter.job_id,
        "event": event,
        "t": time.time(),
    }
    if ok is not None:
        record["ok"] = ok
    try:
        _append_line(state_dir / DRAIN_LOG, record)
    except OSError:
        log.exception("could not log %s of job %s", event, reporter.job_id)


def _rejoin_quietly(config: AgentConfig, reporter: JobReporter) -> None:
    """Rejoin a node a failed or interrupted job left drained; a failure is
    logged, the job's own outcome is what gets reported."""
    try:
        run_hook(config.rejoin_cmd, "rejoin", reporter, "REJOINING", 95, state_dir=config.state_dir)
    except Exception:
        log.exception("job %s: rejoin after the job failed", reporter.job_id)
    if reporter.ledger is not None:
        reporter.ledger.set_drained(reporter.job_id, False)


class ApplyHookFailed(EngineError):
    code = "HOOK_FAILED"


def _rollback_target(state_dir: Path, point_id: str | None) -> str | None:
    """The version a rollback would restore (None when no point leads there)."""
    try:
        points = engine.list_points(state_dir)
    except (OSError, ValueError, EngineError):
        return None
    if point_id is not None:
        chosen = [p for p in points if p.get("id") == point_id]
    else:
        installed = _installed(state_dir)
        chosen = [p for p in points if p.get("to_version") == installed and installed][-1:]
    version = chosen[0].get("version") if chosen else None
    return version if isinstance(version, str) else None


@app.task(name="agent.rollback", ignore_result=True, acks_late=True)
def rollback_node(envelope: Any = None, **extra: Any) -> None:
    config = AgentConfig.from_env()
    command = open_command(config, CommandType.ROLLBACK, envelope, extra)
    if command is None:
        return
    job_id, node_id = str(command.job_id), config.node_id
    point = command.args.get("point_id")
    point_id = str(point) if point else None
    ledger = Ledger(config.state_dir)
    reporter = JobReporter(job_id, node_id, config.report_key, ledger=ledger, kind=JobKind.ROLLBACK)
    target = _rollback_target(config.state_dir, point_id)
    if not _admit(config, reporter, JobKind.ROLLBACK, target):
        return
    try:
        reporter.step("RESTORE_POINT", 10)
        try:
            _log_engine_start(config, job_id, JobKind.ROLLBACK)
            result = engine.rollback(
                target=config.install_dir,
                state_dir=config.state_dir,
                point_id=point_id,
                progress=reporter.step,
            )
        except AlreadyInProgress as err:
            if _in_progress_elsewhere(config, reporter):
                log.warning("rollback job %s: engine busy with it already (%s)", job_id, err)
                reporter.step(IN_PROGRESS_STEP, 0)
            else:
                reporter.finish(ok=False, error=err, state_dir=config.state_dir)
        except Exception as err:
            log.warning("rollback job %s failed: %s", job_id, err)
            reporter.finish(ok=False, error=err, state_dir=config.state_dir)
        else:
            reporter.finish(ok=True, result=result, state_dir=config.state_dir)
    finally:
        ledger.release(job_id)
    send_heartbeat(config)


class ContractRefused(EngineError):
    """The dashboard asked for another release's contract than the one installed here."""

    code = "CONTRACT_REFUSED"


@app.task(name="agent.contract", ignore_result=True, acks_late=True)
def contract_schema(envelope: Any = None, **extra: Any) -> None:
    """Expand/contract: the installed release's contract migrations, and the column drops
    whose grace ended, once the dashboard found every node of the cluster on that release.
    Signed like every command; refused for any release but the one this node runs; under
    the node lock (never beside an apply); idempotent per job id (the ledger), and the
    migrator skips what it applied already."""
    config = AgentConfig.from_env()
    command = open_command(config, CommandType.CONTRACT, envelope, extra)
    if command is None:
        return
    version = str(command.args["version"])
    ledger = Ledger(config.state_dir)
    reporter = JobReporter(
        str(command.job_id), config.node_id, config.report_key, ledger=ledger, kind=JobKind.CONTRACT
    )
    if not _admit(config, reporter, JobKind.CONTRACT, version):
        return
    try:
        run_contract_job(config, reporter, version)
    finally:
        ledger.release(reporter.job_id)
    send_heartbeat(config)


def run_contract_job(config: AgentConfig, reporter: JobReporter, version: str | None) -> None:
    """Run the contract and report its end (the job's final report, through the ledger)."""
    installed = _installed(config.state_dir)
    if not version or installed != version:
        refused = ContractRefused(
            f"this node runs {installed or 'no release'}, not {version or '(none named)'}:"
            " its contract migrations are not run"
        )
        reporter.finish(
            ok=False,
            error=refused,
            result={"installed_version": installed},
            state_dir=config.state_dir,
        )
        return
    reporter.step("CONTRACTING", 10)
    try:
        _log_engine_start(config, reporter.job_id, JobKind.CONTRACT)
        with NodeLock(config.state_dir, command="contract"):
            result = run_contract(config.install_dir, config.state_dir)
    except AlreadyInProgress as err:
        if _in_progress_elsewhere(config, reporter):
            log.warning("contract job %s: engine busy with it already (%s)", reporter.job_id, err)
            reporter.step(IN_PROGRESS_STEP, 0)
        else:
            reporter.finish(ok=False, error=err, state_dir=config.state_dir)
    except Exception as err:  # every failure is reported, with its engine code
        log.warning("contract job %s failed: %s", reporter.job_id, err)
        details = dict(err.details) if isinstance(err, EngineError) else {}
        reporter.finish(ok=False, error=err, result=details, state_dir=config.state_dir)
    else:
        reporter.finish(
            ok=True, result={**result, "version": installed}, state_dir=config.state_dir
        )
