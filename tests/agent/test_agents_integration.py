"""Real redis-server, real coordinator worker (with beat), real node agents."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from django.db import connection

from tests import procs
from tests.conftest import Fleet
from updates.models import Event, Node

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]


def _status(node_id: str) -> str:
    return Node.objects.get(node_id=node_id).status


def test_heartbeats_recorded_and_killed_agent_marked_offline(
    fleet: Fleet, tmp_path: Path, redis_url: str
) -> None:
    Node.objects.update(status=Node.Status.UNKNOWN, last_heartbeat=None)
    env = procs.dashboard_env(
        redis_url,
        connection.settings_dict["NAME"],
        THEMIS_NODE_OFFLINE_AFTER="3",
        THEMIS_OFFLINE_CHECK_SECONDS="1",
        THEMIS_VAR_DIR=str(tmp_path),
    )
    coordinator = procs.coordinator(env, tmp_path)
    agents: dict[str, procs.Proc] = {}
    for node_id in ("a-1", "b-1"):
        node_dir = tmp_path / node_id
        agent_env = procs.agent_env(redis_url, node_id, node_dir, THEMIS_HEARTBEAT_SECONDS="1")
        (node_dir / "state" / "service-status.json").write_text('{"raft_role": "leader"}')
        agents[node_id] = procs.agent(node_id, agent_env, tmp_path)
    try:
        online = procs.wait_until(
            lambda: _status("a-1") == "online" and _status("b-1") == "online", 60
        )
        assert online, coordinator.output()[-3000:] + agents["a-1"].output()[-2000:]
        node = Node.objects.get(node_id="a-1")
        assert node.raft_role == "leader"
        assert node.disk_free_bytes and node.memory_available_bytes
        # the agent process itself holds no database settings
        environ = Path(f"/proc/{agents['a-1'].popen.pid}/environ").read_bytes()
        assert b"DATABASE_URL=" not in environ
        assert b"DJANGO_SETTINGS_MODULE=" not in environ

        agents["b-1"].kill()
        assert procs.wait_until(lambda: _status("b-1") == "offline", 20), coordinator.output()[
            -3000:
        ]
        assert _status("a-1") == "online"
        offline = Event.objects.filter(verb="node.offline", object_id=str(fleet.node_b.pk))
        assert offline.count() == 1
    finally:
        procs.stop_all([*agents.values(), coordinator])


def test_agent_process_cannot_open_the_dashboard_database(tmp_path: Path) -> None:
    env = procs.agent_env("redis://127.0.0.1:1/0", "a-1", tmp_path / "a-1")
    code = (
        "import themis_dashboard.settings.agent as s\n"
        "assert not hasattr(s, 'DATABASES')\n"
        "from workers import agent\n"  # what the agent worker imports
        "from django.db import connection\n"
        "try:\n"
        "    connection.cursor()\n"
        "except Exception as exc:\n"
        "    print(type(exc).__name__)\n"
        "else:\n"
        "    print('OPENED')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=procs.ROOT,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ImproperlyConfigured"
