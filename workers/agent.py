"""The node agent: a Celery worker on queue `node.<id>` without database access.

It learns who it is from its environment, reports a heartbeat to the
`dashboard` queue every few seconds from a thread of the worker's main process
(so long tasks in the pool never silence it), and runs node-side work through
the engine. Nothing here imports Django.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import platform
import signal
import subprocess
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import psutil
import requests
from celery import signals

from themis_dashboard.celery import app
from updates.engine import apply as engine
from updates.engine.bundle import verify_bundle
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
from updates.engine.journal import RESTORE_POINT as RESTORE_POINT_STEP
from updates.engine.lock import NodeLock, read_holder
from updates.engine.parts import HEAD_DIR, sweep_abandoned_parts
from updates.engine.preflight import preflight
from updates.engine.reports import HEARTBEAT_QUEUE, ReportSequence, ReportType, sign_report
from updates.engine.restore import points_disk_usage, points_root
from updates.engine.retention import Retention, cleanup_points, parse_duration, parse_size
from updates.engine.schema import node_database_url, run_contract, schema_status
from updates.engine.state import load_state, write_json_atomic
from updates.engine.truststore import (
    TRUST_STORE_FILE,
    install_trust_store,
    trust_store_version,
)
from workers.components import ENV_VAR as COMPONENTS_ENV_VAR
from workers.components import Component, parse_components
from workers.download import DownloadCorrupt, DownloadFailed, download_resumable
from workers.faults import ENV_VAR as FAULTS_ENV_VAR
from workers.faults import Fault, FaultInjector, FaultSpec
from workers.fetch import DownloadTask, ParallelDownloader, Progress
from workers.ledger import ClaimOutcome, EntryState, JobKind, Ledger, LedgerEntry, valid_job_id
from workers.parts import PartsResult, fetch_by_parts
from workers.plan import (
    JournalStep,
    PlanInvalid,
    PlanJournal,
    PlanOutcome,
    PlanStep,
    StepState,
    parse_plan,
)

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
# and that no job was applied twice (to the same component: a plan applies one job
# to several).
DRAIN_LOG = "drain.log"
APPLIES_LOG = "applies.log"
# The agent died mid-job; engine recovery has since made the node whole again.
INTERRUPTED = "INTERRUPTED"
# The final report for a job cancelled before this agent started it.
CANCELLED = "CANCELLED"
ACCEPTED_STEP = "ACCEPTED"
# A download's ETA is reported up to this (a stalled one would otherwise say "forever").
MAX_ETA_SECONDS = 30 * 24 * 3600
# A drain or rejoin command that has not ended by then fails its job: with whatever it
# started (its whole process group) killed, so no leftover holds its output open.
HOOK_TIMEOUT_SECONDS = 300.0
# What of a failed hook's error output its report quotes.
HOOK_STDERR_CHARS = 200
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
    # The node's components besides the primary one (THEMIS_COMPONENTS): each its own
    # product, install dir and state dir, updated together with it by a plan.
    components: tuple[Component, ...] = ()

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
        health_cmd = env.get("THEMIS_HEALTH_CMD") or None
        health_url = env.get("THEMIS_HEALTH_URL") or None
        product = env.get("THEMIS_PRODUCT", "themisdb")
        primary = Component(product, install_dir, state_dir, health_cmd, health_url)
        return cls(
            node_id,
            install_dir,
            state_dir,
            status_file,
            seconds,
            trust_anchor=Path(env.get("THEMIS_TRUST_ANCHOR", str(cls.trust_anchor))),
            health_cmd=health_cmd,
            health_url=health_url,
            product=product,
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
            components=parse_components(env.get(COMPONENTS_ENV_VAR), primary),
        )

    @property
    def retention(self) -> Retention:
        return Retention(self.points_keep, self.points_max_age, self.points_max_bytes)

    @property
    def primary(self) -> Component:
        """The primary component: the server, in the agent's own install and state dir."""
        return Component(
            self.product, self.install_dir, self.state_dir, self.health_cmd, self.health_url
        )

    @property
    def all_components(self) -> tuple[Component, ...]:
        """Every component of the node, the primary one first."""
        return (self.primary, *self.components)

    def installed_components(self) -> dict[str, str]:
        """product -> installed version, for the components installed (dependency checks)."""
        found = {c.product: c.installed_version() for c in self.all_components}
        return {product: version for product, version in found.items() if version}


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


@functools.cache
def host_inventory() -> dict[str, str | int]:
    """The host as this process sees it, read once (it does not change under a running
    agent): OS, kernel, architecture, CPUs, memory, the Python the agent runs on."""
    try:
        os_name = platform.freedesktop_os_release().get("PRETTY_NAME", "")
    except OSError:
        os_name = ""
    return {
        "os": (os_name or f"{platform.system()} {platform.release()}")[:128],
        "kernel": platform.release()[:128],
        "arch": platform.machine()[:32],
        "cpus": min(max(os.cpu_count() or 1, 1), 4096),
        "memory_total_bytes": int(psutil.virtual_memory().total),
        "python": platform.python_version()[:32],
    }


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
        # Every component with its version ("" never installed), the primary one first.
        "components": [
            {"product": config.product, "version": installed},
            *(
                {"product": c.product, "version": c.installed_version() or ""}
                for c in config.components
            ),
        ],
        "raft_role": read_raft_role(config.status_file),
        "disk_free_bytes": disk.free,
        "disk_total_bytes": disk.total,
        "memory_available_bytes": psutil.virtual_memory().available,
        "load_1m": os.getloadavg()[0],
        "inventory": host_inventory(),
        "restore_points": _restore_points(config.state_dir),
        "restore_points_bytes": _restore_points_bytes(config.state_dir),
        **read_service_metrics(config.metrics_file),
        "last_job": _last_job(config.state_dir),
        "active_job_id": _active_job_id(config.state_dir),
        "traffic_role": read_traffic_role(config.state_dir),
        # The installed trust store's version (0: the bootstrap anchor, -1: unreadable).
        "trust_store_version": _trust_store_version(config.state_dir),
        **_schema_field(config.state_dir),
    }


# state dir -> (the trust store file's identity and times, the version read from it)
_trust_store_cache: dict[str, tuple[tuple[int, ...] | None, int]] = {}


def _trust_store_version(state_dir: Path) -> int:
    """The installed trust store's version for the heartbeat, read again (its roots parsed)
    only when the file changed: a store is replaced by rename, which gives a new inode."""
    try:
        st = (state_dir / TRUST_STORE_FILE).stat()
        stamp: tuple[int, ...] | None = (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    except OSError:
        stamp = None
    cached = _trust_store_cache.get(str(state_dir))
    if cached is not None and cached[0] == stamp:
        return cached[1]
    version = trust_store_version(state_dir)
    _trust_store_cache[str(state_dir)] = (stamp, version)
    return version


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
    """The periodic retention (config.retention) of every component's restore points:
    the deleted point ids, or None when it had to wait for another round (a job runs,
    or the engine is busy on a component). It holds the ledger's lock throughout, so no
    job of this agent starts meanwhile and none finds a node lock taken by it."""
    holding = [c for c in config.all_components if points_root(c.state_dir).is_dir()]
    if not holding:
        return []
    deleted: list[str] = []
    with Ledger(config.state_dir).while_idle() as idle:
        if not idle:
            return None
        for component in holding:
            try:
                pruned = cleanup_points(component.state_dir, config.retention)
            except AlreadyInProgress:
                return None  # an operator's command on the node, say
            if pruned:
                log.info("%s restore points pruned: %s", component.product, ", ".join(pruned))
            deleted += pruned
    return deleted


# One sequence per state dir, shared by every thread of the process; reports are
# numbered and published under one lock, so the broker sees them in order.
_sequences: dict[str, ReportSequence] = {}
_send_lock = threading.Lock()


def report_sequence(state_dir: Path | None) -> ReportSequence | None:
    if state_dir is None:
        return None
    with _send_lock:
        # By the file itself: two spellings of one state dir must share one sequence.
        path = str((state_dir / SEQUENCE_FILE).resolve())
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
        # Heartbeats on a queue of their own: taken in batches, and never ahead of a job's reports.
        queue = HEARTBEAT_QUEUE if task == HEARTBEAT_TASK else "dashboard"
        app.send_task(task, kwargs=kwargs, queue=queue)
        if fault is Fault.DUPLICATE:
            app.send_task(task, kwargs=kwargs, queue=queue)


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
    "plan": (list,),
    "point_id": (str,),
    "role": (str,),
    "store_version": (int,),
    "store": (str,),
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


@app.task(name="agent.install_trust_store", ignore_result=True)
def install_trust_store_command(envelope: Any = None, **extra: Any) -> None:
    """The dashboard offers a newer trust store. The command's signature says it comes
    from the dashboard; the store's own says who may change this node's trust: it is
    taken only if signed under what the node trusts now, newer and unexpired, else it is
    refused with nothing written. The next heartbeat reports the version installed."""
    config = AgentConfig.from_env()
    command = open_command(config, CommandType.TRUST_STORE, envelope, extra)
    if command is None:
        return
    store = command.args.get("store")
    try:
        installed = install_trust_store(
            config.state_dir, str(store or "").encode(), anchor=config.trust_anchor
        )
    except EngineError as err:
        log.error("trust store refused by %s: %s: %s", config.node_id, err.code, err)
    else:
        log.info("trust store version %s installed on %s", installed.version, config.node_id)
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


@dataclass(frozen=True)
class PlanPosition:
    """The step of a plan that runs: `text` is "step 2 of 3: downloading themis-query 1.4.5"."""

    index: int  # 1-based
    count: int
    text: str

    def percent(self, percent: int) -> int:
        """A step's own percent as the whole plan's."""
        return ((self.index - 1) * 100 + max(0, min(100, percent))) // self.count


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
        # Within a plan: which step runs (its progress reports say so).
        self.position: PlanPosition | None = None
        self.state_dir = (
            state_dir
            if state_dir is not None
            else (ledger.dir.parent if ledger is not None else None)
        )

    def _send(self, task: str, **kwargs: Any) -> None:
        if task == PROGRESS_TASK and self.position is not None:
            kwargs["percent"] = self.position.percent(int(kwargs.get("percent", 0)))
            kwargs["plan_step"] = self.position.text
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


def _log_engine_start(
    config: AgentConfig, job_id: str, kind: JobKind, product: str | None = None
) -> None:
    """One line per engine run; a plan's steps each name their component (one job, one
    apply per component)."""
    record = {"job": job_id, "kind": kind.value, "product": product or config.product}
    _append_line(config.state_dir / APPLIES_LOG, {**record, "t": time.time()})


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
    entries = settle_plan(config, entries)
    try:
        recovered: dict[str, Any] = engine.recover(
            target=config.install_dir, state_dir=config.state_dir
        )
    except AlreadyInProgress as err:
        # Someone else (an operator's CLI) holds the node: decide later. The callers let go
        # of the entries, so the next start or delivery takes them up again.
        log.warning("engine recovery deferred: %s", err)
        for entry in entries:
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
    # What recovery did, for the reports; None when it had nothing to do.
    recovery = recovered if recovered.get("action", "none") != "none" else None
    if recovery is not None:
        log.warning("engine recovery at start: %s", recovery)
    for entry in entries:
        _settle_one(config, entry, recovery)


def _settle_one(config: AgentConfig, entry: LedgerEntry, recovery: dict[str, Any] | None) -> None:
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


def bundle_download_path(state_dir: Path, sha256: str) -> Path:
    """Where a bundle is downloaded to (its folder made): beside the head-only bundles of
    a parts fetch, in the one downloads folder of the state dir."""
    folder = state_dir / HEAD_DIR
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"{sha256}.bundle"


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
            path = bundle_download_path(self.config.state_dir, self.sha256)
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

    With `plan` it is a multi-component update: the plan's bundles go on in order,
    each into its own component, all or none (run_plan).

    Idempotent per job id (see the ledger): only the first delivery applies."""
    config = AgentConfig.from_env()
    command = open_command(config, CommandType.APPLY, envelope, extra)
    if command is None:
        return
    args = command.args
    job_id, node_id = str(command.job_id), config.node_id
    version = args.get("version")
    ledger = Ledger(config.state_dir)
    reporter = JobReporter(job_id, node_id, config.report_key, ledger=ledger, kind=JobKind.APPLY)
    # A plan's target may be another component than the primary one, whose version is what
    # an interrupted job is judged by: a plan cut short is settled by its own journal,
    # and before that journal exists nothing was applied (no target: any change counts).
    target = None if args.get("plan") is not None else version
    if not _admit(config, reporter, JobKind.APPLY, target):
        return
    options = ApplyOptions(
        download_token=str(args.get("download_token") or ""),
        allow_downgrade=bool(args.get("allow_downgrade", False)),
        health_timeout=float(args.get("health_timeout") or 30),
    )
    try:
        if args.get("plan") is not None:
            run_plan(config, reporter, args["plan"], options)
        else:
            _apply_admitted(config, reporter, BundleSource.from_args(args), options)
    finally:
        ledger.release(job_id)
    send_heartbeat(config)


@dataclass(frozen=True)
class ApplyOptions:
    """What every bundle of one apply job is installed with."""

    download_token: str
    allow_downgrade: bool = False
    health_timeout: float = 30.0


@dataclass(frozen=True)
class BundleSource:
    """Where one bundle comes from: the command's keys, or a plan step's."""

    sha256: str
    artifact_url: str | None
    size: int | None
    full_artifact_url: str | None = None
    full_sha256: str = ""
    full_size: int | None = None
    # Delivery by parts (the primary component only): the files this node lacks.
    parts_url: str | None = None

    @classmethod
    def from_args(cls, args: dict[str, Any]) -> BundleSource:
        return cls(
            sha256=str(args["sha256"]),
            artifact_url=args.get("artifact_url"),
            size=args.get("size"),
            full_artifact_url=args.get("full_artifact_url"),
            full_sha256=str(args.get("full_sha256") or ""),
            full_size=args.get("full_size"),
            parts_url=args.get("parts_url"),
        )


@dataclass
class FetchedBundle:
    """One bundle on this node, ready for the engine, and what to clean up after it."""

    path: Path | None = None
    downloaded: Path | None = None
    full: FullBundleFetch | None = None
    by_parts: PartsResult | None = None

    @property
    def bundle(self) -> Path:
        assert self.path is not None
        return self.path

    def cleanup(self) -> None:
        if self.downloaded is not None:
            self.downloaded.unlink(missing_ok=True)
        if self.full is not None:
            self.full.cleanup()
        if self.by_parts is not None:
            self.by_parts.staged.discard_if_unused()


@contextlib.contextmanager
def fetched_bundle(
    config: AgentConfig, reporter: JobReporter, source: BundleSource, options: ApplyOptions
) -> Iterator[FetchedBundle]:
    """The bundle of `source` on disk (by parts, the delta or the full bundle), removed
    again when the block ends, however it ends."""
    fetched = FetchedBundle()
    token = options.download_token
    if source.full_artifact_url and source.full_sha256:
        fetched.full = FullBundleFetch(
            config, source.full_artifact_url, token, source.full_sha256, source.full_size
        )
    try:
        if source.parts_url and fetched.full is None:
            # Only the files this node lacks; any failure falls back to the whole bundle.
            fetched.by_parts = _fetch_parts(
                config, reporter, source.parts_url, token, options.allow_downgrade
            )
        if fetched.by_parts is not None:
            fetched.path = fetched.by_parts.staged.bundle
        elif source.artifact_url:
            fetched.path = _download(config, reporter, source, token, fetched)
        else:
            raise ManifestInvalid("job names no bundle to install")
        yield fetched
    finally:
        fetched.cleanup()


def _download(
    config: AgentConfig,
    reporter: JobReporter,
    source: BundleSource,
    token: str,
    fetched: FetchedBundle,
) -> Path:
    assert source.artifact_url is not None
    fetched.downloaded = bundle_download_path(config.state_dir, source.sha256)
    try:
        fetch_bundle(
            config,
            reporter,
            source.artifact_url,
            token,
            fetched.downloaded,
            source.sha256,
            source.size,
        )
    except (DownloadFailed, DownloadCorrupt) as err:
        if fetched.full is None:
            raise
        # The delta is gone or damaged: the full bundle does the job
        # (a job that is over is refused that one too).
        job_id = reporter.job_id
        log.warning("job %s: delta download failed (%s); using the full bundle", job_id, err)
        fetched.downloaded, fetched.full = _download_full(fetched.full, reporter), None
    return fetched.downloaded


def _mark_drained(config: AgentConfig, reporter: JobReporter, state_dirs: list[Path]) -> bool:
    """Before the drain hook: whether the node will be drained (and so must be rejoined
    if the job fails), recorded in the ledger. Never drain a node whose engine is busy
    (any component's): that would be a second drain while some apply runs."""
    if not config.drain_cmd:
        return False
    for state_dir in state_dirs:
        NodeLock(state_dir, command="probe").acquire().release()
    assert reporter.ledger is not None
    reporter.ledger.set_drained(reporter.job_id, True)
    return True


def install_bundle(
    config: AgentConfig,
    reporter: JobReporter,
    component: Component,
    fetched: FetchedBundle,
    options: ApplyOptions,
    progress: engine.ProgressFn | None = None,
) -> engine.ApplyResult:
    """One bundle into one component through the engine (pre-flight with the node's
    components, lock, restore point, atomic switch, health check, rollback on failure)."""
    _log_engine_start(config, reporter.job_id, JobKind.APPLY, component.product)
    return engine.apply_bundle(
        fetched.bundle,
        target=component.install_dir,
        state_dir=component.state_dir,
        trust_anchor=config.trust_anchor,
        health_cmd=component.health_cmd,
        health_url=component.health_url,
        health_timeout=options.health_timeout,
        allow_downgrade=options.allow_downgrade,
        product=component.product,
        progress=progress or reporter.step,
        rebuild_deltas=delta_rebuilder(fetched.full) if fetched.full is not None else None,
        # The service the checks reach is the primary's; the others' come from their
        # own supervisor, if any.
        verify_url=config.verify_url if component == config.primary else None,
        keep=config.points_keep,
        components=config.installed_components(),
    )


def _apply_admitted(
    config: AgentConfig, reporter: JobReporter, source: BundleSource, options: ApplyOptions
) -> None:
    job_id = reporter.job_id
    reporter.step("PREFLIGHT", 2)
    drained = False
    delivery: dict[str, Any] | None = None
    try:
        with fetched_bundle(config, reporter, source, options) as fetched:
            drained = _mark_drained(config, reporter, [config.state_dir])
            run_hook(config.drain_cmd, "drain", reporter, "DRAINING", 3, state_dir=config.state_dir)
            result = install_bundle(config, reporter, config.primary, fetched, options)
            drained = False
            if fetched.by_parts is not None:
                delivery = fetched.by_parts.to_dict()
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
        if delivery is not None:
            outcome["delivery"] = delivery
        reporter.finish(ok=True, result=outcome, state_dir=config.state_dir)


# ------------------------------------------------------------ multi-component plans


def run_plan(config: AgentConfig, reporter: JobReporter, plan: Any, options: ApplyOptions) -> None:
    """A multi-component update (workers/plan.py): the plan's bundles into their
    components in order, all or none. Every bundle is fetched and verified, and every
    step's dependencies checked against the components as the steps before it leave
    them, before anything is written; a failed step is undone by the engine and every
    step before it rolled back, newest first. The final report names the failed step."""
    components = {c.product: c for c in config.all_components}
    try:
        steps = parse_plan(plan, components)
    except PlanInvalid as err:
        log.warning("job %s: plan refused: %s", reporter.job_id, err)
        reporter.finish(ok=False, error=err, state_dir=config.state_dir)
        return
    PlanRun(config, reporter, options, [(s, components[s.product]) for s in steps]).execute()


@dataclass
class PlanRun:
    """One plan job's state while it runs."""

    config: AgentConfig
    reporter: JobReporter
    options: ApplyOptions
    steps: list[tuple[PlanStep, Component]]
    current: int = 0  # 0-based: the step being fetched, checked or applied
    journal: PlanJournal | None = None
    drained: bool = False

    @property
    def count(self) -> int:
        return len(self.steps)

    def label(self, index: int) -> str:
        return self.steps[index][0].label(index + 1, self.count)

    def at(self, index: int, doing: str) -> None:
        """Progress reports from here on say which step runs and what it does."""
        step = self.steps[index][0]
        text = f"step {index + 1} of {self.count}: {doing} {step.product} {step.version}"
        self.reporter.position = PlanPosition(index + 1, self.count, text)

    def execute(self) -> None:
        self.reporter.step("PREFLIGHT", 2)
        try:
            self._run_steps()
        except Exception as err:  # every failure is reported, after the undo
            self._failed(err)
            return
        finally:
            self.reporter.position = None
        assert self.journal is not None
        self.journal.close(PlanOutcome.DONE)  # from here on the plan stands, as a whole
        self.drained = False
        try:
            self._hook("rejoin")
        except Exception as err:  # as after a single update: reported, nothing undone
            self._finish(ok=False, error=err, result={"plan": self.journal.states()})
        else:
            self._finish(ok=True, result={"plan": self.journal.states()})

    def _run_steps(self) -> None:
        with contextlib.ExitStack() as stack:
            fetched = [stack.enter_context(self._fetch(i)) for i in range(self.count)]
            self._preflight(fetched)
            self.current = 0
            self.drained = _mark_drained(
                self.config, self.reporter, [c.state_dir for _, c in self.steps]
            )
            self.journal = PlanJournal.begin(
                self.config.state_dir, self.reporter.job_id, self._journal_steps()
            )
            # The drain is the node's, not the last fetched step's: reported as itself.
            self.reporter.position = None
            self._hook("drain")
            for index, bundle in enumerate(fetched):
                self._apply(index, bundle)

    def _hook(self, what: str) -> None:
        """The node's drain (before the first step) or rejoin (after the last) command."""
        config = self.config
        if what == "drain":
            run_hook(
                config.drain_cmd, what, self.reporter, "DRAINING", 3, state_dir=config.state_dir
            )
        else:
            run_hook(
                config.rejoin_cmd, what, self.reporter, "REJOINING", 95, state_dir=config.state_dir
            )

    @contextlib.contextmanager
    def _fetch(self, index: int) -> Iterator[FetchedBundle]:
        self.current = index
        step = self.steps[index][0]
        self.at(index, "downloading")
        source = BundleSource(step.sha256, step.artifact_url, step.size)
        with fetched_bundle(self.config, self.reporter, source, self.options) as fetched:
            yield fetched

    def _preflight(self, fetched: list[FetchedBundle]) -> None:
        """Every bundle verified in full (signature, product, version rule, payload) and
        pre-flighted (disk, memory, minimum version, and its dependencies against the
        components as the steps before it leave them): a plan that cannot finish is
        refused before its first step."""
        installed = self.config.installed_components()
        for index, ((step, component), bundle) in enumerate(zip(self.steps, fetched, strict=True)):
            self.current = index  # what a refusal names ("step 2 of 3 (themis-query 1.1)")
            manifest = verify_bundle(
                bundle.bundle,
                trust_anchor=self.config.trust_anchor,
                product=component.product,
                state_dir=component.state_dir,
                allow_downgrade=self.options.allow_downgrade,
            ).manifest
            if manifest.version != step.version:
                raise ManifestInvalid(f"the bundle is {manifest.product} {manifest.version}")
            preflight(
                bundle.bundle,
                target=component.install_dir,
                state_dir=component.state_dir,
                components=installed,
                manifest=manifest,
            ).raise_if_failed()
            installed[step.product] = step.version

    def _journal_steps(self) -> list[JournalStep]:
        steps = []
        for step, component in self.steps:
            before = load_state(component.state_dir)
            steps.append(
                JournalStep(
                    product=step.product,
                    version=step.version,
                    install_dir=str(component.install_dir.absolute()),
                    state_dir=str(component.state_dir.absolute()),
                    version_from=before.installed_version,
                    highest_from=before.highest_version,
                )
            )
        return steps

    def _apply(self, index: int, bundle: FetchedBundle) -> None:
        assert self.journal is not None
        self.current = index
        self.at(index, "installing")
        self.journal.mark(index, StepState.APPLYING)
        try:
            install_bundle(
                self.config,
                self.reporter,
                self.steps[index][1],
                bundle,
                self.options,
                progress=self._progress(index),
            )
        except BaseException:
            # The engine put the old version back (or left its journal for recover).
            self.journal.mark(index, StepState.FAILED)
            raise
        self.journal.mark(index, StepState.APPLIED)

    def _progress(self, index: int) -> engine.ProgressFn:
        """The engine's progress, reported; the restore point it made is journaled (what
        an undo of this step restores)."""
        journal = self.journal
        assert journal is not None

        def progress(step: str, percent: int, detail: dict[str, Any]) -> None:
            point = detail.get("point_id")
            if step == RESTORE_POINT_STEP and isinstance(point, str):
                journal.mark(index, StepState.APPLYING, point_id=point)
            self.reporter.step(step, percent, detail)

        return progress

    def _failed(self, err: Exception) -> None:
        log.warning("job %s: %s failed: %s", self.reporter.job_id, self.label(self.current), err)
        undo_errors: list[str] = []
        if self.journal is not None:
            undo_errors = undo_plan(self.config, self.reporter, self.journal)
        whole = not undo_errors and not isinstance(err, RecoveryNeeded | RestorePointCorrupt)
        if self.drained and whole:
            _rejoin_quietly(self.config, self.reporter)
        result: dict[str, Any] = {"plan": self._states(), "failed_step": self.current + 1}
        if isinstance(err, EngineError) and err.details:
            result["step_details"] = dict(err.details)
        if undo_errors:
            result["undo_errors"] = undo_errors
        code = getattr(err, "code", "UNEXPECTED")
        message = RuntimeError(f"{self.label(self.current)}: {err}")
        if self.journal is not None and not undo_errors:
            self.journal.close(PlanOutcome.UNDONE)
        keep = bool(undo_errors)
        self._finish(ok=False, error=message, error_code=code, result=result, keep=keep)

    def _states(self) -> list[dict[str, str]]:
        """The plan's steps for a failure report."""
        if self.journal is not None:
            return self.journal.states()
        # Nothing was applied: the step that failed its download or check, the others
        # never started.
        return [
            {
                "product": step.product,
                "version": step.version,
                "state": (StepState.FAILED if i == self.current else StepState.NOT_STARTED).value,
            }
            for i, (step, _) in enumerate(self.steps)
        ]

    def _finish(
        self,
        *,
        ok: bool,
        result: dict[str, Any],
        error: Exception | None = None,
        error_code: str = "",
        keep: bool = False,
    ) -> None:
        """The final report, recorded in the ledger; then the journal goes, unless an
        undo did not finish (start-up recovery tries again)."""
        state_dir = self.config.state_dir
        self.reporter.finish(
            ok=ok, error=error, error_code=error_code, result=result, state_dir=state_dir
        )
        if self.journal is not None and not keep:
            self.journal.remove()


def undo_plan(config: AgentConfig, reporter: JobReporter, journal: PlanJournal) -> list[str]:
    """Every step the journal holds as begun, newest first, back to its old version:
    the engine's recover finishes or undoes whatever it was doing on that component, and
    a step that took effect is rolled back to the restore point its apply made. Returns
    one message per step that could not be undone (none: the node is whole again); the
    journal keeps each step's new state."""
    errors: list[str] = []
    for index in reversed(range(len(journal.steps))):
        step = journal.steps[index]
        if step.state is StepState.NOT_STARTED:
            continue
        reporter.position = PlanPosition(
            index + 1,
            len(journal.steps),
            f"step {index + 1} of {len(journal.steps)}: rolling back {step.product} {step.version}",
        )
        try:
            _undo_step(config, journal, index, reporter.step)
        except Exception as err:  # the others are still undone; this one is reported
            log.exception("job %s: undo of %s failed", journal.job_id, step.product)
            errors.append(f"{step.product} {step.version}: {err}")
    reporter.position = None
    return errors


def _undo_step(
    config: AgentConfig, journal: PlanJournal, index: int, progress: engine.ProgressFn
) -> None:
    step = journal.steps[index]
    engine.recover(target=step.target, state_dir=step.state_path)
    installed = load_state(step.state_path).installed_version
    if installed == step.version and installed != step.version_from:
        _log_engine_start(config, journal.job_id, JobKind.ROLLBACK, step.product)
        engine.rollback(
            target=step.target,
            state_dir=step.state_path,
            point_id=step.point_id,
            # Back to the rollback protection it had, when the plan raised it.
            lower_highest=step.highest_from == step.version_from,
            progress=progress,
        )
    if step.state is not StepState.FAILED:
        journal.mark(index, StepState.ROLLED_BACK)


def settle_plan(config: AgentConfig, entries: list[LedgerEntry]) -> list[LedgerEntry]:
    """A plan journal a dead agent left (start-up recovery, or a redelivery of its job
    taking it over): every step it had begun goes back to its old version, newest first,
    and its job, when among `entries`, is reported (failed, "interrupted; rolled back";
    or done, when every step had been applied). Returns the entries still to settle."""
    try:
        journal = PlanJournal.load(config.state_dir)
    except ValueError:
        log.exception("plan journal unreadable: nothing of it undone")
        return entries
    if journal is None:
        return entries
    entry = next((e for e in entries if e.job_id == journal.job_id), None)
    if entry is None and _running_here(config, journal.job_id):
        return entries  # its job is under way in this agent: not a leftover
    reporter = _reporter(config, journal.job_id, JobKind.APPLY)
    begun = [i for i, s in enumerate(journal.steps) if s.state is not StepState.NOT_STARTED]
    stopped_in = max(begun, default=0)
    errors: list[str] = []
    if journal.outcome is PlanOutcome.RUNNING:
        log.warning("job %s: plan interrupted; rolling its steps back", journal.job_id)
        errors = undo_plan(config, reporter, journal)
        if not errors:
            journal.close(PlanOutcome.UNDONE)
    if entry is not None:
        if entry.drained and not errors:
            _rejoin_quietly(config, reporter)
        _report_settled_plan(config, reporter, journal, stopped_in, errors)
    if not errors:
        journal.remove()
    return [e for e in entries if e is not entry]


def _running_here(config: AgentConfig, job_id: str) -> bool:
    ledger = Ledger(config.state_dir)
    entry = ledger.get(job_id)
    return entry is not None and entry.state is EntryState.RUNNING and ledger.owner_alive(entry)


def _report_settled_plan(
    config: AgentConfig,
    reporter: JobReporter,
    journal: PlanJournal,
    stopped_in: int,
    errors: list[str],
) -> None:
    states = journal.states()
    if journal.outcome is PlanOutcome.DONE:
        log.warning("job %s: interrupted after every step took effect; done", journal.job_id)
        done = {"plan": states, "settled_after_restart": True}
        reporter.finish(ok=True, result=done, state_dir=config.state_dir)
        return
    step = journal.steps[stopped_in]
    where = f"step {stopped_in + 1} of {len(journal.steps)} ({step.product} {step.version})"
    if errors:
        message = f"interrupted during {where}; not every step could be rolled back: {errors[0]}"
    else:
        message = (
            f"interrupted; rolled back: the agent stopped during {where};"
            " every step is back on its old version"
        )
    log.warning("job %s: %s", journal.job_id, message)
    result: dict[str, Any] = {"plan": states, "interrupted_step": stopped_in + 1}
    if errors:
        result["undo_errors"] = errors
    reporter.finish(
        ok=False,
        error=RuntimeError(message),
        error_code=INTERRUPTED,
        result=result,
        state_dir=config.state_dir,
    )


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
    path = bundle_download_path(full.config.state_dir, full.sha256)
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
    returncode, stderr = _run_hook_command(command, what)
    if state_dir is not None and what == "rejoin":
        _log_hook(state_dir, reporter, what, ok=returncode == 0)
    if returncode != 0:
        raise ApplyHookFailed(
            f"{what} command failed ({returncode}): {stderr.strip()[:HOOK_STDERR_CHARS]}"
        )


def _run_hook_command(command: str, what: str) -> tuple[int, str]:
    """The hook's exit status and error output. In a session of its own: past its deadline
    the whole group is killed (a shell's children too, which would hold the pipes open)
    and it fails as a hook that timed out."""
    with subprocess.Popen(  # noqa: S602 - operator-configured command
        command,
        shell=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    ) as proc:
        try:
            _, stderr = proc.communicate(timeout=HOOK_TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise ApplyHookFailed(
                f"{what} command timed out after {HOOK_TIMEOUT_SECONDS:g} s (killed)"
            ) from None
    return proc.returncode, stderr


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
