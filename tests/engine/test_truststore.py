"""A node's signed trust store (updates.engine.truststore) with a real OpenSSL-made PKI: a
root rollover where old and new roots overlap, a revoked signer refused after the store
update and accepted before it, and every refused update leaving the state dir as it was."""

from __future__ import annotations

import base64
import json
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes

from tests.engine.apply_fixtures import OLD_TREE, write_tree
from tests.engine.conftest import tree_snapshot
from updates.engine.apply import apply_bundle
from updates.engine.bundle import create_bundle, verify_bundle
from updates.engine.cli import main as cli
from updates.engine.devpki import KeyPair, Pki
from updates.engine.errors import ManifestInvalid, SignatureInvalid, StaleOrDowngrade
from updates.engine.truststore import (
    TRUST_STORE_FILE,
    install_trust_store,
    installed_trust_store,
    make_trust_store,
    trust_for,
    trust_store_version,
)

YEAR = timedelta(days=365)


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _store(
    pki: Pki,
    version: int,
    roots: list[Path],
    *,
    signer: KeyPair | None = None,
    chain: Path | None = None,
    expires: datetime | None = None,
    revoked: tuple[Path, ...] = (),
    revoked_fingerprints: tuple[str, ...] = (),
) -> bytes:
    return make_trust_store(
        version=version,
        expires=expires or datetime.now(UTC) + YEAR,
        roots=[_cert(root) for root in roots],
        revoked_certificates=[_cert(path) for path in revoked],
        revoked_fingerprints=revoked_fingerprints,
        key_path=(signer or pki.store_signer).key,
        cert_path=(signer or pki.store_signer).cert,
        chain_path=chain or pki.chain,
    )


def _bundle(tmp_path: Path, pki: Pki, signer: KeyPair, chain: Path, name: str) -> Path:
    src = tmp_path / f"src-{name}"
    write_tree(src, {"bin/themisd": b"themisd " + name.encode()})
    out = tmp_path / f"{name}.tar"
    create_bundle(
        src,
        product="themisdb",
        version="2.0.0",
        key_path=signer.key,
        cert_path=signer.cert,
        chain_path=chain,
        out_path=out,
    )
    return out


def _accepts(state: Path, pki: Pki, bundle: Path) -> str:
    """The signer if the node with `state` takes `bundle` (else the EngineError)."""
    return verify_bundle(bundle, trust_anchor=trust_for(state, pki.root)).signer


@pytest.fixture
def state(tmp_path: Path) -> Path:
    directory = tmp_path / "state"
    directory.mkdir()
    return directory


def test_a_root_rollover_overlaps_then_drops_the_old_root(
    tmp_path: Path, pki: Pki, state: Path
) -> None:
    old = _bundle(tmp_path, pki, pki.leaf, pki.chain, "old-root")
    new = _bundle(tmp_path, pki, pki.next_leaf, pki.next_chain, "new-root")
    assert "release signer (leaf)" in _accepts(state, pki, old)
    with pytest.raises(SignatureInvalid):  # the bootstrap root alone: the new root unknown
        _accepts(state, pki, new)

    # Step 1: both roots, signed under the old one (what the node trusts now).
    both = install_trust_store(state, _store(pki, 1, [pki.root, pki.next_root]), anchor=pki.root)
    assert both.version == 1 and len(both.trust.roots) == 2
    assert "release signer (leaf)" in _accepts(state, pki, old)
    assert "release signer (next-leaf)" in _accepts(state, pki, new)

    # Step 2: only the new root, signed by a store signer under the new root (trusted by
    # store 1): the old root's releases are refused from now on.
    only_new = _store(pki, 2, [pki.next_root], signer=pki.next_store_signer, chain=pki.next_chain)
    install_trust_store(state, only_new, anchor=pki.root)
    assert trust_store_version(state) == 2
    assert "release signer (next-leaf)" in _accepts(state, pki, new)
    with pytest.raises(SignatureInvalid, match="certificate chain rejected"):
        _accepts(state, pki, old)


def test_a_revoked_signer_is_accepted_before_the_store_and_refused_after(
    tmp_path: Path, pki: Pki, state: Path
) -> None:
    bundle = _bundle(tmp_path, pki, pki.leaf, pki.chain, "leaf")
    assert _accepts(state, pki, bundle)
    store = _store(pki, 1, [pki.root], revoked=(pki.leaf.cert,))
    install_trust_store(state, store, anchor=pki.root)
    with pytest.raises(SignatureInvalid, match="is revoked by trust store version 1"):
        _accepts(state, pki, bundle)
    # Another signer under the same root is still taken.
    other = _bundle(tmp_path, pki, pki.ec_leaf, pki.chain, "ec-leaf")
    assert "ec-leaf" in _accepts(state, pki, other)


def test_a_certificate_revoked_by_fingerprint_is_refused_too(
    tmp_path: Path, pki: Pki, state: Path
) -> None:
    intermediate = _cert(pki.chain).fingerprint(hashes.SHA256()).hex()
    # A store that revokes the intermediate its own signer is under is refused: a leaked
    # intermediate cannot vouch for the store that revokes it.
    revoking = _store(pki, 1, [pki.root, pki.next_root], revoked_fingerprints=(intermediate,))
    with pytest.raises(SignatureInvalid, match="revoked"):
        install_trust_store(state, revoking, anchor=pki.root)
    assert not (state / TRUST_STORE_FILE).exists()
    # The way: first trust the next root too, then revoke from under it.
    install_trust_store(state, _store(pki, 1, [pki.root, pki.next_root]), anchor=pki.root)
    revoking = _store(
        pki,
        2,
        [pki.root, pki.next_root],
        signer=pki.next_store_signer,
        chain=pki.next_chain,
        revoked_fingerprints=(intermediate,),
    )
    install_trust_store(state, revoking, anchor=pki.root)
    for signer, name in ((pki.leaf, "leaf"), (pki.ec_leaf, "ec")):
        bundle = _bundle(tmp_path, pki, signer, pki.chain, name)
        with pytest.raises(SignatureInvalid, match="Intermediate CA.*is revoked"):
            _accepts(state, pki, bundle)
    assert _accepts(state, pki, _bundle(tmp_path, pki, pki.next_leaf, pki.next_chain, "next"))


def test_an_apply_on_a_node_with_the_store_refuses_the_revoked_signer_and_writes_nothing(
    tmp_path: Path, pki: Pki, state: Path
) -> None:
    target = tmp_path / "target"
    write_tree(target, OLD_TREE)
    store = _store(pki, 1, [pki.root], revoked=(pki.leaf.cert,))
    install_trust_store(state, store, anchor=pki.root)
    bundle = _bundle(tmp_path, pki, pki.leaf, pki.chain, "apply")
    before = tree_snapshot(target), _kept_state(state)
    with pytest.raises(SignatureInvalid, match="revoked") as refused:
        apply_bundle(bundle, target=target, state_dir=state, trust_anchor=pki.root)
    assert refused.value.exit_code == 10
    # The target, the trust store, the installed version: as they were; no staging, no
    # restore point (the lock file and the last attempt's journal are the node's diary).
    assert (tree_snapshot(target), _kept_state(state)) == before


def _kept_state(state: Path) -> dict[str, tuple[object, ...]]:
    diary = ("lock", "journal.last.json")
    return {k: v for k, v in tree_snapshot(state).items() if k not in diary}


@pytest.mark.parametrize(
    "case", ["older", "same", "expired", "bad-signature", "release-signer", "untrusted", "junk"]
)
def test_a_refused_store_update_leaves_the_state_dir_as_it_was(
    pki: Pki, state: Path, case: str
) -> None:
    install_trust_store(state, _store(pki, 5, [pki.root]), anchor=pki.root)
    before = tree_snapshot(state)
    offered, error, words = {
        "older": (_store(pki, 4, [pki.root]), StaleOrDowngrade, "not newer than the installed 5"),
        "same": (_store(pki, 5, [pki.root]), StaleOrDowngrade, "not newer"),
        "expired": (
            _store(pki, 6, [pki.root], expires=datetime.now(UTC) - timedelta(minutes=1)),
            StaleOrDowngrade,
            "expired",
        ),
        "bad-signature": (
            _tampered(_store(pki, 6, [pki.root])),
            SignatureInvalid,
            "messageDigest does not match",
        ),
        "release-signer": (
            _store(pki, 6, [pki.root], signer=pki.leaf),
            SignatureInvalid,
            "trust-store signing",
        ),
        "untrusted": (
            _store(pki, 6, [pki.root], signer=pki.next_store_signer, chain=pki.next_chain),
            SignatureInvalid,
            "chain rejected",
        ),
        "junk": (b'{"store": "not base64!", "signature": ""}', ManifestInvalid, "envelope"),
    }[case]
    with pytest.raises(error, match=words):
        install_trust_store(state, offered, anchor=pki.root)
    assert tree_snapshot(state) == before
    assert trust_store_version(state) == 5


def _tampered(envelope: bytes) -> bytes:
    outer = json.loads(envelope)
    document = json.loads(base64.b64decode(outer["store"]))
    document["revoked"]["serials"] = []  # same shape, other meaning
    document["version"] = 7
    outer["store"] = base64.b64encode(
        json.dumps(document, sort_keys=True, separators=(",", ":")).encode()
    ).decode()
    return json.dumps(outer).encode()


def test_an_expired_installed_store_refuses_every_bundle_until_a_newer_one(
    tmp_path: Path, pki: Pki, state: Path
) -> None:
    install_trust_store(
        state, _store(pki, 1, [pki.root], expires=datetime.now(UTC) + timedelta(hours=1)),
        anchor=pki.root,
    )  # fmt: skip
    bundle = _bundle(tmp_path, pki, pki.leaf, pki.chain, "leaf")
    later = datetime.now(UTC) + timedelta(hours=2)
    with pytest.raises(SignatureInvalid, match="trust store version 1 expired"):
        verify_bundle(bundle, trust_anchor=trust_for(state, pki.root), now=later)
    assert _accepts(state, pki, bundle)  # before it expires


def test_a_damaged_installed_store_is_refused_not_skipped(
    tmp_path: Path, pki: Pki, state: Path
) -> None:
    install_trust_store(state, _store(pki, 1, [pki.next_root], signer=pki.store_signer),
                        anchor=pki.root)  # fmt: skip
    (state / TRUST_STORE_FILE).write_text('{"store": "AAAA", "signature": "AAAA"}')
    bundle = _bundle(tmp_path, pki, pki.leaf, pki.chain, "leaf")
    # Falling back to the bootstrap root would trust the root that store 1 dropped.
    with pytest.raises(SignatureInvalid, match="damaged"):
        _accepts(state, pki, bundle)
    assert trust_store_version(state) == -1
    assert installed_trust_store(tmp_path / "no-state") is None


def test_a_store_signature_verifies_with_openssl_too(tmp_path: Path, pki: Pki) -> None:
    outer = json.loads(_store(pki, 1, [pki.root]))
    document, signature = tmp_path / "store.json", tmp_path / "store.p7s"
    document.write_bytes(base64.b64decode(outer["store"]))
    signature.write_bytes(base64.b64decode(outer["signature"]))
    result = subprocess.run(
        ["openssl", "cms", "-verify", "-binary", "-inform", "DER", "-in", str(signature),
         "-content", str(document), "-CAfile", str(pki.root), "-purpose", "any",
         "-out", "/dev/null"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "Verification successful" in result.stderr


def test_the_cli_makes_installs_and_shows_a_store(
    tmp_path: Path, pki: Pki, state: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = tmp_path / "store-3.json"
    assert cli([
        "trust", "create", "--version", "3", "--root", str(pki.root), "--root",
        str(pki.next_root), "--revoke-cert", str(pki.ec_leaf.cert), "--key",
        str(pki.store_signer.key), "--cert", str(pki.store_signer.cert), "--chain",
        str(pki.chain), "-o", str(store),
    ]) == 0  # fmt: skip
    capsys.readouterr()
    assert cli(["trust", "show", str(store), "--trust-anchor", str(pki.root)]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["valid"] and shown["version"] == 3 and len(shown["roots"]) == 2
    ec_leaf = _cert(pki.ec_leaf.cert)
    assert shown["revoked_serials"] == [
        {"issuer": ec_leaf.issuer.rfc4514_string(), "serial": f"{ec_leaf.serial_number:x}"}
    ]
    assert cli(["trust", "show", "--state-dir", str(state)]) == 0
    assert json.loads(capsys.readouterr().out) == {"installed": False}
    argv = ["trust", "install", str(store), "--state-dir", str(state), "--trust-anchor"]
    assert cli([*argv, str(pki.root)]) == 0
    assert json.loads(capsys.readouterr().out)["version"] == 3
    assert cli([*argv, str(pki.root)]) == 13  # the same version again: not newer
    assert "not newer than the installed 3" in capsys.readouterr().err
    assert cli(["trust", "show", "--state-dir", str(state)]) == 0
    assert json.loads(capsys.readouterr().out)["installed"] is True


def _envelope(document: object) -> bytes:
    raw = json.dumps(document).encode()
    return json.dumps(
        {"store": base64.b64encode(raw).decode(), "signature": base64.b64encode(b"x").decode()}
    ).encode()


@pytest.mark.parametrize(
    ("document", "words"),
    [
        ([], "not an object"),
        ({"format": 2}, "format 2"),
        ({"format": 1, "version": True}, "not a positive integer"),
        ({"format": 1, "version": 0}, "not a positive integer"),
        ({"format": 1, "version": 1, "expires": "soon"}, "does not match format"),
        ({"format": 1, "version": 1, "expires": "2030-01-01T00:00:00Z", "roots": []}, "roots"),
        ({"format": 1, "version": 1, "expires": "2030-01-01T00:00:00Z", "roots": [1]}, "PEM"),
    ],
)
def test_a_malformed_store_is_refused_before_its_signature_is_read(
    pki: Pki, state: Path, document: object, words: str
) -> None:
    with pytest.raises(ManifestInvalid, match=words):
        install_trust_store(state, _envelope(document), anchor=pki.root)
    assert tree_snapshot(state) == {}


@pytest.mark.parametrize(
    ("revoked", "words"),
    [
        ({"serials": "all", "fingerprints": []}, "revoked serials"),
        ({"serials": [{"serial": "1"}], "fingerprints": []}, "revoked serial"),
        ({"serials": [], "fingerprints": ["XYZ"]}, "revoked fingerprint"),
        ({"serials": [], "fingerprints": "all"}, "revoked fingerprints"),
    ],
)
def test_a_malformed_revocation_list_is_refused(
    pki: Pki, state: Path, revoked: object, words: str
) -> None:
    root = pki.root.read_text()
    document = {"format": 1, "version": 1, "expires": "2030-01-01T00:00:00Z", "roots": [root],
                "revoked": revoked}  # fmt: skip
    with pytest.raises(ManifestInvalid, match=words):
        install_trust_store(state, _envelope(document), anchor=pki.root)
    leaf = pki.leaf.cert.read_text()  # not a CA: no root
    document = {**document, "roots": [leaf], "revoked": {"serials": [], "fingerprints": []}}
    with pytest.raises(ManifestInvalid, match="is not a CA"):
        install_trust_store(state, _envelope(document), anchor=pki.root)


def test_an_oversized_or_unreadable_store_is_refused(pki: Pki, state: Path) -> None:
    with pytest.raises(ManifestInvalid, match="exceed"):
        install_trust_store(state, b" " * (2 << 20), anchor=pki.root)
    (state / TRUST_STORE_FILE).mkdir()  # there, but cannot be read as a file
    with pytest.raises(SignatureInvalid, match="cannot read"):
        installed_trust_store(state)
