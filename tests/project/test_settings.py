"""Settings come from the environment, strictly."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from django.core.exceptions import ImproperlyConfigured
from django.db import connection

from tests import procs
from themis_dashboard import env


def _settings_import(module: str, **overrides: str) -> subprocess.CompletedProcess[str]:
    environ = procs.inherited_env(drop=frozenset({"DATABASE_URL", "DEBUG"}))
    environ.update(overrides, DJANGO_SETTINGS_MODULE=module)
    code = "import django; django.setup(); print('ok')"
    return subprocess.run(
        [sys.executable, "-c", code], env=environ, capture_output=True, text=True, timeout=60
    )


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("DEBUG", "maybe"),
        ("DATABASE_URL", "mysql://x/y"),
        ("DATABASE_URL", "postgres://host:notaport/db"),
        ("DATABASE_URL", "sqlite://"),
        ("REDIS_URL", "http://127.0.0.1:6379"),
        ("REDIS_URL", "redis://127.0.0.1:port/0"),
        ("ALLOWED_HOSTS", "a.example,,b.example"),
        ("THEMIS_NODE_OFFLINE_AFTER", "thirty"),
        ("THEMIS_NODE_OFFLINE_AFTER", "0"),
    ],
)
def test_malformed_setting_names_the_variable(variable: str, value: str) -> None:
    result = _settings_import("themis_dashboard.settings.local", **{variable: value})
    assert result.returncode != 0
    assert "ImproperlyConfigured" in result.stderr
    assert variable in result.stderr.splitlines()[-1]


def test_production_refuses_debug() -> None:
    result = _settings_import(
        "themis_dashboard.settings.production", DEBUG="true", SECRET_KEY="x" * 50
    )
    assert result.returncode != 0
    assert "DEBUG: must be off in production" in result.stderr


def test_production_refuses_default_secret() -> None:
    result = _settings_import("themis_dashboard.settings.production", DEBUG="false")
    assert result.returncode != 0
    assert "SECRET_KEY" in result.stderr.splitlines()[-1]


def test_production_starts_with_proper_values(tmp_path: Path) -> None:
    result = _settings_import(
        "themis_dashboard.settings.production",
        DEBUG="0",
        SECRET_KEY="s" * 50,
        DATABASE_URL=f"sqlite:///{tmp_path}/prod.sqlite3",
        ALLOWED_HOSTS="updates.example.com",
        THEMIS_PUBLIC_URL="https://updates.example.com",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_production_refuses_a_public_url_that_is_not_https(tmp_path: Path) -> None:
    result = _settings_import(
        "themis_dashboard.settings.production",
        DEBUG="0",
        SECRET_KEY="s" * 50,
        DATABASE_URL=f"sqlite:///{tmp_path}/prod.sqlite3",
        THEMIS_PUBLIC_URL="http://updates.example.com",
    )
    assert result.returncode != 0
    assert "THEMIS_PUBLIC_URL: must be an https:// URL" in result.stderr


def test_production_passes_the_deployment_check(tmp_path: Path) -> None:
    """`manage.py check --deploy` answers no warning: HSTS, SSL redirect, secure cookies..."""
    environ = procs.inherited_env(drop=frozenset({"DATABASE_URL", "DEBUG"}))
    environ.update(
        DJANGO_SETTINGS_MODULE="themis_dashboard.settings.production",
        DEBUG="0",
        SECRET_KEY="k3y-" + "q9Zx7Lw2" * 8,
        DATABASE_URL=f"sqlite:///{tmp_path}/prod.sqlite3",
        ALLOWED_HOSTS="updates.example.com",
        THEMIS_PUBLIC_URL="https://updates.example.com",
    )
    result = subprocess.run(
        [sys.executable, "manage.py", "check", "--deploy", "--fail-level", "WARNING"],
        env=environ,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "no issues" in result.stdout


def test_database_url_parsing() -> None:
    pg = env.parse_database_url("DATABASE_URL", "postgres://u:p%40ss@db:5433/themis")
    assert pg["ENGINE"] == "django.db.backends.postgresql"
    assert (pg["USER"], pg["PASSWORD"], pg["HOST"], pg["PORT"], pg["NAME"]) == (
        "u",
        "p@ss",
        "db",
        "5433",
        "themis",
    )
    lite = env.parse_database_url("DATABASE_URL", "sqlite:////srv/themis.db")
    assert lite["NAME"] == "/srv/themis.db"
    assert lite["OPTIONS"]["transaction_mode"] == "IMMEDIATE"
    assert "journal_mode=WAL" in lite["OPTIONS"]["init_command"]


def test_env_helpers_accept_and_reject(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("X_BOOL", "Yes")
    assert env.env_bool("X_BOOL", False) is True
    monkeypatch.setenv("X_INT", "-3")
    with pytest.raises(ImproperlyConfigured, match="X_INT: must be at least 0"):
        env.env_int("X_INT", 1, minimum=0)
    monkeypatch.setenv("X_PATH", "  ")
    with pytest.raises(ImproperlyConfigured, match="X_PATH: empty path"):
        env.env_path("X_PATH", Path("/tmp"))
    monkeypatch.delenv("X_LIST", raising=False)
    assert env.env_list("X_LIST", ["a"]) == ["a"]


@pytest.mark.skipif(connection.vendor != "sqlite", reason="SQLite's journal mode")
def test_sqlite_runs_in_wal_mode(db: None) -> None:
    with connection.cursor() as cursor:
        cursor.execute("PRAGMA journal_mode")
        assert cursor.fetchone()[0] == "wal"
