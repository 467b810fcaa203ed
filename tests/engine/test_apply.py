"""Apply: the happy path and every failure path, each checked on disk."""

from __future__ import annotations

import dataclasses
import errno
import http.server
import importlib
import json
import os
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.engine.apply_fixtures import (  # noqa: F401  (fixtures)
    NEW_FILES,
    NEW_REMOVE,
    OLD_TREE,
    REPO,
    Files,
    Node,
    Snapshot,
    bundles_fixture,
    expected_new,
    node_fixture,
    small_tmpfs_fixture,
    snapshot,
    split,
    write_tree,
)
from updates.engine import apply as apply_mod
from updates.engine.apply import NodeEngine, apply_bundle, list_points
from updates.engine.bundle import VerifiedBundle
from updates.engine.errors import (
    ApplyFailed,
    HealthCheckFailed,
    ManifestInvalid,
    PreflightFailed,
    RestorePointFailed,
    StaleOrDowngrade,
    UnsafePath,
)
from updates.engine.journal import JOURNAL_FILE
from updates.engine.state import load_state


def _bundle(node: Node, version: str = "2.0") -> Path:
    return node.maker.make(version, NEW_FILES, remove=NEW_REMOVE)


def _expected_tree(tmp_path: Path, files: Files) -> Snapshot:
    ref = tmp_path / f"ref-{len(files)}-{os.urandom(3).hex()}"
    write_tree(ref, files)
    return snapshot(ref)


def assert_untouched(node: Node, before: Snapshot) -> None:
    """The failure left the target exactly as it was and nothing pending."""
    assert snapshot(node.target) == before
    assert not (node.state / JOURNAL_FILE).exists()
    assert list_points(node.state) == []
    staging = node.state / "staging"
    assert not staging.exists() or os.listdir(staging) == []
    assert not [p for p in (node.state / "points").glob(".tmp-*")]


def test_apply_installs_exactly_the_new_tree(node: Node, tmp_path: Path) -> None:
    events: list[tuple[str, int]] = []
    result = apply_bundle(
        _bundle(node), **node.kwargs(progress=lambda s, p, d: events.append((s, p)))
    )
    assert snapshot(node.target) == _expected_tree(
        tmp_path, expected_new(OLD_TREE, NEW_FILES, NEW_REMOVE)
    )
    assert result.version_from is None and result.version_to == "2.0"
    assert result.files_changed == 3
    assert result.files_added == ["share/plugins/new.so"]
    assert result.files_removed == ["lib/old.so"]
    assert result.files_fallback == []
    assert {"preflight", "lock", "stage", "restore_point", "switch", "total"} <= set(
        result.durations_ms
    )
    steps = [s for s, _ in events]
    assert steps == [
        "PREFLIGHT", "LOCKED", "STAGED", "RESTORE_POINT",
        "SWITCHING", "SWITCHED", "VERIFYING", "COMMITTED",
    ]  # fmt: skip
    assert [p for _, p in events] == sorted(p for _, p in events)
    state = load_state(node.state)
    assert (state.installed_version, state.highest_version) == ("2.0", "2.0")
    assert not (node.state / JOURNAL_FILE).exists()
    assert os.listdir(node.state / "staging") == []
    [point] = list_points(node.state)
    assert point["id"] == result.restore_point and point["file_count"] == 3
    json.dumps(result.to_dict())  # the CLI prints it


def test_restore_point_hardlinks_old_files(node: Node) -> None:
    # Incompressible and unlike its new version: kept as it is, by a hardlink.
    (node.target / "bin/themisd").unlink()
    (node.target / "bin/themisd").write_bytes(os.urandom(64 << 10))
    old_inode = os.stat(node.target / "bin/themisd").st_ino
    result = apply_bundle(_bundle(node), **node.kwargs())
    blobs = node.state / "points" / result.restore_point / "blobs"
    assert old_inode in {os.stat(b).st_ino for b in blobs.iterdir()}
    # new files come from staging by hardlink as well: nothing copied at all
    assert result.linked_files == 3


def test_first_install_into_missing_target(node: Node, tmp_path: Path) -> None:
    node.target = tmp_path / "fresh" / "target"
    apply_bundle(_bundle(node), **node.kwargs())
    assert snapshot(node.target) == _expected_tree(tmp_path, dict(NEW_FILES))


def test_same_version_again_is_stale_and_changes_nothing(node: Node) -> None:
    apply_bundle(_bundle(node), **node.kwargs())
    before = snapshot(node.target)
    with pytest.raises(StaleOrDowngrade):
        apply_bundle(_bundle(node), **node.kwargs())
    assert snapshot(node.target) == before
    assert len(list_points(node.state)) == 1
    assert not (node.state / JOURNAL_FILE).exists()


def test_health_cmd_failure_rolls_back_exit_24(node: Node) -> None:
    before = snapshot(node.target)
    events: list[str] = []
    with pytest.raises(HealthCheckFailed, match="exited 3") as err:
        apply_bundle(
            _bundle(node),
            **node.kwargs(health_cmd="exit 3", progress=lambda s, p, d: events.append(s)),
        )
    assert err.value.exit_code == 24
    assert_untouched(node, before)
    assert load_state(node.state).installed_version is None
    assert events[-1] == "ROLLED_BACK"


def test_health_cmd_sees_new_version_and_passes(node: Node, tmp_path: Path) -> None:
    seen = tmp_path / "seen"
    cmd = f'grep -q "2.0" "$THEMIS_TARGET/bin/themisd" && echo "$THEMIS_VERSION" > {seen}'
    result = apply_bundle(_bundle(node), **node.kwargs(health_cmd=cmd))
    assert seen.read_text().strip() == "2.0"
    assert result.health and result.health["ok"]


def test_health_cmd_timeout_rolls_back(node: Node) -> None:
    before = snapshot(node.target)
    with pytest.raises(HealthCheckFailed, match="timed out"):
        apply_bundle(_bundle(node), **node.kwargs(health_cmd="sleep 30", health_timeout=0.3))
    assert_untouched(node, before)


@pytest.fixture
def http_status() -> Iterator[tuple[str, list[int]]]:
    status = [200]

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            self.send_response(status[0])
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}/health", status
    server.shutdown()


def test_health_url(node: Node, http_status: tuple[str, list[int]]) -> None:
    url, status = http_status
    status[0] = 503
    before = snapshot(node.target)
    with pytest.raises(HealthCheckFailed, match="503"):
        apply_bundle(_bundle(node), **node.kwargs(health_url=url))
    assert_untouched(node, before)
    status[0] = 204
    assert apply_bundle(_bundle(node), **node.kwargs(health_url=url)).version_to == "2.0"


def test_health_url_unreachable(node: Node) -> None:
    before = snapshot(node.target)
    with pytest.raises(HealthCheckFailed, match="ConnectionError"):
        apply_bundle(_bundle(node), **node.kwargs(health_url="http://127.0.0.1:9/x"))
    assert_untouched(node, before)


def test_error_after_first_change_rolls_back_exit_23(
    node: Node, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An I/O error on the second file, injected at the place_file seam."""
    before = snapshot(node.target)
    from updates.engine.install import place_file as real

    calls = []

    def failing(src: Path, dest: Path, mode: int, token: str, *, link: bool) -> bool:
        calls.append(dest)
        if len(calls) == 2:
            raise OSError(errno.EIO, "Input/output error", str(dest))
        return real(src, dest, mode, token, link=link)

    monkeypatch.setattr(apply_mod, "place_file", failing)
    with pytest.raises(ApplyFailed, match="Input/output error") as err:
        apply_bundle(_bundle(node), **node.kwargs())
    assert err.value.exit_code == 23
    assert len(calls) == 2  # the first file had really been replaced
    assert_untouched(node, before)


def test_immutable_dir_in_target_rolls_back_exit_23(node: Node) -> None:
    """A real failure mid-switch: root cannot create a file in an immutable dir."""
    share = node.target / "share"
    share.mkdir()
    if subprocess.run(["chattr", "+i", str(share)], capture_output=True).returncode:
        pytest.skip("chattr +i not supported on this filesystem")
    try:
        before = snapshot(node.target)
        with pytest.raises(ApplyFailed, match="share/plugins/new.so"):
            apply_bundle(_bundle(node), **node.kwargs())
        assert_untouched(node, before)
    finally:
        subprocess.run(["chattr", "-i", str(share)], check=True)


def test_directory_where_file_expected_exit_22(node: Node) -> None:
    """The restore point cannot save a path that is not a regular file."""
    lib = node.target / "lib/libthemis.so"
    lib.unlink()
    lib.mkdir()
    (lib / "inner").write_bytes(b"x")
    before = snapshot(node.target)
    with pytest.raises(RestorePointFailed, match="lib/libthemis.so") as err:
        apply_bundle(_bundle(node), **node.kwargs())
    assert err.value.exit_code == 22
    assert_untouched(node, before)


def test_unreadable_file_exit_22(node: Node, monkeypatch: pytest.MonkeyPatch) -> None:
    """A read error while saving an old file (injected at the hashing seam)."""
    from updates.engine import restore

    def broken(path: Path) -> str:
        raise OSError(errno.EIO, "Input/output error", str(path))

    monkeypatch.setattr(restore, "sha256_file", broken)
    before = snapshot(node.target)
    with pytest.raises(RestorePointFailed, match="Input/output error"):
        apply_bundle(_bundle(node), **node.kwargs())
    assert_untouched(node, before)


def test_disk_full_during_restore_point_exit_22(
    node: Node, small_tmpfs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """State dir on a 2 MiB tmpfs, target elsewhere: the old 3 MiB library
    must be copied (EXDEV) and the copy runs out of space."""
    (node.target / "lib/libthemis.so").write_bytes(os.urandom(3 << 20))
    node.state = small_tmpfs / "state"
    before = snapshot(node.target)
    # Pre-flight sees it coming (the point may have to keep 3 MiB): exit 20.
    with pytest.raises(PreflightFailed, match="disk_state_dir: .* restore point") as refused:
        apply_bundle(_bundle(node), **node.kwargs())
    assert refused.value.exit_code == 20
    # Past a pre-flight that guessed wrong, the point itself fails cleanly: exit 22.
    preflight_mod = importlib.import_module("updates.engine.preflight")
    real = preflight_mod.disk_need

    def no_point(*args: Any, **kwargs: Any) -> Any:
        return dataclasses.replace(real(*args, **kwargs), restore_point_bytes=0)

    monkeypatch.setattr(preflight_mod, "disk_need", no_point)
    with pytest.raises(RestorePointFailed, match="No space left") as err:
        apply_bundle(_bundle(node), **node.kwargs())
    assert err.value.exit_code == 22
    assert_untouched(node, before)
    free = os.statvfs(small_tmpfs)
    assert free.f_bavail * free.f_frsize > (1 << 20)  # the partial copy was removed


def test_symlink_in_target_is_refused_exit_11(node: Node, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    os.rename(node.target / "lib", elsewhere / "lib")
    os.symlink(elsewhere / "lib", node.target / "lib")
    before, outside = snapshot(node.target), snapshot(elsewhere)
    with pytest.raises(UnsafePath) as err:
        apply_bundle(_bundle(node), **node.kwargs())
    assert err.value.exit_code == 11
    assert_untouched(node, before)
    assert snapshot(elsewhere) == outside


def test_retention_keeps_last_n(node: Node) -> None:
    ids = []
    for minor in range(1, 6):
        files = {"bin/themisd": (f"v2.{minor}".encode(), 0o755)}
        bundle = node.maker.make(f"2.{minor}", files)
        ids.append(apply_bundle(bundle, **node.kwargs(keep=2)).restore_point)
    assert [p["id"] for p in list_points(node.state)] == ids[-2:]


def test_node_engine_seam(node: Node) -> None:
    engine = NodeEngine(node.target, node.state, node.trust_anchor)
    result = engine.apply(_bundle(node))
    assert result["ok"] and result["version_to"] == "2.0"
    assert [p["id"] for p in engine.list_restore_points()] == [result["restore_point"]]
    back = engine.rollback()
    assert back["version_to"] is None
    assert engine.recover()["action"] == "none"


def _cli_apply(node: Node, bundle: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    argv = node.cli(
        "apply", bundle, "--target", node.target, "--state-dir", node.state,
        "--trust-anchor", node.trust_anchor, *extra,
    )  # fmt: skip
    return subprocess.run(argv, capture_output=True, text=True, cwd=REPO)


def test_cli_apply_prints_json_result(node: Node) -> None:
    proc = _cli_apply(node, _bundle(node))
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["ok"] and (result["version_from"], result["version_to"]) == (None, "2.0")
    assert result["files_changed"] == 3 and result["files_fallback"] == []
    assert result["restore_point"] == list_points(node.state)[0]["id"]
    assert {"preflight", "stage", "restore_point", "switch", "total"} <= set(result["durations_ms"])


def test_cli_apply_health_failure_exit_24(node: Node) -> None:
    before = snapshot(node.target)
    proc = _cli_apply(node, _bundle(node), "--health-cmd", "false")
    assert proc.returncode == 24
    [line] = proc.stderr.strip().splitlines()
    assert "HEALTH_CHECK_FAILED_ROLLED_BACK" in line and "false" in line
    assert_untouched(node, before)


def test_cli_apply_wrong_product_exit_12(node: Node) -> None:
    before = snapshot(node.target)
    proc = _cli_apply(node, _bundle(node), "--product", "other")
    assert proc.returncode == 12, proc.stderr
    assert_untouched(node, before)


def test_dry_run_changes_nothing(node: Node) -> None:
    before = snapshot(node.target)
    report = NodeEngine(node.target, node.state, node.trust_anchor).dry_run(_bundle(node))
    assert report["ok"] and report["version_to"] == "2.0" and report["remove"] == NEW_REMOVE
    assert snapshot(node.target) == before
    assert list_points(node.state) == []


def _delta_bundle(node: Node, tmp_path: Path) -> Path:
    from updates.engine.delta_bundle import create_delta_bundle

    old_dir, new_dir = tmp_path / "d-old", tmp_path / "d-new"
    write_tree(old_dir, OLD_TREE)
    new_tree = expected_new(OLD_TREE, NEW_FILES, NEW_REMOVE)
    new_tree["lib/libthemis.so"] = (split(OLD_TREE["lib/libthemis.so"])[0] + b"+patch", 0o644)
    write_tree(new_dir, new_tree)
    out = tmp_path / "delta.tar"
    pki = node.maker.pki
    result = create_delta_bundle(
        old_dir, new_dir, out, product="themisdb", version="2.0", key_path=pki.leaf.key,
        cert_path=pki.leaf.cert, chain_path=pki.chain, extra_manifest={"remove": NEW_REMOVE},
    )  # fmt: skip
    assert "lib/libthemis.so" in result.delta_paths
    return out


def test_delta_bundle_rebuilt_through_the_hook(node: Node, tmp_path: Path) -> None:
    bundle = _delta_bundle(node, tmp_path)
    seen = []

    def hook(verified: VerifiedBundle, target: Path) -> list[str]:
        from updates.engine.delta_bundle import rebuild_staged_deltas

        seen.append(sorted(verified.delta_paths))
        assert snapshot(target) == before  # called before anything changes
        return rebuild_staged_deltas(verified, target)

    before = snapshot(node.target)
    result = apply_bundle(bundle, **node.kwargs(rebuild_deltas=hook))
    assert seen and "lib/libthemis.so" in seen[0] and result.files_fallback == []
    assert (node.target / "lib/libthemis.so").read_bytes().endswith(b"+patch")
    assert not (node.target / "lib/old.so").exists()


def test_delta_with_wrong_base_and_no_fallback_changes_nothing(node: Node, tmp_path: Path) -> None:
    bundle = _delta_bundle(node, tmp_path)
    (node.target / "lib/libthemis.so").write_bytes(b"hand-patched")
    before = snapshot(node.target)
    with pytest.raises(ManifestInvalid, match="fall back"):
        apply_bundle(bundle, **node.kwargs())  # default hook: no full file to fetch
    assert_untouched(node, before)
