"""Pre-flight: disk, memory and dependency checks from the manifest alone."""

from __future__ import annotations

import builtins
import io
import json
import os
import subprocess
import tarfile
from io import BufferedReader
from pathlib import Path
from typing import Any

import pytest

from tests.engine.apply_fixtures import (  # noqa: F401  (fixtures)
    NEW_FILES,
    OLD_TREE,
    REPO,
    Node,
    bundles_fixture,
    node_fixture,
    small_tmpfs_fixture,
    snapshot,
    split,
)
from updates.engine.apply import apply_bundle
from updates.engine.errors import EngineError, PreflightFailed
from updates.engine.preflight import preflight
from updates.engine.state import NodeState, save_state


def _checks(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in report["checks"]}


def test_report_has_every_check_with_figure_and_threshold(node: Node) -> None:
    save_state(node.state, NodeState(components={"glibc": "2.36", "kernel": "6.1.0"}))
    bundle = node.maker.make("2.0", NEW_FILES, dependencies={"glibc": ">=2.31", "kernel": ">=5"})
    report = preflight(bundle, target=node.target, state_dir=node.state).to_dict()
    assert report["ok"] and report["version"] == "2.0"
    checks = _checks(report)
    assert set(checks) == {
        "disk_target", "disk_state_dir", "memory", "dependency:glibc", "dependency:kernel",
    }  # fmt: skip
    # Sized from the manifest: the new files plus the old ones the point may keep.
    unpacked = sum(len(split(v)[0]) for v in NEW_FILES.values())
    replaced = sum(len(split(OLD_TREE[rel])[0]) for rel in NEW_FILES if rel in OLD_TREE)
    assert report["disk"]["unpacked_bytes"] == unpacked
    assert report["disk"]["restore_point_bytes"] == replaced
    assert checks["disk_target"]["threshold"] == unpacked + replaced  # one filesystem
    assert checks["disk_state_dir"]["threshold"] == unpacked + replaced
    assert checks["disk_target"]["value"] >= unpacked + replaced
    assert checks["dependency:glibc"] == {
        "name": "dependency:glibc", "ok": True, "value": "2.36", "threshold": ">=2.31",
        "unit": "", "detail": "glibc 2.36 satisfies >=2.31",
    }  # fmt: skip


def test_failed_dependency_exit_20_before_anything_is_written(node: Node) -> None:
    bundle = node.maker.make("2.0", NEW_FILES, dependencies={"glibc": ">=2.40", "zlib": "~=1.3"})
    save_state(node.state, NodeState(components={"glibc": "2.36"}))
    listing = sorted(node.state.rglob("*"))
    before = snapshot(node.target)
    with pytest.raises(PreflightFailed, match="glibc 2.36 does not satisfy >=2.40") as err:
        apply_bundle(bundle, **node.kwargs())
    assert err.value.exit_code == 20 and "+1 more" in str(err.value)
    assert snapshot(node.target) == before
    assert sorted(node.state.rglob("*")) == listing  # not even the lock file


def test_memory_floor(node: Node) -> None:
    bundle = node.maker.make("2.0", NEW_FILES)
    report = preflight(bundle, target=node.target, state_dir=node.state, min_memory_mb=1 << 30)
    assert not report.ok
    assert [c.name for c in report.failures()] == ["memory"]


def test_disk_space_on_small_filesystem(node: Node, small_tmpfs: Path) -> None:
    """A 2 MiB state dir: room to stage 1.5 MB of new files, not to also keep the
    1 MB old file they replace in the restore point."""
    bundle = node.maker.make("2.0", {"big": os.urandom(1500 << 10)})
    state = small_tmpfs / "not-yet-created" / "state"
    assert preflight(bundle, target=node.target, state_dir=state).ok
    (node.target / "big").write_bytes(os.urandom(1000 << 10))
    report = preflight(bundle, target=node.target, state_dir=state)
    [failed] = report.failures()
    need = (1500 << 10) + (1000 << 10)
    assert failed.name == "disk_state_dir" and failed.threshold == need
    assert f"need {need} ({1500 << 10} unpacked files + {1000 << 10} restore point" in failed.detail
    assert f"{failed.value} bytes free on the filesystem of {state}" in failed.detail
    # The target is on another filesystem: the new files are copied in, nothing else.
    assert report.disk["shared_filesystem"] == 0
    assert _checks(report.to_dict())["disk_target"]["threshold"] == 1500 << 10
    with pytest.raises(PreflightFailed, match=rf"disk_state_dir: .* need {need} ") as err:
        apply_bundle(bundle, **node.kwargs(state_dir=state))
    assert err.value.exit_code == 20
    assert not state.exists()


def test_cli_prints_report_and_exits_20(node: Node) -> None:
    bundle = node.maker.make("2.0", NEW_FILES, dependencies={"zlib": ">=1"})
    args: list[str | Path] = [
        "preflight",
        bundle,
        "--target",
        node.target,
        "--state-dir",
        node.state,
    ]
    proc = subprocess.run(node.cli(*args), capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 20
    report = json.loads(proc.stdout)
    assert not report["ok"] and not _checks(report)["dependency:zlib"]["ok"]
    assert proc.stderr.count("\n") == 1 and "dependency:zlib" in proc.stderr
    save_state(node.state, NodeState(components={"zlib": "1.3"}))
    proc = subprocess.run(node.cli(*args), capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0 and json.loads(proc.stdout)["ok"]


class _CountingFile:
    """A file that adds every byte read through it to `counter`."""

    def __init__(self, raw: BufferedReader, counter: list[int]) -> None:
        self._raw, self._counter = raw, counter

    def read(self, size: int | None = -1) -> bytes:
        data = self._raw.read(size)
        self._counter[0] += len(data)
        return data

    def readinto(self, buffer: Any) -> int:
        count = self._raw.readinto(buffer)
        self._counter[0] += count
        return count

    def __getattr__(self, name: str) -> Any:
        return getattr(self._raw, name)

    def __enter__(self) -> _CountingFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self._raw.close()


def _count_bundle_reads(monkeypatch: pytest.MonkeyPatch, bundle: Path) -> list[int]:
    """Bytes read from `bundle` through open() (builtins and io, which pathlib uses)."""
    counter = [0]
    real_open = builtins.open

    def counting_open(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        handle = real_open(file, mode, *args, **kwargs)
        is_bundle = isinstance(file, str | os.PathLike) and Path(file).resolve() == bundle.resolve()
        if is_bundle and isinstance(handle, BufferedReader):
            return _CountingFile(handle, counter)
        return handle

    monkeypatch.setattr(builtins, "open", counting_open)
    monkeypatch.setattr(io, "open", counting_open)
    return counter


def test_preflight_reads_the_manifest_not_the_payload(
    node: Node, monkeypatch: pytest.MonkeyPatch
) -> None:
    bundle = node.maker.make("2.0", {"big": os.urandom(20 << 20)})
    size = bundle.stat().st_size
    read = _count_bundle_reads(monkeypatch, bundle)
    report = preflight(bundle, target=node.target, state_dir=node.state)
    assert report.ok and report.bundle_size == size
    # The manifest and signature come first: a few blocks of a 20 MB file. (More than
    # nothing: the count sees the reads pre-flight makes.)
    assert 0 < read[0] < 1 << 20, (read[0], size)


def test_preflight_passes_a_bundle_whose_payload_is_garbage(node: Node) -> None:
    bundle = node.maker.make("2.0", {"big": os.urandom(4 << 20)})
    with tarfile.open(bundle) as tar:
        payload = next(m for m in tar.getmembers() if m.name.startswith("payload/"))
    size = bundle.stat().st_size
    with open(bundle, "r+b") as handle:
        # From the payload's header to the end: no tar record, no file data is left.
        handle.seek(payload.offset)
        handle.write(b"\xff" * (size - payload.offset))
    assert bundle.stat().st_size == size
    report = preflight(bundle, target=node.target, state_dir=node.state)
    assert report.ok and report.version == "2.0"
    # Anything that reads the payload fails on it.
    with pytest.raises(EngineError):
        apply_bundle(bundle, **node.kwargs())


def test_min_version_needs_the_upgrade_path_first(node: Node) -> None:
    save_state(node.state, NodeState(installed_version="1.2.0", highest_version="1.2.0"))
    bundle = node.maker.make("2.0", NEW_FILES, min_version="1.5")
    listing = sorted(node.state.rglob("*"))
    before = snapshot(node.target)
    with pytest.raises(PreflightFailed, match="installed 1.2.0, bundle needs at least 1.5") as err:
        apply_bundle(bundle, **node.kwargs())
    assert err.value.exit_code == 20
    assert snapshot(node.target) == before
    assert sorted(node.state.rglob("*")) == listing
    save_state(node.state, NodeState(installed_version="1.5.0", highest_version="1.5.0"))
    report = preflight(bundle, target=node.target, state_dir=node.state)
    assert report.ok and _checks(report.to_dict())["min_version"]["ok"]


def test_min_version_does_not_block_a_fresh_node(node: Node) -> None:
    bundle = node.maker.make("2.0", NEW_FILES, min_version="1.5")
    report = preflight(bundle, target=node.target, state_dir=node.state)
    assert report.ok and "min_version" not in _checks(report.to_dict())


def test_disk_is_sized_from_the_unpacked_files_not_the_compressed_bundle(node: Node) -> None:
    files = {"data/zeros.bin": bytes(8 << 20)}
    bundle = node.maker.make("2.0", files, name="themisdb-2.0.tar.zst")
    assert bundle.stat().st_size < 1 << 20  # 8 MB of zeros compress to almost nothing
    report = preflight(bundle, target=node.target, state_dir=node.state)
    assert report.disk["unpacked_bytes"] == 8 << 20
    assert _checks(report.to_dict())["disk_state_dir"]["threshold"] == 8 << 20


def test_unchanged_files_the_last_commit_installed_cost_the_point_nothing(node: Node) -> None:
    big = os.urandom(1 << 20)
    apply_bundle(node.maker.make("2.0", {"lib/big.so": big, "bin/themisd": b"v2"}), **node.kwargs())
    bundle = node.maker.make("3.0", {"lib/big.so": big, "bin/themisd": b"v3!"})
    report = preflight(bundle, target=node.target, state_dir=node.state)
    # big.so is byte for byte what the hash cache says is installed: linked, not kept.
    assert report.disk["restore_point_bytes"] == len(b"v2")
    assert report.disk["unpacked_bytes"] == len(big) + 3
    # Changed outside the engine: the cache no longer vouches for it.
    with open(node.target / "lib/big.so", "r+b") as fh:
        fh.write(b"local edit")
    report = preflight(bundle, target=node.target, state_dir=node.state)
    assert report.disk["restore_point_bytes"] == len(big) + len(b"v2")


def test_a_resumable_staging_of_the_same_manifest_counts_as_staged(
    node: Node, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.engine.test_recover import crash_in_child, die_after_state
    from updates.engine import apply as apply_mod
    from updates.engine import journal as J
    from updates.engine.apply import recover

    files = {"lib/big.so": os.urandom(1 << 20)}
    bundle = node.maker.make("2.0", files)
    assert (
        preflight(bundle, target=node.target, state_dir=node.state).disk["already_staged_bytes"]
        == 0
    )
    crash_in_child(
        lambda: apply_bundle(bundle, **node.kwargs()), die_after_state(monkeypatch, J.STAGED)
    )
    monkeypatch.undo()
    recover(target=node.target, state_dir=node.state)  # keeps the staging for a re-run
    assert (node.state / apply_mod.RESUME_FILE).exists()
    resumed = preflight(bundle, target=node.target, state_dir=node.state)
    assert resumed.disk["already_staged_bytes"] == 1 << 20
    threshold = _checks(resumed.to_dict())["disk_state_dir"]["threshold"]
    before = _checks(fresh_report(bundle, node))["disk_state_dir"]["threshold"]
    assert threshold == before - (1 << 20)
    # Another bundle's manifest gets no credit from it.
    other = node.maker.make("2.1", files)
    assert (
        preflight(other, target=node.target, state_dir=node.state).disk["already_staged_bytes"] == 0
    )


def fresh_report(bundle: Path, node: Node) -> dict[str, Any]:
    """The report as if nothing were staged (the resume record moved aside)."""
    from updates.engine import apply as apply_mod

    record = node.state / apply_mod.RESUME_FILE
    aside = record.with_name("aside.json")
    record.rename(aside)
    try:
        return preflight(bundle, target=node.target, state_dir=node.state).to_dict()
    finally:
        aside.rename(record)


def test_preflight_names_the_resume_file_apply_writes() -> None:
    import importlib

    from updates.engine import apply as apply_mod

    preflight_mod = importlib.import_module("updates.engine.preflight")
    assert preflight_mod.RESUME_FILE == apply_mod.RESUME_FILE
    assert preflight_mod.STAGING_DIR == apply_mod.STAGING_DIR
