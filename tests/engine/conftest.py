"""Fixtures for the engine tests: plain Python, no Django, no database."""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

import pytest

from updates.engine.devpki import Pki, make_pki


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """A real code-signing PKI made with the openssl CLI, once per session."""
    return make_pki(tmp_path_factory.mktemp("bundle-pki"))


def tree_snapshot(root: Path) -> dict[str, tuple[object, ...]]:
    """Every entry under `root` (type, mode, content hash): compare before and
    after to prove a rejected bundle wrote nothing."""
    result: dict[str, tuple[object, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            info = path.lstat()
            rel = str(path.relative_to(root))
            if stat.S_ISREG(info.st_mode):
                digest = hashlib.sha256(path.read_bytes()).hexdigest()
                result[rel] = ("file", stat.S_IMODE(info.st_mode), digest)
            else:
                result[rel] = (stat.S_IFMT(info.st_mode), stat.S_IMODE(info.st_mode))
    return result
