"""Lean restore points: what each old file is stored as, restoring from every storage,
corrupt blobs and missing delta bases (exit 25, nothing restored), crashes mid-restore,
points made before lean storage, and retention by count, age and disk use."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from tests.engine.apply_fixtures import (  # noqa: F401  (fixtures)
    REPO,
    Files,
    Node,
    bundles_fixture,
    node_fixture,
    small_tmpfs_fixture,
    snapshot,
    write_tree,
)
from tests.engine.test_recover import CRASH, crash_in_child, die_after_state, die_on_call
from updates.engine import journal as J
from updates.engine import restore
from updates.engine.apply import (
    ApplyResult,
    apply_bundle,
    list_points,
    prune_points,
    recover,
    rollback,
)
from updates.engine.errors import AlreadyInProgress, HealthCheckFailed, RestorePointCorrupt
from updates.engine.journal import JOURNAL_FILE, Journal
from updates.engine.lock import NodeLock
from updates.engine.point_storage import DELTA, FULL, ZSTD, NewFile
from updates.engine.restore import (
    DiskUse,
    SchemaMark,
    create_point,
    load_point,
    needed_points,
    points_disk_usage,
    verify_point,
)
from updates.engine.retention import Retention, cleanup_points, parse_duration, parse_size
from updates.engine.state import load_state

KIB = 1 << 10


def _random(seed: int, size: int) -> bytes:
    return random.Random(seed).randbytes(size)


def _text(tag: str, size: int) -> bytes:
    line = f"{tag}: the quick brown fox jumps over the lazy dog\n".encode()
    return (line * (size // len(line) + 1))[:size]


def _edited(data: bytes, seed: int) -> bytes:
    """A new build of a binary: a few small edits, an insert, an append."""
    rng = random.Random(seed)
    new = bytearray(data)
    for _ in range(8):
        pos = rng.randrange(len(new) - 64)
        new[pos : pos + 32] = rng.randbytes(32)
    new[len(new) // 2 : len(new) // 2] = rng.randbytes(500)
    return bytes(new + rng.randbytes(300))


THEMISD_2 = _edited(_random(2, 900 * KIB), 7)
THEMISD_3 = _edited(THEMISD_2, 8)

# Version 1.0 on the node and the 2.0 update: one file per storage a point can choose.
OLD: dict[str, bytes | tuple[bytes, int]] = {
    "lib/same.so": _random(1, 600 * KIB),  # unchanged: linked to the inode the target keeps
    "bin/themisd": (_random(2, 900 * KIB), 0o755),  # rebuilt: a delta against 2.0's
    "share/docs.txt": _text("1.0", 400 * KIB),  # rewritten: compressible, unlike its successor
    "lib/blob.bin": _random(3, 200 * KIB),  # rewritten, incompressible: the old inode
    "etc/old.conf": (_text("old conf", 300 * KIB), 0o600),  # removed: compressed
}
NEW: dict[str, bytes | tuple[bytes, int]] = {
    "lib/same.so": _random(1, 600 * KIB),
    "bin/themisd": (THEMISD_2, 0o750),
    "share/docs.txt": _random(4, 300 * KIB),
    "lib/blob.bin": _random(5, 200 * KIB),
    "share/added.txt": b"new in 2.0",
}
REMOVE = ["etc/old.conf"]
EXPECTED = {
    "lib/same.so": FULL,
    "bin/themisd": DELTA,
    "share/docs.txt": ZSTD,
    "lib/blob.bin": FULL,
    "etc/old.conf": ZSTD,
}


@pytest.fixture(name="lean")
def lean_fixture(node: Node) -> Node:
    """The node with 1.0 (OLD) installed by hand: no hash cache, no points."""
    shutil.rmtree(node.target)
    write_tree(node.target, OLD)
    return node


def _apply(
    node: Node, version: str, files: Files, remove: list[str] | None = None, keep: int = 3
) -> ApplyResult:
    bundle = node.maker.make(version, files, remove=remove)
    return apply_bundle(bundle, **node.kwargs(keep=keep))


def _size(value: bytes | tuple[bytes, int]) -> int:
    return len(value[0] if isinstance(value, tuple) else value)


def _storages(node: Node, point_id: str) -> dict[str, str]:
    return {f.path: f.storage for f in load_point(node.state, point_id).files}


def _cli(node: Node, *args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(node.cli(*args), capture_output=True, text=True, cwd=REPO)


# ------------------------------------------------------------------------ sizes


def test_each_old_file_gets_the_smallest_storage(lean: Node) -> None:
    result = _apply(lean, "2.0", NEW, REMOVE)
    point = load_point(lean.state, result.restore_point)
    assert {f.path: f.storage for f in point.files} == EXPECTED
    assert point.absent == ("share/added.txt",)
    by_path = {f.path: f for f in point.files}
    # The unchanged file is the very inode the target holds: no byte of its own.
    same = os.stat(point.blob_path(by_path["lib/same.so"]))
    assert same.st_ino == os.stat(lean.target / "lib/same.so").st_ino
    # The incompressible rewritten file keeps its old inode (linked before the switch).
    assert os.stat(point.blob_path(by_path["lib/blob.bin"])).st_nlink == 1
    delta = by_path["bin/themisd"]
    assert delta.stored_size is not None and delta.stored_size < 20 * KIB  # of 900 KiB
    assert delta.base_sha256 == _sha(lean.target / "bin/themisd")
    docs = by_path["share/docs.txt"]
    assert docs.stored_size is not None and docs.stored_size < 40 * KIB  # of 400 KiB
    # On disk the point holds the rewritten incompressible file and two small blobs.
    held = points_disk_usage(lean.state)
    full_copy = sum(_size(v) for v in OLD.values())
    assert held < _size(OLD["lib/blob.bin"]) + 100 * KIB < full_copy // 5
    summary = list_points(lean.state)[0]
    assert summary["storage"] == {FULL: 2, ZSTD: 2, DELTA: 1}
    assert summary["shared_bytes"] >= _size(OLD["lib/same.so"])


def test_point_json_records_each_blob_and_its_sha256(lean: Node) -> None:
    result = _apply(lean, "2.0", NEW, REMOVE)
    data = json.loads((lean.state / "points" / result.restore_point / "point.json").read_bytes())
    entries = {f["path"]: f for f in data["files"]}
    assert set(entries["lib/same.so"]) == {"path", "sha256", "mode", "size", "blob", "storage"}
    assert {"stored_size", "stored_sha256"} <= set(entries["share/docs.txt"])
    assert {"base_sha256", "base_size"} <= set(entries["bin/themisd"])
    blob = lean.state / "points" / result.restore_point / "blobs" / entries["bin/themisd"]["blob"]
    assert _sha(blob) == entries["bin/themisd"]["stored_sha256"]
    # A delta blob is a Themis delta patch: it applies by hand with the CLI.
    out = lean.state.parent / "rebuilt"
    proc = _cli(lean, "delta", "apply", lean.target / "bin/themisd", blob, "-o", out)
    assert proc.returncode == 0, proc.stderr
    assert out.read_bytes() == _random(2, 900 * KIB)


def test_not_lean_keeps_every_old_file_as_it_is(lean: Node) -> None:
    staged = lean.state.parent / "staged"
    write_tree(staged, NEW)
    point = create_point(
        lean.target,
        lean.state,
        replaced=list(NEW),
        removed=REMOVE,
        version="1.0",
        to_version="2.0",
        product="themisdb",
        txid="0123456789abcdef",
        new_files={
            rel: NewFile(staged / rel, _sha(staged / rel), (staged / rel).stat().st_size)
            for rel in NEW
        },
        lean=False,
    )
    assert {f.storage for f in point.files} == {FULL}
    assert point.linked == len(point.files)


def test_a_small_file_keeps_a_self_contained_copy(lean: Node) -> None:
    """A delta saves too little on a small file: compressed instead, so a damaged
    installed file of that size still rolls back."""
    small = {"etc/themis.conf": _text("port = 7000", 20 * KIB)}
    write_tree(lean.target, small)
    result = _apply(lean, "2.0", {"etc/themis.conf": _text("port = 7001", 20 * KIB)})
    assert _storages(lean, result.restore_point) == {"etc/themis.conf": ZSTD}
    (lean.target / "etc/themis.conf").write_bytes(b"damaged")
    rollback(target=lean.target, state_dir=lean.state)
    assert (lean.target / "etc/themis.conf").read_bytes() == small["etc/themis.conf"]


def test_a_state_dir_on_another_filesystem_stores_unchanged_files_as_deltas(
    node: Node, small_tmpfs: Path
) -> None:
    """No hardlink reaches the target (EXDEV): an unchanged file is a delta against
    itself (a few bytes), restored by leaving the installed file alone."""
    same = _random(11, 300 * KIB)
    write_tree(node.target, {"lib/same.so": same})
    node.state = small_tmpfs / "state"
    before = snapshot(node.target)
    result = _apply(node, "2.0", {"lib/same.so": same, "bin/themisd": b"v2"})
    point = load_point(node.state, result.restore_point)
    [entry] = [f for f in point.files if f.path == "lib/same.so"]
    assert entry.storage == DELTA and entry.stored_size is not None
    assert entry.stored_size < 4 * KIB and entry.base_sha256 == entry.sha256
    assert point.linked == 0
    rollback(target=node.target, state_dir=node.state)
    assert snapshot(node.target) == before


# ---------------------------------------------------------------------- restore


def test_rollback_restores_every_storage_byte_for_byte(lean: Node) -> None:
    before = snapshot(lean.target)
    _apply(lean, "2.0", NEW, REMOVE)
    assert snapshot(lean.target) != before
    result = rollback(target=lean.target, state_dir=lean.state)
    assert snapshot(lean.target) == before  # bytes, modes, no added file, no temp file
    assert result["files_restored"] == len(EXPECTED)


def test_a_failed_health_check_undoes_from_a_lean_point(lean: Node) -> None:
    before = snapshot(lean.target)
    bundle = lean.maker.make("2.0", NEW, remove=REMOVE)
    with pytest.raises(HealthCheckFailed) as err:
        apply_bundle(bundle, **lean.kwargs(health_cmd="false"))
    assert err.value.exit_code == 24
    assert snapshot(lean.target) == before


def test_a_chain_of_deltas_rolls_back_several_versions(lean: Node) -> None:
    """Each point's delta is made against the next version: the newer point rebuilds
    the base the older one needs, so the chain is checked and restored newest first."""
    before = snapshot(lean.target)
    first = _apply(lean, "2.0", NEW, REMOVE)
    v3 = {**NEW, "bin/themisd": (THEMISD_3, 0o750)}
    second = _apply(lean, "3.0", v3)
    assert _storages(lean, second.restore_point)["bin/themisd"] == DELTA
    result = rollback(target=lean.target, state_dir=lean.state, point_id=first.restore_point)
    assert result["points"] == [second.restore_point, first.restore_point]
    assert snapshot(lean.target) == before


# ------------------------------------------------------------ corrupt and missing


@pytest.mark.parametrize("rel", ["bin/themisd", "share/docs.txt", "lib/blob.bin", "lib/same.so"])
def test_a_corrupt_blob_of_any_storage_exits_25_and_restores_nothing(lean: Node, rel: str) -> None:
    result = _apply(lean, "2.0", NEW, REMOVE)
    point = load_point(lean.state, result.restore_point)
    [entry] = [f for f in point.files if f.path == rel]
    blob = point.blob_path(entry)
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped bit's worth, same size
    blob.unlink()  # never write through a hardlink into the target's file
    blob.write_bytes(bytes(data))
    before = snapshot(lean.target)
    with pytest.raises(RestorePointCorrupt, match=f"{rel}: saved copy .* SHA-256") as err:
        rollback(target=lean.target, state_dir=lean.state)
    assert err.value.exit_code == 25
    assert snapshot(lean.target) == before
    assert load_state(lean.state).installed_version == "2.0"
    proc = _cli(lean, "rollback", "--target", lean.target, "--state-dir", lean.state)
    assert proc.returncode == 25 and "RESTORE_POINT_CORRUPT" in proc.stderr
    assert snapshot(lean.target) == before
    assert not (lean.state / JOURNAL_FILE).exists()


def test_a_delta_whose_base_was_changed_exits_25_and_restores_nothing(lean: Node) -> None:
    _apply(lean, "2.0", NEW, REMOVE)
    with open(lean.target / "bin/themisd", "r+b") as fh:  # damaged in place after the update
        fh.write(b"CORRUPTED")
    before = snapshot(lean.target)
    with pytest.raises(RestorePointCorrupt, match="bin/themisd: the installed file") as err:
        rollback(target=lean.target, state_dir=lean.state)
    assert err.value.exit_code == 25 and "re-apply 2.0" in str(err.value)
    assert snapshot(lean.target) == before
    (lean.target / "bin/themisd").unlink()  # missing altogether: the same answer
    with pytest.raises(RestorePointCorrupt, match="missing"):
        rollback(target=lean.target, state_dir=lean.state)


def test_a_small_unchanged_file_gets_a_copy_of_its_own(lean: Node) -> None:
    """A config the update leaves as it is, edited in place afterwards (as vim does for
    a file with several links): the point's copy is its own, so the rollback restores
    the original."""
    conf = _text("listen = 0.0.0.0:7000", 8 * KIB)
    write_tree(lean.target, {"etc/themis.conf": conf})
    result = _apply(lean, "2.0", {**NEW, "etc/themis.conf": conf}, REMOVE)
    assert _storages(lean, result.restore_point)["etc/themis.conf"] == ZSTD
    with open(lean.target / "etc/themis.conf", "r+b") as fh:
        fh.write(b"listen = 6.6.6.6")
    rollback(target=lean.target, state_dir=lean.state)
    assert (lean.target / "etc/themis.conf").read_bytes() == conf


def test_an_unchanged_file_written_in_place_is_named_as_such(lean: Node) -> None:
    """The point shares an unchanged file's inode with the target: a write in place to
    the installed file reaches the point too, and the rollback says so (exit 25)."""
    _apply(lean, "2.0", NEW, REMOVE)
    with open(lean.target / "lib/same.so", "r+b") as fh:
        fh.write(b"patched in place")
    before = snapshot(lean.target)
    with pytest.raises(RestorePointCorrupt, match="lib/same.so: .*written in place") as err:
        rollback(target=lean.target, state_dir=lean.state)
    assert err.value.exit_code == 25
    assert snapshot(lean.target) == before


# ------------------------------------------------------------- crash mid-restore


def _die_at_decoded(monkeypatch: pytest.MonkeyPatch, nth: int, after: bool) -> Any:
    """Arm: die at the nth file rebuilt from a zstd or delta blob (before or after it)."""
    real = restore._place_decoded
    calls: list[int] = []

    def dying(*args: Any, **kw: Any) -> None:
        calls.append(1)
        if len(calls) == nth and not after:
            os._exit(CRASH)
        real(*args, **kw)
        if len(calls) == nth and after:
            os._exit(CRASH)

    return lambda: monkeypatch.setattr(restore, "_place_decoded", dying)


@pytest.mark.parametrize(("nth", "after"), [(1, True), (2, False), (3, True)])
def test_recover_finishes_a_rollback_that_died_mid_restore(
    lean: Node, monkeypatch: pytest.MonkeyPatch, nth: int, after: bool
) -> None:
    before = snapshot(lean.target)
    _apply(lean, "2.0", NEW, REMOVE)
    crash_in_child(
        lambda: rollback(target=lean.target, state_dir=lean.state),
        _die_at_decoded(monkeypatch, nth, after),
    )
    monkeypatch.undo()
    assert snapshot(lean.target) != before  # torn: some old, some new
    result = recover(target=lean.target, state_dir=lean.state)
    assert result["action"] == "finished" and result["op"] == "rollback"
    assert snapshot(lean.target) == before
    assert load_state(lean.state).installed_version is None


def test_a_temp_file_left_by_a_crash_mid_write_is_swept(
    lean: Node, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Killed between creating a rebuilt file's temp and renaming it: the re-run makes
    the same temp name again (O_EXCL) and must not trip over the leftover."""
    before = snapshot(lean.target)
    _apply(lean, "2.0", NEW, REMOVE)
    real = restore._write_all

    def arm() -> None:
        def dying(fd: int, data: bytes) -> None:
            real(fd, data[: len(data) // 2])
            os._exit(CRASH)

        monkeypatch.setattr(restore, "_write_all", dying)

    crash_in_child(lambda: rollback(target=lean.target, state_dir=lean.state), arm)
    monkeypatch.undo()
    assert any(".themis-tmp-" in p.name for p in lean.target.rglob("*"))
    recover(target=lean.target, state_dir=lean.state)
    assert snapshot(lean.target) == before


def test_recover_goes_on_with_a_chain_after_its_first_point(
    lean: Node, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Killed while restoring the older of two points: the journal says the newer one is
    done, so recover does not replay it over files the older one already restored (its
    delta could not: their bytes are no longer its base)."""
    before = snapshot(lean.target)
    first = _apply(lean, "2.0", NEW, REMOVE)
    v3 = {**NEW, "bin/themisd": (THEMISD_3, 0o750)}
    second = _apply(lean, "3.0", v3)
    # 3.0's point rebuilds bin/themisd (1 file decoded); then 2.0's: die after its first.
    crash_in_child(
        lambda: rollback(target=lean.target, state_dir=lean.state, point_id=first.restore_point),
        _die_at_decoded(monkeypatch, 2, after=True),
    )
    monkeypatch.undo()
    journal = Journal.load(lean.state)
    assert journal is not None and journal.get("restored") == [second.restore_point]
    result = recover(target=lean.target, state_dir=lean.state)
    assert result["action"] == "finished"
    assert snapshot(lean.target) == before


def test_recover_undoes_an_apply_that_died_mid_switch_from_a_lean_point(
    lean: Node, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Some files switched (delta bases present), some not (old bytes still there):
    recover rebuilds the first and leaves the second alone."""
    before = snapshot(lean.target)
    bundle = lean.maker.make("2.0", NEW, remove=REMOVE)
    crash_in_child(
        lambda: apply_bundle(bundle, **lean.kwargs()), die_on_call(monkeypatch, "place_file", 3)
    )
    monkeypatch.undo()
    assert recover(target=lean.target, state_dir=lean.state)["action"] == "undone"
    assert snapshot(lean.target) == before


def test_recover_after_a_crash_during_an_undo(lean: Node, monkeypatch: pytest.MonkeyPatch) -> None:
    before = snapshot(lean.target)
    bundle = lean.maker.make("2.0", NEW, remove=REMOVE)
    crash_in_child(
        lambda: apply_bundle(bundle, **lean.kwargs()), die_after_state(monkeypatch, J.SWITCHED)
    )
    monkeypatch.undo()
    crash_in_child(
        lambda: recover(target=lean.target, state_dir=lean.state),
        _die_at_decoded(monkeypatch, 1, after=True),
    )
    monkeypatch.undo()
    assert recover(target=lean.target, state_dir=lean.state)["action"] == "undone"
    assert snapshot(lean.target) == before


# --------------------------------------------------------------- old-format points


def _as_old_format(point_dir: Path) -> None:
    """point.json as points were written before lean storage: no `storage` fields."""
    path = point_dir / "point.json"
    data = json.loads(path.read_bytes())
    for entry in data["files"]:
        assert entry.pop("storage") == FULL
        assert set(entry) == {"path", "sha256", "mode", "size", "blob"}
    path.write_text(json.dumps(data))


def test_a_point_made_before_lean_storage_loads_verifies_and_restores(
    lean: Node, monkeypatch: pytest.MonkeyPatch
) -> None:
    from updates.engine import apply as apply_mod

    before = snapshot(lean.target)
    real = getattr(apply_mod, "create_point")  # noqa: B009 (not exported: patched where used)
    monkeypatch.setattr(
        apply_mod, "create_point", lambda *a, **kw: real(*a, **{**kw, "lean": False})
    )
    result = _apply(lean, "2.0", NEW, REMOVE)
    monkeypatch.undo()
    _as_old_format(lean.state / "points" / result.restore_point)
    point = load_point(lean.state, result.restore_point)
    assert {f.storage for f in point.files} == {FULL} and point.schema is None
    verify_point(point, lean.target)
    assert list_points(lean.state)[0]["storage"] == {FULL: 5, ZSTD: 0, DELTA: 0}
    rollback(target=lean.target, state_dir=lean.state)
    assert snapshot(lean.target) == before


def test_the_schema_mark_is_kept(lean: Node) -> None:
    staged = lean.state.parent / "staged"
    write_tree(staged, NEW)
    point = create_point(
        lean.target,
        lean.state,
        replaced=list(NEW),
        removed=REMOVE,
        version="1.0",
        to_version="2.0",
        product="themisdb",
        txid="0123456789abcdef",
        schema=SchemaMark("0003"),
        new_files={
            rel: NewFile(staged / rel, _sha(staged / rel), (staged / rel).stat().st_size)
            for rel in NEW
        },
    )
    assert load_point(lean.state, point.id).schema == SchemaMark("0003")
    data = json.loads((point.dir / "point.json").read_bytes())
    assert data["schema"] == {"version": "0003"}


def test_an_unknown_storage_is_a_corrupt_point(lean: Node) -> None:
    result = _apply(lean, "2.0", NEW, REMOVE)
    path = lean.state / "points" / result.restore_point / "point.json"
    data = json.loads(path.read_bytes())
    data["files"][0]["storage"] = "lz4"
    path.write_text(json.dumps(data))
    with pytest.raises(RestorePointCorrupt, match="unknown storage"):
        load_point(lean.state, result.restore_point)


# -------------------------------------------------------------------- retention


def _versions(node: Node, count: int) -> list[str]:
    """`count` updates, each rewriting one incompressible 256 KiB file: each point holds
    its old version, 256 KiB of its own."""
    write_tree(node.target, {"lib/data.bin": _random(99, 256 * KIB)})
    ids = []
    for i in range(count):
        files = {"lib/data.bin": _random(100 + i, 256 * KIB)}
        ids.append(_apply(node, f"2.{i}", files, keep=10).restore_point)
    return ids


def _age(node: Node, point_id: str, seconds: float) -> None:
    path = node.state / "points" / point_id / "point.json"
    data = json.loads(path.read_bytes())
    data["created"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - seconds))
    path.write_text(json.dumps(data))


def test_retention_by_age(node: Node) -> None:
    ids = _versions(node, 3)
    _age(node, ids[0], 10 * 86400)
    _age(node, ids[1], 3 * 86400)
    _age(node, ids[2], 9 * 86400)  # the installed version's rollback point: kept however old
    assert prune_points(node.state, None, max_age=parse_duration("7d")) == ids[:1]
    assert [p["id"] for p in list_points(node.state)] == ids[1:]
    assert prune_points(node.state, None, max_age=86400) == ids[1:2]


def test_retention_by_disk_use(node: Node) -> None:
    ids = _versions(node, 4)
    held = points_disk_usage(node.state)
    assert held >= 4 * 256 * KIB
    # Room for two points' own bytes: the two oldest go.
    assert prune_points(node.state, None, max_bytes=held // 2 + 4 * KIB) == ids[:2]
    assert points_disk_usage(node.state) <= held // 2 + 4 * KIB
    # Nothing fits: everything but the installed version's rollback point goes.
    assert prune_points(node.state, None, max_bytes=0) == ids[2:3]
    assert [p["id"] for p in list_points(node.state)] == ids[3:]


def test_disk_use_counts_only_what_the_points_alone_hold(lean: Node) -> None:
    _apply(lean, "2.0", NEW, REMOVE)
    points = restore.list_points(lean.state)
    use = DiskUse(points)
    total = use.of(p.id for p in points)
    shared = os.stat(lean.target / "lib/same.so").st_blocks * 512
    own_blocks = sum(
        os.stat(p).st_blocks * 512 for p in (lean.state / "points").rglob("*") if p.is_file()
    )
    assert total == own_blocks - shared  # the unchanged file's inode is the target's
    assert use.of([]) == 0


def test_retention_by_count_never_deletes_what_rollback_or_a_journal_needs(node: Node) -> None:
    ids = _versions(node, 4)
    rollback(target=node.target, state_dir=node.state)  # back to 2.2: needs ids[2]
    assert load_state(node.state).installed_version == "2.2"
    assert needed_points(node.state) == {ids[2]}
    # keep 1 would keep only the newest (ids[3], the point of 2.3 rolled back from).
    assert prune_points(node.state, 1) == ids[:2]
    assert [p["id"] for p in list_points(node.state)] == ids[2:]
    # A pending journal's points are needed too (an interrupted rollback, say).
    journal = Journal.begin(node.state, "rollback", points=[ids[3]], target=str(node.target))
    try:
        assert needed_points(node.state) == {ids[2], ids[3]}
        assert prune_points(node.state, 0, max_bytes=0) == []
    finally:
        journal.close(J.ABORTED)


def test_cleanup_waits_for_nobody_and_refuses_while_an_update_holds_the_lock(
    node: Node,
) -> None:
    _versions(node, 2)
    with NodeLock(node.state, command="apply"), pytest.raises(AlreadyInProgress) as err:
        cleanup_points(node.state, Retention(keep=1))
    assert err.value.exit_code == 21
    assert len(list_points(node.state)) == 2
    assert len(cleanup_points(node.state, Retention(keep=1))) == 1
    # The doomed point was renamed aside under the lock, then removed: nothing left.
    assert [p.name for p in (node.state / "points").iterdir()] == [list_points(node.state)[0]["id"]]


def test_prune_cli_takes_age_and_size(node: Node) -> None:
    ids = _versions(node, 3)
    _age(node, ids[0], 2 * 3600)
    proc = _cli(node, "prune", "--state-dir", node.state, "--max-age", "90m")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["pruned"] == ids[:1] and out["restore_points_bytes"] >= 2 * 256 * KIB
    proc = _cli(node, "prune", "--state-dir", node.state, "--max-bytes", "300K")
    assert json.loads(proc.stdout)["pruned"] == ids[1:2]
    proc = _cli(node, "prune", "--state-dir", node.state, "--max-age", "soon")
    assert proc.returncode == 2 and "--max-age" in proc.stderr


def test_size_and_duration_parsers() -> None:
    assert parse_size("1024") == 1024 and parse_size("2G") == 2 << 30
    assert parse_size("1.5MiB") == 3 << 19 and parse_size("10 kb") == 10 << 10
    assert parse_duration("36h") == 36 * 3600 and parse_duration("2w") == 14 * 86400
    for bad in ("", "-1", "1X", "G"):
        with pytest.raises(ValueError, match="expected bytes"):
            parse_size(bad)
    with pytest.raises(ValueError, match="expected seconds"):
        parse_duration("1y")


def _sha(path: Path) -> str:
    return restore.sha256_file(path)
