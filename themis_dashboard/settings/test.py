"""Test settings: fast hashing, isolated var dir."""

import os
from pathlib import Path

from .base import *  # noqa: F403
from .base import BASE_DIR, DATABASES

DEBUG = False
PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
# A file-backed test database so real worker processes can share it.
_test_db = Path(os.environ.get("THEMIS_TEST_DB", BASE_DIR / "var" / "test" / "test.sqlite3"))
_test_db.parent.mkdir(parents=True, exist_ok=True)
DATABASES["default"]["TEST"] = {"NAME": str(_test_db)}
