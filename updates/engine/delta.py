"""Binary delta patches: a small self-checking container around bsdiff4, zstd or
hdiffpatch payloads.

Container layout (little-endian, `HEADER.size` = 140 bytes, then the payload):

    magic "THMDELTA" | format u8 | algorithm u8 | param u16 | reserved u32
    base size u64 | target size u64 | payload size u64
    base SHA-256 | target SHA-256 | payload SHA-256 | CRC-32 of the above u32

The payload hash lets a corrupt patch be rejected before any decoder sees it;
the CRC tells a damaged header apart from a patch made for another base.

Apply never trusts the patch: it checks the base's size and hash before, and
the rebuilt file's size and hash after decoding, and only then writes the
output (temp file in the same directory, O_EXCL, fsync, rename, fsync dir).
Every failure is `ManifestInvalid` (exit 12) and leaves no file behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, BinaryIO

from .delta_codecs import BY_CODE, CODECS, Budget, CodecError, choose_algorithm
from .errors import EngineError, ManifestInvalid, UsageError
from .state import fsync_dir

MAGIC = b"THMDELTA"
FORMAT_VERSION = 1
HEADER = struct.Struct("<8sBBHIQQQ32s32s32s")
CRC = struct.Struct("<I")
HEADER_SIZE = HEADER.size + CRC.size
ALGORITHMS = ("auto", *CODECS)
WRITE_CHUNK = 8 << 20
# Above this a patch cannot be for a file we would hold in memory anyway.
MAX_FILE_SIZE = 1 << 36

Progress = Callable[[str], None]


def _no_progress(_phase: str) -> None:
    return None


@dataclass(frozen=True)
class PatchHeader:
    format: int
    algorithm: str
    param: int
    base_size: int
    base_sha256: str
    target_size: int
    target_sha256: str
    payload_size: int
    payload_sha256: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def pack(self) -> bytes:
        head = HEADER.pack(
            MAGIC,
            self.format,
            CODECS[self.algorithm].code,
            self.param,
            0,
            self.base_size,
            self.target_size,
            self.payload_size,
            bytes.fromhex(self.base_sha256),
            bytes.fromhex(self.target_sha256),
            bytes.fromhex(self.payload_sha256),
        )
        return head + CRC.pack(zlib.crc32(head))


@dataclass(frozen=True)
class PatchInfo:
    header: PatchHeader
    patch: Path
    patch_size: int
    output: Path | None = None
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            **self.header.to_json(),
            "patch": str(self.patch),
            "patch_size": self.patch_size,
            "output": str(self.output) if self.output else None,
            "seconds": round(self.seconds, 3),
        }


# --- header -----------------------------------------------------------------


def parse_header(raw: bytes, *, where: str = "patch") -> PatchHeader:
    """Decode and check the fixed header; every defect is ManifestInvalid."""
    if len(raw) < HEADER_SIZE:
        raise ManifestInvalid(f"{where}: truncated header ({len(raw)} bytes)")
    if raw[:8] != MAGIC:
        raise ManifestInvalid(f"{where}: not a Themis delta patch (bad magic)")
    fields = HEADER.unpack_from(raw)
    (crc,) = CRC.unpack_from(raw, HEADER.size)
    if zlib.crc32(raw[: HEADER.size]) != crc:
        raise ManifestInvalid(f"{where}: header checksum mismatch (corrupt header)")
    _, version, code, param, _, base_size, target_size, payload_size = fields[:8]
    if version != FORMAT_VERSION:
        raise ManifestInvalid(f"{where}: unsupported patch format version {version}")
    if code not in BY_CODE:
        raise ManifestInvalid(f"{where}: unknown algorithm code {code}")
    if max(base_size, target_size) > MAX_FILE_SIZE:
        raise ManifestInvalid(f"{where}: declared file size out of range")
    return PatchHeader(
        format=version,
        algorithm=BY_CODE[code].name,
        param=param,
        base_size=base_size,
        base_sha256=fields[8].hex(),
        target_size=target_size,
        target_sha256=fields[9].hex(),
        payload_size=payload_size,
        payload_sha256=fields[10].hex(),
    )


def read_header(patch: Path) -> PatchHeader:
    """The header of `patch`, checked (magic, version, algorithm, CRC, length)."""
    patch = Path(patch)
    with _open_patch(patch) as fh:
        header = parse_header(fh.read(HEADER_SIZE), where=str(patch))
        actual = os.fstat(fh.fileno()).st_size - HEADER_SIZE
    if actual != header.payload_size:
        raise ManifestInvalid(
            f"{patch}: payload is {actual} bytes, header says {header.payload_size} (truncated?)"
        )
    return header


def _read_patch(patch: Path) -> tuple[PatchHeader, bytes]:
    header = read_header(patch)
    with _open_patch(patch) as fh:
        fh.seek(HEADER_SIZE)
        payload = fh.read()
    if len(payload) != header.payload_size:
        raise ManifestInvalid(f"{patch}: patch changed while reading")
    if hashlib.sha256(payload).hexdigest() != header.payload_sha256:
        raise ManifestInvalid(f"{patch}: payload SHA-256 mismatch (corrupt patch)")
    return header, payload


@contextlib.contextmanager
def _open_patch(patch: Path) -> Iterator[BinaryIO]:
    try:
        with patch.open("rb") as fh:
            yield fh
    except (FileNotFoundError, IsADirectoryError, PermissionError) as err:
        raise ManifestInvalid(f"{patch}: cannot read patch: {err.strerror}") from err


def extract_payload(patch: Path, out: Path) -> PatchHeader:
    """Write the bare algorithm payload (BSDIFF40, zstd frame, HDIFF) to `out`."""
    header, payload = _read_patch(Path(patch))
    write_atomic(Path(out), [payload], mode=0o644)
    return header


# --- create -----------------------------------------------------------------


def create_patch(
    old: Path,
    new: Path,
    out: Path,
    *,
    algorithm: str = "auto",
    budget: Budget | None = None,
    progress: Progress = _no_progress,
) -> PatchInfo:
    """Diff `old` -> `new` into the patch file `out` (written atomically)."""
    started = time.monotonic()
    if algorithm not in ALGORITHMS:
        raise UsageError(f"unknown algorithm {algorithm!r}; choose from {', '.join(ALGORITHMS)}")
    progress("reading")
    old_bytes, new_bytes = _read_input(Path(old)), _read_input(Path(new))
    if algorithm == "auto":
        algorithm = choose_algorithm(len(old_bytes), len(new_bytes), budget)
    progress(f"diffing ({algorithm})")
    payload, param = CODECS[algorithm].diff(old_bytes, new_bytes)
    header = PatchHeader(
        format=FORMAT_VERSION,
        algorithm=algorithm,
        param=param,
        base_size=len(old_bytes),
        base_sha256=hashlib.sha256(old_bytes).hexdigest(),
        target_size=len(new_bytes),
        target_sha256=hashlib.sha256(new_bytes).hexdigest(),
        payload_size=len(payload),
        payload_sha256=hashlib.sha256(payload).hexdigest(),
    )
    progress("writing")
    write_atomic(Path(out), [header.pack(), payload], mode=0o644)
    size = HEADER_SIZE + len(payload)
    return PatchInfo(header, Path(out), size, seconds=time.monotonic() - started)


def _read_input(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as err:
        raise UsageError(f"{path}: cannot read: {err.strerror}") from err


# --- apply ------------------------------------------------------------------


def apply_patch(
    old: Path,
    patch: Path,
    out: Path,
    *,
    expect_sha256: str | None = None,
    mode: int | None = None,
    progress: Progress = _no_progress,
) -> PatchInfo:
    """Rebuild the target from `old` + `patch` into `out`, verified, atomically.

    `mode` defaults to the base file's permission bits, so a patched
    executable stays executable.
    """
    started = time.monotonic()
    old, patch, out = Path(old), Path(patch), Path(out)
    progress("checking patch")
    header, payload = _read_patch(patch)
    _check_expected(header, expect_sha256, patch)
    progress("checking base")
    base = _read_base(old, header)
    progress(f"applying ({header.algorithm})")
    target = decode(header, base, payload, where=str(patch))
    del base, payload  # the base is no longer needed: don't hold it through the write
    progress("verifying and writing")
    if mode is None:
        mode = os.stat(old).st_mode & 0o777
    # The hash runs while the bytes go to disk; the rename waits for both.
    write_atomic(out, [target], mode=mode, check=lambda: check_target(header, target, str(patch)))
    size = HEADER_SIZE + header.payload_size
    return PatchInfo(header, patch, size, output=out, seconds=time.monotonic() - started)


def decode(header: PatchHeader, base: bytes, payload: bytes, *, where: str = "patch") -> bytes:
    """Run the codec; the result's size is checked here, its hash by `check_target`."""
    try:
        target = CODECS[header.algorithm].patch(base, payload, header.param)
    except CodecError as err:
        raise ManifestInvalid(f"{where}: {err}") from err
    if len(target) != header.target_size:
        raise ManifestInvalid(
            f"{where}: rebuilt file is {len(target)} bytes, expected {header.target_size}"
        )
    return target


def check_target(header: PatchHeader, target: bytes, where: str = "patch") -> None:
    if hashlib.sha256(target).hexdigest() != header.target_sha256:
        raise ManifestInvalid(f"{where}: rebuilt file SHA-256 mismatch")


def _check_expected(header: PatchHeader, expect_sha256: str | None, patch: Path) -> None:
    # Checked before decoding: a patch for another target is refused cheaply.
    if expect_sha256 is not None and expect_sha256.lower() != header.target_sha256:
        raise ManifestInvalid(
            f"{patch}: patch produces sha256 {header.target_sha256}, expected {expect_sha256}"
        )


def _read_base(old: Path, header: PatchHeader) -> bytes:
    try:
        base = old.read_bytes()
    except OSError as err:
        raise ManifestInvalid(f"{old}: cannot read base file: {err.strerror}") from err
    if len(base) != header.base_size:
        raise ManifestInvalid(
            f"{old}: wrong base: {len(base)} bytes, patch needs {header.base_size}"
        )
    if hashlib.sha256(base).hexdigest() != header.base_sha256:
        raise ManifestInvalid(f"{old}: wrong base: SHA-256 differs from the patch's base")
    return base


def verify_file(path: Path, sha256: str) -> bool:
    """True if `path` exists and its SHA-256 is `sha256`."""
    digest = hashlib.sha256()
    try:
        with Path(path).open("rb") as fh:
            while chunk := fh.read(WRITE_CHUNK):
                digest.update(chunk)
    except OSError:
        return False
    return digest.hexdigest() == sha256.lower()


# --- durable write ----------------------------------------------------------


def write_atomic(
    path: Path, parts: list[bytes], *, mode: int, check: Callable[[], None] | None = None
) -> None:
    """Replace `path` with `parts`: readers see the old file or the whole new one.

    Temp file in the same directory (O_EXCL, so a stale or hostile file is
    never reused), fsync, rename, fsync the directory.  `check` runs in a
    thread while the data is written and must pass before the rename.  On
    any failure the temp file is removed and `path` is untouched.
    """
    directory = path.parent
    tmp = directory / f".{path.name}.{secrets.token_hex(6)}.tmp"
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(tmp, flags, 0o600)
    except OSError as err:
        # Not the patch's fault (exit 1, not 12): the output location is unusable.
        raise EngineError(f"{path}: cannot create output: {err.strerror}") from err
    try:
        with _Background(check) as background:
            try:
                _write_all(fd, parts)
                os.fchmod(fd, mode)
                os.fsync(fd)
            finally:
                os.close(fd)
        background.result()
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(directory)


def _write_all(fd: int, parts: list[bytes]) -> None:
    offset = 0
    for part in parts:
        view = memoryview(part)
        while view:
            written = os.write(fd, view[:WRITE_CHUNK])
            # Start writeback of what is written now, so the final fsync has
            # less to wait for (DONTNEED leaves dirty pages cached).
            with contextlib.suppress(OSError, AttributeError):
                os.posix_fadvise(fd, offset, written, os.POSIX_FADV_DONTNEED)
            offset += written
            view = view[written:]


class _Background:
    """Run a check in a thread for the duration of a `with` block."""

    def __init__(self, check: Callable[[], None] | None) -> None:
        self.check = check
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            if self.check is not None:
                self.check()
        except BaseException as err:  # re-raised in the caller's thread by result()
            self.error = err

    def __enter__(self) -> _Background:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.thread.join()

    def result(self) -> None:
        if self.error is not None:
            raise self.error


# --- DeltaEngine (protocols.DeltaEngine) -----------------------------------


class BinaryDeltaEngine:
    """The real `DeltaEngine`: the container above with the codecs of delta_codecs."""

    def generate(self, old: Path, new: Path, out: Path, algorithm: str = "auto") -> PatchInfo:
        return create_patch(old, new, out, algorithm=algorithm)

    def apply(
        self, old: Path, patch: Path, out: Path, expect_sha256: str | None = None
    ) -> PatchInfo:
        return apply_patch(old, patch, out, expect_sha256=expect_sha256)

    def verify(self, path: Path, sha256: str) -> bool:
        return verify_file(path, sha256)


def header_json(header: PatchHeader) -> str:
    return json.dumps(header.to_json(), indent=2, sort_keys=True)


__all__ = [
    "BinaryDeltaEngine",
    "PatchHeader",
    "PatchInfo",
    "apply_patch",
    "create_patch",
    "extract_payload",
    "read_header",
]
