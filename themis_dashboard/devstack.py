"""`make run`: the whole local stack in one terminal.

Starts a private redis-server, the dashboard, the coordinator worker, beat and
one node-agent worker per demo node, prints the URL and demo logins, and stops
everything on Ctrl-C. Agents get no database settings in their environment.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

BASE_DIR = Path(__file__).resolve().parent.parent
VAR_DIR = Path(os.environ.get("THEMIS_VAR_DIR", BASE_DIR / "var"))
VENV_BIN = Path(sys.executable).parent
HOST = "127.0.0.1"


@dataclass
class Stack:
    redis_port: int
    web_port: int
    log_dir: Path
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    @property
    def redis_url(self) -> str:
        return f"redis://{HOST}:{self.redis_port}/0"

    def dashboard_env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            REDIS_URL=self.redis_url,
            DJANGO_SETTINGS_MODULE="themis_dashboard.settings.local",
            THEMIS_VAR_DIR=str(VAR_DIR),
            THEMIS_PUBLIC_URL=f"http://{HOST}:{self.web_port}",
            PYTHONUNBUFFERED="1",
        )
        return env

    def agent_env(self, node: dict[str, str]) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in AGENT_ENV_DENYLIST}
        env.update(
            REDIS_URL=self.redis_url,
            THEMIS_NODE_ID=node["node_id"],
            THEMIS_NODE_KEY=node["node_key"],
            THEMIS_INSTALL_DIR=node["install_dir"],
            THEMIS_STATE_DIR=node["state_dir"],
            THEMIS_STATUS_FILE=node["status_file"],
            THEMIS_TRUST_ANCHOR=str(VAR_DIR / "pki" / "root.pem"),
            THEMIS_METRICS_FILE=node["metrics_file"],
            THEMIS_HEALTH_URL=f"http://{HOST}:{node['service_port']}/health",
            PYTHONUNBUFFERED="1",
        )
        if node.get("components"):
            # The components it runs beside the server (themis_dashboard/demo/fleet.py).
            env["THEMIS_COMPONENTS"] = node["components"]
        return env

    def start(self, name: str, argv: list[str], env: dict[str, str]) -> None:
        log = open(self.log_dir / f"{name}.log", "ab")  # noqa: SIM115 - owned by the child
        self.procs[name] = subprocess.Popen(
            argv,
            cwd=BASE_DIR,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def stop(self) -> None:
        """Every child's whole process group: SIGTERM, up to 15 s, then SIGKILL for what is
        left. A group outlives its leader (a demo service its launcher started), so every
        group gets both signals whatever its leader did. A second Ctrl-C or SIGTERM meanwhile
        is ignored: cutting the stop short left services holding their ports."""
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        for proc in self.procs.values():
            _signal_group(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 15
        for proc in self.procs.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        for proc in self.procs.values():
            _signal_group(proc.pid, signal.SIGKILL)
            proc.wait()


def _signal_group(pgid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signum)


# Anything that would let an agent reach the dashboard's database or secrets.
AGENT_ENV_DENYLIST = {"DATABASE_URL", "DJANGO_SETTINGS_MODULE", "SECRET_KEY"}


def port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        return sock.connect_ex((HOST, port)) != 0


def wait_for_port(port: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not port_is_free(port):
            return True
        time.sleep(0.2)
    return False


def celery(*args: str) -> list[str]:
    return [str(VENV_BIN / "celery"), "-A", "themis_dashboard", *args]


def start_stack(stack: Stack, nodes: list[dict[str, str]]) -> None:
    redis_dir = VAR_DIR / "redis"
    redis_dir.mkdir(parents=True, exist_ok=True)
    stack.start(
        "redis",
        [
            "redis-server",
            "--bind",
            HOST,
            "--port",
            str(stack.redis_port),
            # Queued messages survive a restart of the broker, as in docker-compose.
            "--save",
            "",
            "--appendonly",
            "yes",
            "--appendfsync",
            "everysec",
            "--dir",
            str(redis_dir),
        ],
        dict(os.environ),
    )
    if not wait_for_port(stack.redis_port, 10):
        raise SystemExit(f"redis-server did not start on port {stack.redis_port}")
    env = stack.dashboard_env()
    stack.start(
        "web",
        # --insecure: static files served with DEBUG off (as local settings have it).
        [
            sys.executable,
            "manage.py",
            "runserver",
            f"{HOST}:{stack.web_port}",
            "--noreload",
            "--insecure",
        ],
        env,
    )
    stack.start(
        "coordinator",
        celery("worker", "-Q", "dashboard", "-n", "coordinator@%h", "-c", "2", "-l", "info"),
        env,
    )
    stack.start(
        "beat", celery("beat", "-l", "info", "-s", str(VAR_DIR / "celerybeat-schedule")), env
    )
    for node in nodes:
        # The node's own service, as installed from the signed demo bundle, under the
        # supervisor that owns its socket: an update reloads it without dropping a request.
        stack.start(
            f"service-{node['node_id']}",
            [
                *service_supervisor(node),
                "--",
                sys.executable,
                str(Path(node["install_dir"]) / "bin" / "themisd"),
                "--install",
                node["install_dir"],
                "--state",
                node["state_dir"],
            ],
            dict(os.environ),
        )
        stack.start(
            f"agent-{node['node_id']}",
            celery(
                "worker",
                "-Q",
                f"node.{node['node_id']}",
                "-n",
                f"agent-{node['node_id']}@%h",
                "-P",
                "threads",
                "-c",
                "2",
                "-l",
                "info",
            ),
            stack.agent_env(node),
        )


def service_supervisor(node: dict[str, str]) -> list[str]:
    """`themis-update service run` for a demo node's service port and state dir."""
    return [
        sys.executable,
        "-m",
        "updates.engine",
        "service",
        "run",
        "--listen",
        f"{HOST}:{node['service_port']}",
        "--state-dir",
        node["state_dir"],
        "--grace",
        "5",
    ]


def main() -> int:
    fleet = json.loads((VAR_DIR / "demo" / "fleet.json").read_text())
    creds = json.loads((VAR_DIR / "demo" / "credentials.json").read_text())
    redis_port = int(os.environ.get("THEMIS_REDIS_PORT", "6390"))
    web_port = int(os.environ.get("THEMIS_WEB_PORT", "8000"))
    for port, what in ((redis_port, "THEMIS_REDIS_PORT"), (web_port, "THEMIS_WEB_PORT")):
        if not port_is_free(port):
            print(f"port {port} is in use: stop what holds it or set {what}", file=sys.stderr)
            return 1
    log_dir = VAR_DIR / "log"
    log_dir.mkdir(parents=True, exist_ok=True)
    stack = Stack(redis_port, web_port, log_dir)
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    # Started in the background by a non-interactive shell, SIGINT arrives ignored (and
    # Python then never raises KeyboardInterrupt): Ctrl-C must stop the stack whatever
    # the parent left.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        start_stack(stack, fleet["nodes"])
        # Generous: on a busy machine Django's start-up checks alone can take a minute.
        if not wait_for_port(web_port, 150):
            print("the dashboard did not come up; see var/log/web.log", file=sys.stderr)
            return 1
        print_banner(stack, creds, len(fleet["nodes"]))
        while True:
            for name, proc in stack.procs.items():
                if proc.poll() is not None:
                    print(f"{name} exited with {proc.returncode}; see var/log/{name}.log")
                    return 1
            time.sleep(1)
    except KeyboardInterrupt:
        print("\nstopping…")
        return 0
    finally:
        stack.stop()


def print_banner(stack: Stack, creds: dict[str, str], node_count: int) -> None:
    print(f"\nThemis Update Manager is running: http://{HOST}:{stack.web_port}/\n")
    print("Demo logins (generated on first run, stored in var/demo/credentials.json):")
    for user, password in creds.items():
        print(f"  {user:<16} {password}")
    print(f"\nRedis {stack.redis_url} · coordinator, beat and {node_count} node agents")
    bundles = VAR_DIR / "demo" / "bundles"
    print(f"Signed demo bundles to publish (demo keys in var/pki/): {bundles}/")
    print("Logs in var/log/. Press Ctrl-C to stop everything.\n", flush=True)


if __name__ == "__main__":
    sys.exit(main())
