"""Real processes for integration tests: a private redis-server and Celery
workers (coordinator and node agents), each in its own process group."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest

from tests.ports import reserved_port

ROOT = Path(__file__).resolve().parent.parent
CELERY = str(Path(sys.executable).parent / "celery")


def free_port() -> int:
    """A port for a test server (see tests/ports.py: never one a client may take)."""
    return reserved_port()


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


# Long enough for an idle worker's warm shutdown (its pool children take about a second).
STOP_GRACE = 15.0


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path
    # How it was started, so `respawn` can start it again the same way.
    argv: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.popen.poll() is None:
            os.killpg(self.popen.pid, sig)
            self.popen.wait(timeout=20)

    def stop(self, grace: float = STOP_GRACE) -> None:
        """End the process as a service manager would (systemd's KillMode=mixed): SIGTERM
        to the process, SIGKILL to whatever is left of its group after `grace` seconds.
        A Celery worker shuts down warm and ends its pool children and beat itself, so
        every process writes its coverage data; a SIGKILLed one cannot, nor can a pool
        child that gets a second SIGTERM (the group's and its worker's) while it exits.
        `stop_all` stops several at once."""
        stop_all([self], grace)

    @property
    def alive(self) -> bool:
        return self.popen.poll() is None

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


def _group_members(pgid: int) -> list[str]:
    """The command lines of the group's processes still running (zombies waiting to be
    reaped do not count)."""
    found = []
    for proc in psutil.process_iter(["status", "cmdline"]):
        try:
            if os.getpgid(proc.pid) == pgid and proc.info["status"] != psutil.STATUS_ZOMBIE:
                found.append(" ".join(proc.info["cmdline"] or [])[:80])
        except (ProcessLookupError, psutil.Error):
            continue
    return found


def stop_all(stopping: list[Proc], grace: float = STOP_GRACE) -> None:
    """Stop every process gracefully and at once (see `Proc.stop`): the grace periods
    run side by side, not one after another."""
    deadline = time.monotonic() + grace
    running = [p for p in stopping if p.alive]
    for proc in running:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.popen.pid, signal.SIGTERM)
    for proc in running:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.popen.wait(timeout=max(0.0, deadline - time.monotonic()))
        # The group outlives its leader for a moment: pool children finishing their
        # exit, a hook's command. Wait for them within the same grace, then kill.
        pgid = proc.popen.pid
        while (left := _group_members(pgid)) and time.monotonic() < deadline:
            time.sleep(0.05)
        if left:
            # Shown in the run's warnings summary: a worker that will not stop (a task
            # still running) costs the grace period, and its coverage data is lost.
            warnings.warn(
                f"{proc.name}: still running {grace:g} s after SIGTERM, killed: {left}",
                stacklevel=2,
            )
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)
        proc.popen.wait(timeout=20)


def unmeasured(env: dict[str, str]) -> dict[str, str]:
    """`env` for a process whose coverage is not measured: one that is SIGKILLed (its
    data would be lost anyway) and whose timing matters more than its coverage."""
    return {k: v for k, v in env.items() if k not in COVERAGE_VARIABLES}


# Set by coverage (`[tool.coverage.run] patch = ["subprocess"]`) for the processes a
# measured test run starts: with one of them a Python process measures itself.
COVERAGE_VARIABLES = frozenset({"COVERAGE_PROCESS_CONFIG", "COVERAGE_PROCESS_START"})


def spawn(
    name: str, argv: list[str], env: dict[str, str], log_dir: Path, *, append: bool = False
) -> Proc:
    log_dir.mkdir(parents=True, exist_ok=True)
    log = log_dir / f"{name}.log"
    with open(log, "ab" if append else "wb") as out:
        popen = subprocess.Popen(
            argv, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    return Proc(name, popen, log, list(argv), dict(env))


def respawn(proc: Proc, env: dict[str, str] | None = None) -> Proc:
    """Start `proc` again as it was started (after killing it if it still runs); its
    log keeps what the earlier process wrote."""
    proc.kill()
    return spawn(proc.name, proc.argv, env or proc.env, proc.log.parent, append=True)


@contextmanager
def redis_server(tmp: Path, port: int | None = None) -> Iterator[str]:
    if shutil.which("redis-server") is None:
        pytest.fail("redis-server is not installed: run `make install`")
    port = port or free_port()
    proc = spawn(
        "redis",
        [
            "redis-server",
            "--bind",
            "127.0.0.1",
            "--port",
            str(port),
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(tmp),
        ],
        inherited_env(),
        tmp,
    )
    try:
        # Its own answer, not just an open port: another process already listening there
        # (the server then exits, "Address already in use") would take every test's commands.
        if not wait_until(lambda: redis_pid(port) == proc.popen.pid, 10):
            raise RuntimeError(f"redis-server did not start on port {port}:\n{proc.output()}")
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.kill(signal.SIGTERM)


class RedisServer:
    """A private redis-server that can be killed and started again on the same port and
    data dir. With `appendonly` every write is in the append-only file before it is
    acknowledged, so a restarted server still holds every queued message."""

    def __init__(self, data_dir: Path, port: int | None = None, *, appendonly: bool = True):
        if shutil.which("redis-server") is None:
            pytest.fail("redis-server is not installed: run `make install`")
        self.data_dir, self.port, self.appendonly = data_dir, port or free_port(), appendonly
        self.proc: Proc | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        """Start the server; a no-op while it runs (as a service manager's start is): two
        restarts due at once (two faults that overlapped) must not start a second server,
        which would fail on the port the first holds and leave the first untracked."""
        if self.alive:
            return
        argv = ["redis-server", "--bind", "127.0.0.1", "--port", str(self.port), "--save", ""]
        argv += ["--appendonly", "yes" if self.appendonly else "no", "--dir", str(self.data_dir)]
        if self.appendonly:
            argv += ["--appendfsync", "always"]
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.proc = spawn("redis", argv, inherited_env(), self.data_dir, append=True)
        proc = self.proc
        if not wait_until(lambda: redis_pid(self.port) == proc.popen.pid, 15, 0.05):
            raise RuntimeError(f"redis-server did not start:\n{self.proc.output()[-2000:]}")

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None:
            self.proc.kill(sig)
        # The port is closed once the process is gone; wait so a restart can bind it.
        wait_until(lambda: not port_open(self.port), 10, 0.05)

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.alive


@contextmanager
def persistent_redis(tmp: Path, port: int | None = None) -> Iterator[RedisServer]:
    """A restartable redis-server with append-only persistence, stopped on exit."""
    server = RedisServer(tmp, port)
    server.start()
    try:
        yield server
    finally:
        server.kill(signal.SIGTERM)


def redis_answers(port: int) -> bool:
    """Whether a Redis server answers on `port`."""
    return redis_pid(port) is not None


def redis_pid(port: int) -> int | None:
    """The process id of the Redis server answering on `port`, or None when none does."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
            sock.sendall(b"INFO server\r\n")
            reply = b""
            while b"process_id:" not in reply or not reply.endswith(b"\r\n"):
                chunk = sock.recv(4096)
                if not chunk:
                    return None
                reply += chunk
                if reply.startswith(b"-") and reply.endswith(b"\r\n"):
                    return None  # an error: still loading its data, say
    except OSError:
        return None
    found = re.search(rb"process_id:(\d+)", reply)
    return int(found.group(1)) if found else None


def port_open(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


# Set for the browser tests' own thread only: a child process must keep Django's
# async-safety check (a production deployment check refuses it outright).
NOT_INHERITED = {"DJANGO_ALLOW_ASYNC_UNSAFE"}


def inherited_env(*, drop: frozenset[str] = frozenset()) -> dict[str, str]:
    """This process's environment for a child process, less what must not leak into it."""
    return {k: v for k, v in os.environ.items() if k not in NOT_INHERITED | drop}


def dashboard_env(redis_url: str, database_path: str, **extra: str) -> dict[str, str]:
    env = inherited_env()
    env.update(
        REDIS_URL=redis_url,
        DATABASE_URL=f"sqlite:///{database_path}",
        DJANGO_SETTINGS_MODULE="themis_dashboard.settings.base",
        PYTHONUNBUFFERED="1",
        **extra,
    )
    env.pop("THEMIS_NODE_ID", None)
    return env


def agent_env(redis_url: str, node_id: str, node_dir: Path, **extra: str) -> dict[str, str]:
    env = inherited_env(drop=frozenset({"DATABASE_URL", "DJANGO_SETTINGS_MODULE", "SECRET_KEY"}))
    (node_dir / "install").mkdir(parents=True, exist_ok=True)
    (node_dir / "state").mkdir(parents=True, exist_ok=True)
    # Read from the database here, not at import: benchmarks use this module without
    # Django configured.
    from updates.fleet.node_keys import node_key_hex

    env.update(
        REDIS_URL=redis_url,
        THEMIS_NODE_ID=node_id,
        THEMIS_NODE_KEY=node_key_hex(node_id),
        THEMIS_INSTALL_DIR=str(node_dir / "install"),
        THEMIS_STATE_DIR=str(node_dir / "state"),
        PYTHONUNBUFFERED="1",
        **extra,
    )
    return env


def supervised_service(name: str, port: int, install: Path, state: Path, log_dir: Path) -> Proc:
    """The demo service installed in `install`, under `themis-update service run` on
    127.0.0.1:`port` with its control socket in `state` (returns once it serves)."""
    argv = [sys.executable, "-m", "updates.engine", "service", "run"]
    argv += ["--listen", f"127.0.0.1:{port}", "--state-dir", str(state), "--grace", "3"]
    argv += ["--", sys.executable, str(install / "bin/themisd")]
    argv += ["--install", str(install), "--state", str(state), "--grace", "1"]
    proc = spawn(name, argv, inherited_env(), log_dir)
    if not wait_until(lambda: (state / "service.sock").exists(), 20):
        proc.kill()
        raise RuntimeError(f"{name} did not start:\n{proc.output()[-2000:]}")
    return proc


def coordinator(
    env: dict[str, str], log_dir: Path, *, beat: bool = True, name: str = "coordinator"
) -> Proc:
    argv = [
        CELERY,
        "-A",
        "themis_dashboard",
        "worker",
        "-Q",
        "dashboard",
        "-n",
        f"coordinator-{free_port()}@%h",
        "-c",
        "1",
        "-l",
        "info",
    ]
    if beat:
        argv += ["-B", "-s", str(log_dir / "beat-schedule")]
    return spawn(name, argv, env, log_dir)


def beat(env: dict[str, str], log_dir: Path, *, name: str = "beat") -> Proc:
    """Celery beat alone (the periodic reapers and relays), apart from any worker."""
    argv = [CELERY, "-A", "themis_dashboard", "beat", "-l", "info"]
    argv += ["-s", str(log_dir / f"{name}-schedule")]
    return spawn(name, argv, env, log_dir)


def agent(node_id: str, env: dict[str, str], log_dir: Path) -> Proc:
    argv = [
        CELERY,
        "-A",
        "themis_dashboard",
        "worker",
        "-Q",
        f"node.{node_id}",
        "-n",
        f"agent-{node_id}@%h",
        "-P",
        "threads",
        "-c",
        "2",
        "-l",
        "info",
    ]
    return spawn(f"agent-{node_id}", argv, env, log_dir)
