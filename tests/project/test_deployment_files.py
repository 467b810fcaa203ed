"""docker-compose.yml stays consistent with `make run` (it cannot run here)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests import procs

ROOT = Path(__file__).resolve().parent.parent.parent
COMPOSE = ROOT / "docker-compose.yml"


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:  # the parsed YAML
    parsed: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return parsed


def test_compose_has_every_role(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert {"postgres", "redis", "web", "coordinator", "beat"} <= set(services)
    agents = [name for name in services if name.startswith("agent-")]
    assert len(agents) == 3


def test_agents_hold_no_database_credentials(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        if name.startswith("agent-"):
            env = service["environment"]
            assert "DATABASE_URL" not in env and "SECRET_KEY" not in env
            assert env["THEMIS_NODE_ID"]
            assert "node.$$THEMIS_NODE_ID" in " ".join(service["command"])


def test_dashboard_roles_use_production_settings(compose: dict[str, Any]) -> None:
    for name in ("web", "coordinator", "beat"):
        env = compose["services"][name]["environment"]
        assert env["DJANGO_SETTINGS_MODULE"] == "themis_dashboard.settings.production"
        assert env["DATABASE_URL"].startswith("postgres://")
    assert "-Q dashboard" in " ".join(compose["services"]["coordinator"]["command"])


def test_compose_config_validates_when_client_present() -> None:
    docker = shutil.which("docker")
    probe = (
        subprocess.run([docker, "compose", "version"], capture_output=True, timeout=30)
        if docker
        else None
    )
    if probe is None or probe.returncode != 0:
        pytest.skip("no `docker compose` client on this machine")
    assert docker is not None  # narrows: the probe ran, so the client was found
    env = {**procs.inherited_env(), "POSTGRES_PASSWORD": "x", "SECRET_KEY": "y" * 40}
    result = subprocess.run(
        [docker, "compose", "-f", str(COMPOSE), "config", "-q"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
