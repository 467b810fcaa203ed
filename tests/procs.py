"""Real processes for integration tests: a private redis-server and Celery
workers (coordinator and node agents), each in its own process group."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CELERY = str(Path(sys.executable).parent / "celery")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.popen.poll() is None:
            os.killpg(self.popen.pid, sig)
            self.popen.wait(timeout=20)

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


def spawn(name: str, argv: list[str], env: dict[str, str], log_dir: Path) -> Proc:
    log_dir.mkdir(parents=True, exist_ok=True)
    log = log_dir / f"{name}.log"
    with open(log, "wb") as out:
        popen = subprocess.Popen(
            argv, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    return Proc(name, popen, log)


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
        dict(os.environ),
        tmp,
    )
    try:
        if not wait_until(lambda: port_open(port), 10):
            raise RuntimeError(f"redis-server did not start:\n{proc.output()}")
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.kill(signal.SIGTERM)


def port_open(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def dashboard_env(redis_url: str, database_path: str, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
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
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in {"DATABASE_URL", "DJANGO_SETTINGS_MODULE", "SECRET_KEY"}
    }
    (node_dir / "install").mkdir(parents=True, exist_ok=True)
    (node_dir / "state").mkdir(parents=True, exist_ok=True)
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


def coordinator(env: dict[str, str], log_dir: Path, *, beat: bool = True) -> Proc:
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
    return spawn("coordinator", argv, env, log_dir)


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
