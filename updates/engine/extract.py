"""Streaming, extract-nothing reading of bundle archives.

The archive is read once, front to back, in tarfile's stream mode (behind a
zstd stream reader for `.tar.zst`); member bytes are copied by us, hashed in
the same pass, and either discarded or written into a fresh staging
directory. Nothing calls `extract`/`extractall`: tarfile never chooses a path
on disk. Every member is checked against the signed manifest before a byte of
it is written.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import logging
import os
import secrets
import shutil
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import zstandard

from .errors import ManifestInvalid, SignatureInvalid, UnsafePath, UsageError
from .manifest import Manifest, ManifestFile
from .paths import collision_key, path_problem

log = logging.getLogger("themis_update.bundle")

MiB = 1 << 20
GiB = 1 << 30
MANIFEST_NAME = "manifest.json"
SIGNATURE_NAME = "manifest.json.p7s"
PAYLOAD_PREFIX = "payload/"
# tarfile's stream buffer; member data is read in chunks aligned to it (see
# _member_chunks). Measured: 128 KiB keeps a large bundle within ~1.1x of plain
# SHA-256 (256 KiB was no faster) while keeping tarfile's per-header buffer
# re-slicing cheap for bundles of many small files (10 KiB default: ~1.35x).
STREAM_BUFFER = 128 * 1024
# pax/GNU long-name records are read into memory whole by tarfile; bound them.
MAX_EXTENDED_HEADER = MiB
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
# A ratio check on tiny inputs would trip on tar padding alone.
ZSTD_RATIO_SLACK = 4 * MiB
_REGULAR = (tarfile.REGTYPE, tarfile.AREGTYPE)
_TYPE_NAMES = {
    tarfile.SYMTYPE: "a symlink",
    tarfile.LNKTYPE: "a hard link",
    tarfile.DIRTYPE: "a directory",
    tarfile.CHRTYPE: "a character device",
    tarfile.BLKTYPE: "a block device",
    tarfile.FIFOTYPE: "a FIFO",
    tarfile.CONTTYPE: "a contiguous file",
    tarfile.GNUTYPE_SPARSE: "a sparse file",
}

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class BundleLimits:
    """Resource bounds for one bundle; a bundle beyond any of them is rejected."""

    max_members: int = 100_000
    max_file_size: int = 8 * GiB
    max_total_size: int = 32 * GiB
    max_manifest_size: int = 16 * MiB
    max_signature_size: int = 1 * MiB
    max_zstd_ratio: int = 200  # decompressed bytes per compressed byte
    max_zstd_window: int = 128 * MiB  # zstd decoder memory


# ------------------------------------------------------------------ tar layer


class _TarInfo(tarfile.TarInfo):
    """TarInfo that remembers the name in the ustar header itself, so a pax or
    GNU long-name record that renames a member to something else is seen, and
    that refuses sparse members and oversized extended headers while parsing."""

    header_name = ""

    @classmethod
    def frombuf(cls, buf: bytes | bytearray, encoding: str, errors: str) -> Any:
        obj = super().frombuf(buf, encoding, errors)
        obj.header_name = obj.name
        return obj

    def _proc_pax(self, tarfile: Any) -> Any:
        self._bound_header()
        return super()._proc_pax(tarfile)  # type: ignore[misc]

    def _proc_gnulong(self, tarfile: Any) -> Any:
        self._bound_header()
        return super()._proc_gnulong(tarfile)  # type: ignore[misc]

    def _bound_header(self) -> None:
        if self.size > MAX_EXTENDED_HEADER:
            raise ManifestInvalid(
                f"member {self.name!r}: extended header of {self.size} bytes exceeds the limit"
            )

    def _proc_sparse(self, tarfile: Any) -> Any:
        raise ManifestInvalid(f"member {self.name!r}: is a sparse file, not a regular file")

    def _reject_pax_sparse(self, next: Any, *_args: Any) -> None:
        raise ManifestInvalid(f"member {next.name!r}: is a sparse file, not a regular file")

    _proc_gnusparse_00 = _proc_gnusparse_01 = _proc_gnusparse_10 = _reject_pax_sparse


def _header_names_agree(header_name: str, name: str) -> bool:
    """Whether the ustar header name is what a pax/GNU long name legitimately
    leaves there: the same name, or its truncation to the 100-byte field
    (ASCII, or with non-ASCII characters replaced by '?', as writers do)."""
    if header_name in ("", name):
        return True
    header = header_name.encode("utf-8", "surrogateescape")
    full = name.encode("utf-8", "surrogateescape")
    replaced = name.encode("ascii", "replace")
    return header in (full[:100], replaced, replaced[:100])


class _CountingReader:
    """The raw bundle file: counts bytes for progress and the zstd ratio."""

    def __init__(self, raw: IO[bytes], total: int, progress: Progress | None) -> None:
        self.raw = raw
        self.total = total
        self.count = 0
        self.progress = progress

    def read(self, size: int = -1) -> bytes:
        data = self.raw.read(size)
        self.count += len(data)
        if self.progress is not None:
            self.progress(self.count, self.total)
        return data


class _RatioGuard:
    """The decompressed stream: stops a zstd bomb before it costs much."""

    def __init__(self, inner: Any, source: _CountingReader, limits: BundleLimits) -> None:
        self.inner = inner
        self.source = source
        self.limits = limits
        self.count = 0

    def read(self, size: int = -1) -> bytes:
        data = bytes(self.inner.read(size))
        self.count += len(data)
        allowed = self.limits.max_zstd_ratio * self.source.count + ZSTD_RATIO_SLACK
        if self.count > allowed:
            raise ManifestInvalid(
                f"bundle: zstd decompression ratio exceeds {self.limits.max_zstd_ratio}:1"
            )
        return data


def _is_zstd(magic: bytes) -> bool:
    # A zstd stream starts with a frame or a skippable frame (0x184D2A5?).
    return magic == ZSTD_MAGIC or (
        len(magic) == 4 and magic[1:] == b"\x2a\x4d\x18" and magic[0] & 0xF0 == 0x50
    )


# --------------------------------------------------------------------- staging


class Staging:
    """A fresh directory `<state_dir>/staging/<random>` that receives payloads.

    Files are created with O_CREAT|O_EXCL|O_NOFOLLOW relative to directory
    descriptors we opened ourselves, so no path is ever re-resolved through
    something another process could swap for a symlink. Staged files are not
    fsynced: staging is scratch space, re-created from the bundle after a crash.
    """

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = Path(state_dir)
        self._dir_fds: dict[str, int] = {}
        self._created_parent = False
        if not self.state_dir.is_dir():
            raise UsageError(f"state dir: {str(state_dir)!r} is not a directory")
        parent = self.state_dir / "staging"
        try:
            os.mkdir(parent, 0o700)
            self._created_parent = True
        except FileExistsError:
            pass
        parent_fd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        try:
            name = secrets.token_hex(8)
            os.mkdir(name, 0o700, dir_fd=parent_fd)
            self._dir_fds[""] = os.open(
                name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=parent_fd
            )
        except BaseException:
            self._remove_parent_if_ours()
            raise
        finally:
            os.close(parent_fd)
        self.path = parent / name

    def create(self, relpath: str) -> int:
        """A new, empty file descriptor for `relpath` (already checked safe)."""
        *dirs, name = relpath.split("/")
        dir_fd = self._dir_fd("/".join(dirs))
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        return os.open(name, flags, 0o600, dir_fd=dir_fd)

    def remove(self, relpath: str) -> None:
        """Unlink a staged file again (one that turned out bad), through our own dir fds."""
        *dirs, name = relpath.split("/")
        os.unlink(name, dir_fd=self._dir_fd("/".join(dirs)))

    def _dir_fd(self, reldir: str) -> int:
        if reldir in self._dir_fds:
            return self._dir_fds[reldir]
        parent, _, name = reldir.rpartition("/")
        parent_fd = self._dir_fd(parent)
        # An existing one was made by us for an earlier file; O_NOFOLLOW still checks it.
        with contextlib.suppress(FileExistsError):
            os.mkdir(name, 0o755, dir_fd=parent_fd)
        fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=parent_fd)
        self._dir_fds[reldir] = fd
        return fd

    def close(self) -> None:
        for fd in self._dir_fds.values():
            os.close(fd)
        self._dir_fds.clear()

    def discard(self) -> None:
        self.close()
        shutil.rmtree(self.path, ignore_errors=True)
        self._remove_parent_if_ours()

    def _remove_parent_if_ours(self) -> None:
        if self._created_parent:
            remove_empty_dir(self.state_dir / "staging")


def remove_empty_dir(path: Path) -> None:
    # Not empty (another staging in use) or already gone: leave it.
    with contextlib.suppress(OSError):
        os.rmdir(path)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


# ---------------------------------------------------------------- the reader


class BundleReader:
    """One pass over a bundle: `read_head()`, then `read_payload()`."""

    def __init__(
        self,
        path: Path,
        limits: BundleLimits | None = None,
        progress: Progress | None = None,
    ) -> None:
        self.path = Path(path)
        self.limits = limits or BundleLimits()
        try:
            self._file = open(self.path, "rb")  # noqa: SIM115 (closed in close())
        except OSError as exc:
            raise UsageError(f"bundle: cannot open {str(path)!r}: {exc.strerror}") from None
        self._decompressor: Any = None
        try:
            # tarfile reads the first header while opening.
            self._tar = archive_step(lambda: self._open_tar(progress))
        except BaseException:
            self.close()
            raise

    def _open_tar(self, progress: Progress | None) -> tarfile.TarFile:
        total = os.fstat(self._file.fileno()).st_size
        magic = self._file.read(4)
        self._file.seek(0)
        source = _CountingReader(self._file, total, progress)
        stream: Any = source
        if _is_zstd(magic):
            decompressor = zstandard.ZstdDecompressor(max_window_size=self.limits.max_zstd_window)
            self._decompressor = decompressor.stream_reader(
                source,  # type: ignore[arg-type]  # any object with read() will do
                read_size=MiB,
                read_across_frames=True,
                closefd=False,
            )
            stream = _RatioGuard(self._decompressor, source, self.limits)
        return tarfile.open(
            fileobj=stream,
            mode="r|",
            tarinfo=_TarInfo,
            encoding="utf-8",
            errors="surrogateescape",
            bufsize=STREAM_BUFFER,
        )

    def __enter__(self) -> BundleReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        tar = getattr(self, "_tar", None)
        if tar is not None:
            tar.close()
        if self._decompressor is not None:
            self._decompressor.close()
        self._file.close()

    def _next(self) -> _TarInfo | None:
        member = self._tar.next()
        if member is None:
            return None
        assert isinstance(member, _TarInfo)
        if not _header_names_agree(member.header_name, member.name):
            raise UnsafePath(
                f"member {member.name!r}: pax/long-name record overrides the header name"
                f" {member.header_name!r}"
            )
        return member

    # ---- step 1: the manifest and its signature, within their limits

    def read_head(self) -> tuple[bytes, bytes]:
        first = self._next()
        if first is None or first.name != MANIFEST_NAME:
            found = None if first is None else first.name
            raise _misplaced(found, MANIFEST_NAME, ManifestInvalid)
        manifest = self._read_small(first, self.limits.max_manifest_size, ManifestInvalid)
        second = self._next()
        if second is None or second.name != SIGNATURE_NAME:
            found = None if second is None else second.name
            raise _misplaced(found, SIGNATURE_NAME, SignatureInvalid)
        signature = self._read_small(second, self.limits.max_signature_size, SignatureInvalid)
        return manifest, signature

    def _read_small(self, member: _TarInfo, limit: int, error: type[Exception]) -> bytes:
        if member.type not in _REGULAR or member.sparse is not None:
            raise error(f"member {member.name!r}: is {_kind(member)}, not a regular file")
        if member.size > limit:
            raise error(
                f"member {member.name!r}: {member.size} bytes exceed the {limit}-byte limit"
            )
        reader = self._tar.extractfile(member)
        assert reader is not None
        data: bytes = reader.read(member.size)
        if len(data) != member.size:
            raise error(f"member {member.name!r}: truncated")
        return data

    # ---- step 4: payload members, checked against the manifest and streamed

    def read_payload(self, manifest: Manifest, staging: Staging | None = None) -> None:
        expected = {PAYLOAD_PREFIX + entry.path: entry for entry in manifest.files}
        seen: dict[str, str] = {}  # collision key -> member name
        for member in self._payload_members():
            entry = self._check_member(member, expected, seen)
            self._copy(member, entry, staging)
        missing = sorted(set(expected) - set(seen.values()))
        if missing:
            raise ManifestInvalid(
                f"member {missing[0]!r}: listed in the manifest but missing from the bundle"
                + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
            )

    def _payload_members(self) -> Iterator[_TarInfo]:
        while (member := self._next()) is not None:
            yield member

    def _check_member(
        self, member: _TarInfo, expected: dict[str, ManifestFile], seen: dict[str, str]
    ) -> ManifestFile:
        name = member.name
        if not name.startswith(PAYLOAD_PREFIX):
            raise UnsafePath(f"member {name!r}: outside {PAYLOAD_PREFIX!r}")
        problem = path_problem(name[len(PAYLOAD_PREFIX) :])
        if problem:
            raise UnsafePath(f"member {name!r}: {problem}")
        key = collision_key(name)
        if key in seen:
            raise ManifestInvalid(f"member {name!r}: duplicates {seen[key]!r}")
        seen[key] = name
        if member.type not in _REGULAR or member.sparse is not None:
            raise ManifestInvalid(f"member {name!r}: is {_kind(member)}, not a regular file")
        if member.mode & 0o7000:
            raise ManifestInvalid(f"member {name!r}: has setuid, setgid or sticky bits")
        entry = expected.get(name)
        if entry is None:
            raise ManifestInvalid(f"member {name!r}: is not listed in the manifest")
        if member.size != entry.payload_size:
            raise ManifestInvalid(
                f"member {name!r}: size {member.size} differs from the manifest's"
                f" {entry.payload_size}"
            )
        return entry

    def _copy(self, member: _TarInfo, entry: ManifestFile, staging: Staging | None) -> None:
        """Hash (and maybe stage) the member in one pass over its bytes."""
        digest = hashlib.sha256()
        out = staging.create(entry.path) if staging is not None else None
        try:
            for chunk in self._member_chunks(member):
                digest.update(chunk)
                if out is not None:
                    _write_all(out, chunk)
            if out is not None:
                os.fchmod(out, entry.mode)
        finally:
            if out is not None:
                os.close(out)
        if not hmac.compare_digest(digest.hexdigest(), entry.payload_sha256):
            raise ManifestInvalid(
                f"member {member.name!r}: SHA-256 differs from the manifest (corrupt or tampered)"
            )

    def _member_chunks(self, member: _TarInfo) -> Iterator[bytes]:
        """The member's bytes, read straight from the archive stream.

        Not `extractfile()`: in stream mode it is a BufferedReader over the
        same stream that adds a copy of every byte (1.3x the cost of SHA-256
        against 1.1x measured). Ending each read on a STREAM_BUFFER boundary of
        the archive keeps tarfile from re-slicing a leftover on every read.
        Sparse members were refused, so the data is contiguous.
        """
        stream = self._tar.fileobj
        position = member.offset_data
        remaining = member.size
        while remaining:
            chunk = stream.read(min(remaining, STREAM_BUFFER - position % STREAM_BUFFER))
            if not chunk:
                raise ManifestInvalid(f"member {member.name!r}: truncated archive")
            position += len(chunk)
            remaining -= len(chunk)
            yield chunk


TAR_ERRORS = (tarfile.TarError, zstandard.ZstdError, EOFError, ValueError, RecursionError)


def archive_step(step: Callable[[], Any]) -> Any:
    """Run a reading step; a broken archive is a payload error (exit 12)."""
    try:
        return step()
    except TAR_ERRORS as exc:
        raise ManifestInvalid(f"bundle: not a valid tar/tar.zst archive: {exc}") from None


def _kind(member: tarfile.TarInfo) -> str:
    if member.sparse is not None:
        return "a sparse file"
    return _TYPE_NAMES.get(member.type, f"of tar type {member.type!r}")


def _misplaced(found: str | None, wanted: str, error: type[Exception]) -> Exception:
    if found is None:
        return error(f"bundle: {wanted!r} is missing (archive ended)")
    problem = path_problem(found)
    if problem:  # a traversal name at the front is an attack, not a mistake
        return UnsafePath(f"member {found!r}: {problem}")
    if found in (MANIFEST_NAME, SIGNATURE_NAME):  # the pair out of order
        return SignatureInvalid(
            f"bundle: expected {wanted!r} here, found {found!r} (misplaced signature)"
        )
    return error(f"bundle: expected {wanted!r} here, found member {found!r} (missing or misplaced)")
