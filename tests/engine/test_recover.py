"""Recover: a process that dies at any journal state (simulated in a forked
child with os._exit, so no cleanup code runs) leaves something `recover` turns
into exactly the old or exactly the new tree. The exhaustive syscall-level
version of this is test_crash.py."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.engine.apply_fixtures import (  # noqa: F401  (fixtures)
    NEW_FILES,
    NEW_REMOVE,
    OLD_TREE,
    Node,
    Snapshot,
    bundles_fixture,
    expected_new,
    node_fixture,
    snapshot,
    write_tree,
)
from updates.engine import apply as apply_mod
from updates.engine import journal as J
from updates.engine.apply import apply_bundle, list_points, recover, rollback
from updates.engine.errors import (
    AlreadyInProgress,
    RecoveryNeeded,
    RestorePointCorrupt,
    UsageError,
)
from updates.engine.journal import JOURNAL_FILE, Journal
from updates.engine.lock import NodeLock
from updates.engine.restore import restore_to_target
from updates.engine.state import load_state

CRASH = 99


def crash_in_child(action: Callable[[], Any], arm: Callable[[], None]) -> None:
    """Run `action` in a forked child that dies (no cleanup) where `arm` says."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            arm()
            action()
            os._exit(0)
        except BaseException:
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == CRASH, "the planned crash did not happen"


def die_after_state(monkeypatch: pytest.MonkeyPatch, state: str) -> Callable[[], None]:
    real = Journal.advance

    def advance(self: Journal, new: str, **fields: Any) -> None:
        real(self, new, **fields)
        if new == state:
            os._exit(CRASH)

    return lambda: monkeypatch.setattr(Journal, "advance", advance)


def die_on_call(monkeypatch: pytest.MonkeyPatch, name: str, nth: int) -> Callable[[], None]:
    real = getattr(apply_mod, name)
    calls = []

    def wrapper(*args: Any, **kw: Any) -> Any:
        calls.append(1)
        if len(calls) == nth:
            os._exit(CRASH)
        return real(*args, **kw)

    return lambda: monkeypatch.setattr(apply_mod, name, wrapper)


def trees(node: Node, tmp_path: Path) -> tuple[Snapshot, Snapshot]:
    old, new = tmp_path / "ref-old", tmp_path / "ref-new"
    write_tree(old, OLD_TREE)
    write_tree(new, expected_new(OLD_TREE, NEW_FILES, NEW_REMOVE))
    return snapshot(old), snapshot(new)


CRASH_STATES = [s for s in J.APPLY_STATES]


@pytest.mark.parametrize("state", CRASH_STATES)
def test_crash_after_each_state(
    node: Node, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, state: str
) -> None:
    old, new = trees(node, tmp_path)
    bundle = node.maker.make("2.0", NEW_FILES, remove=NEW_REMOVE)
    crash_in_child(
        lambda: apply_bundle(bundle, **node.kwargs()), die_after_state(monkeypatch, state)
    )
    monkeypatch.undo()
    assert (node.state / JOURNAL_FILE).exists()
    report = recover(target=node.target, state_dir=node.state)
    committed = state == J.COMMITTED
    assert report["action"] == ("finished" if committed else "undone")
    assert snapshot(node.target) == (new if committed else old)
    assert load_state(node.state).installed_version == ("2.0" if committed else None)
    assert not (node.state / JOURNAL_FILE).exists()
    assert recover(target=node.target, state_dir=node.state)["action"] == "none"
    if not committed:  # re-running converges, from the kept staging when there was one
        result = apply_bundle(bundle, **node.kwargs())
        assert snapshot(node.target) == new
        assert result.resumed_staging == (state != J.LOCKED)
    assert len(list_points(node.state)) == 1
    staging = node.state / "staging"
    assert not staging.exists() or os.listdir(staging) == []


@pytest.mark.parametrize("nth", [1, 2, 3])
def test_crash_mid_switch(
    node: Node, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, nth: int
) -> None:
    old, new = trees(node, tmp_path)
    bundle = node.maker.make("2.0", NEW_FILES, remove=NEW_REMOVE)
    crash_in_child(
        lambda: apply_bundle(bundle, **node.kwargs()), die_on_call(monkeypatch, "place_file", nth)
    )
    monkeypatch.undo()
    assert recover(target=node.target, state_dir=node.state)["action"] == "undone"
    assert snapshot(node.target) == old


def test_recover_is_idempotent_after_crash_during_recover(
    node: Node, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    old, _ = trees(node, tmp_path)
    bundle = node.maker.make("2.0", NEW_FILES, remove=NEW_REMOVE)
    crash_in_child(
        lambda: apply_bundle(bundle, **node.kwargs()), die_after_state(monkeypatch, J.SWITCHED)
    )
    monkeypatch.undo()
    from updates.engine import restore

    calls = []

    def arm() -> None:
        # Old files come back by copy (place_file) or decoded (_place_decoded): the
        # second of either dies.
        for name in ("place_file", "_place_decoded"):
            real = getattr(restore, name)

            def dying(*a: Any, _real: Any = real, **kw: Any) -> Any:
                calls.append(1)
                if len(calls) == 2:
                    os._exit(CRASH)
                return _real(*a, **kw)

            monkeypatch.setattr(restore, name, dying)

    crash_in_child(lambda: recover(target=node.target, state_dir=node.state), arm)
    monkeypatch.undo()
    assert recover(target=node.target, state_dir=node.state)["action"] == "undone"
    assert snapshot(node.target) == old


def test_crash_during_rollback_is_finished_by_recover(
    node: Node, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    old, _ = trees(node, tmp_path)
    apply_bundle(node.maker.make("2.0", NEW_FILES, remove=NEW_REMOVE), **node.kwargs())
    crash_in_child(
        lambda: rollback(target=node.target, state_dir=node.state),
        die_after_state(monkeypatch, J.SWITCHING),
    )
    monkeypatch.undo()
    assert recover(target=node.target, state_dir=node.state)["action"] == "finished"
    assert snapshot(node.target) == old
    assert load_state(node.state).installed_version is None


def test_recover_waits_for_the_lock(node: Node) -> None:
    with NodeLock(node.state), pytest.raises(AlreadyInProgress) as err:
        recover(target=node.target, state_dir=node.state)
    assert err.value.exit_code == 21


def test_recover_refuses_another_targets_journal(
    node: Node, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bundle = node.maker.make("2.0", NEW_FILES, remove=NEW_REMOVE)
    crash_in_child(
        lambda: apply_bundle(bundle, **node.kwargs()), die_after_state(monkeypatch, J.SWITCHED)
    )
    monkeypatch.undo()
    other = tmp_path / "other"
    other.mkdir()
    with pytest.raises(UsageError, match="belongs to"):
        recover(target=other, state_dir=node.state)
    assert (node.state / JOURNAL_FILE).exists()


def test_recover_with_corrupt_point_restores_nothing(
    node: Node, monkeypatch: pytest.MonkeyPatch
) -> None:
    bundle = node.maker.make("2.0", NEW_FILES, remove=NEW_REMOVE)
    crash_in_child(
        lambda: apply_bundle(bundle, **node.kwargs()), die_after_state(monkeypatch, J.SWITCHED)
    )
    monkeypatch.undo()
    [blob, *_] = sorted((node.state / "points").glob("*/blobs/*"))
    subprocess.run(["chattr", "-i", str(blob)], check=False)
    blob.unlink()
    blob.write_bytes(b"rotten")
    before = snapshot(node.target)
    with pytest.raises(RestorePointCorrupt):
        recover(target=node.target, state_dir=node.state)
    assert snapshot(node.target) == before
    assert (node.state / JOURNAL_FILE).exists()


def test_changed_staging_is_not_resumed(
    node: Node, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, new = trees(node, tmp_path)
    bundle = node.maker.make("2.0", NEW_FILES, remove=NEW_REMOVE)
    crash_in_child(
        lambda: apply_bundle(bundle, **node.kwargs()), die_after_state(monkeypatch, J.STAGED)
    )
    monkeypatch.undo()
    recover(target=node.target, state_dir=node.state)
    [staged] = (node.state / "staging").glob("*/bin/themisd")
    staged.write_bytes(b"tampered while waiting")
    result = apply_bundle(bundle, **node.kwargs())
    assert not result.resumed_staging
    assert snapshot(node.target) == new


def _failing_restore(fails: list[int]) -> Callable[..., None]:
    """restore_to_target failing as a full disk would, the number of times in `fails`."""
    real = restore_to_target

    def restore(*args: Any, **kw: Any) -> None:
        if fails[0] > 0:
            fails[0] -= 1
            raise OSError(28, "No space left on device", str(args[1]))
        real(*args, **kw)

    return restore


def test_an_undo_that_cannot_finish_keeps_the_journal_for_recover(
    node: Node, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The health check fails after the switch and putting the old files back fails too:
    RecoveryNeeded (exit 1, not a normal outcome) with the journal kept; `recover` then
    undoes the apply."""
    old, _ = trees(node, tmp_path)
    bundle = node.maker.make("2.0", NEW_FILES, remove=NEW_REMOVE)
    monkeypatch.setattr(apply_mod, "restore_to_target", _failing_restore([1]))
    with pytest.raises(RecoveryNeeded) as err:
        apply_bundle(bundle, **node.kwargs(health_cmd="false"))
    assert err.value.exit_code == 1 and err.value.code == "RECOVERY_NEEDED"
    assert "rollback after a failed apply did not finish (No space left on device" in str(err.value)
    assert "themis-update recover" in str(err.value)
    journal = Journal.load(node.state)
    assert journal is not None and journal.op == "apply"
    assert load_state(node.state).installed_version is None  # 2.0 was never committed
    monkeypatch.undo()
    result = recover(target=node.target, state_dir=node.state)
    assert result["action"] == "undone" and result["op"] == "apply"
    assert snapshot(node.target) == old
    assert not (node.state / JOURNAL_FILE).exists()


def test_a_rollback_that_cannot_finish_keeps_the_journal_for_recover(
    node: Node, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    old, _ = trees(node, tmp_path)
    apply_bundle(node.maker.make("2.0", NEW_FILES, remove=NEW_REMOVE), **node.kwargs())
    monkeypatch.setattr(apply_mod, "restore_to_target", _failing_restore([1]))
    with pytest.raises(RecoveryNeeded, match=r"rollback did not finish \(No space left on device"):
        rollback(target=node.target, state_dir=node.state)
    journal = Journal.load(node.state)
    assert journal is not None and journal.op == "rollback" and journal.state == J.SWITCHING
    assert load_state(node.state).installed_version == "2.0"  # not recorded as rolled back
    monkeypatch.undo()
    result = recover(target=node.target, state_dir=node.state)
    assert result["action"] == "finished" and result["op"] == "rollback"
    assert snapshot(node.target) == old
    assert load_state(node.state).installed_version is None
    assert not (node.state / JOURNAL_FILE).exists()
