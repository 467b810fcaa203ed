"""What `make run` starts: the whole local stack, in real processes."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests import procs
from themis_dashboard.demo.fleet import DEMO_NODES, DEMO_SERVICE_BASE_PORT

pytestmark = pytest.mark.slow


def _online_nodes(db_path: str) -> int:
    with sqlite3.connect(db_path, timeout=5) as conn:
        row = conn.execute(
            "SELECT count(*) FROM updates_node"
            " WHERE status = 'online' AND installed_version = '1.0.0'"
        ).fetchone()
    return int(row[0])


def _components(db_path: str, node_id: str) -> dict[str, str]:
    with sqlite3.connect(db_path, timeout=5) as conn:
        rows = conn.execute(
            "SELECT c.product, c.version FROM updates_nodecomponent c"
            " JOIN updates_node n ON n.id = c.node_id WHERE n.node_id = ?",
            (node_id,),
        ).fetchall()
    return {str(product): str(version) for product, version in rows}


def test_local_stack_serves_login_and_brings_demo_fleet_online(tmp_path: Path) -> None:
    env = procs.inherited_env(drop=frozenset({"DATABASE_URL"}))
    web_port, redis_port = procs.free_port(), procs.free_port()
    env.update(
        THEMIS_VAR_DIR=str(tmp_path),
        DJANGO_SETTINGS_MODULE="themis_dashboard.settings.local",
        THEMIS_WEB_PORT=str(web_port),
        THEMIS_REDIS_PORT=str(redis_port),
    )
    for command in (["migrate", "--noinput", "-v", "0"], ["load_demo"]):
        subprocess.run(
            [sys.executable, "manage.py", *command],
            env=env,
            check=True,
            cwd=procs.ROOT,
            timeout=120,
        )
    started = time.monotonic()
    stack = procs.spawn(
        "devstack", [sys.executable, "-m", "themis_dashboard.devstack"], env, tmp_path
    )
    try:
        assert procs.wait_until(lambda: "is running" in stack.output(), 200), stack.output()
        with urllib.request.urlopen(f"http://127.0.0.1:{web_port}/login/", timeout=10) as resp:
            assert resp.status == 200
            assert b"Sign in" in resp.read()
        banner = stack.output()
        for user in ("operator", "oncall", "admin-acme", "admin-borealis"):
            assert user in banner
        assert (tmp_path / "demo" / "bundles" / "themisdb-1.1.0.tar.zst").exists()
        db = str(tmp_path / "themis.sqlite3")
        all_online = procs.wait_until(lambda: _online_nodes(db) == 7, 30)
        logs = "\n".join(p.read_text()[-1500:] for p in (tmp_path / "log").glob("*.log"))
        assert all_online, logs
        print(f"7 demo nodes online {time.monotonic() - started:.1f} s after start")
        # One demo node runs a storage engine beside the server, as its heartbeats say.
        both = {"themisdb": "1.0.0", "themis-storage": "1.0.0"}
        assert procs.wait_until(lambda: _components(db, "cobalt-solo") == both, 30), logs
        assert (tmp_path / "demo" / "bundles" / "themis-storage-1.1.0.tar.zst").exists()
    finally:
        stack.popen.send_signal(signal.SIGINT)
        stack.popen.wait(timeout=40)
    assert "stopping" in stack.output()
    # every child is gone: the ports are free again
    assert procs.wait_until(lambda: not procs.port_open(web_port), 10)
    assert not procs.port_open(redis_port)
    # The demo services the agents run are gone too (left running, they held these fixed
    # ports and the next `make run` failed).
    service_ports = [DEMO_SERVICE_BASE_PORT + i for i in range(len(DEMO_NODES))]
    assert not [port for port in service_ports if procs.port_open(port)]
