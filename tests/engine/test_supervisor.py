"""The supervisor in-process: addresses, a busy port, the control protocol, readiness
deadlines and restarts (real child processes, real sockets)."""

from __future__ import annotations

import socket
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from tests import procs
from updates.engine.supervisor import (
    Listen,
    ServiceControlError,
    Supervisor,
    SupervisorConfig,
    SupervisorError,
    control_request,
    control_socket,
    service_base_url,
)

DEMO = str(procs.ROOT / "themis_dashboard" / "demo" / "service.py")


@pytest.mark.parametrize("text", ["localhost", ":80", "host:", "host:0", "host:70000", "h:x"])
def test_a_bad_address_is_refused(text: str) -> None:
    with pytest.raises(SupervisorError, match="expected HOST:PORT"):
        Listen.parse(text)


def test_an_ipv6_address_reads_back() -> None:
    assert str(Listen.parse("[::1]:8080")) == "::1:8080"


def _config(tmp_path: Path, command: list[str], **options: object) -> SupervisorConfig:
    (tmp_path / "install" / "share").mkdir(parents=True, exist_ok=True)
    (tmp_path / "install" / "share" / "VERSION").write_text("3.1.0\n")
    return SupervisorConfig(
        command=command,
        listen=[Listen("127.0.0.1", procs.free_port())],
        state_dir=tmp_path,
        **options,  # type: ignore[arg-type]
    )


def _demo(tmp_path: Path) -> list[str]:
    install = str(tmp_path / "install")
    return [sys.executable, DEMO, "--install", install, "--state", str(tmp_path), "--grace", "0.2"]


@pytest.fixture
def supervisor(tmp_path: Path) -> Iterator[Supervisor]:
    found = Supervisor(_config(tmp_path, _demo(tmp_path), ready_timeout=20, grace=1))
    yield found
    found.shutdown()


def test_a_busy_port_is_refused(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        config = _config(tmp_path, ["true"])
        config.listen = [Listen("127.0.0.1", taken.getsockname()[1])]
        with pytest.raises(SupervisorError, match="cannot listen on 127.0.0.1"):
            Supervisor(config)


def test_no_command_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SupervisorError, match="no service command"):
        Supervisor(_config(tmp_path, []))


def test_start_status_reload_and_unknown_operations(supervisor: Supervisor) -> None:
    assert supervisor.start().ok
    status = supervisor.handle({"op": "status"})
    assert status["ok"] and status["generation"] == 1 and status["restarts"] == 0
    url = f"http://{supervisor.config.listen[0]}/version"
    first = requests.get(url, timeout=5).json()
    assert first == {"version": "3.1.0", "pid": status["pid"]}
    answer = supervisor.handle({"op": "reload", "timeout": "soon"})  # default deadline
    assert answer["ok"] and answer["old_pid"] == status["pid"]
    assert requests.get(url, timeout=5).json()["pid"] == answer["pid"]
    assert supervisor.handle({"op": "ensure"})["pid"] == answer["pid"]  # nothing to do
    assert supervisor.handle({"op": "format the disk"}) == {
        "ok": False,
        "error": "unknown operation 'format the disk'",
    }


def test_a_command_that_exits_is_not_ready(tmp_path: Path) -> None:
    supervisor = Supervisor(_config(tmp_path, [sys.executable, "-c", "raise SystemExit(3)"]))
    try:
        result = supervisor.start()
        assert not result.ok and "exited with 3 before it was ready" in result.error
        # No serving process: the next check starts one again (it fails again, backed off).
        assert supervisor.ensure_serving() is not None
        assert supervisor.ensure_serving() is None  # within the back-off: not yet
        assert supervisor.restarts == 1
    finally:
        supervisor.shutdown()


def test_readiness_by_url(tmp_path: Path) -> None:
    config = _config(tmp_path, [], ready_timeout=20)
    config.command = _demo(tmp_path)
    config.ready_url = f"http://{config.listen[0]}/health"
    supervisor = Supervisor(config)
    try:
        assert supervisor.start().ok
    finally:
        supervisor.shutdown()


def test_the_control_socket_answers_and_a_missing_one_is_an_error(tmp_path: Path) -> None:
    assert control_socket(tmp_path) is None
    with pytest.raises(ServiceControlError):
        control_request(tmp_path / "service.sock", {"op": "status"}, timeout=1)
    assert service_base_url(tmp_path / "service.sock") is None
