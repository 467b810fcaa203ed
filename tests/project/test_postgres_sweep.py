"""The sweep of leftover test clusters removes only those whose session is gone."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import postgres


@pytest.fixture
def cluster_dirs() -> Iterator[list[Path]]:
    made: list[Path] = []
    yield made
    for root in made:
        shutil.rmtree(root, ignore_errors=True)


def _cluster(made: list[Path]) -> Path:
    """A cluster's directory, young: no other session's sweep takes it yet."""
    root = Path(tempfile.mkdtemp(prefix=postgres.ROOT_PREFIX))
    made.append(root)
    (root / "data").mkdir()
    (root / "data" / "PG_VERSION").write_text("15\n")
    return root


def _age(root: Path, seconds: float) -> None:
    then = time.time() - seconds
    os.utime(root, (then, then))


HOLD_LOCK = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_CREAT | os.O_RDWR, 0o600)
fcntl.flock(fd, fcntl.LOCK_EX)
print("held", flush=True)
time.sleep(60)
"""


def test_a_cluster_whose_owner_lives_is_kept_even_when_old(cluster_dirs: list[Path]) -> None:
    root = _cluster(cluster_dirs)
    owner = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(root / postgres.OWNER_LOCK)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert owner.stdout is not None and owner.stdout.readline().strip() == "held"
        _age(root, 3600)
        assert root not in postgres.sweep_stale_clusters()
        assert (root / "data" / "PG_VERSION").is_file()
    finally:
        owner.kill()
        owner.wait(timeout=10)
    # The kernel dropped the lock with its holder: now the cluster is a leftover.
    postgres.sweep_stale_clusters()  # (or another test process's sweep, first)
    assert not root.exists()


def test_a_young_cluster_without_a_lock_file_is_kept_and_an_old_one_removed(
    cluster_dirs: list[Path],
) -> None:
    young, old = _cluster(cluster_dirs), _cluster(cluster_dirs)
    _age(old, 3600)
    # (Another test process's sweep may take the old one first: either way it is gone.)
    removed = postgres.sweep_stale_clusters(older_than=600)
    assert young not in removed and (young / "data" / "PG_VERSION").is_file()
    assert not old.exists()


def test_a_running_server_survives_another_sessions_sweep() -> None:
    with postgres.postgres_server() as server:
        # Old enough to be swept were it not held (a minute: younger directories of other
        # test processes, still taking their lock, are left alone).
        _age(server.root, 3600)
        assert server.root not in postgres.sweep_stale_clusters(older_than=60)
        assert (server.data_dir / "postmaster.pid").is_file()
    assert not server.root.exists()
