"""How a restore point keeps one old file (`storage` in point.json; layout in restore.py).

full   the old bytes as they are: a hardlink to the old inode or, for a file the update
       leaves byte for byte the same (from 64 KiB on: restore.SHARE_MIN_BYTES), to the new
       inode the target gets (so it costs no space at all); a copy where linking is
       impossible. Points made before lean storage
       hold only these and have no `storage` field.
zstd   one zstd frame of the old bytes (`zstd -d BLOB` reads it).
delta  a Themis delta patch (delta.py's container, zstd payload) that rebuilds the old
       file from the NEW one at the same path: the patch's base is the file the update
       installs, its target the old file (`themis-update delta apply NEW BLOB -o OLD`).

Which one: the smallest, with two rules of thumb. A compressed copy only when it saves at
least ZSTD_MIN_SAVING of the file (else the hardlink: free to make). A delta depends on
the installed file being exactly the version it was made against (restore checks that
first, exit 25 otherwise), so it is chosen only where it saves real space: at most half
the next best and at least DELTA_MIN_SAVING bytes less. Small files thus keep a
self-contained copy, and a damaged installed file of that size still rolls back.

Every encoding is decoded once while the point is made and must give back the old bytes'
SHA-256; point.json records the blob's own size and SHA-256, which restore checks before
anything is written.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import pyzstd

from .delta import FORMAT_VERSION, HEADER_SIZE, PatchHeader, check_target, decode, parse_header
from .delta_codecs import zstd_window_log
from .errors import ManifestInvalid, RestorePointCorrupt, RestorePointFailed

FULL = "full"
ZSTD = "zstd"
DELTA = "delta"
STORAGES = (FULL, ZSTD, DELTA)

CHUNK = 1 << 20
# Level 3: ~150 MB/s on a small node; higher levels buy a few percent for several times
# the time, and the point is made while the update waits.
ZSTD_LEVEL = 3
DELTA_LEVEL = 3
# A compressed copy must save at least this share of the file over the hardlink.
ZSTD_MIN_SAVING = 0.10
# A delta must be at most this share of the next best and save at least DELTA_MIN_SAVING.
DELTA_MAX_SHARE = 0.5
DELTA_MIN_SAVING = 64 << 10
# Deltas are made in memory (old and new side by side): larger files are compressed only.
DELTA_MAX_BYTES = 256 << 20
# Files from this size on are probed first (their first MiB compressed fast): an
# incompressible one (media, already compressed data) gets no compressed copy at all, and
# one whose delta is far smaller than even a hopeful guess at its compressed size gets
# only the delta.
PROBE_FROM = 4 << 20
PROBE_MIN_SAVING = 0.03
# A whole file may compress this much better than the probe says.
PROBE_MARGIN = 0.6


@dataclass(frozen=True)
class NewFile:
    """The file an update installs at a path, as staged (its bytes verified)."""

    path: Path
    sha256: str
    size: int


@dataclass(frozen=True)
class Encoded:
    """A blob written to `path` (a scratch name, renamed by the caller)."""

    storage: str
    path: Path
    size: int
    sha256: str  # of the blob's bytes
    base_sha256: str | None = None
    base_size: int | None = None


def encode(
    source: Path,
    sha256: str,
    size: int,
    base: NewFile | None,
    scratch: Path,
) -> Encoded | None:
    """The best encoding of `source` (the old bytes, SHA-256 `sha256`) written next to
    `scratch`, or None when the bytes as they are (full) are best. `base` is the new file
    at the same path (None: the update removes the path, or no delta is wanted).

    The delta comes first where there is a base; a large file's first MiB, compressed
    fast, then tells whether a compressed copy could come anywhere near it. When even an
    optimistic guess could not, the delta is taken without compressing the whole file."""
    ratio = _probe_ratio(source) if size >= PROBE_FROM else None
    patch: Encoded | None = None
    if base is not None and max(size, base.size) <= DELTA_MAX_BYTES:
        patch = _delta(source, sha256, base, scratch.with_name(scratch.name + ".delta"))
    if patch is not None and ratio is not None and _delta_wins(patch.size, size, ratio):
        return patch
    zst: Encoded | None = None
    if ratio is None or ratio <= 1 - PROBE_MIN_SAVING:
        zst = _compress(source, sha256, scratch.with_name(scratch.name + ".zst"))
    best_size = size
    best: Encoded | None = None
    if zst is not None and zst.size <= size * (1 - ZSTD_MIN_SAVING):
        best, best_size = zst, zst.size
    if patch is not None and _delta_wins(patch.size, best_size, 1.0):
        best = patch
    for loser in (zst, patch):
        if loser is not None and loser is not best:
            _unlink(loser.path)
    return best


def _delta_wins(delta_size: int, other_size: int, ratio: float) -> bool:
    """A delta over the other storage of `other_size` bytes compressed by `ratio` (a
    probe's: whole files at level 3 do better than a first MiB at level 1, hence the
    margin)."""
    other = min(other_size, other_size * ratio * PROBE_MARGIN) if ratio < 1.0 else other_size
    return delta_size <= other * DELTA_MAX_SHARE and other - delta_size >= DELTA_MIN_SAVING


def _probe_ratio(source: Path) -> float:
    with open(source, "rb") as fh:
        head = fh.read(CHUNK)
    return len(pyzstd.compress(head, 1)) / max(len(head), 1)


def _compress(source: Path, sha256: str, out: Path) -> Encoded:
    digest = hashlib.sha256()
    options: dict[int, int] = {
        pyzstd.CParameter.compressionLevel: ZSTD_LEVEL,
        pyzstd.CParameter.checksumFlag: 1,
    }
    with open(source, "rb") as src, _new_file(out) as raw:
        with pyzstd.ZstdFile(raw, "wb", level_or_option=options) as zst:
            while chunk := src.read(CHUNK):
                digest.update(chunk)
                zst.write(chunk)
        raw.flush()
        os.fsync(raw.fileno())
    if digest.hexdigest() != sha256:
        _unlink(out)
        raise RestorePointFailed(f"{source}: changed while the restore point was made")
    encoded = Encoded(ZSTD, out, *_digest_file(out))
    with open(out, "rb") as blob:
        got = decode_zstd(blob, lambda _chunk: None)
    if got != sha256:  # never keep a blob that does not give the old bytes back
        _unlink(out)
        raise RestorePointFailed(f"{source}: compressed copy does not decode to the old bytes")
    return encoded


def _delta(source: Path, sha256: str, base: NewFile, out: Path) -> Encoded | None:
    try:
        new = base.path.read_bytes()
    except OSError:
        return None  # no staged file to diff against: a compressed or full copy does
    if len(new) != base.size or hashlib.sha256(new).hexdigest() != base.sha256:
        return None
    old = source.read_bytes()
    if hashlib.sha256(old).hexdigest() != sha256:
        raise RestorePointFailed(f"{source}: changed while the restore point was made")
    window = zstd_window_log(len(new), len(old))
    options: dict[int, int] = {
        pyzstd.CParameter.compressionLevel: DELTA_LEVEL,
        pyzstd.CParameter.enableLongDistanceMatching: 1,
        pyzstd.CParameter.windowLog: window,
        pyzstd.CParameter.checksumFlag: 1,
    }
    # The zstd codec of delta.py: the base as a raw-content prefix (`zstd --patch-from`).
    prefix = pyzstd.ZstdDict(new, is_raw=True).as_prefix if len(new) >= 8 else None
    payload = pyzstd.compress(old, level_or_option=options, zstd_dict=prefix)
    header = PatchHeader(
        format=FORMAT_VERSION,
        algorithm="zstd",
        param=window,
        base_size=len(new),
        base_sha256=base.sha256,
        target_size=len(old),
        target_sha256=sha256,
        payload_size=len(payload),
        payload_sha256=hashlib.sha256(payload).hexdigest(),
    )
    try:
        check_target(header, decode(header, new, payload, where=str(out)), str(out))
    except ManifestInvalid as err:
        raise RestorePointFailed(f"{source}: delta does not rebuild the old bytes: {err}") from err
    blob = header.pack() + payload
    with _new_file(out) as fh:
        fh.write(blob)
        fh.flush()
        os.fsync(fh.fileno())
    return Encoded(
        DELTA,
        out,
        len(blob),
        hashlib.sha256(blob).hexdigest(),
        base_sha256=base.sha256,
        base_size=base.size,
    )


# ----------------------------------------------------------------------------- decoding


def decode_zstd(blob: BinaryIO, write: Callable[[bytes], object]) -> str:
    """Stream the old bytes out of a zstd blob into `write`; returns their SHA-256."""
    digest = hashlib.sha256()
    try:
        with pyzstd.ZstdFile(blob, "rb") as zst:
            while chunk := zst.read(CHUNK):
                digest.update(chunk)
                write(chunk)
    except (pyzstd.ZstdError, EOFError) as err:
        name = getattr(blob, "name", "blob")
        raise RestorePointCorrupt(f"{name}: does not decode: {err}") from err
    return digest.hexdigest()


def decode_delta(blob: Path, base: bytes) -> bytes:
    """The old bytes rebuilt from `base` (the installed file) and a delta blob; the
    result's size and SHA-256 are checked against the patch header."""
    raw = blob.read_bytes()
    try:
        header = parse_header(raw[:HEADER_SIZE], where=str(blob))
        payload = raw[HEADER_SIZE:]
        if len(payload) != header.payload_size:
            raise ManifestInvalid(f"{blob}: truncated payload")
        if hashlib.sha256(base).hexdigest() != header.base_sha256:
            raise ManifestInvalid(f"{blob}: the installed file is not the patch's base")
        old = decode(header, base, payload, where=str(blob))
        check_target(header, old, str(blob))
    except ManifestInvalid as err:
        raise RestorePointCorrupt(str(err)) from err
    return old


# ----------------------------------------------------------------------------- helpers


def digest_file(path: Path) -> tuple[int, str]:
    """(size, SHA-256) of a file, read through one descriptor."""
    return _digest_file(path)


def _digest_file(path: Path) -> tuple[int, str]:
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            size += len(chunk)
            digest.update(chunk)
    return size, digest.hexdigest()


@contextlib.contextmanager
def _new_file(path: Path) -> Iterator[BinaryIO]:
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(path, flags, 0o600)
    try:
        with os.fdopen(fd, "wb") as fh:
            yield fh
    except BaseException:
        _unlink(path)
        raise


def _unlink(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
