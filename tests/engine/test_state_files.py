"""State files are replaced atomically by any number of threads, and recovery sweeps only
the temp files of writers that died mid-write."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

from updates.engine.state import sweep_dead_writers_temps, write_json_atomic


def _dead_pid() -> int:
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], check=True,
                          capture_output=True, text=True)  # fmt: skip
    return int(proc.stdout)


def test_threads_writing_one_file_never_collide(tmp_path: Path) -> None:
    target = tmp_path / "report-sequence.json"
    errors: list[BaseException] = []

    def write(n: int) -> None:
        try:
            for i in range(200):
                write_json_atomic(target, {"writer": n, "i": i})
        except BaseException as exc:  # noqa: BLE001 - collected for the assertion
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not any(thread.is_alive() for thread in threads), "a writer hung"
    assert errors == []
    assert json.loads(target.read_text())["i"] == 199
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report-sequence.json"]


def test_sweep_deletes_a_dead_writers_temp_and_keeps_a_live_ones(tmp_path: Path) -> None:
    dead = _dead_pid()
    (tmp_path / "node-state.json").write_text("{}")
    leftovers = [f".node-state.json.{dead}.140.tmp", f".last-job.json.{dead}.tmp"]
    in_flight = f".report-sequence.json.{os.getpid()}.77.tmp"
    for name in [*leftovers, in_flight]:
        (tmp_path / name).write_text("{")

    assert sorted(sweep_dead_writers_temps(tmp_path)) == sorted(leftovers)
    assert sorted(p.name for p in tmp_path.iterdir()) == [in_flight, "node-state.json"]
    assert (tmp_path / "node-state.json").read_text() == "{}"


def test_sweep_deletes_a_temp_that_names_no_writer(tmp_path: Path) -> None:
    (tmp_path / ".state.tmp").write_text("{")
    assert sweep_dead_writers_temps(tmp_path) == [".state.tmp"]
    assert list(tmp_path.iterdir()) == []
