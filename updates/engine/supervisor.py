"""The node's service supervisor: owns the listening sockets, hands them to the service.

`themis-update service run --listen HOST:PORT --state-dir DIR -- CMD...` binds the
sockets once and keeps them open for its whole life. It starts CMD with the sockets
inherited as systemd's socket activation passes them (fds 3.., `LISTEN_FDS`,
`LISTEN_PID`, `LISTEN_FDNAMES`) and a `NOTIFY_SOCKET` for sd_notify, so the same service
runs unchanged under real systemd socket units.

A reload (asked by the engine over the control socket `service.sock` in the state dir,
after it switched the files) starts the new process on the same sockets, waits until
it is ready (`READY=1` from that very process, or its health URL answering 2xx) within a
deadline, and only then sends the old one SIGTERM: the old one stops accepting and
drains while the new one already accepts. The listening sockets are never closed, so
no connection is refused. A new process that is not ready in time is stopped and the
old one keeps serving. A serving process that dies is started again (with back-off).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import secrets
import selectors
import signal
import socket
import struct
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests

log = logging.getLogger("themis_update.supervisor")

CONTROL_SOCKET = "service.sock"
# systemd's first passed descriptor.
SD_LISTEN_FDS_START = 3
DEFAULT_READY_TIMEOUT = 30.0
DEFAULT_GRACE = 10.0
# A dead service is started again after this back-off, doubling up to the maximum.
RESTART_BACKOFF = (0.2, 10.0)
_REQUEST_LIMIT = 64 * 1024


class SupervisorError(Exception):
    """The supervisor cannot start (bad address, busy port, no command)."""


@dataclass(frozen=True)
class Listen:
    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> Listen:
        host, sep, port = text.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise SupervisorError(f"--listen {text!r}: expected HOST:PORT")
        return cls(host.strip("[]"), int(port))

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass
class SupervisorConfig:
    command: list[str]
    listen: list[Listen]
    state_dir: Path
    cwd: Path | None = None
    # Readiness: the process's own READY=1, or (when set) this URL answering 2xx.
    ready_url: str | None = None
    ready_timeout: float = DEFAULT_READY_TIMEOUT
    grace: float = DEFAULT_GRACE
    env: dict[str, str] = field(default_factory=dict)


@dataclass
class Child:
    proc: subprocess.Popen[bytes]
    generation: int
    notify: socket.socket
    notify_name: str
    started: float
    ready_at: float | None = None
    # While draining: when SIGKILL follows the SIGTERM.
    kill_at: float | None = None
    # It speaks sd_notify (said READY=1): it will say STOPPING=1 too.
    notifies: bool = False

    @property
    def pid(self) -> int:
        return self.proc.pid

    def close(self) -> None:
        self.notify.close()


@dataclass(frozen=True)
class ReloadResult:
    ok: bool
    pid: int | None
    old_pid: int | None
    seconds: float
    error: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "pid": self.pid,
            "old_pid": self.old_pid,
            "seconds": round(self.seconds, 4),
            "error": self.error,
        }


def bind_sockets(listen: Sequence[Listen]) -> list[socket.socket]:
    """Bound, listening sockets for every address (reusable at once after a restart)."""
    sockets = []
    try:
        for address in listen:
            family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_STREAM)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((address.host, address.port))
            sock.listen(1024)
    except OSError as err:
        for sock in sockets:
            sock.close()
        raise SupervisorError(f"cannot listen on {address}: {err.strerror or err}") from None
    return sockets


def _notify_socket() -> tuple[socket.socket, str]:
    """A datagram socket in the abstract namespace (no path-length limit, nothing left
    on disk) whose messages carry the sender's credentials."""
    name = f"themis-notify-{os.getpid()}-{secrets.token_hex(6)}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    sock.bind("\0" + name)
    sock.setblocking(False)
    return sock, "@" + name


def _read_notify(sock: socket.socket) -> list[tuple[int | None, str]]:
    """Every pending sd_notify message with its sender's pid."""
    messages: list[tuple[int | None, str]] = []
    while True:
        try:
            data, ancillary, _flags, _addr = sock.recvmsg(4096, socket.CMSG_SPACE(12))
        except (BlockingIOError, InterruptedError):
            return messages
        pid = None
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                pid = struct.unpack("3i", payload[:12])[0]
        messages.append((pid, data.decode("utf-8", "replace")))


def _handoff(fds: Sequence[int], env: dict[str, str]) -> Callable[[], None]:
    """In the child between fork and exec: the sockets at fds 3.. and the activation
    variables naming this very process (its pid is known only here)."""

    def setup() -> None:
        # Move the sources out of the way first: one may sit where another must go.
        high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 256) for fd in fds]
        for index, fd in enumerate(high):
            os.dup2(fd, SD_LISTEN_FDS_START + index, inheritable=True)
        env["LISTEN_PID"] = str(os.getpid())
        for key, value in env.items():
            os.environ[key] = value

    return setup


class Supervisor:
    def __init__(self, config: SupervisorConfig, *, clock: Callable[[], float] = time.monotonic):
        if not config.command:
            raise SupervisorError("no service command given (after --)")
        self.config = config
        self.clock = clock
        self.sockets = bind_sockets(config.listen)
        self.current: Child | None = None
        self.draining: list[Child] = []
        self.generation = 0
        self.restarts = 0
        self._backoff = RESTART_BACKOFF[0]
        self._next_restart = 0.0
        self._stopped = False

    # ------------------------------------------------------------- processes

    def spawn(self) -> Child:
        self.generation += 1
        notify, notify_name = _notify_socket()
        env = {
            **self.config.env,
            "LISTEN_FDS": str(len(self.sockets)),
            "LISTEN_FDNAMES": ":".join(f"listen{i}" for i in range(len(self.sockets))),
            "NOTIFY_SOCKET": notify_name,
            "THEMIS_SERVICE_GENERATION": str(self.generation),
        }
        fds = [sock.fileno() for sock in self.sockets]
        keep = tuple(range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + len(fds)))
        # The supervisor runs no threads: preexec_fn is safe here, and only it can name
        # the child's own pid in LISTEN_PID before exec.
        proc = subprocess.Popen(  # noqa: S603 - the operator's own service command
            self.config.command,
            cwd=self.config.cwd,
            stdin=subprocess.DEVNULL,
            pass_fds=keep,
            preexec_fn=_handoff(fds, env),  # noqa: PLW1509
            start_new_session=True,
        )
        log.info("service generation %s started: pid %s", self.generation, proc.pid)
        return Child(proc, self.generation, notify, notify_name, self.clock())

    def wait_ready(self, child: Child, timeout: float) -> str:
        """'' once ready, else why not (it exited, or the deadline passed)."""
        deadline = self.clock() + timeout
        while self.clock() < deadline:
            for pid, message in _read_notify(child.notify):
                lines = message.splitlines()
                if pid == child.pid and "READY=1" in lines:
                    child.notifies = True
                    if self.config.ready_url is None:
                        child.ready_at = self.clock()
                        return ""
            code = child.proc.poll()
            if code is not None:
                return f"the new service process exited with {code} before it was ready"
            if self.config.ready_url is not None and _url_ok(self.config.ready_url):
                child.ready_at = self.clock()
                return ""
            time.sleep(0.01)
        return f"the new service process was not ready within {timeout:g}s"

    def wait_stopped_accepting(self, child: Child, timeout: float = 5.0) -> None:
        """Until the old process says STOPPING=1 (or exits), so that once a reload has
        answered every new connection is served by the new version. A process that
        never spoke sd_notify cannot say it: then there is nothing to wait for."""
        if not child.notifies:
            return
        deadline = self.clock() + min(timeout, self.config.grace)
        while self.clock() < deadline and child.proc.poll() is None:
            for pid, message in _read_notify(child.notify):
                if pid == child.pid and "STOPPING=1" in message.splitlines():
                    return
            time.sleep(0.005)

    def stop(self, child: Child, *, grace: float | None = None) -> None:
        """SIGTERM (drain), then SIGKILL after the grace period; reaped by `reap`."""
        self._signal(child, signal.SIGTERM)
        child.kill_at = self.clock() + (self.config.grace if grace is None else grace)
        self.draining.append(child)

    def _signal(self, child: Child, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(child.pid, sig)

    def reap(self) -> None:
        """Collect drained processes; kill the ones past their grace period."""
        for child in list(self.draining):
            if child.proc.poll() is not None:
                self.draining.remove(child)
                child.close()
            elif child.kill_at is not None and self.clock() >= child.kill_at:
                self._signal(child, signal.SIGKILL)

    # ------------------------------------------------------------- operations

    def start(self) -> ReloadResult:
        """The first process (or a replacement for one that died)."""
        began = self.clock()
        child = self.spawn()
        why = self.wait_ready(child, self.config.ready_timeout)
        if why:
            self.stop(child, grace=0)
            return ReloadResult(False, None, None, self.clock() - began, why)
        self.current = child
        return ReloadResult(True, child.pid, None, self.clock() - began)

    def reload(self, timeout: float | None = None) -> ReloadResult:
        """The new process on the same sockets; the old one drains once it is ready."""
        began = self.clock()
        old = self.current
        child = self.spawn()
        why = self.wait_ready(child, timeout or self.config.ready_timeout)
        if why:
            self.stop(child, grace=0)
            self.ensure_serving()
            return ReloadResult(False, None, old.pid if old else None, self.clock() - began, why)
        self.current = child
        if old is not None:
            self.stop(old)
            self.wait_stopped_accepting(old)
        self._backoff = RESTART_BACKOFF[0]
        log.info("reloaded: pid %s serving, pid %s draining", child.pid, old and old.pid)
        return ReloadResult(True, child.pid, old.pid if old else None, self.clock() - began)

    def ensure_serving(self) -> ReloadResult | None:
        """Start a process again if the serving one died (backed off); None if it runs."""
        current = self.current
        if current is not None and current.proc.poll() is None:
            return None
        if self.clock() < self._next_restart:
            return None
        if current is not None:
            log.warning("service pid %s exited with %s", current.pid, current.proc.returncode)
            current.close()
            self.current = None
        self.restarts += 1
        result = self.start()
        if result.ok:
            self._backoff = RESTART_BACKOFF[0]
        else:
            log.error("service did not start again: %s", result.error)
            self._next_restart = self.clock() + self._backoff
            self._backoff = min(self._backoff * 2, RESTART_BACKOFF[1])
        return result

    def status(self) -> dict[str, Any]:
        current = self.current
        alive = current is not None and current.proc.poll() is None
        return {
            "ok": alive,
            "pid": current.pid if current and alive else None,
            "generation": current.generation if current else None,
            "listen": [str(address) for address in self.config.listen],
            "draining": [child.pid for child in self.draining],
            "restarts": self.restarts,
        }

    def shutdown(self) -> None:
        self._stopped = True
        children = [c for c in (self.current, *self.draining) if c is not None]
        for child in children:
            self._signal(child, signal.SIGTERM)
        deadline = self.clock() + self.config.grace
        for child in children:
            try:
                child.proc.wait(max(deadline - self.clock(), 0.01))
            except subprocess.TimeoutExpired:
                self._signal(child, signal.SIGKILL)
                child.proc.wait()
            child.close()
        for sock in self.sockets:
            sock.close()

    # ------------------------------------------------------------- control socket

    def handle(self, request: dict[str, Any]) -> dict[str, Any]:
        op = request.get("op")
        if op == "status":
            return self.status()
        if op == "reload":
            timeout = request.get("timeout")
            deadline = None
            if isinstance(timeout, int | float) and 0 < timeout <= 3600:
                deadline = float(timeout)
            return self.reload(deadline).to_json()
        if op == "ensure":
            result = self.ensure_serving()
            return result.to_json() if result is not None else self.status()
        return {"ok": False, "error": f"unknown operation {op!r}"}

    def run(self, control_path: Path) -> None:
        """Serve until SIGTERM/SIGINT: the control socket, restarts, reaping."""
        first = self.start()
        if not first.ok:
            raise SupervisorError(f"the service did not start: {first.error}")
        server = _control_server(control_path)
        stop = {"now": False}

        def request_stop(_signum: int, _frame: object) -> None:
            stop["now"] = True

        signal.signal(signal.SIGTERM, request_stop)
        signal.signal(signal.SIGINT, request_stop)
        selector = selectors.DefaultSelector()
        selector.register(server, selectors.EVENT_READ)
        try:
            while not stop["now"]:
                for _key, _events in selector.select(timeout=0.1):
                    self._serve_one(server)
                self.reap()
                self.ensure_serving()
        finally:
            selector.close()
            server.close()
            with contextlib.suppress(FileNotFoundError):
                control_path.unlink()
            self.shutdown()

    def _serve_one(self, server: socket.socket) -> None:
        try:
            conn, _ = server.accept()
        except OSError:
            return
        with conn:
            conn.settimeout(5)
            try:
                request = json.loads(_read_line(conn))
                answer = self.handle(request if isinstance(request, dict) else {})
            except (OSError, ValueError) as err:
                answer = {"ok": False, "error": f"bad request: {err}"}
            with contextlib.suppress(OSError):
                conn.sendall(json.dumps(answer).encode() + b"\n")


def _url_ok(url: str) -> bool:
    try:
        return 200 <= requests.get(url, timeout=1, allow_redirects=False).status_code < 300
    except requests.RequestException:
        return False


def _read_line(conn: socket.socket) -> bytes:
    data = b""
    while b"\n" not in data and len(data) < _REQUEST_LIMIT:
        chunk = conn.recv(4096)
        if not chunk:
            break
        data += chunk
    return data.split(b"\n", 1)[0]


def short_path(path: Path) -> tuple[str, int]:
    """A path a unix socket can use however deep `path` is (sun_path holds 108
    bytes): through /proc/self/fd of an open descriptor of its directory. Returns the
    path and the descriptor, which the caller closes."""
    fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    return f"/proc/self/fd/{fd}/{path.name}", fd


def _control_server(path: Path) -> socket.socket:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    address, fd = short_path(path)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        old_umask = os.umask(0o077)  # only the node's own user may reload its service
        try:
            server.bind(address)
        finally:
            os.umask(old_umask)
    finally:
        os.close(fd)
    server.listen(16)
    server.setblocking(False)
    return server


# ------------------------------------------------------------------ the engine's side


class ServiceControlError(Exception):
    """The supervisor did not answer (not running, or too slow)."""


def control_socket(state_dir: Path) -> Path | None:
    """The supervisor's control socket in `state_dir`, if a supervisor serves there."""
    path = Path(state_dir) / CONTROL_SOCKET
    try:
        return path if path.is_socket() else None
    except OSError:
        return None


def control_request(path: Path, request: dict[str, Any], *, timeout: float) -> dict[str, Any]:
    """One request to the supervisor and its answer (a reload answers once the new
    process is ready or the reload failed, so `timeout` must outlast its own)."""
    address, fd = short_path(path)
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.settimeout(timeout)
            conn.connect(address)
            conn.sendall(json.dumps(request).encode() + b"\n")
            answer = json.loads(_read_line(conn) or b"null")
    except (OSError, ValueError) as err:
        raise ServiceControlError(f"service supervisor at {path}: {err}") from None
    finally:
        os.close(fd)
    if not isinstance(answer, dict):
        raise ServiceControlError(f"service supervisor at {path}: no answer")
    return answer


def service_base_url(path: Path) -> str | None:
    """http://HOST:PORT of the supervised service's first listening address."""
    try:
        listen = control_request(path, {"op": "status"}, timeout=10).get("listen")
    except ServiceControlError:
        return None
    if not isinstance(listen, list) or not listen or not isinstance(listen[0], str):
        return None
    address = Listen.parse(listen[0])
    host = f"[{address.host}]" if ":" in address.host else address.host
    return f"http://{host}:{address.port}"


def reload_service(path: Path, *, timeout: float) -> ReloadResult:
    answer = control_request(path, {"op": "reload", "timeout": timeout}, timeout=timeout + 15)
    return ReloadResult(
        ok=bool(answer.get("ok")),
        pid=answer.get("pid"),
        old_pid=answer.get("old_pid"),
        seconds=float(answer.get("seconds") or 0.0),
        error=str(answer.get("error") or ""),
    )
