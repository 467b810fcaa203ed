"""Signed update bundles (format v1, DESIGN.md): create and verify.

This is the public face of the bundle code; the pieces live in `manifest`
(schema), `cms` (signatures), `extract` (streaming archive reading, staging)
and `paths` (path rules), and are re-exported here.

Verification follows DESIGN.md's order and writes nothing before step 3 has
passed: (1) the first two members are the manifest and its signature, (2) the
signature and certificate chain verify, (3) the manifest is well-formed, its
paths safe, product/version/expiry acceptable, (4) payload members stream
through SHA-256 into staging (or nowhere). Any failure raises the EngineError
with DESIGN.md's exit code and removes whatever staging was made.
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
import shutil
import stat
import tarfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO, Any

import zstandard

from .cms import (
    CmsSignatureValidator,
    ManifestSigner,
    Trust,
    TrustAnchor,
    check_signature,
    load_trust,
    manifest_signer,
    verify_manifest_signature,
)
from .errors import EngineError, ManifestInvalid, StaleOrDowngrade, UnsafePath, UsageError
from .extract import (
    MANIFEST_NAME,
    PAYLOAD_PREFIX,
    SIGNATURE_NAME,
    BundleLimits,
    BundleReader,
    Staging,
    archive_step,
    remove_empty_dir,
)
from .manifest import (
    Dependency,
    Manifest,
    ManifestFile,
    encode_manifest,
    manifest_document,
    parse_manifest,
)
from .paths import check_no_symlink_components, collision_key, is_safe_path, require_safe_path
from .state import check_version_rule, load_state

__all__ = [
    "BundleLimits",
    "CmsSignatureValidator",
    "Manifest",
    "ManifestFile",
    "VerifiedBundle",
    "check_no_symlink_components",
    "create_bundle",
    "is_safe_path",
    "parse_manifest",
    "read_manifest",
    "verify_bundle",
    "verify_manifest_signature",
]

log = logging.getLogger("themis_update.bundle")

DEFAULT_PRODUCT = "themisdb"
_RESERVED_KEYS = frozenset({"format", "product", "version", "created", "expires", "files"})


# ---------------------------------------------------------------- verification


@dataclass
class VerifiedBundle:
    """A bundle that passed every check. With staging, its payloads sit in
    `staging_dir` at their manifest paths with their manifest modes (for a
    delta entry: the patch); call `cleanup()` (or use `with`) when done."""

    manifest: Manifest
    manifest_bytes: bytes
    signer: str
    staging_dir: Path | None
    delta_paths: frozenset[str]

    def cleanup(self) -> None:
        if self.staging_dir is not None:
            shutil.rmtree(self.staging_dir, ignore_errors=True)
            remove_empty_dir(self.staging_dir.parent)
            self.staging_dir = None

    def __enter__(self) -> VerifiedBundle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.cleanup()

    def summary(self) -> dict[str, Any]:
        """What `bundle verify` prints."""
        manifest = self.manifest
        return {
            "product": manifest.product,
            "version": manifest.version,
            "signer": self.signer,
            "created": _iso(manifest.created),
            "expires": _iso(manifest.expires),
            "files": len(manifest.files),
            "total_size": manifest.total_size,
            "payload_size": manifest.payload_size,
            "remove": len(manifest.remove),
            "deltas": len(self.delta_paths),
            "min_version": manifest.min_version,
            "dependencies": [dependency.to_document() for dependency in manifest.dependencies],
            "manifest_sha256": hashlib.sha256(self.manifest_bytes).hexdigest(),
        }


def verify_bundle(
    bundle_path: Path,
    *,
    trust_anchor: TrustAnchor,
    product: str = DEFAULT_PRODUCT,
    state_dir: Path | None = None,
    allow_downgrade: bool = False,
    stage: bool = False,
    now: datetime | None = None,
    progress: Callable[[int, int], None] | None = None,
    limits: BundleLimits | None = None,
) -> VerifiedBundle:
    """Verify a bundle completely (DESIGN.md steps 1-4); raise the EngineError
    for the first failure. `stage=True` (needs `state_dir`) keeps payloads in
    a fresh staging dir; otherwise they are hashed and dropped."""
    if stage and state_dir is None:
        raise UsageError("verify_bundle: stage=True needs a state_dir")
    try:
        return _verify(
            Path(bundle_path),
            anchors=load_trust(trust_anchor),
            product=product,
            state_dir=Path(state_dir) if state_dir is not None else None,
            allow_downgrade=allow_downgrade,
            stage=stage,
            now=now or datetime.now(UTC),
            progress=progress,
            limits=limits or BundleLimits(),
        )
    except EngineError as err:
        # One line per rejection, naming the cause and the offending name.
        log.info("bundle rejected (%s): %s", err.code, err)
        raise


def _verify(
    bundle_path: Path,
    *,
    anchors: Trust,
    product: str,
    state_dir: Path | None,
    allow_downgrade: bool,
    stage: bool,
    now: datetime,
    progress: Callable[[int, int], None] | None,
    limits: BundleLimits,
) -> VerifiedBundle:
    with BundleReader(bundle_path, limits, progress) as reader:
        manifest_bytes, signature = archive_step(reader.read_head)
        signer = check_signature(manifest_bytes, signature, anchors, now)
        manifest = parse_manifest(manifest_bytes)
        check_manifest_policy(
            manifest,
            product=product,
            state_dir=state_dir,
            allow_downgrade=allow_downgrade,
            now=now,
            limits=limits,
        )
        staging = Staging(state_dir) if stage and state_dir is not None else None
        try:
            archive_step(lambda: reader.read_payload(manifest, staging))
        except BaseException:
            if staging is not None:
                staging.discard()
            raise
        if staging is not None:
            staging.close()
    return VerifiedBundle(
        manifest=manifest,
        manifest_bytes=manifest_bytes,
        signer=signer,
        staging_dir=staging.path if staging is not None else None,
        delta_paths=frozenset(e.path for e in manifest.files if e.delta is not None),
    )


def check_manifest_policy(
    manifest: Manifest,
    *,
    product: str = DEFAULT_PRODUCT,
    state_dir: Path | None = None,
    allow_downgrade: bool = False,
    now: datetime | None = None,
    limits: BundleLimits | None = None,
) -> None:
    """Step 3 after parsing: limits, product, version rule, expiry."""
    limits = limits or BundleLimits()
    if len(manifest.files) > limits.max_members:
        raise ManifestInvalid(
            f"manifest: files: {len(manifest.files)} entries exceed the limit of"
            f" {limits.max_members}"
        )
    for entry in manifest.files:
        if max(entry.size, entry.payload_size) > limits.max_file_size:
            raise ManifestInvalid(
                f"manifest: files: {entry.path!r} is larger than the per-file limit"
                f" of {limits.max_file_size} bytes"
            )
    if max(manifest.total_size, manifest.payload_size) > limits.max_total_size:
        raise ManifestInvalid(
            f"manifest: files: total size exceeds the limit of {limits.max_total_size} bytes"
        )
    if manifest.product != product:
        raise ManifestInvalid(
            f"manifest: product: {manifest.product!r} is not this node's product {product!r}"
        )
    if state_dir is not None:
        check_version_rule(manifest.version, load_state(state_dir), allow_downgrade=allow_downgrade)
    if manifest.expires <= (now or datetime.now(UTC)):
        raise StaleOrDowngrade(f"manifest: expires: {_iso(manifest.expires)} has passed")


def read_manifest(bundle_path: Path, limits: BundleLimits | None = None) -> tuple[bytes, bytes]:
    """The raw manifest and signature bytes of a bundle (step 1 only: nothing
    is verified, so treat the result as untrusted)."""
    with BundleReader(Path(bundle_path), limits) as reader:
        result: tuple[bytes, bytes] = archive_step(reader.read_head)
        return result


# -------------------------------------------------------------------- creation


def create_bundle(
    src_dir: Path,
    *,
    product: str,
    version: str,
    key_path: Path | None = None,
    cert_path: Path | None = None,
    chain_path: Path | None = None,
    signer: ManifestSigner | None = None,
    expires_days: int = 90,
    out_path: Path,
    extra_manifest: dict[str, Any] | None = None,
    dependencies: Sequence[Dependency] = (),
    deltas: Mapping[str, Mapping[str, Any]] | None = None,
) -> Manifest:
    """Build and sign a bundle from the regular files under `src_dir`, with `signer` (a
    key in a token: hsm.Pkcs11Signer) or else the PEM `key_path` and `cert_path`.

    `dependencies` lists what the release needs of other components.
    `extra_manifest` adds top-level keys (`remove`, `min_version`, ...).
    `deltas` marks source files that are patches:
    path -> {"algorithm", "base_sha256", "size", "sha256"} where size/sha256
    describe the rebuilt target; the patch's own size/hash are computed.
    The output is `.tar.zst` when `out_path` ends with `.zst`, and is written
    to a temp file and renamed, so a failure leaves no partial bundle.
    """
    if expires_days < 1:
        raise UsageError(f"--expires-days: {expires_days} must be at least 1")
    reserved = _RESERVED_KEYS & set(extra_manifest or {})
    if reserved:
        raise UsageError(f"extra_manifest: may not set {sorted(reserved)}")
    sources = scan_source(Path(src_dir))
    entries = [_entry(rel, path, mode, (deltas or {}).get(rel)) for rel, path, mode in sources]
    unknown = set(deltas or {}) - {rel for rel, _, _ in sources}
    if unknown:
        raise UsageError(f"deltas: {sorted(unknown)[0]!r} is not a file under {str(src_dir)!r}")
    created = datetime.now(UTC).replace(microsecond=0)
    document = manifest_document(
        product=product,
        version=version,
        created=created,
        expires=created + timedelta(days=expires_days),
        files=entries,
        dependencies=dependencies,
        extra=extra_manifest,
    )
    manifest_bytes = encode_manifest(document)
    manifest = parse_manifest(manifest_bytes)  # never sign what we would reject
    signature = manifest_signer(signer, key_path, cert_path, chain_path)(manifest_bytes)
    members = [(entry, path) for entry, (_, path, _) in zip(entries, sources, strict=True)]
    _write_archive(Path(out_path), manifest_bytes, signature, members, int(created.timestamp()))
    return manifest


def scan_source(root: Path) -> list[tuple[str, Path, int]]:
    """(relative path, path, mode without setuid/setgid/sticky) of every file
    under `root`, sorted; symlinks and special files are refused."""
    if not root.is_dir():
        raise UsageError(f"SRC_DIR: {str(root)!r} is not a directory")
    found: list[tuple[str, Path, int]] = []
    keys: dict[str, str] = {}
    stack = [("", root)]
    while stack:
        prefix, directory = stack.pop()
        with os.scandir(directory) as entries:
            for item in entries:
                rel = prefix + item.name
                mode = item.stat(follow_symlinks=False).st_mode
                if stat.S_ISLNK(mode):
                    raise UnsafePath(f"source: {rel!r} is a symlink; bundles carry regular files")
                if stat.S_ISDIR(mode):
                    stack.append((rel + "/", Path(item.path)))
                    continue
                if not stat.S_ISREG(mode):
                    raise ManifestInvalid(f"source: {rel!r} is not a regular file")
                require_safe_path(rel, "source")
                key = collision_key(rel)
                if key in keys:
                    raise ManifestInvalid(f"source: {rel!r} and {keys[key]!r} differ only in case")
                keys[key] = rel
                found.append((rel, Path(item.path), stat.S_IMODE(mode) & 0o777))
    return sorted(found)


def _entry(rel: str, path: Path, mode: int, delta: Mapping[str, Any] | None) -> ManifestFile:
    size, sha256 = _hash_file(path)
    if delta is None:
        return ManifestFile(path=rel, size=size, sha256=sha256, mode=mode)
    try:
        target_size, target_sha256 = int(delta["size"]), str(delta["sha256"])
        spec = {
            "algorithm": str(delta["algorithm"]),
            "base_sha256": str(delta["base_sha256"]),
            "patch_sha256": sha256,
            "patch_size": size,
        }
    except (KeyError, TypeError, ValueError) as exc:
        raise UsageError(f"deltas: {rel!r}: needs algorithm, base_sha256, size, sha256") from exc
    return ManifestFile(path=rel, size=target_size, sha256=target_sha256, mode=mode, delta=spec)


def _hash_file(path: Path) -> tuple[int, str]:
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


class _HashingReader:
    """Hashes what tarfile copies, to catch a source changed since hashing."""

    def __init__(self, handle: IO[bytes]) -> None:
        self.handle = handle
        self.digest = hashlib.sha256()

    def read(self, size: int = -1) -> bytes:
        data = self.handle.read(size)
        self.digest.update(data)
        return data


def _write_archive(
    out_path: Path,
    manifest_bytes: bytes,
    signature: bytes,
    members: list[tuple[ManifestFile, Path]],
    mtime: int,
) -> None:
    tmp = out_path.with_name(f".{out_path.name}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "xb") as raw:
            compressed = out_path.name.endswith(".zst")
            sink: Any = (
                zstandard.ZstdCompressor(level=9).stream_writer(raw, closefd=False)
                if compressed
                else raw
            )
            with tarfile.open(fileobj=sink, mode="w|", format=tarfile.PAX_FORMAT) as tar:
                for name, data in ((MANIFEST_NAME, manifest_bytes), (SIGNATURE_NAME, signature)):
                    _add(tar, name, len(data), 0o644, mtime, _BytesReader(data))
                for entry, path in members:
                    _add_file(tar, entry, path, mtime)
            if compressed:
                sink.close()
            raw.flush()
            os.fsync(raw.fileno())
        os.replace(tmp, out_path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


class _BytesReader:
    def __init__(self, data: bytes) -> None:
        self.data = memoryview(data)
        self.pos = 0

    def read(self, size: int = -1) -> bytes:
        end = len(self.data) if size < 0 else self.pos + size
        chunk = bytes(self.data[self.pos : end])
        self.pos += len(chunk)
        return chunk


def _add(tar: tarfile.TarFile, name: str, size: int, mode: int, mtime: int, data: Any) -> None:
    # Fixed owner and time so the same tree gives the same archive bytes.
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = size, mode, mtime
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, data)


def _add_file(tar: tarfile.TarFile, entry: ManifestFile, path: Path, mtime: int) -> None:
    with open(path, "rb") as handle:
        reader = _HashingReader(handle)
        _add(tar, PAYLOAD_PREFIX + entry.path, entry.payload_size, entry.mode, mtime, reader)
    if reader.digest.hexdigest() != entry.payload_sha256:
        raise ManifestInvalid(f"source: {entry.path!r} changed while the bundle was being built")


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
