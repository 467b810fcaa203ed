"""A real, throwaway PostgreSQL server for tests and benchmarks.

The Debian package's binaries (`initdb`, `postgres`) are found on PATH or under
`/usr/lib/postgresql/<ver>/bin`. The cluster lives in a fresh directory under the
system temp dir (not pytest's 0700 tmp tree: as root the server runs as the
`postgres` user, which must be able to reach it), listens on 127.0.0.1 on a free port
with `trust` auth, and keeps its unix socket in its own directory.

The postmaster runs in the foreground as our child, never daemonized, so it cannot
outlive us: `stop()` ends it at the end of a session, and if the session itself is
killed the kernel sends the postmaster SIGQUIT (parent-death signal), whose children
follow it. No pytest here: the benchmark uses it too.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import itertools
import os
import pwd
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import psycopg

from tests.locks import flock_is_free
from tests.ports import reserved_port

INSTALL_HINT = "PostgreSQL is not installed (no initdb/postgres found): run `make install`"
_PR_SET_PDEATHSIG = 1
# Fast and still a real server: a test cluster is thrown away, so it need not survive
# a power cut.
TEST_SETTINGS: Mapping[str, str] = {
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
}


class PostgresMissing(RuntimeError):
    """The server binaries are not installed."""


def find_bin_dir() -> Path:
    """The directory holding `initdb` and `postgres`: PATH first, then the newest
    `/usr/lib/postgresql/<ver>/bin`."""
    on_path = shutil.which("initdb")
    candidates = [Path(on_path).resolve().parent] if on_path else []
    versions = sorted(
        Path("/usr/lib/postgresql").glob("*/bin"),
        key=lambda p: [int(x) for x in re.findall(r"\d+", p.parent.name)] or [0],
        reverse=True,
    )
    for bin_dir in [*candidates, *versions]:
        if (bin_dir / "initdb").is_file() and (bin_dir / "postgres").is_file():
            return bin_dir
    raise PostgresMissing(INSTALL_HINT)


def _as_server_user() -> pwd.struct_passwd | None:
    """The account to run the server as: `postgres` when we are root (the server
    refuses to run as root), else ourselves (None)."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam("postgres")
    except KeyError as exc:
        raise PostgresMissing(f"{INSTALL_HINT} (no postgres user)") from exc


def _child_setup(user: pwd.struct_passwd | None) -> Callable[[], None]:
    """Runs in the forked child before exec: drop to the server user, then ask the
    kernel for SIGQUIT (immediate shutdown) when we die. The order matters: a change
    of credentials clears the parent-death signal."""

    def setup() -> None:
        if user is not None:
            os.setgroups([])
            os.setgid(user.pw_gid)
            os.setuid(user.pw_uid)
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGQUIT)

    return setup


@dataclass
class PostgresServer:
    root: Path
    port: int
    bin_dir: Path
    user: pwd.struct_passwd | None
    proc: subprocess.Popen[bytes] | None = None
    owner_lock: int | None = None
    _counter: Iterator[int] = field(default_factory=lambda: itertools.count(1))

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def socket_dir(self) -> Path:
        return self.root / "socket"

    @property
    def log(self) -> Path:
        return self.root / "server.log"

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def create_database(self, prefix: str = "t") -> str:
        """A new empty database (`<prefix>_<n>`); returns its URL."""
        name = f"{prefix}_{next(self._counter)}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def start(self, settings: Mapping[str, str]) -> None:
        self._initdb()
        argv = [str(self.bin_dir / "postgres"), "-D", str(self.data_dir)]
        argv += ["-c", "listen_addresses=127.0.0.1", "-p", str(self.port)]
        argv += ["-c", f"unix_socket_directories={self.socket_dir}"]
        for key, value in settings.items():
            argv += ["-c", f"{key}={value}"]
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                argv, stdout=out, stderr=subprocess.STDOUT, preexec_fn=_child_setup(self.user)
            )
        self._wait_ready(30.0)

    def _initdb(self) -> None:
        self.socket_dir.mkdir()
        if self.user is not None:
            for path in (self.root, self.socket_dir):
                os.chown(path, self.user.pw_uid, self.user.pw_gid)
        argv = [str(self.bin_dir / "initdb"), "-D", str(self.data_dir), "-U", "postgres"]
        argv += ["-A", "trust", "-E", "UTF8", "--locale=C", "--no-sync"]
        if self.user is not None:
            argv = ["runuser", "-u", "postgres", "--", *argv]
        # Once more in a clean directory if it fails: seen once on a loaded machine (a
        # bootstrap file initdb had just written was missing).
        for _attempt in range(2):
            proc = subprocess.run(argv, capture_output=True, text=True)
            if proc.returncode == 0:
                return
            shutil.rmtree(self.data_dir, ignore_errors=True)
        raise RuntimeError(f"initdb failed: {proc.stderr.strip()[-2000:]}")

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                break
            with contextlib.suppress(psycopg.OperationalError):
                psycopg.connect(self.url(), connect_timeout=2).close()
                return
            time.sleep(0.05)
        log = self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""
        self.stop()
        raise RuntimeError(f"postgres did not start:\n{log}")

    def stop(self) -> None:
        """Fast shutdown (SIGINT: abort sessions, checkpoint), SIGKILL if it hangs, then
        the cluster's directory is removed."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        shutil.rmtree(self.root, ignore_errors=True)
        if self.owner_lock is not None:
            os.close(self.owner_lock)
            self.owner_lock = None


ROOT_PREFIX = "themis-pg-"
OWNER_LOCK = "owner.lock"


def _hold_owner_lock(root: Path) -> int:
    """Mark a cluster's directory as in use for as long as this process lives: an
    exclusive flock the kernel drops when the process dies, however it dies."""
    fd = os.open(root / OWNER_LOCK, os.O_CREAT | os.O_RDWR, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


def sweep_stale_clusters(older_than: float = 600.0) -> list[Path]:
    """Remove the directories of clusters whose session is gone: a session killed with
    SIGKILL takes its server down (parent-death signal) but cannot delete the files.

    A cluster is in use while its owner holds the flock on its lock file, whatever its
    server is doing. (Reading the server's pid file instead raced with initdb: its
    bootstrap backend writes one and exits, and another session swept a cluster that
    was still being made.) A directory without a lock file is left alone while young:
    its owner may be about to take the lock."""
    removed = []
    for root in Path(tempfile.gettempdir()).glob(f"{ROOT_PREFIX}*"):
        if _owner_is_gone(root, older_than):
            shutil.rmtree(root, ignore_errors=True)
            removed.append(root)
    return removed


def _owner_is_gone(root: Path, older_than: float) -> bool:
    try:
        return flock_is_free(root / OWNER_LOCK)
    except FileNotFoundError:
        with contextlib.suppress(FileNotFoundError):
            return time.time() - root.stat().st_mtime >= older_than
        return False


def start_server(settings: Mapping[str, str] = TEST_SETTINGS) -> PostgresServer:
    """Start a throwaway server; the caller must `stop()` it (see `postgres_server`)."""
    sweep_stale_clusters()
    bin_dir, user = find_bin_dir(), _as_server_user()
    root = Path(tempfile.mkdtemp(prefix=ROOT_PREFIX))
    server = PostgresServer(
        root=root,
        port=reserved_port(),
        bin_dir=bin_dir,
        user=user,
        owner_lock=_hold_owner_lock(root),
    )
    try:
        server.start(settings)
    except BaseException:
        server.stop()
        raise
    return server


@contextlib.contextmanager
def postgres_server(settings: Mapping[str, str] = TEST_SETTINGS) -> Iterator[PostgresServer]:
    server = start_server(settings)
    try:
        yield server
    finally:
        server.stop()
