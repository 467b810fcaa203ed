"""Rollback, restore points and retention, through the API and the CLI."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.engine.apply_fixtures import (  # noqa: F401  (fixtures)
    NEW_FILES,
    NEW_REMOVE,
    OLD_TREE,
    REPO,
    Files,
    Node,
    bundles_fixture,
    node_fixture,
    small_tmpfs_fixture,
    snapshot,
    split,
)
from updates.engine.apply import ApplyResult, apply_bundle, list_points, prune_points, rollback
from updates.engine.errors import RestorePointCorrupt, UsageError
from updates.engine.journal import JOURNAL_FILE
from updates.engine.state import load_state


def _apply(
    node: Node, version: str, files: Files | None = None, remove: list[str] | None = None
) -> ApplyResult:
    bundle = node.maker.make(version, files or NEW_FILES, remove=remove)
    return apply_bundle(bundle, **node.kwargs())


def _cli(node: Node, *args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(node.cli(*args), capture_output=True, text=True, cwd=REPO)


def test_rollback_restores_bytes_and_modes(node: Node) -> None:
    before = snapshot(node.target)
    _apply(node, "2.0", remove=NEW_REMOVE)
    assert snapshot(node.target) != before
    result = rollback(target=node.target, state_dir=node.state)
    assert snapshot(node.target) == before
    assert (result["version_from"], result["version_to"]) == ("2.0", None)
    state = load_state(node.state)
    assert (state.installed_version, state.highest_version) == (None, "2.0")
    assert not (node.state / JOURNAL_FILE).exists()


def test_rollback_cli_after_binary_corrupted(node: Node) -> None:
    """Integration: update, corrupt the installed binary in place, roll back:
    the original binary is back with its SHA-256."""
    _apply(node, "1.5", {"bin/themisd": OLD_TREE["bin/themisd"]})
    _apply(node, "2.0", remove=NEW_REMOVE)
    binary = node.target / "bin/themisd"
    with open(binary, "r+b") as fh:
        fh.write(b"CORRUPTED")
    proc = _cli(node, "rollback", "--target", node.target, "--state-dir", node.state)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["version_to"] == "1.5"
    data, mode = split(OLD_TREE["bin/themisd"])
    assert hashlib.sha256(binary.read_bytes()).digest() == hashlib.sha256(data).digest()
    assert os.stat(binary).st_mode & 0o7777 == mode
    assert (node.target / "lib/old.so").exists()
    assert load_state(node.state).installed_version == "1.5"


def test_corrupt_point_exit_25_nothing_restored(node: Node) -> None:
    result = _apply(node, "2.0", remove=NEW_REMOVE)
    blobs = node.state / "points" / result.restore_point / "blobs"
    blob = sorted(blobs.iterdir())[0]
    blob.unlink()  # break the link, then plant other bytes under the same name
    blob.write_bytes(b"bit rot")
    before = snapshot(node.target)
    with pytest.raises(RestorePointCorrupt, match="SHA-256") as err:
        rollback(target=node.target, state_dir=node.state)
    assert err.value.exit_code == 25
    assert snapshot(node.target) == before
    assert load_state(node.state).installed_version == "2.0"
    proc = _cli(node, "rollback", "--target", node.target, "--state-dir", node.state)
    assert proc.returncode == 25 and "RESTORE_POINT_CORRUPT" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert snapshot(node.target) == before


def test_missing_blob_and_garbled_point_json_are_corrupt(node: Node) -> None:
    result = _apply(node, "2.0", remove=NEW_REMOVE)
    pdir = node.state / "points" / result.restore_point
    (pdir / "blobs" / "0").unlink()
    with pytest.raises(RestorePointCorrupt, match="unreadable"):
        rollback(target=node.target, state_dir=node.state, point_id=result.restore_point)
    (pdir / "point.json").write_text("{not json")
    with pytest.raises(RestorePointCorrupt):
        rollback(target=node.target, state_dir=node.state, point_id=result.restore_point)
    proc = _cli(node, "points", "--state-dir", node.state)
    [listed] = json.loads(proc.stdout)
    assert listed["id"] == result.restore_point and listed["corrupt"] is True


def test_rollback_several_versions_back(node: Node) -> None:
    before = snapshot(node.target)
    first = _apply(node, "2.0", remove=NEW_REMOVE)
    _apply(node, "3.0", {"bin/themisd": (b"v3", 0o700), "doc/new/README": b"3"})
    _apply(node, "4.0", {"bin/themisd": (b"v4", 0o755)}, remove=["lib/libthemis.so"])
    rollback(target=node.target, state_dir=node.state, point_id=first.restore_point)
    assert snapshot(node.target) == before
    assert load_state(node.state).installed_version is None
    # forward again, then step back one version at a time
    _apply(node, "4.0", {"bin/themisd": (b"v4", 0o755)})
    rollback(target=node.target, state_dir=node.state)
    assert snapshot(node.target) == before


def test_repeated_rollback_steps_back(node: Node) -> None:
    before = snapshot(node.target)
    _apply(node, "2.0", remove=NEW_REMOVE)
    middle = snapshot(node.target)
    _apply(node, "3.0", {"bin/themisd": (b"v3", 0o700)})
    assert rollback(target=node.target, state_dir=node.state)["version_to"] == "2.0"
    assert snapshot(node.target) == middle
    assert rollback(target=node.target, state_dir=node.state)["version_to"] is None
    assert snapshot(node.target) == before
    with pytest.raises(UsageError, match="not found"):
        rollback(target=node.target, state_dir=node.state)


def test_lower_highest(node: Node) -> None:
    _apply(node, "2.0")
    rollback(target=node.target, state_dir=node.state, lower_highest=True)
    state = load_state(node.state)
    assert (state.installed_version, state.highest_version) == (None, None)


def test_unknown_point(node: Node) -> None:
    _apply(node, "2.0")
    proc = _cli(
        node, "rollback", "--target", node.target, "--state-dir", node.state, "--point", "nope"
    )
    assert proc.returncode == 2 and "nope" in proc.stderr


def test_points_and_prune_cli(node: Node) -> None:
    ids = [_apply(node, f"2.{i}", {"bin/themisd": f"{i}".encode()}).restore_point for i in range(4)]
    proc = _cli(node, "points", "--state-dir", node.state)
    points = json.loads(proc.stdout)
    assert [p["id"] for p in points] == ids[-3:]  # default keep 3
    assert {"id", "version", "created", "size", "file_count"} <= set(points[0])
    assert points[-1]["version"] == "2.2" and points[-1]["file_count"] == 1
    proc = _cli(node, "prune", "--state-dir", node.state, "--keep", "1")
    assert json.loads(proc.stdout)["pruned"] == ids[1:3]
    assert [p["id"] for p in list_points(node.state)] == ids[-1:]
    # The point a rollback of the installed version needs is never pruned, not even by 0.
    assert prune_points(node.state, 0) == []
    assert [p["id"] for p in list_points(node.state)] == ids[-1:]


def test_point_copies_when_hardlink_impossible(node: Node, small_tmpfs: Path) -> None:
    """State dir on another filesystem: link(2) fails with EXDEV, so copy."""
    node.state = small_tmpfs / "state"
    before = snapshot(node.target)
    result = _apply(node, "2.0", remove=NEW_REMOVE)
    [point] = list_points(node.state)
    assert point["file_count"] == 3 and point["shared_bytes"] == 0
    assert result.linked_files == 0  # staging is on the tmpfs too: copied in
    rollback(target=node.target, state_dir=node.state)
    assert snapshot(node.target) == before


def test_point_reuses_hashes_of_what_the_last_commit_installed(
    node: Node, monkeypatch: pytest.MonkeyPatch
) -> None:
    from updates.engine import restore

    _apply(node, "2.0", remove=NEW_REMOVE)
    with open(node.target / "lib/libthemis.so", "r+b") as fh:  # changed in place: rehash
        fh.write(b"LOCAL EDIT")
    hashed: list[Path] = []
    real = restore.sha256_file

    def recording_sha256(path: Path) -> str:
        hashed.append(path)
        return real(path)

    monkeypatch.setattr(restore, "sha256_file", recording_sha256)
    files = {rel: (b"v3 " + rel.encode(), 0o755) for rel in NEW_FILES}
    result = _apply(node, "3.0", files)
    point = restore.load_point(node.state, result.restore_point)
    assert len(hashed) == 1  # only the edited file was read
    monkeypatch.undo()
    restore.verify_point(point)  # the reused hashes are the true ones
    rollback(target=node.target, state_dir=node.state)
    assert (node.target / "lib/libthemis.so").read_bytes().startswith(b"LOCAL EDIT")
    assert not (node.state / restore.HASH_CACHE).exists()  # rollback forgets them
