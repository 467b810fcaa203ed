"""The demo's misbehaving service: by default its metrics go over the canary gate's limits
while its health check passes (the update goes through, the gate stops the canary); in
`down` mode the health check fails too; --off undoes either."""

from __future__ import annotations

from pathlib import Path

import pytest
from django.core.management import CommandError, call_command
from pytest_django.fixtures import Settings

from themis_dashboard.demo.service import Service
from updates.rollout_options import GateOptions

GATE = GateOptions()


@pytest.fixture
def demo_node(tmp_path: Path, settings: Settings) -> tuple[Path, Path]:
    settings.VAR_DIR = tmp_path
    state = tmp_path / "nodes" / "acme-db-1" / "state"
    install = tmp_path / "nodes" / "acme-db-1" / "install"
    state.mkdir(parents=True)
    (install / "share").mkdir(parents=True)
    (install / "share" / "VERSION").write_text("1.0.0\n")
    return install, state


def _misbehave(*args: str) -> None:
    call_command("demo_misbehave", "acme-db-1", *args)


def test_slow_fails_the_gate_on_metrics_with_the_health_check_passing(
    demo_node: tuple[Path, Path],
) -> None:
    service = Service(*demo_node)
    _misbehave()
    metrics = service.metrics()
    assert service.answer("/health")[0] == 200 and metrics["healthy"] is True
    assert float(str(metrics["error_rate"])) > GATE.max_error_rate
    assert float(str(metrics["p99_ms"])) > GATE.max_p99_ms


def test_down_fails_the_health_check_and_off_undoes_it(demo_node: tuple[Path, Path]) -> None:
    service = Service(*demo_node)
    _misbehave("--mode", "down")
    assert service.answer("/health")[0] == 500 and service.metrics()["healthy"] is False
    _misbehave("--off")
    metrics = service.metrics()
    assert service.answer("/health")[0] == 200
    assert float(str(metrics["error_rate"])) <= GATE.max_error_rate
    assert not (demo_node[1] / "misbehave").exists()


def test_an_unknown_demo_node_is_named(demo_node: tuple[Path, Path]) -> None:
    with pytest.raises(CommandError, match="no demo node 'nope'"):
        call_command("demo_misbehave", "nope")
