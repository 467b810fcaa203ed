"""Test settings: fast hashing, isolated var dir."""

import os
from pathlib import Path

from tests.ports import reserved_port
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


# The suite's private redis-server (started by a fixture when a test needs it)
# listens here, so the test process and its worker processes share one broker.
TEST_REDIS_PORT = env_int("THEMIS_TEST_REDIS_PORT", 0) or reserved_port()
REDIS_URL = f"redis://127.0.0.1:{TEST_REDIS_PORT}/0"
CELERY_BROKER_URL = REDIS_URL
# No background delta runs unless a test asks for them (var/pki may hold demo keys).
THEMIS_DELTA_BASES = 0
