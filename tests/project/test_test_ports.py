"""The suite's redis-server gets a port no other server of the machine takes first, and a
server that could not bind its port is said to have failed, not taken for the broker."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest
from django.conf import settings

from tests import procs
from tests.locks import flock_is_free
from tests.ports import PORT_LOCKS, reserved_port


def _ephemeral_low() -> int:
    return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])


def test_the_suites_redis_port_is_below_the_ports_the_kernel_hands_out() -> None:
    port = settings.TEST_REDIS_PORT
    assert port < _ephemeral_low()
    # Held by this process for its lifetime: another test process cannot pick it.
    assert not flock_is_free(PORT_LOCKS / f"{port}.lock")


def test_a_test_servers_port_is_below_the_ephemeral_range_too() -> None:
    assert procs.free_port() < _ephemeral_low()


def test_a_reserved_port_is_free_held_and_never_one_another_process_holds() -> None:
    mine = reserved_port()
    assert mine != settings.TEST_REDIS_PORT and mine < _ephemeral_low()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", mine))  # free: nothing listens there yet
    # Another process reserving many ports never gets one this process holds.
    code = (
        "from themis_dashboard.settings import test as t\n"
        "from tests.ports import reserved_port\n"
        "print(t.TEST_REDIS_PORT, *(reserved_port() for _ in range(300)))"
    )
    env = procs.inherited_env() | {"DJANGO_SETTINGS_MODULE": "themis_dashboard.settings.test"}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    theirs = {int(port) for port in out.stdout.split()}
    assert len(theirs) == 301  # the settings' own port, then 300 more, all different
    assert not theirs & {mine, settings.TEST_REDIS_PORT}


def test_a_redis_server_whose_port_another_server_holds_fails_to_start(tmp_path: Path) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", reserved_port()))
        squatter.listen()
        port = squatter.getsockname()[1]
        failing = pytest.raises(RuntimeError, match=f"did not start on port {port}")
        with failing as failed, procs.redis_server(tmp_path, port):
            pass
    assert "Address already in use" in str(failed.value)


def test_redis_answers_only_for_a_redis_server(tmp_path: Path) -> None:
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        assert not procs.redis_answers(silent.getsockname()[1])
    with procs.redis_server(tmp_path) as url:
        assert procs.redis_answers(int(url.rsplit(":", 1)[1].split("/")[0]))


def test_starting_a_running_redis_server_again_leaves_it_as_it_is(tmp_path: Path) -> None:
    # Two chaos faults that overlap each schedule a restart: the second finds it running.
    with procs.persistent_redis(tmp_path) as server:
        assert server.proc is not None
        first = server.proc.popen.pid
        server.start()
        assert server.proc.popen.pid == first and server.alive
        assert procs.redis_answers(server.port)
        server.kill()
        server.start()  # down: started again, on its port
        assert server.proc.popen.pid != first and procs.redis_answers(server.port)


def test_a_redis_server_whose_port_another_redis_server_holds_fails_to_start(
    tmp_path: Path,
) -> None:
    # The other one answers on the port: only this server's own answer counts.
    with procs.redis_server(tmp_path / "first") as url:
        port = int(url.rsplit(":", 1)[1].split("/")[0])
        failing = pytest.raises(RuntimeError, match=f"did not start on port {port}")
        with failing as failed, procs.redis_server(tmp_path / "second", port):
            pass
        assert "Address already in use" in str(failed.value)
        assert procs.redis_answers(port)  # the first one is untouched
