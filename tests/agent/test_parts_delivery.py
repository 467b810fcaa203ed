"""Delivery by parts on the node: a node running N fetches N+1 from a real HTTP server on
127.0.0.1 that serves the release's manifest, signature and per-file objects; only what
changed is asked for, the signature is checked before any payload byte, every file is hashed
as it arrives, and a failure leaves nothing staged behind (the tests look at the disk)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.agent.file_server import FileServer
from tests.agent.parts_fixtures import (
    CHANGED,
    PREFIX,
    Node,
    Releases,
    build,
    served_parts,
    sha,
    tree,
)
from updates.engine import apply as engine
from updates.engine.bundle import read_manifest
from updates.engine.devpki import Pki
from updates.engine.errors import ManifestInvalid, SignatureInvalid, StaleOrDowngrade
from updates.engine.parts import PARTS_RECORD, open_parts_staging, sweep_abandoned_parts
from workers.download import DownloadCorrupt
from workers.parts import PartsResult, fetch_by_parts


def fetch(
    node: Node, server: FileServer, sleep: Callable[[float], None] | None = None
) -> PartsResult:
    return fetch_by_parts(
        server.url(PREFIX),
        token="",
        state_dir=node.state,
        target=node.target,
        trust_anchor=node.pki.root,
        sleep=sleep,
    )


def objects_requested(server: FileServer) -> list[str]:
    return [p.removeprefix(f"{PREFIX}/") for p in server.paths_requested()]


def test_a_node_on_n_fetches_only_what_n1_changed(
    node: Node, releases: Releases, parts_server: FileServer
) -> None:
    node.install(releases.n)
    result = fetch_by_parts(
        parts_server.url(PREFIX),
        token="",
        state_dir=node.state,
        target=node.target,
        trust_anchor=node.pki.root,
        # One connection: with several, which request reaches the server first is a race,
        # and the order the queue hands files out is what this test checks.
        concurrency=1,
    )
    requested = objects_requested(parts_server)
    assert requested[:2] == ["manifest.json", "manifest.json.p7s"]  # before any payload
    assert sorted(requested[2:]) == sorted(sha(releases.files_n1[p]) for p in CHANGED)
    assert result.files_fetched == len(CHANGED)
    assert result.bytes_fetched == sum(len(releases.files_n1[p]) for p in CHANGED)
    assert result.files_local == len(releases.files_n1) - len(CHANGED)
    # The executable came first among the payload.
    assert requested[2] == sha(releases.files_n1["bin/themisd"])

    applied = engine.apply_bundle(
        result.staged.bundle, target=node.target, state_dir=node.state, trust_anchor=node.pki.root
    )
    result.staged.discard_if_unused()
    assert applied.version_to == "1.1.0" and not applied.resumed_staging
    assert tree(node.target) == releases.files_n1
    assert os.stat(node.target / "bin/themisd").st_mode & 0o777 == 0o755
    assert node.leftovers() == []


def test_a_fresh_node_fetches_everything(
    node: Node, releases: Releases, parts_server: FileServer
) -> None:
    result = fetch(node, parts_server)
    distinct = {sha(data) for data in releases.files_n1.values()}
    assert sorted(objects_requested(parts_server)[2:]) == sorted(distinct)
    assert result.files_local == 0
    engine.apply_bundle(
        result.staged.bundle,
        target=node.target,
        state_dir=node.state,
        trust_anchor=node.pki.root,
    )
    assert tree(node.target) == releases.files_n1


def test_the_signature_is_checked_before_any_payload_byte(
    node: Node, releases: Releases, tmp_path: Path, test_pki: Pki
) -> None:
    node.install(releases.n)
    forged = build(
        tmp_path, test_pki, "1.1.0", releases.files_n1, signer=test_pki.rogue_leaf,
        chain=test_pki.rogue_chain,
    )  # fmt: skip
    server = FileServer(served_parts(forged, releases.files_n1))
    try:
        with pytest.raises(SignatureInvalid):
            fetch(node, server)
        assert objects_requested(server) == ["manifest.json", "manifest.json.p7s"]
    finally:
        server.close()
    assert node.leftovers() == [] and tree(node.target) == releases.files_n


def test_a_downgrade_is_refused_before_any_payload_byte(node: Node, releases: Releases) -> None:
    node.install(releases.n)
    node.install(releases.n1)
    server = FileServer(served_parts(releases.n, releases.files_n))
    try:
        with pytest.raises(StaleOrDowngrade):
            fetch(node, server)
        assert objects_requested(server) == ["manifest.json", "manifest.json.p7s"]
    finally:
        server.close()
    assert node.leftovers() == []


def test_a_wrong_file_aborts_and_leaves_nothing_staged(
    node: Node, releases: Releases, parts_server: FileServer
) -> None:
    node.install(releases.n)
    bad = sha(releases.files_n1["lib/mod5.so"])
    parts_server.faults.wrong.add(f"{PREFIX}/{bad}")
    with pytest.raises(DownloadCorrupt, match=r"lib/mod5\.so: SHA-256 .* differs"):
        fetch(node, parts_server)
    assert node.leftovers() == []  # no staging, no record, no head bundle
    assert tree(node.target) == releases.files_n


def test_a_cut_object_is_resumed_from_its_bytes(
    node: Node, releases: Releases, parts_server: FileServer
) -> None:
    node.install(releases.n)
    binary = releases.files_n1["bin/themisd"]
    path = f"{PREFIX}/{sha(binary)}"
    parts_server.faults.cut_after["/" + path] = [10_000]
    result = fetch(node, parts_server, sleep=lambda _s: None)
    first, second = parts_server.requests_for(path)
    assert first.sent == 10_000 and second.range == f"bytes=10000-{len(binary) - 1}"
    assert parts_server.bytes_sent(path) == len(binary)
    engine.apply_bundle(
        result.staged.bundle,
        target=node.target,
        state_dir=node.state,
        trust_anchor=node.pki.root,
    )
    assert tree(node.target) == releases.files_n1


def test_an_installed_file_changed_by_hand_is_fetched_not_copied(
    node: Node, releases: Releases, parts_server: FileServer
) -> None:
    node.install(releases.n)
    # Same size, other bytes: the hash cache no longer vouches for it, the copy's hash fails.
    mod1 = node.target / "lib/mod1.so"
    mod1.write_bytes(bytes(len(mod1.read_bytes())))
    fetch(node, parts_server)
    assert sha(releases.files_n1["lib/mod1.so"]) in objects_requested(parts_server)


def test_a_staged_file_changed_after_the_fetch_is_refused_by_the_apply(
    node: Node, releases: Releases, parts_server: FileServer
) -> None:
    node.install(releases.n)
    result = fetch(node, parts_server)
    staged = result.staged.staging_dir / "lib/mod3.so"
    staged.write_bytes(b"x" * staged.stat().st_size)
    with pytest.raises(ManifestInvalid):
        engine.apply_bundle(
            result.staged.bundle,
            target=node.target,
            state_dir=node.state,
            trust_anchor=node.pki.root,
        )
    result.staged.discard_if_unused()
    assert tree(node.target) == releases.files_n
    assert node.leftovers() == []


def test_an_unused_staging_is_dropped(
    node: Node, releases: Releases, parts_server: FileServer
) -> None:
    node.install(releases.n)
    result = fetch(node, parts_server)
    assert node.staging_entries()
    result.staged.discard_if_unused()
    assert node.leftovers() == []


def test_a_fetch_killed_half_way_is_swept(node: Node, releases: Releases) -> None:
    node.install(releases.n)
    manifest, signature = read_manifest(releases.n1)
    staging = open_parts_staging(
        manifest, signature, trust_anchor=node.pki.root, state_dir=node.state
    )
    entry = staging.manifest.files[0]
    half = staging.open_file(entry)
    half.write_at(0, b"x")  # ... and the agent dies here
    assert (node.state / PARTS_RECORD).exists() and node.staging_entries()
    sweep_abandoned_parts(node.state)  # what the agent does when it starts again
    assert node.leftovers() == []
