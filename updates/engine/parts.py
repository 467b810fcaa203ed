"""Staging a release from its parts: the signed manifest first, then each file as it arrives.

Delivery by parts (a node fetches a release's manifest, its signature and only the files it
lacks, see `workers/parts.py`) ends where a bundle does: in a staging directory the apply
accepts. The order is DESIGN.md's, fail-closed:

1. `open_parts_staging(manifest_bytes, signature, ...)` verifies the signature, the manifest
   and its policy (product, version rule, expiry) before a staging directory exists, so
   before any payload byte is fetched or written;
2. each file goes through a `StagedFile`: its bytes are hashed as they arrive (in order, even
   when they arrive as parallel ranges), and `commit()` checks size and SHA-256 against the
   signed manifest; a file this node already holds is copied from the target, hashed too;
3. `finish()` checks that every listed file is staged, writes a head-only bundle (the manifest
   and its signature, no payload) and hands the staging to the apply as resumable staging:
   `apply_bundle(head_bundle)` verifies the signature again and re-hashes every staged file
   before anything reaches the target.

Any failure before `finish()`: `discard()` removes the staging directory; nothing is left.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import logging
import os
import shutil
import stat
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from .apply import adopt_resumable_staging, drop_resumable_staging
from .bundle import _write_archive, check_manifest_policy
from .cms import verify_manifest_signature
from .errors import ManifestInvalid, PreflightFailed, SignatureInvalid, UnsafePath, UsageError
from .extract import BundleLimits, Staging
from .install import check_target_path
from .manifest import Manifest, ManifestFile, parse_manifest
from .restore import _stat_key, load_hash_cache
from .state import write_json_atomic
from .truststore import trust_for

log = logging.getLogger("themis_update.parts")

CHUNK = 1 << 20
# The head-only bundles `finish()` writes, next to the agent's downloads.
HEAD_DIR = "downloads"
# The staging of a parts fetch under way (a crash leaves it; the next fetch removes it).
PARTS_RECORD = "parts-staging.json"
# The same free-space rule as pre-flight: staging plus the new files.
DISK_FACTOR = 2


class HashedFile:
    """A file filled at any offsets (parallel ranges, resumed requests), hashed in order.

    Bytes written at the end of the contiguous prefix are hashed as they pass; bytes written
    further on are remembered as extents and hashed (read back, from the page cache) once
    the prefix reaches them. `held` is that prefix: where a resumed request starts.
    Thread-safe: ranges of one file may arrive on several threads."""

    def __init__(self, fd: int, *, size: int, sha256: str, name: str, held: int = 0) -> None:
        self.fd, self.size, self.sha256, self.name = fd, size, sha256.lower(), name
        self._lock = threading.Lock()
        self._digest = hashlib.sha256()
        self._hashed = 0
        self._ahead: dict[int, int] = {}  # start -> end of bytes written past the prefix
        self._ends: dict[int, int] = {}  # end -> start, to grow an extent as its range arrives
        if held:
            self._hash_from_disk(held)

    @property
    def held(self) -> int:
        with self._lock:
            return self._hashed

    def write_at(self, offset: int, data: bytes | memoryview) -> None:
        length = len(data)
        if not length:
            return
        with self._lock:
            if offset < self._hashed or offset + length > self.size:
                raise ManifestInvalid(
                    f"{self.name}: bytes {offset}-{offset + length - 1} lie outside what is"
                    f" still missing of its {self.size} bytes"
                )
            _pwrite_all(self.fd, data, offset)
            if offset == self._hashed:
                self._digest.update(data)
                self._hashed += length
                self._absorb()
                return
            start = self._ends.pop(offset, offset)
            self._ahead[start] = offset + length
            self._ends[offset + length] = start

    def truncate(self, length: int) -> None:
        """Keep the first `length` bytes only (0: start over). Bytes written ahead of the
        prefix are dropped too: they are fetched again."""
        with self._lock:
            length = min(length, self._hashed)
            os.ftruncate(self.fd, length)
            self._ahead.clear()
            self._ends.clear()
            if length < self._hashed:
                self._digest = hashlib.sha256()
                self._hashed = 0
                self._hash_from_disk(length)

    def check(self) -> None:
        """Every byte arrived and the SHA-256 is the expected one; ManifestInvalid otherwise."""
        with self._lock:
            if self._hashed != self.size or self._ahead:
                raise ManifestInvalid(
                    f"{self.name}: only {self._hashed} of its {self.size} bytes arrived"
                )
            digest = self._digest.hexdigest()
        if not hmac.compare_digest(digest, self.sha256):
            raise ManifestInvalid(
                f"{self.name}: SHA-256 {digest} differs from the expected {self.sha256}"
                " (corrupt or tampered)"
            )

    def _absorb(self) -> None:
        while (end := self._ahead.pop(self._hashed, None)) is not None:
            del self._ends[end]
            self._hash_from_disk(end)

    def _hash_from_disk(self, end: int) -> None:
        while self._hashed < end:
            data = os.pread(self.fd, min(CHUNK, end - self._hashed), self._hashed)
            if not data:
                raise ManifestInvalid(f"{self.name}: shorter on disk than what was written")
            self._digest.update(data)
            self._hashed += len(data)


def _pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


class StagedFile(HashedFile):
    """One manifest file being written into the staging directory (see HashedFile)."""

    def __init__(self, owner: PartsStaging, entry: ManifestFile, fd: int) -> None:
        super().__init__(fd, size=entry.size, sha256=entry.sha256, name=entry.path)
        self.owner, self.entry = owner, entry
        self._open = True

    def commit(self) -> None:
        """Check the bytes against the signed manifest and keep the file staged."""
        self.check()
        os.fchmod(self.fd, self.entry.mode)
        self._close()
        self.owner._committed(self.entry)

    def discard(self) -> None:
        """Remove the file from the staging (a bad file, or the fetch gave up)."""
        if self._close():
            self.owner._remove(self.entry)

    def close(self) -> None:
        """Stop writing without committing: the file is not staged."""
        self.discard()

    def _close(self) -> bool:
        with self.owner._lock:
            if not self._open:
                return False
            self._open = False
        os.close(self.fd)
        return True


@dataclass(frozen=True)
class PartsPlan:
    """What a node must fetch, and what it can copy from files it already has."""

    fetch: list[ManifestFile]
    local: list[tuple[ManifestFile, Path]]
    # The same content at several paths is fetched once: path -> the fetched entry.
    copies: dict[str, ManifestFile] = field(default_factory=dict)

    @property
    def fetch_bytes(self) -> int:
        return sum(entry.size for entry in self.fetch)


@dataclass(frozen=True)
class StagedRelease:
    """A finished parts staging, waiting for `apply_bundle(bundle)`."""

    bundle: Path  # the head-only bundle: manifest.json and its signature, no payload
    staging_dir: Path
    manifest_sha256: str
    state_dir: Path

    def discard_if_unused(self) -> None:
        """Drop the staging if no apply took it over (an apply that did owns it now)."""
        drop_resumable_staging(self.state_dir, self.staging_dir)
        self.bundle.unlink(missing_ok=True)


class PartsStaging:
    """A verified manifest and the staging directory its files are written into."""

    def __init__(
        self,
        *,
        manifest: Manifest,
        manifest_bytes: bytes,
        signature: bytes,
        signer: str,
        state_dir: Path,
    ) -> None:
        self.manifest, self.manifest_bytes, self.signature = manifest, manifest_bytes, signature
        self.signer, self.state_dir = signer, Path(state_dir)
        self.manifest_sha256 = hashlib.sha256(manifest_bytes).hexdigest()
        self._lock = threading.Lock()
        self._done: set[str] = set()
        self._entries = {entry.path: entry for entry in manifest.files}
        sweep_abandoned_parts(self.state_dir)
        self._staging = Staging(self.state_dir)
        self.staging_dir = self._staging.path
        try:
            write_json_atomic(self.state_dir / PARTS_RECORD, {"staging_dir": str(self.path_abs)})
        except BaseException:
            self._staging.discard()
            raise

    @property
    def path_abs(self) -> Path:
        return self.staging_dir.absolute()

    @property
    def entries(self) -> Mapping[str, ManifestFile]:
        """The manifest's entries by path."""
        return self._entries

    # ---- what to fetch

    def plan(self, target: Path) -> PartsPlan:
        """Which files to fetch and which to copy from the target. A target file is a copy
        candidate when it sits at a manifest path with the manifest's size and the hash
        cache does not say it holds other bytes; or when the hash cache vouches that it holds
        the wanted bytes at another path. Copies are hashed, so a wrong guess only means a
        fetch."""
        target = Path(target)
        cache = load_hash_cache(self.state_dir)
        vouched: dict[str, Path] = {}  # sha256 -> an installed file the cache vouches for
        for rel, record in cache.items():
            sha = _vouched_sha(target, rel, record)
            if sha:
                vouched.setdefault(sha, target / rel)
        fetch: list[ManifestFile] = []
        local: list[tuple[ManifestFile, Path]] = []
        copies: dict[str, ManifestFile] = {}
        first_by_sha: dict[str, ManifestFile] = {}
        for entry in self.manifest.files:
            source = self._local_source(target, entry, cache, vouched)
            if source is not None:
                local.append((entry, source))
            elif entry.sha256 in first_by_sha:
                copies[entry.path] = first_by_sha[entry.sha256]
            else:
                first_by_sha[entry.sha256] = entry
                fetch.append(entry)
        return PartsPlan(fetch=fetch, local=local, copies=copies)

    def _local_source(
        self,
        target: Path,
        entry: ManifestFile,
        cache: Mapping[str, Any],
        vouched: Mapping[str, Path],
    ) -> Path | None:
        try:
            check_target_path(target, entry.path)
        except UnsafePath:
            return None  # the apply refuses it anyway; nothing is read through a symlink
        path = target / entry.path
        try:
            st = os.lstat(path)
        except OSError:
            st = None
        if st is not None and stat.S_ISREG(st.st_mode) and st.st_size == entry.size:
            sha = _vouched_sha(target, entry.path, cache.get(entry.path))
            if not sha or sha == entry.sha256:
                return path
        return vouched.get(entry.sha256)

    # ---- staging files

    def open_file(self, entry: ManifestFile) -> StagedFile:
        """A new, empty staged file for `entry` (a manifest entry)."""
        if self.entries.get(entry.path) != entry:
            raise UsageError(f"{entry.path}: not an entry of this manifest")
        with self._lock:
            if entry.path in self._done:
                raise UsageError(f"{entry.path}: staged already")
            fd = self._staging.create(entry.path)
        return StagedFile(self, entry, fd)

    def stage_local(self, entry: ManifestFile, source: Path) -> bool:
        """Copy `source` into the staging as `entry`, hashing as it goes. False (and
        nothing staged) when its bytes are not the manifest's; the file is fetched then."""
        try:
            fd_in = os.open(source, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            return False
        staged = self.open_file(entry)
        try:
            with os.fdopen(fd_in, "rb") as src:
                offset = 0
                while chunk := src.read(CHUNK):
                    if offset + len(chunk) > entry.size:
                        staged.discard()
                        return False
                    staged.write_at(offset, chunk)
                    offset += len(chunk)
            staged.commit()
        except ManifestInvalid:
            staged.discard()
            return False
        except BaseException:
            staged.discard()
            raise
        return True

    def stage_copy(self, entry: ManifestFile, staged_from: ManifestFile) -> None:
        """`entry` holds the same bytes as the already staged `staged_from`: copy them."""
        if staged_from.path not in self._done:
            raise UsageError(f"{entry.path}: {staged_from.path} is not staged")
        if not self.stage_local(entry, self.staging_dir / staged_from.path):
            raise ManifestInvalid(f"{entry.path}: the staged copy of {staged_from.path} differs")

    def missing(self) -> list[str]:
        with self._lock:
            return [e.path for e in self.manifest.files if e.path not in self._done]

    def finish(self) -> StagedRelease:
        """Every file is staged: write the head-only bundle and hand the staging to the apply."""
        missing = self.missing()
        if missing:
            raise ManifestInvalid(
                f"{missing[0]}: listed in the manifest but not staged"
                + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
            )
        self._staging.close()
        head_dir = self.state_dir / HEAD_DIR
        head_dir.mkdir(parents=True, exist_ok=True)
        bundle = head_dir / f"{self.manifest_sha256}.head.tar"
        _write_archive(bundle, self.manifest_bytes, self.signature, [], int(time.time()))
        try:
            adopt_resumable_staging(self.state_dir, self.manifest_bytes, self.staging_dir)
        except BaseException:
            bundle.unlink(missing_ok=True)
            raise
        _forget_record(self.state_dir, self.path_abs)
        return StagedRelease(bundle, self.staging_dir, self.manifest_sha256, self.state_dir)

    def discard(self) -> None:
        """Remove the staging directory and everything in it."""
        self._staging.discard()
        _forget_record(self.state_dir, self.path_abs)

    def _committed(self, entry: ManifestFile) -> None:
        with self._lock:
            self._done.add(entry.path)

    def _remove(self, entry: ManifestFile) -> None:
        with self._lock:
            self._done.discard(entry.path)
            with contextlib.suppress(FileNotFoundError):
                self._staging.remove(entry.path)


def open_parts_staging(
    manifest_bytes: bytes,
    signature: bytes,
    *,
    trust_anchor: Path,
    state_dir: Path,
    target: Path | None = None,
    product: str = "themisdb",
    allow_downgrade: bool = False,
    now: datetime | None = None,
) -> PartsStaging:
    """Verify a release's manifest and signature (DESIGN.md steps 2-3: signature and chain,
    well-formed manifest, safe paths, product, version rule, expiry) and only then open a
    staging directory for its files. Raises the EngineError of the first failure with
    nothing written. With `target`, free space is checked too (PreflightFailed)."""
    limits = BundleLimits()
    if len(manifest_bytes) > limits.max_manifest_size:
        raise ManifestInvalid(
            f"manifest.json: {len(manifest_bytes)} bytes exceed the"
            f" {limits.max_manifest_size}-byte limit"
        )
    if len(signature) > limits.max_signature_size:
        raise SignatureInvalid(
            f"manifest.json.p7s: {len(signature)} bytes exceed the"
            f" {limits.max_signature_size}-byte limit"
        )
    signer = verify_manifest_signature(
        manifest_bytes, signature, trust_for(state_dir, trust_anchor), now=now
    )
    manifest = parse_manifest(manifest_bytes)
    check_manifest_policy(
        manifest,
        product=product,
        state_dir=state_dir,
        allow_downgrade=allow_downgrade,
        now=now,
        limits=limits,
    )
    deltas = [entry.path for entry in manifest.files if entry.delta is not None]
    if deltas:
        raise ManifestInvalid(f"{deltas[0]}: a delta entry cannot be delivered by parts")
    if target is not None:
        check_space(manifest, target=Path(target), state_dir=Path(state_dir))
    return PartsStaging(
        manifest=manifest,
        manifest_bytes=manifest_bytes,
        signature=signature,
        signer=signer,
        state_dir=Path(state_dir),
    )


def check_space(manifest: Manifest, *, target: Path, state_dir: Path) -> None:
    """Pre-flight's disk rule for a release staged from parts (there is no bundle file to
    size against): twice the release's unpacked size free where staging and target live."""
    need = DISK_FACTOR * manifest.total_size
    for name, path in (("disk_state_dir", state_dir), ("disk_target", target)):
        where = path.absolute()
        while not where.exists() and where != where.parent:
            where = where.parent
        st = os.statvfs(where)
        free = st.f_bavail * st.f_frsize
        if free < need:
            raise PreflightFailed(
                f"{name}: {free} bytes free on the filesystem of {path}, need {need}"
                " (2x the release's unpacked size)"
            )


def _vouched_sha(target: Path, rel: str, record: Any) -> str:
    """The SHA-256 the hash cache recorded for `rel` if the file is still exactly what the
    last commit installed (same stat); "" when the cache cannot vouch for it."""
    if not isinstance(record, dict):
        return ""
    try:
        st = os.lstat(Path(target) / rel)
    except OSError:
        return ""
    if not stat.S_ISREG(st.st_mode) or record.get("stat") != _stat_key(st):
        return ""
    sha = record.get("sha256")
    return sha if isinstance(sha, str) else ""


def sweep_abandoned_parts(state_dir: Path) -> None:
    """A parts fetch that died (the agent was killed) left its staging: remove it."""
    record = _read_record(state_dir)
    if record is None:
        return
    staging = Path(str(record.get("staging_dir")))
    root = (Path(state_dir) / "staging").absolute()
    if staging.parent == root and staging.is_dir() and not staging.is_symlink():
        log.warning("removing the staging of an abandoned parts fetch: %s", staging)
        shutil.rmtree(staging, ignore_errors=True)
    _forget_record(state_dir, None)


def _read_record(state_dir: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((Path(state_dir) / PARTS_RECORD).read_bytes())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _forget_record(state_dir: Path, staging: Path | None) -> None:
    record = _read_record(state_dir)
    if record is None:
        return
    if staging is not None and record.get("staging_dir") != str(staging):
        return  # another fetch's record
    with contextlib.suppress(FileNotFoundError):
        os.unlink(Path(state_dir) / PARTS_RECORD)


def staged_paths(staging_dir: Path) -> Iterable[str]:
    """The files under a staging directory, relative (for tests and diagnostics)."""
    root = Path(staging_dir)
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
