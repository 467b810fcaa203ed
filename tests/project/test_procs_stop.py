"""How the suite stops the processes it started (tests/procs.py `stop_all`): SIGTERM to
each process, so it ends through its own handlers (and saves its coverage data), then
SIGKILL for whatever of its group is left when the grace period is over, with a warning
naming it."""

from __future__ import annotations

import signal
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests import procs

UP = "import signal, sys, time\n{setup}\nprint('up', flush=True)\ntime.sleep(120)\n"


def _start(name: str, setup: str, log_dir: Path) -> procs.Proc:
    proc = procs.spawn(
        name, [sys.executable, "-c", UP.format(setup=setup)], procs.inherited_env(), log_dir
    )
    assert procs.wait_until(lambda: "up" in proc.output(), 60, 0.05), proc.output()
    return proc


def test_a_process_that_ends_on_sigterm_ends_through_its_handler(
    tmp_path: Path, recwarn: pytest.WarningsRecorder
) -> None:
    polite = _start("polite", "signal.signal(signal.SIGTERM, lambda *_: sys.exit(3))", tmp_path)
    procs.stop_all([polite], grace=30)
    assert polite.popen.returncode == 3  # its own exit, not a kill
    assert not [w for w in recwarn if "SIGTERM" in str(w.message)]


def test_processes_are_stopped_at_once_not_one_grace_after_another(tmp_path: Path) -> None:
    stubborn = [
        _start(f"stubborn-{i}", "signal.signal(signal.SIGTERM, signal.SIG_IGN)", tmp_path)
        for i in range(3)
    ]
    started = time.monotonic()
    with pytest.warns(UserWarning, match="after SIGTERM, killed") as warned:
        procs.stop_all(stubborn, grace=2)
    assert time.monotonic() - started < 4.5  # one grace period for all three, not 6 s
    assert all(p.popen.returncode == -signal.SIGKILL for p in stubborn)
    assert sorted(str(w.message).split(":")[0] for w in warned) == [
        "stubborn-0",
        "stubborn-1",
        "stubborn-2",
    ]
    assert "still running 2 s after SIGTERM, killed" in str(warned[0].message)


def test_what_is_left_of_the_group_is_killed_and_named(tmp_path: Path) -> None:
    # The leader ends on SIGTERM; a command it started, deaf to SIGTERM, stays behind.
    child = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(120)"
    setup = (
        "import subprocess\n"
        f"left = subprocess.Popen([sys.executable, '-c', {child!r}])\n"
        "signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))"
    )
    leader = _start("leader", setup, tmp_path)
    (orphan,) = psutil.Process(leader.popen.pid).children()
    with pytest.warns(UserWarning, match=r"leader: still running 1 s after SIGTERM, killed: \["):
        procs.stop_all([leader], grace=1)
    assert leader.popen.returncode == 0
    assert procs.wait_until(
        lambda: not orphan.is_running() or orphan.status() == psutil.STATUS_ZOMBIE, 10, 0.05
    )
