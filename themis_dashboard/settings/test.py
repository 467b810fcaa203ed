"""Test settings: fast hashing, isolated var dir."""

import fcntl
import os
import random
import socket
import tempfile
from pathlib import Path

from themis_dashboard.env import env_int

from .base import *  # noqa: F403
from .base import BASE_DIR, DATABASES

DEBUG = False
PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
# A file-backed test database so real worker processes can share it. With DATABASE_URL
# naming a PostgreSQL server (tests/project/test_postgres_suite.py), Django's own
# `test_<name>` database there instead.
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    _test_db = Path(os.environ.get("THEMIS_TEST_DB", BASE_DIR / "var" / "test" / "test.sqlite3"))
    _test_db.parent.mkdir(parents=True, exist_ok=True)
    DATABASES["default"]["TEST"] = {"NAME": str(_test_db)}


# Ports below the kernel's ephemeral range: a port the kernel hands out for `bind(0)` (every
# other server a test starts) or for an outgoing connection is never one of these.
_RESERVED_PORTS = range(20000, 32768)
_PORT_LOCKS = Path(tempfile.gettempdir()) / "themis-test-ports"
_held_port_locks: list[int] = []  # open descriptors: a lock lasts as long as this process


def _reserved_port() -> int:
    """A port for a server this process starts later: free now, below the ephemeral range,
    and held (an flock the kernel drops when this process dies) so that no other test process
    on the machine picks it in the meantime."""
    _PORT_LOCKS.mkdir(parents=True, exist_ok=True)
    for port in random.sample(_RESERVED_PORTS, 200):
        fd = os.open(_PORT_LOCKS / f"{port}.lock", os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            with socket.socket() as sock:
                sock.bind(("127.0.0.1", port))
        except OSError:
            os.close(fd)
            continue
        _held_port_locks.append(fd)
        return port
    raise RuntimeError(f"no free port in {_RESERVED_PORTS} for the test redis-server")


# The suite's private redis-server (started by a fixture when a test needs it)
# listens here, so the test process and its worker processes share one broker.
TEST_REDIS_PORT = env_int("THEMIS_TEST_REDIS_PORT", 0) or _reserved_port()
REDIS_URL = f"redis://127.0.0.1:{TEST_REDIS_PORT}/0"
CELERY_BROKER_URL = REDIS_URL
# No background delta runs unless a test asks for them (var/pki may hold demo keys).
THEMIS_DELTA_BASES = 0
