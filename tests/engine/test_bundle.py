"""Bundle creation and verification: round trips, staging, interop with the
openssl CLI and GNU tar, the CLI, and the fast signature API."""

from __future__ import annotations

import io
import json
import os
import shutil
import stat
import subprocess
import tarfile
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TypedDict

import pytest
from time_machine import TimeMachineFixture

from tests.engine.conftest import tree_snapshot
from tests.engine.malicious import (
    Member,
    build_tar,
    encode,
    head,
    manifest_doc,
    openssl_sign,
    payload,
    sha256,
    zstd,
)
from updates.engine.bundle import (
    BundleLimits,
    CmsSignatureValidator,
    Manifest,
    VerifiedBundle,
    create_bundle,
    read_manifest,
    verify_bundle,
    verify_manifest_signature,
)
from updates.engine.cli import main
from updates.engine.cli.bundle import ProgressBar
from updates.engine.devpki import Pki, make_pki
from updates.engine.errors import (
    ManifestInvalid,
    SignatureInvalid,
    StaleOrDowngrade,
    UnsafePath,
    UsageError,
)
from updates.engine.manifest import Dependency
from updates.engine.protocols import SignatureValidator
from updates.engine.state import NodeState, save_state

SOURCE = {
    "bin/themisd": (b"\x7fELF themisd 1.7.0\n" * 100, 0o755),
    "lib/libthemis.so": (b"\x7fELF lib\n" * 50, 0o644),
    "share/doc/README": (b"Themis\n", 0o600),
    "share/ünïcödé/名前.txt": (b"names\n", 0o644),
    "share/" + "long-directory-name/" * 6 + "file.txt": (b"long\n", 0o644),
}


def write_source(root: Path, files: dict[str, tuple[bytes, int]] = SOURCE) -> Path:
    for rel, (data, mode) in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        path.chmod(mode)
    return root


def make(pki: Pki, tmp_path: Path, name: str = "b.tar", *, version: str = "1.7.0") -> Path:
    src = write_source(tmp_path / "src") if not (tmp_path / "src").exists() else tmp_path / "src"
    out = tmp_path / name
    create_bundle(
        src,
        product="themisdb",
        version=version,
        key_path=pki.leaf.key,
        cert_path=pki.leaf.cert,
        chain_path=pki.chain,
        out_path=out,
    )
    return out


# ------------------------------------------------------------------ round trip


@pytest.mark.parametrize("name", ["b.tar", "b.tar.zst"])
def test_create_then_verify_round_trip(pki: Pki, tmp_path: Path, name: str) -> None:
    bundle = make(pki, tmp_path, name)
    verified = verify_bundle(bundle, trust_anchor=pki.root)
    manifest = verified.manifest
    assert manifest.product == "themisdb" and manifest.version == "1.7.0"
    assert [f.path for f in manifest.files] == sorted(SOURCE)
    assert {f.path: f.mode for f in manifest.files} == {k: m for k, (_, m) in SOURCE.items()}
    assert verified.signer.startswith("CN=Themis DEMO release signer (leaf)")
    assert verified.staging_dir is None and verified.delta_paths == frozenset()
    assert manifest.expires - manifest.created == timedelta(days=90)


def test_archive_layout_is_deterministic_and_strips_special_bits(pki: Pki, tmp_path: Path) -> None:
    src = write_source(tmp_path / "src")
    (src / "bin" / "themisd").chmod(0o6755)  # setuid + setgid in the source tree
    bundle = make(pki, tmp_path)
    with tarfile.open(bundle) as tar:
        members = tar.getmembers()
    names = [m.name for m in members]
    assert names[:2] == ["manifest.json", "manifest.json.p7s"]
    assert names[2:] == sorted(names[2:]) == ["payload/" + p for p in sorted(SOURCE)]
    assert all(m.isreg() and not m.mode & 0o7000 and m.uid == 0 for m in members)
    manifest = json.loads(read_manifest(bundle)[0])
    assert manifest["files"][0] == {
        "path": "bin/themisd",
        "size": len(SOURCE["bin/themisd"][0]),
        "sha256": sha256(SOURCE["bin/themisd"][0]),
        "mode": "0755",
    }


def test_zstd_is_detected_by_magic_not_extension(pki: Pki, tmp_path: Path) -> None:
    compressed = make(pki, tmp_path, "b.tar.zst")
    plain = make(pki, tmp_path, "c.tar")
    assert compressed.read_bytes()[:4] == b"\x28\xb5\x2f\xfd"
    disguised = compressed.rename(tmp_path / "bundle.bin")
    misnamed = plain.rename(tmp_path / "plain.tar.zst")
    for bundle in (disguised, misnamed):
        assert verify_bundle(bundle, trust_anchor=pki.root).manifest.version == "1.7.0"


def test_stage_keeps_payload_with_modes_and_cleanup_removes_it(pki: Pki, tmp_path: Path) -> None:
    bundle = make(pki, tmp_path, "b.tar.zst")
    state = tmp_path / "state"
    state.mkdir()
    with verify_bundle(bundle, trust_anchor=pki.root, state_dir=state, stage=True) as verified:
        staging = verified.staging_dir
        assert staging is not None and staging.parent == state / "staging"
        for rel, (data, mode) in SOURCE.items():
            assert (staging / rel).read_bytes() == data
            assert stat.S_IMODE((staging / rel).stat().st_mode) == mode
    assert not staging.exists() and list(state.iterdir()) == []


def test_stage_without_state_dir_is_a_usage_error(pki: Pki, tmp_path: Path) -> None:
    with pytest.raises(UsageError):
        verify_bundle(make(pki, tmp_path), trust_anchor=pki.root, stage=True)
    with pytest.raises(UsageError, match="not a directory"):
        verify_bundle(
            make(pki, tmp_path), trust_anchor=pki.root, state_dir=tmp_path / "no", stage=True
        )


def test_existing_staging_parent_survives_a_rejection(pki: Pki, tmp_path: Path) -> None:
    manifest = encode(manifest_doc({"a": b"1"}))
    from tests.engine.malicious import sign

    bundle = tmp_path / "bad.tar"
    members = head(manifest, sign(manifest, pki.leaf, pki.chain)) + [Member("payload/a", b"2")]
    bundle.write_bytes(build_tar(members))
    state = tmp_path / "state"
    (state / "staging" / "other").mkdir(parents=True)
    before = tree_snapshot(state)
    with pytest.raises(ManifestInvalid, match="SHA-256"):
        verify_bundle(bundle, trust_anchor=pki.root, state_dir=state, stage=True)
    assert tree_snapshot(state) == before


def test_delta_entries_stage_the_patch(pki: Pki, tmp_path: Path) -> None:
    src = write_source(tmp_path / "src", {"bin/themisd": (b"PATCH-BYTES", 0o755)})
    target = b"the rebuilt binary\n"
    delta = {"algorithm": "bsdiff4", "base_sha256": "ab" * 32}
    out = tmp_path / "delta.tar"
    manifest = create_bundle(
        src,
        product="themisdb",
        version="1.7.1",
        key_path=pki.leaf.key,
        cert_path=pki.leaf.cert,
        chain_path=pki.chain,
        out_path=out,
        extra_manifest={"min_version": "1.7.0", "dependencies": {"glibc": ">=2.31"}},
        deltas={"bin/themisd": {**delta, "size": len(target), "sha256": sha256(target)}},
    )
    entry = manifest.files[0]
    assert entry.size == len(target) and entry.sha256 == sha256(target)
    assert entry.delta == {
        **delta,
        "patch_sha256": sha256(b"PATCH-BYTES"),
        "patch_size": len(b"PATCH-BYTES"),
    }
    state = tmp_path / "state"
    state.mkdir()
    with verify_bundle(out, trust_anchor=pki.root, state_dir=state, stage=True) as verified:
        assert verified.delta_paths == frozenset({"bin/themisd"})
        assert verified.staging_dir is not None
        assert (verified.staging_dir / "bin/themisd").read_bytes() == b"PATCH-BYTES"
        assert verified.manifest.min_version == "1.7.0"
        assert verified.manifest.dependencies == (Dependency("glibc", ">=2.31"),)
        assert verified.summary()["deltas"] == 1


class _CreateOptions(TypedDict):
    product: str
    version: str
    key_path: Path
    cert_path: Path
    out_path: Path


def test_create_rejects_bad_delta_spec_and_unknown_paths(pki: Pki, tmp_path: Path) -> None:
    src = write_source(tmp_path / "src", {"a": (b"x", 0o644)})
    common: _CreateOptions = {
        "product": "themisdb",
        "version": "1.0",
        "key_path": pki.leaf.key,
        "cert_path": pki.leaf.cert,
        "out_path": tmp_path / "o.tar",
    }
    with pytest.raises(UsageError, match="needs algorithm"):
        create_bundle(src, deltas={"a": {"algorithm": "x"}}, **common)
    with pytest.raises(UsageError, match="not a file"):
        create_bundle(src, deltas={"zz": {}}, **common)
    with pytest.raises(UsageError, match="may not set"):
        create_bundle(src, extra_manifest={"files": []}, **common)
    with pytest.raises(UsageError, match="expires-days"):
        create_bundle(src, expires_days=0, **common)
    assert not (tmp_path / "o.tar").exists()


# ------------------------------------------------------- version rule, expiry


def test_version_rule_uses_state_dir(pki: Pki, tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    save_state(state, NodeState(installed_version="1.6.0", highest_version="1.7.0"))
    again = make(pki, tmp_path, version="1.7.0")
    assert verify_bundle(again, trust_anchor=pki.root, state_dir=state).manifest.version == "1.7.0"
    older = make(pki, tmp_path, "old.tar", version="1.6.5")
    with pytest.raises(StaleOrDowngrade):
        verify_bundle(older, trust_anchor=pki.root, state_dir=state)
    verify_bundle(older, trust_anchor=pki.root, state_dir=state, allow_downgrade=True)
    verify_bundle(older, trust_anchor=pki.root)  # no state dir: no version rule


def test_expiry_and_certificate_time_follow_now(pki: Pki, tmp_path: Path) -> None:
    bundle = make(pki, tmp_path)
    later = datetime.now(UTC) + timedelta(days=91)
    with pytest.raises(StaleOrDowngrade, match="expires"):
        verify_bundle(bundle, trust_anchor=pki.root, now=later)
    # The leaf is valid for ten years: in twenty the chain itself fails.
    with pytest.raises(SignatureInvalid, match="validation time"):
        verify_bundle(bundle, trust_anchor=pki.root, now=later + timedelta(days=7300))


# --------------------------------------------------------------------- limits


@pytest.mark.parametrize(
    ("limits", "message"),
    [
        (BundleLimits(max_members=2), "exceed the limit"),
        (BundleLimits(max_file_size=100), "per-file limit"),
        (BundleLimits(max_total_size=1000), "total size"),
        (BundleLimits(max_manifest_size=100), "manifest.json"),
    ],
)
def test_limits_reject_and_write_nothing(
    pki: Pki, tmp_path: Path, limits: BundleLimits, message: str
) -> None:
    bundle = make(pki, tmp_path)
    state = tmp_path / "state"
    state.mkdir()
    with pytest.raises(ManifestInvalid, match=message):
        verify_bundle(bundle, trust_anchor=pki.root, state_dir=state, stage=True, limits=limits)
    assert list(state.iterdir()) == []


def test_oversized_pax_header_is_refused(pki: Pki, tmp_path: Path) -> None:
    from tests.engine.malicious import sign

    manifest = encode(manifest_doc({"a": b"1"}))
    big = Member("payload/a", b"1", pax={"comment": "x" * (2 << 20)})
    members = head(manifest, sign(manifest, pki.leaf, pki.chain)) + [big]
    bundle = tmp_path / "pax.tar"
    bundle.write_bytes(build_tar(members))
    with pytest.raises(ManifestInvalid, match="extended header"):
        verify_bundle(bundle, trust_anchor=pki.root)


def test_progress_reports_bytes_read(pki: Pki, tmp_path: Path) -> None:
    bundle = make(pki, tmp_path, "b.tar.zst")
    calls: list[tuple[int, int]] = []
    verify_bundle(bundle, trust_anchor=pki.root, progress=lambda d, t: calls.append((d, t)))
    assert calls and calls[-1] == (bundle.stat().st_size, bundle.stat().st_size)
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)


# -------------------------------------------------------------------- interop


def test_openssl_signed_bundle_verifies(pki: Pki, tmp_path: Path) -> None:
    files = {"bin/themisd": b"built elsewhere\n"}
    manifest = encode(manifest_doc(files))
    for signer, extra in ((pki.leaf, ()), (pki.leaf, ("-keyopt", "rsa_padding_mode:pss"))):
        signature = openssl_sign(manifest, tmp_path, [signer], pki.chain, *extra)
        bundle = tmp_path / "openssl.tar"
        bundle.write_bytes(build_tar(head(manifest, signature) + payload(files)))
        assert verify_bundle(bundle, trust_anchor=pki.root).manifest.files[0].path == "bin/themisd"
    signature = openssl_sign(manifest, tmp_path, [pki.ec_leaf], pki.chain)
    assert "ec-leaf" in verify_manifest_signature(manifest, signature, pki.root)


def test_created_signature_verifies_with_openssl(pki: Pki, tmp_path: Path) -> None:
    bundle = make(pki, tmp_path)
    manifest, signature = read_manifest(bundle)
    (tmp_path / "manifest.json").write_bytes(manifest)
    (tmp_path / "manifest.json.p7s").write_bytes(signature)
    result = subprocess.run(
        ["openssl", "cms", "-verify", "-binary", "-inform", "DER", "-purpose", "any",
         "-in", tmp_path / "manifest.json.p7s", "-content", tmp_path / "manifest.json",
         "-CAfile", pki.root, "-out", os.devnull],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    printed = subprocess.run(
        ["openssl", "cms", "-cmsout", "-print", "-inform", "DER", "-in",
         tmp_path / "manifest.json.p7s"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    for attribute in ("contentType", "messageDigest", "signingTime", "sha256"):
        assert attribute in printed
    assert "eContent: <ABSENT>" in printed  # detached


@pytest.mark.parametrize("fmt", ["posix", "gnu"])
def test_gnu_tar_built_bundle_with_long_names_verifies(pki: Pki, tmp_path: Path, fmt: str) -> None:
    """External tools build bundles too: GNU tar's pax and GNU long names."""
    if shutil.which("tar") is None:
        pytest.fail("tar is not installed: run `make install`")
    long_rel = "share/" + "x" * 90 + "/" + "y" * 60 + ".txt"
    files = {"bin/themisd": b"a\n", long_rel: b"b\n", "lib/ñ.so": b"c\n"}
    from tests.engine.malicious import sign

    manifest = encode(manifest_doc(files))
    root = tmp_path / "tree"
    for rel, data in {
        "manifest.json": manifest,
        **{"payload/" + k: v for k, v in files.items()},
    }.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    (root / "manifest.json.p7s").write_bytes(sign(manifest, pki.leaf, pki.chain))
    names = ["manifest.json", "manifest.json.p7s", *("payload/" + k for k in sorted(files))]
    bundle = tmp_path / "gnu.tar"
    subprocess.run(
        ["tar", f"--format={fmt}", "--owner=0", "--group=0", "-cf", bundle, "-C", root, *names],
        check=True,
    )
    verified = verify_bundle(bundle, trust_anchor=pki.root)
    assert {f.path for f in verified.manifest.files} == set(files)


# ------------------------------------------------------------------------ CLI


def test_cli_create_and_verify(
    pki: Pki, tmp_path: Path, capsys: pytest.CaptureFixture[str], time_machine: TimeMachineFixture
) -> None:
    # The clock stands still (at a moment the session's certificates are valid), so the
    # expiry is exactly the creation time plus the days asked for.
    frozen = datetime.now(UTC).replace(microsecond=0)
    time_machine.move_to(frozen, tick=False)
    src = write_source(tmp_path / "src")
    out = tmp_path / "themisdb-1.8.0.tar.zst"
    rc = main(
        ["bundle", "create", str(src), "--product", "themisdb", "--version", "1.8.0",
         "--key", str(pki.leaf.key), "--cert", str(pki.leaf.cert), "--chain", str(pki.chain),
         "--expires-days", "7", "-o", str(out)]
    )  # fmt: skip
    assert rc == 0 and out.exists()
    created = json.loads(capsys.readouterr().out)
    assert created["version"] == "1.8.0" and created["files"] == len(SOURCE)
    rc = main(["bundle", "verify", str(out), "--trust-anchor", str(pki.root)])
    summary = json.loads(capsys.readouterr().out)
    assert rc == 0
    assert summary["product"] == "themisdb" and summary["version"] == "1.8.0"
    assert summary["files"] == len(SOURCE)
    assert summary["total_size"] == sum(len(d) for d, _ in SOURCE.values())
    assert "release signer (leaf)" in summary["signer"]
    expires = datetime.fromisoformat(summary["expires"])
    assert expires == frozen + timedelta(days=7)


@pytest.mark.parametrize(
    ("kind", "code"), [("symlink", UnsafePath.exit_code), ("fifo", ManifestInvalid.exit_code)]
)
def test_cli_create_refuses_special_files(
    pki: Pki, tmp_path: Path, kind: str, code: int, capsys: pytest.CaptureFixture[str]
) -> None:
    src = write_source(tmp_path / "src")
    if kind == "symlink":
        (src / "bin" / "link").symlink_to("/etc/passwd")
    else:
        os.mkfifo(src / "bin" / "pipe")
    out = tmp_path / "x.tar"
    rc = main(
        ["bundle", "create", str(src), "--product", "themisdb", "--version", "1.0",
         "--key", str(pki.leaf.key), "--cert", str(pki.leaf.cert), "-o", str(out)]
    )  # fmt: skip
    assert rc == code
    err = capsys.readouterr().err
    assert "bin/" in err and len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_cli_create_with_mismatched_key_is_a_usage_error(pki: Pki, tmp_path: Path) -> None:
    src = write_source(tmp_path / "src")
    rc = main(
        ["bundle", "create", str(src), "--product", "themisdb", "--version", "1.0",
         "--key", str(pki.ec_leaf.key), "--cert", str(pki.leaf.cert), "-o", str(tmp_path / "x")]
    )  # fmt: skip
    assert rc == UsageError.exit_code


def test_cli_usage_errors_exit_2(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as raised:
        main(["bundle", "verify", str(tmp_path / "x.tar")])  # no --trust-anchor
    assert raised.value.code == 2
    assert main(["bundle", "verify", str(tmp_path / "nope"), "--trust-anchor", "x"]) == 10
    assert main(["-v", "bundle", "create", str(tmp_path / "no-such-dir"), "--product", "p",
                 "--version", "1", "--key", "k", "--cert", "c", "-o", "o"]) == 2  # fmt: skip


def test_cli_verify_missing_bundle_is_a_usage_error(pki: Pki, tmp_path: Path) -> None:
    argv = ["bundle", "verify", str(tmp_path / "nope.tar"), "--trust-anchor", str(pki.root)]
    assert main(argv) == 2


def test_progress_bar_draws_on_a_terminal() -> None:
    stream = io.StringIO()
    ticks = iter([0.0, 0.05, 0.5, 0.6])
    bar = ProgressBar(stream, clock=lambda: next(ticks))
    bar.update(10, 100)
    bar.update(20, 100)  # too soon: skipped
    bar.update(100, 100)
    bar.finish()
    text = stream.getvalue()
    assert "100%" in text and text.endswith("\n") and text.count("\r") == 2


# ------------------------------------------------------------- signature API


def test_signature_validator_seam(pki: Pki, tmp_path: Path) -> None:
    manifest, signature = read_manifest(make(pki, tmp_path))
    validator: SignatureValidator = CmsSignatureValidator(pki.root)
    assert "release signer (leaf)" in validator.verify(manifest, signature)
    with pytest.raises(SignatureInvalid):
        validator.verify(manifest + b" ", signature)
    frozen = CmsSignatureValidator(pki.root, clock=lambda: datetime(2060, 1, 1, tzinfo=UTC))
    with pytest.raises(SignatureInvalid, match="validation time"):
        frozen.verify(manifest, signature)


@pytest.mark.parametrize(
    "signature",
    [b"", b"\x00", b"\x30\x03\x06\x01\x00", b"\x30\x80" * 1000, bytes(range(256)) * 4],
)
def test_signature_garbage_is_rejected_never_crashes(
    pki: Pki, tmp_path: Path, signature: bytes
) -> None:
    with pytest.raises(SignatureInvalid):
        verify_manifest_signature(b"{}", signature, pki.root)


def test_unreadable_trust_anchor_is_a_rejection(pki: Pki, tmp_path: Path) -> None:
    manifest, signature = read_manifest(make(pki, tmp_path))
    with pytest.raises(SignatureInvalid, match="trust anchor"):
        verify_manifest_signature(manifest, signature, tmp_path / "missing.pem")
    with pytest.raises(SignatureInvalid, match="no trust anchor"):
        verify_manifest_signature(manifest, signature, [])


def test_make_pki_is_idempotent(pki: Pki) -> None:
    before = pki.leaf.cert.read_bytes()
    assert make_pki(pki.directory) == pki
    assert pki.leaf.cert.read_bytes() == before


def test_verified_bundle_cleanup_is_idempotent(tmp_path: Path) -> None:
    staging = tmp_path / "staging" / "abc"
    staging.mkdir(parents=True)
    now = datetime.now(UTC)
    manifest = Manifest(1, "p", "1", now, now, (), (), None, {})
    verified = VerifiedBundle(manifest, b"{}", "CN=x", staging, frozenset())
    verified.cleanup()
    verified.cleanup()
    assert not (tmp_path / "staging").exists()


def test_compressed_and_plain_payload_bytes_agree(pki: Pki, tmp_path: Path) -> None:
    files = {"a/b": os.urandom(300_000)}
    from tests.engine.malicious import sign

    manifest = encode(manifest_doc(files))
    data = build_tar(head(manifest, sign(manifest, pki.leaf, pki.chain)) + payload(files))
    state = tmp_path / "state"
    state.mkdir()
    for name, blob in (("p.tar", data), ("z.tar.zst", zstd(data))):
        (tmp_path / name).write_bytes(blob)
        with verify_bundle(
            tmp_path / name, trust_anchor=pki.root, state_dir=state, stage=True
        ) as v:
            assert v.staging_dir is not None
            assert (v.staging_dir / "a/b").read_bytes() == files["a/b"]
