"""Job deadline settings are read strictly; the broker keeps messages across a restart
(append-only Redis in docker-compose and `make run`) and its visibility timeout outlasts
the longest job deadline."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests import procs

ROOT = Path(__file__).resolve().parent.parent.parent


def _settings(**overrides: str) -> subprocess.CompletedProcess[str]:
    environ = procs.inherited_env(drop=frozenset({"DATABASE_URL", "DEBUG"}))
    environ.update(overrides, DJANGO_SETTINGS_MODULE="themis_dashboard.settings.local")
    code = (
        "import django, json; django.setup(); from django.conf import settings as s; "
        "print(json.dumps([s.THEMIS_JOB_ACK_TIMEOUT, s.THEMIS_JOB_MAX_SENDS, "
        "s.THEMIS_JOB_PROGRESS_TIMEOUT, s.THEMIS_JOB_OFFLINE_GRACE, "
        "s.CELERY_BROKER_TRANSPORT_OPTIONS['visibility_timeout']]))"
    )
    return subprocess.run(
        [sys.executable, "-c", code], env=environ, capture_output=True, text=True, timeout=60
    )


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("THEMIS_JOB_ACK_TIMEOUT", "soon"),
        ("THEMIS_JOB_ACK_TIMEOUT", "0"),
        ("THEMIS_JOB_MAX_SENDS", "0"),
        ("THEMIS_JOB_MAX_SENDS", "3.5"),
        ("THEMIS_JOB_PROGRESS_TIMEOUT", "-1"),
        ("THEMIS_JOB_OFFLINE_GRACE", "two minutes"),
        ("THEMIS_COMMAND_RELAY_SECONDS", "0"),
    ],
)
def test_malformed_deadline_setting_names_the_variable(variable: str, value: str) -> None:
    result = _settings(**{variable: value})
    assert result.returncode != 0
    assert "ImproperlyConfigured" in result.stderr
    assert variable in result.stderr.splitlines()[-1]


def test_visibility_timeout_outlasts_the_longest_deadline() -> None:
    result = _settings()
    assert result.returncode == 0, result.stderr
    ack, sends, progress, grace, visibility = json.loads(result.stdout.splitlines()[-1])
    assert (ack, sends, progress, grace) == (30, 5, 600, 120)
    assert visibility >= 4 * 3600
    # a long progress deadline raises the visibility timeout with it
    result = _settings(THEMIS_JOB_PROGRESS_TIMEOUT="20000", THEMIS_JOB_MAX_SENDS="7")
    assert result.returncode == 0, result.stderr
    ack, sends, progress, grace, visibility = json.loads(result.stdout.splitlines()[-1])
    assert (sends, progress) == (7, 20000)
    assert visibility >= 2 * 20000


def test_compose_redis_persists_with_appendonly() -> None:
    compose: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    redis = compose["services"]["redis"]
    command = redis["command"]
    assert command[command.index("--appendonly") + 1] == "yes"
    # the append-only file lives on a named volume, so it outlives the container
    assert any(v.endswith(":/data") for v in redis["volumes"])
    assert command[command.index("--dir") + 1] == "/data"
    assert "redisdata" in compose["volumes"]


def test_make_run_starts_redis_with_appendonly(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from themis_dashboard import devstack

    started: dict[str, list[str]] = {}

    class Recorder(devstack.Stack):
        def start(self, name: str, argv: list[str], env: dict[str, str]) -> None:
            started[name] = argv
            raise SystemExit("stop after redis")

    monkeypatch.setattr(devstack, "VAR_DIR", tmp_path)
    stack = Recorder(6390, 8000, tmp_path / "log")
    with pytest.raises(SystemExit, match="stop after redis"):
        devstack.start_stack(stack, [])
    argv = started["redis"]
    assert argv[0] == "redis-server"
    assert argv[argv.index("--appendonly") + 1] == "yes"
    assert argv[argv.index("--dir") + 1] == str(tmp_path / "redis")
