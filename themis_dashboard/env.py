"""Strict parsing of settings from the environment.

A malformed value raises ImproperlyConfigured naming the variable; nothing
silently falls back to a default when a value is present but wrong.
"""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from django.core.exceptions import ImproperlyConfigured

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def env_str(name: str, default: str) -> str:
    return os.environ.get(name, default)


def env_bool(name: str, default: bool) -> bool:
    raw = os.environ.get(name)
    if raw is None:
        return default
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ImproperlyConfigured(f"{name}: expected true/false (1/0, yes/no, on/off), got {raw!r}")


def env_int(name: str, default: int, *, minimum: int | None = None) -> int:
    raw = os.environ.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ImproperlyConfigured(f"{name}: expected an integer, got {raw!r}") from None
    if minimum is not None and value < minimum:
        raise ImproperlyConfigured(f"{name}: must be at least {minimum}, got {value}")
    return value


def env_list(name: str, default: list[str]) -> list[str]:
    raw = os.environ.get(name)
    if raw is None:
        return default
    items = [item.strip() for item in raw.split(",")]
    if any(not item for item in items):
        raise ImproperlyConfigured(f"{name}: empty entry in comma-separated list {raw!r}")
    return items


def env_path(name: str, default: Path) -> Path:
    raw = os.environ.get(name)
    if raw is None:
        return default
    if not raw.strip():
        raise ImproperlyConfigured(f"{name}: empty path")
    return Path(raw).expanduser()


def env_redis_url(name: str, default: str) -> str:
    raw = os.environ.get(name, default)
    parts = urlsplit(raw)
    if parts.scheme not in {"redis", "rediss", "unix"}:
        raise ImproperlyConfigured(f"{name}: expected a redis:// URL, got {raw!r}")
    if parts.scheme != "unix":
        try:
            parts.port  # noqa: B018 - raises ValueError on a bad port
        except ValueError:
            raise ImproperlyConfigured(f"{name}: bad port in {raw!r}") from None
        if not parts.hostname:
            raise ImproperlyConfigured(f"{name}: no host in {raw!r}")
    return raw


def parse_database_url(name: str, raw: str) -> dict[str, Any]:
    """`sqlite:////abs/path.db`, `sqlite:///relative.db` or `postgres://u:p@h:port/db`."""
    parts = urlsplit(raw)
    if parts.scheme == "sqlite":
        path = unquote(parts.path)[1:]  # as dj-database-url: four slashes = absolute
        if not path:
            raise ImproperlyConfigured(f"{name}: sqlite URL without a file path: {raw!r}")
        return sqlite_database(Path(path))
    if parts.scheme in {"postgres", "postgresql"}:
        try:
            port = parts.port
        except ValueError:
            raise ImproperlyConfigured(f"{name}: bad port in {raw!r}") from None
        db_name = unquote(parts.path.lstrip("/"))
        if not parts.hostname or not db_name:
            raise ImproperlyConfigured(f"{name}: postgres URL needs a host and a database name")
        return {
            "ENGINE": "django.db.backends.postgresql",
            "NAME": db_name,
            "USER": unquote(parts.username or ""),
            "PASSWORD": unquote(parts.password or ""),
            "HOST": parts.hostname,
            "PORT": str(port or 5432),
            "CONN_MAX_AGE": 60,
        }
    raise ImproperlyConfigured(f"{name}: unsupported scheme {parts.scheme!r} in {raw!r}")


def sqlite_database(path: Path) -> dict[str, Any]:
    # WAL + IMMEDIATE transactions + a busy timeout let the web process and the
    # coordinator write side by side without "database is locked".
    return {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": str(path),
        "OPTIONS": {
            "transaction_mode": "IMMEDIATE",
            "timeout": 20,
            "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
        },
    }


def env_networks(name: str) -> list[str]:
    """Comma-separated addresses or CIDRs; a bad entry raises ImproperlyConfigured naming it."""
    entries = [item.strip() for item in os.environ.get(name, "").split(",") if item.strip()]
    for entry in entries:
        try:
            ipaddress.ip_network(entry, strict=False)
        except ValueError:
            raise ImproperlyConfigured(f"{name}: {entry!r} is not an address or network") from None
    return entries
