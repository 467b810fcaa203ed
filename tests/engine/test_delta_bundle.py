"""Delta bundles through the real apply engine: patches rebuilt from the
installed base, one file falling back to the full bundle."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TypedDict

import pytest

from tests.engine.apply_fixtures import (  # noqa: F401  (fixtures)
    Node,
    bundles_fixture,
    node_fixture,
    snapshot,
    write_tree,
)
from tests.engine.delta_data import mutate, structured
from updates.engine.apply import apply_bundle
from updates.engine.bundle import create_bundle, verify_bundle
from updates.engine.delta_bundle import FullBundleFallback, create_delta_bundle, delta_rebuilder
from updates.engine.errors import ManifestInvalid


class Signing(TypedDict):
    key_path: Path
    cert_path: Path
    chain_path: Path


OLD = {
    "bin/themisd": (structured(1, 96 << 10), 0o755),
    "lib/libthemis.so": (structured(2, 64 << 10), 0o644),
    "etc/themis.conf": (b"port = 7000\n" * 40, 0o600),
}
NEW = {
    "bin/themisd": (mutate(OLD["bin/themisd"][0], 3), 0o755),
    "lib/libthemis.so": (mutate(OLD["lib/libthemis.so"][0], 4), 0o644),
    "etc/themis.conf": OLD["etc/themis.conf"],
    "share/new.so": (os.urandom(3000), 0o640),  # no base: ships whole
}


@pytest.fixture
def release(node: Node, tmp_path: Path) -> dict[str, Path]:
    """The old release installed on the node; delta and full bundles of the new one."""
    for rel in list(snapshot(node.target)):
        path = node.target / rel
        if path.is_file():
            path.unlink()
    write_tree(node.target, OLD)
    old_dir, new_dir = tmp_path / "old-release", tmp_path / "new-release"
    write_tree(old_dir, OLD)
    write_tree(new_dir, NEW)
    pki = node.maker.pki
    signing: Signing = {
        "key_path": pki.leaf.key,
        "cert_path": pki.leaf.cert,
        "chain_path": pki.chain,
    }
    delta, full = tmp_path / "delta.tar", tmp_path / "full.tar"
    result = create_delta_bundle(
        old_dir, new_dir, delta, product="themisdb", version="2.0", **signing
    )
    assert result.delta_paths == ["bin/themisd", "etc/themis.conf", "lib/libthemis.so"]
    assert result.full_paths == ["share/new.so"]
    create_bundle(new_dir, product="themisdb", version="2.0", out_path=full, **signing)
    assert delta.stat().st_size < full.stat().st_size / 3
    return {"delta": delta, "full": full, "new_dir": new_dir}


def test_delta_bundle_applies_with_one_fallback(
    node: Node, release: dict[str, Path], tmp_path: Path
) -> None:
    # This node's library was hand-patched: not the delta's base.
    (node.target / "lib/libthemis.so").write_bytes(b"hotfixed by hand")

    with FullBundleFallback(release["full"], node.trust_anchor, tmp_path / "cache") as fetch:
        result = apply_bundle(
            release["delta"], **node.kwargs(rebuild_deltas=delta_rebuilder(fetch))
        )

    assert result.files_fallback == ["lib/libthemis.so"]
    assert snapshot(node.target) == snapshot(release["new_dir"])
    assert not (tmp_path / "cache" / "staging").exists()  # full bundle's staging dropped


def test_delta_bundle_without_fallbacks(node: Node, release: dict[str, Path]) -> None:
    result = apply_bundle(release["delta"], **node.kwargs(rebuild_deltas=delta_rebuilder(None)))

    assert result.files_fallback == []
    assert snapshot(node.target) == snapshot(release["new_dir"])


def test_wrong_base_without_fallback_changes_nothing(node: Node, release: dict[str, Path]) -> None:
    (node.target / "bin/themisd").write_bytes(b"something else")
    before = snapshot(node.target)

    with pytest.raises(ManifestInvalid, match="bin/themisd: .*no full file to fall back to"):
        apply_bundle(release["delta"], **node.kwargs(rebuild_deltas=delta_rebuilder(None)))

    assert snapshot(node.target) == before


def test_fallback_file_must_match_the_manifest(
    node: Node, release: dict[str, Path], tmp_path: Path
) -> None:
    (node.target / "bin/themisd").unlink()
    wrong = tmp_path / "wrong"
    wrong.write_bytes(b"not the release's file")
    before = snapshot(node.target)

    with pytest.raises(ManifestInvalid, match="fallback file does not match"):
        apply_bundle(
            release["delta"], **node.kwargs(rebuild_deltas=delta_rebuilder(lambda rel: wrong))
        )

    assert snapshot(node.target) == before


def test_rebuild_refuses_patch_disagreeing_with_manifest(
    node: Node, release: dict[str, Path], tmp_path: Path
) -> None:
    """A signed manifest naming another base than the patch's header: fallback."""
    from updates.engine.delta_bundle import rebuild_staged_deltas

    state = tmp_path / "verify-state"
    state.mkdir()
    verified = verify_bundle(
        release["delta"], trust_anchor=node.trust_anchor, state_dir=state, stage=True
    )
    with verified:
        assert verified.staging_dir is not None
        other = tmp_path / "other.delta"
        (verified.staging_dir / "etc/themis.conf").replace(other)
        (verified.staging_dir / "bin/themisd").rename(verified.staging_dir / "etc/themis.conf")
        other.rename(verified.staging_dir / "bin/themisd")
        fetch = FullBundleFallback(release["full"], node.trust_anchor, tmp_path / "cache")
        with fetch:
            fallback = rebuild_staged_deltas(verified, node.target, fetch)
        assert fallback == ["bin/themisd", "etc/themis.conf"]
        for rel in ("bin/themisd", "etc/themis.conf"):
            assert (verified.staging_dir / rel).read_bytes() == NEW[rel][0]
