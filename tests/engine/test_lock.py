"""The node lock: one operation at a time, released the instant its holder
dies, never inherited by child processes."""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.engine.apply_fixtures import (  # noqa: F401  (fixtures)
    NEW_FILES,
    NEW_REMOVE,
    PYTHON,
    REPO,
    Node,
    bundles_fixture,
    node_fixture,
    snapshot,
)
from tests.procs import wait_until
from updates.engine.apply import apply_bundle, list_points, rollback
from updates.engine.errors import AlreadyInProgress
from updates.engine.lock import LOCK_FILE, NodeLock, boot_id, read_holder
from updates.engine.state import load_state


def _state_listing(state: Path) -> list[str]:
    return sorted(str(p.relative_to(state)) for p in state.rglob("*"))


def test_second_apply_while_locked_changes_nothing_100_times(node: Node) -> None:
    bundle = node.maker.make("2.0", NEW_FILES, remove=NEW_REMOVE)
    before = snapshot(node.target)
    with NodeLock(node.state, command="test"):
        listing = _state_listing(node.state)
        for _ in range(100):
            with pytest.raises(AlreadyInProgress) as err:
                apply_bundle(bundle, **node.kwargs())
            assert err.value.exit_code == 21
        with pytest.raises(AlreadyInProgress):
            rollback(target=node.target, state_dir=node.state)
        assert snapshot(node.target) == before
        assert _state_listing(node.state) == listing
    assert load_state(node.state).installed_version is None
    apply_bundle(bundle, **node.kwargs())  # and once released, it proceeds


def test_cli_exits_21_naming_the_holder(node: Node) -> None:
    bundle = node.maker.make("2.0", NEW_FILES, remove=NEW_REMOVE)
    before = snapshot(node.target)
    commands: tuple[list[str | Path], ...] = (
        ["apply", bundle, "--target", node.target, "--state-dir", node.state,
         "--trust-anchor", node.trust_anchor],
        ["rollback", "--target", node.target, "--state-dir", node.state],
        ["recover", "--target", node.target, "--state-dir", node.state],
    )  # fmt: skip
    with NodeLock(node.state, command="test"):
        for argv in commands:
            proc = subprocess.run(node.cli(*argv), capture_output=True, text=True, cwd=REPO)
            assert proc.returncode == 21, proc.stderr
            [line] = proc.stderr.strip().splitlines()
            assert "ALREADY_IN_PROGRESS" in line and f"pid {os.getpid()}" in line
    assert snapshot(node.target) == before


def test_holder_info_for_diagnosis(tmp_path: Path) -> None:
    with NodeLock(tmp_path, command="apply"):
        holder = read_holder(tmp_path)
        assert holder["pid"] == os.getpid() and holder["command"] == "apply"
        assert holder["boot_id"] == boot_id() and boot_id()
    assert (tmp_path / LOCK_FILE).exists()  # never deleted


def test_killed_holder_releases_at_once(tmp_path: Path) -> None:
    # The holder sleeps only to keep the lock until it is killed (never that long).
    code = textwrap.dedent(f"""
        import sys, time
        from updates.engine.lock import NodeLock
        NodeLock({str(tmp_path)!r}).acquire()
        print("held", flush=True)
        time.sleep(60)
    """)
    proc = subprocess.Popen([str(PYTHON), "-c", code], stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert proc.stdout and proc.stdout.readline().strip() == "held"
        with pytest.raises(AlreadyInProgress):
            NodeLock(tmp_path).acquire()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=20)
    NodeLock(tmp_path).acquire().release()  # no wait, no stale-lock cleanup


def test_lock_fd_is_close_on_exec(tmp_path: Path) -> None:
    lock = NodeLock(tmp_path).acquire()
    try:
        assert lock.fd is not None
        assert fcntl.fcntl(lock.fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
        # Even a child that keeps every inheritable fd must not get the lock.
        proc = subprocess.run(
            ["ls", "-l", "/proc/self/fd/"], capture_output=True, text=True, close_fds=False
        )
        assert str(tmp_path / LOCK_FILE) not in proc.stdout
    finally:
        lock.release()


HEALTH_PROBE = """
import fcntl, os, sys
lock = os.path.join(sys.argv[1], "lock")
for fd in os.listdir("/proc/self/fd"):
    try:
        if os.readlink(f"/proc/self/fd/{fd}") == lock:
            sys.exit(f"inherited the lock as fd {fd}")
    except OSError:
        pass
mine = os.open(lock, os.O_RDWR)
try:
    fcntl.flock(mine, fcntl.LOCK_EX | fcntl.LOCK_NB)
    sys.exit("lock not held during the health check")
except BlockingIOError:
    pass
"""


def test_health_cmd_does_not_inherit_lock(node: Node, tmp_path: Path) -> None:
    probe = tmp_path / "probe.py"
    probe.write_text(HEALTH_PROBE)
    bundle = node.maker.make("2.0", NEW_FILES, remove=NEW_REMOVE)
    result = apply_bundle(
        bundle, **node.kwargs(health_cmd=f"{sys.executable} {probe} {node.state.resolve()}")
    )
    assert result.health and result.health["ok"], result.health


@pytest.mark.parametrize("round_", range(2))
def test_real_concurrent_applies_exactly_one_proceeds(node: Node, round_: int) -> None:
    bundle = node.maker.make("2.0", NEW_FILES, remove=NEW_REMOVE)
    # The one that takes the lock holds it in its health check until the other three have
    # given up, however late they start: the check waits for `go` (at most 60 s).
    go = node.state.parent / f"go-{round_}"
    health = f"i=0; while [ ! -e {go} ] && [ $i -lt 1200 ]; do sleep 0.05; i=$((i+1)); done"
    argv = node.cli(
        "apply", bundle, "--target", node.target, "--state-dir", node.state,
        "--trust-anchor", node.trust_anchor, "--health-cmd", health, "--health-timeout", "120",
    )  # fmt: skip
    procs = [
        subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO)
        for _ in range(4)
    ]
    try:
        three_gave_up = wait_until(lambda: sum(p.poll() is not None for p in procs) == 3, 60)
    finally:
        go.touch()
    codes = sorted(p.wait(timeout=60) for p in procs)
    assert three_gave_up, codes
    assert codes == [0, 21, 21, 21], [p.stderr.read() for p in procs if p.stderr]
    assert load_state(node.state).installed_version == "2.0"
    assert len(list_points(node.state)) == 1
