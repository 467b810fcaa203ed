"""Restore points: what the target looked like before an update, made before
the first byte of the target changes (DESIGN.md invariant).

Layout, `<state_dir>/points/<id>/`:

    point.json   version before/after, SHA-256 + mode + size of every old file and how
                 its blob stores it, manifest paths that did not exist before, dirs
                 that did not exist
    blobs/<n>    the old bytes, lean (point_storage.py): a file the update does not
                 change is a hardlink to the inode the target keeps (free; from
                 SHARE_MIN_BYTES on, smaller ones get a copy of their own); a changed
                 one is a zstd frame or a delta against the new file when that is
                 clearly smaller, else a hardlink to the old inode (the new file
                 arrives by rename, so the old inode is never written again); a copy
                 only when linking fails (e.g. EXDEV). Points made before lean storage
                 have hardlinks and copies only (no `storage` field): they load and
                 restore as ever.

A point is built in `points/.tmp-<id>` and renamed into place when complete,
so a half-built point is never mistaken for a real one.

A delta blob needs the installed file to be the version it was made against. Restore
handles every file on its own (temp file, rename), and a delta's base is the file at
its own path, so a file is rebuilt before its base is replaced and by nothing else:
a file that already holds the old bytes is left alone, one that holds the base is
rebuilt, anything else stops the restore before it starts (`verify_points` checks
the whole chain of points first, exit 25). A crash mid-restore therefore leaves every
file old or new, and running the restore again finishes it; a rollback over several
points records each finished point in its journal, so a re-run never replays a newer
point over files an older one already restored.

Retention (`prune`): by count, age and the points' disk use; the point a pending
journal needs and the one a rollback of the installed version needs are never deleted.
"""

from __future__ import annotations

import calendar
import contextlib
import errno
import hashlib
import json
import os
import shutil
import stat
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from .errors import RestorePointCorrupt, RestorePointFailed
from .install import (
    check_target_path,
    copy_file,
    ensure_parents,
    missing_parents,
    place_file,
    remove_empty_dirs,
    remove_file,
    remove_temp_files,
    temp_path,
)
from .journal import Journal
from .point_storage import (
    DELTA,
    FULL,
    STORAGES,
    NewFile,
    decode_delta,
    decode_zstd,
    digest_file,
    encode,
)
from .state import fsync_dir, load_state, write_json_atomic

POINTS_DIR = "points"
POINT_FILE = "point.json"
PARTIAL_PREFIX = ".tmp-"
# SHA-256 of the files the last commit installed, keyed by their stat, so the
# next restore point need not re-read them (200 MB of SHA-256 costs ~1 s).
HASH_CACHE = "installed-files.json"


# An unchanged file from this size on shares its inode with the target (see _Capture).
SHARE_MIN_BYTES = 64 << 10
# link(2) failures after which the blob is made another way, not an error.
_NO_LINK = {errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EACCES}


@dataclass(frozen=True)
class PointFile:
    path: str
    sha256: str  # of the old bytes
    mode: int
    size: int  # of the old bytes
    blob: str
    storage: str = FULL  # point_storage: full (the bytes as they are), zstd or delta
    stored_size: int | None = None  # zstd, delta: the blob's size and SHA-256
    stored_sha256: str | None = None
    base_sha256: str | None = None  # delta: the installed file it rebuilds the old one from
    base_size: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v is not None}


@dataclass(frozen=True)
class SchemaMark:
    version: str | None  # None: no migration had run on the node database


@dataclass(frozen=True)
class RestorePoint:
    id: str
    dir: Path
    version: str | None  # installed before the update; rollback returns to it
    to_version: str | None  # the update this point was made for
    product: str | None
    created: str
    txid: str | None
    files: tuple[PointFile, ...]
    absent: tuple[str, ...]  # manifest paths that did not exist: rollback deletes them
    absent_dirs: tuple[str, ...]  # dirs the update created: rollback removes them if empty
    linked: int = 0
    copied_bytes: int = 0
    # The schema version the update found, when it ran migrations: undoing the update
    # rolls the schema back to it. None when the update ran none (nothing to undo).
    schema: SchemaMark | None = None

    def blob_path(self, entry: PointFile) -> Path:
        return self.dir / "blobs" / entry.blob

    @property
    def paths(self) -> list[str]:
        return [f.path for f in self.files] + list(self.absent)

    def summary(self) -> dict[str, Any]:
        disk = shared = 0
        for entry in self.files:
            try:
                st = os.stat(self.blob_path(entry))
            except OSError:
                continue
            disk += st.st_blocks * 512
            shared += st.st_blocks * 512 if st.st_nlink > 1 else 0
        return {
            "id": self.id,
            "version": self.version,
            "to_version": self.to_version,
            "created": self.created,
            "file_count": len(self.files),
            "absent_count": len(self.absent),
            "size": disk,  # bytes on disk
            "content_bytes": sum(f.size for f in self.files),
            # still linked from the target or another point: freed only with them
            "shared_bytes": shared,
            # how many old files each storage holds (point_storage)
            "storage": {kind: sum(f.storage == kind for f in self.files) for kind in STORAGES},
        }


def points_root(state_dir: Path) -> Path:
    return Path(state_dir) / POINTS_DIR


def sha256_file(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def _new_id(txid: str) -> str:
    now = time.time()
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(now))
    return f"{stamp}{int(now % 1 * 1e6):06d}Z-{txid[:8]}"


def create_point(
    target: Path,
    state_dir: Path,
    *,
    replaced: Sequence[str],
    removed: Sequence[str],
    version: str | None,
    to_version: str | None,
    product: str | None,
    txid: str,
    schema: SchemaMark | None = None,
    new_files: Mapping[str, NewFile] | None = None,
    lean: bool = True,
) -> RestorePoint:
    """Record the current bytes of every path the update replaces or removes.

    `new_files` are the files the update installs (staged, verified), by path: a file
    they leave unchanged costs the point nothing, a changed one may be kept as a delta
    against its new version. `lean=False` keeps every old file as it is (hardlink or
    copy), as points did before lean storage.

    Raises RestorePointFailed (exit 22) on any failure, leaving no partial point;
    the target is only read.
    """
    root = points_root(state_dir)
    point_id = _new_id(txid)
    tmp = root / f"{PARTIAL_PREFIX}{point_id}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        os.mkdir(tmp)
        os.mkdir(tmp / "blobs")
        capture = _Capture(
            Path(target), tmp / "blobs", load_hash_cache(state_dir), new_files or {}, lean
        )
        files, absent = capture.run(replaced, removed)
        absent_dirs = list(dict.fromkeys(d for r in replaced for d in missing_parents(target, r)))
        data: dict[str, Any] = {
            "id": point_id,
            "version": version,
            "to_version": to_version,
            "product": product,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "txid": txid,
            "files": [f.to_json() for f in files],
            "absent": absent,
            "absent_dirs": absent_dirs,
            "linked": capture.linked,
            "copied_bytes": capture.copied,
        }
        if schema is not None:
            data["schema"] = {"version": schema.version}
        fsync_dir(tmp / "blobs")
        write_json_atomic(tmp / POINT_FILE, data)
        os.rename(tmp, root / point_id)
        fsync_dir(root)
    except RestorePointFailed:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise RestorePointFailed(f"restore point {tmp}: {exc.strerror or exc}") from exc
    return load_point(state_dir, point_id)


class _Capture:
    """Saves the old files of one point into its blobs dir (see point_storage)."""

    def __init__(
        self,
        target: Path,
        blobs: Path,
        cache: Mapping[str, Any],
        new_files: Mapping[str, NewFile],
        lean: bool,
    ) -> None:
        self.target, self.blobs, self.cache = target, blobs, cache
        self.new_files, self.lean = new_files, lean
        self.linked = 0  # blobs that are hardlinks (no bytes written)
        self.copied = 0  # bytes copied because linking was impossible

    def run(
        self, replaced: Sequence[str], removed: Sequence[str]
    ) -> tuple[list[PointFile], list[str]]:
        files: list[PointFile] = []
        absent: list[str] = []
        wanted = set(replaced)
        for rel in dict.fromkeys([*replaced, *removed]):
            path = self.target / rel
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                if rel in wanted:
                    absent.append(rel)  # a remove of a missing file needs no record
                continue
            except OSError as exc:
                raise RestorePointFailed(f"{rel}: cannot read {path}: {exc.strerror}") from exc
            if not stat.S_ISREG(st.st_mode):
                raise RestorePointFailed(f"{rel}: {path} is not a regular file in the target")
            new = self.new_files.get(rel) if rel in wanted else None
            try:
                files.append(self._save(rel, path, st, self.blobs / str(len(files)), new))
            except OSError as exc:
                raise RestorePointFailed(f"{rel}: cannot save {path}: {exc.strerror}") from exc
        return files, absent

    def _save(
        self, rel: str, path: Path, st: os.stat_result, blob: Path, new: NewFile | None
    ) -> PointFile:
        linked = _try_link(path, blob)
        if linked:
            digest = _cached_sha(self.cache, rel, st, blob) or sha256_file(blob)
        else:
            digest = sha256_file(path)
        entry = PointFile(rel, digest, stat.S_IMODE(st.st_mode), st.st_size, blob.name)
        # Unchanged by the update: the target keeps these bytes in the staged inode
        # (hardlinked in by the switch), so the point links that one and costs nothing.
        # Not a small file: a config, say, that someone edits in place later (vim does,
        # for a file with several links) would change the point's bytes with it; a
        # copy of its own costs next to nothing.
        unchanged = self.lean and new is not None and new.sha256 == digest
        shareable = unchanged and st.st_size >= SHARE_MIN_BYTES
        if shareable and new is not None and _link_same(new.path, blob, st.st_dev):
            self.linked += 1
            return entry
        if self.lean:
            encoded = encode(blob if linked else path, digest, st.st_size, new, blob)
            if encoded is not None:
                os.rename(encoded.path, blob)  # over the hardlink to the old inode, if any
                return PointFile(
                    rel,
                    digest,
                    entry.mode,
                    entry.size,
                    blob.name,
                    storage=encoded.storage,
                    stored_size=encoded.size,
                    stored_sha256=encoded.sha256,
                    base_sha256=encoded.base_sha256,
                    base_size=encoded.base_size,
                )
        if linked:
            self.linked += 1
        else:
            self.copied += copy_file(path, blob)
            if sha256_file(blob) != digest:
                raise RestorePointFailed(f"{rel}: {path} changed while the restore point was made")
        return entry


def _try_link(src: Path, dst: Path) -> bool:
    """Hardlink `src` as `dst`; False (nothing made) where linking is impossible."""
    try:
        os.link(src, dst, follow_symlinks=False)
    except OSError as exc:
        if exc.errno not in _NO_LINK:
            raise
        return False
    return True


def _link_same(staged: Path, blob: Path, target_dev: int) -> bool:
    """Make `blob` a hardlink of the staged new file when the switch will hardlink that
    same inode into the target (same filesystem); False when it cannot."""
    try:
        if os.lstat(staged).st_dev != target_dev:
            return False
        scratch = blob.with_name(blob.name + ".same")
        os.link(staged, scratch, follow_symlinks=False)
    except OSError as exc:
        if exc.errno not in _NO_LINK and exc.errno != errno.ENOENT:
            raise
        return False
    os.rename(scratch, blob)
    return True


def _stat_key(st: os.stat_result) -> list[int]:
    # ctime cannot be set from user space: any write, chmod or rename changes it.
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def _cached_sha(cache: Mapping[str, Any], rel: str, before: os.stat_result, blob: Path) -> str:
    """The recorded hash if `before` (the target's stat just before linking)
    is exactly what the last commit recorded and the blob is that inode."""
    entry = cache.get(rel)
    if not isinstance(entry, dict) or entry.get("stat") != _stat_key(before):
        return ""
    if os.lstat(blob).st_ino != before.st_ino:
        return ""
    return str(entry.get("sha256") or "")


def load_hash_cache(state_dir: Path) -> dict[str, Any]:
    try:
        data = json.loads((Path(state_dir) / HASH_CACHE).read_bytes())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def record_hashes(
    state_dir: Path, target: Path, installed: Iterable[tuple[str, str]], removed: Iterable[str]
) -> None:
    """After a commit: remember (stat -> SHA-256) of what was just installed."""
    cache = load_hash_cache(state_dir)
    for rel in removed:
        cache.pop(rel, None)
    for rel, sha in installed:
        try:
            cache[rel] = {"sha256": sha, "stat": _stat_key(os.lstat(Path(target) / rel))}
        except OSError:
            cache.pop(rel, None)
    write_json_atomic(Path(state_dir) / HASH_CACHE, cache)


def forget_hashes(state_dir: Path) -> None:
    """The target changed outside a normal commit: hash everything next time."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(Path(state_dir) / HASH_CACHE)


def _safe_rel(rel: Any, point_dir: Path) -> str:
    parts = PurePosixPath(str(rel)).parts
    if not isinstance(rel, str) or not parts or rel.startswith("/") or ".." in parts:
        raise RestorePointCorrupt(f"{point_dir / POINT_FILE}: unsafe path {rel!r}")
    return rel


def load_point(state_dir: Path, point_id: str) -> RestorePoint:
    if "/" in point_id or point_id.startswith("."):
        raise RestorePointCorrupt(f"point: {point_id!r} is not a restore point id")
    pdir = points_root(state_dir) / point_id
    try:
        data = _read_json(pdir / POINT_FILE)
        files = tuple(_point_file(f, pdir) for f in data["files"])
        return RestorePoint(
            id=point_id,
            dir=pdir,
            version=data.get("version"),
            to_version=data.get("to_version"),
            product=data.get("product"),
            created=str(data.get("created")),
            txid=data.get("txid"),
            files=files,
            absent=tuple(_safe_rel(r, pdir) for r in data.get("absent", [])),
            absent_dirs=tuple(_safe_rel(r, pdir) for r in data.get("absent_dirs", [])),
            linked=int(data.get("linked", 0)),
            copied_bytes=int(data.get("copied_bytes", 0)),
            schema=_schema_mark(data.get("schema")),
        )
    except FileNotFoundError as exc:
        raise RestorePointCorrupt(f"point {point_id}: {pdir / POINT_FILE} is missing") from exc
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise RestorePointCorrupt(f"point {point_id}: {pdir / POINT_FILE}: {exc}") from exc


def _point_file(f: Mapping[str, Any], pdir: Path) -> PointFile:
    """One entry of point.json; one made before lean storage has no `storage`: full."""
    storage = str(f.get("storage", FULL))
    if storage not in STORAGES:
        raise ValueError(f"unknown storage {storage!r}")
    entry = PointFile(
        _safe_rel(f["path"], pdir),
        str(f["sha256"]),
        int(f["mode"]),
        int(f["size"]),
        str(int(f["blob"])),
        storage=storage,
    )
    if storage == FULL:
        return entry
    encoded = {"stored_size": int(f["stored_size"]), "stored_sha256": str(f["stored_sha256"])}
    if storage == DELTA:
        encoded |= {"base_sha256": str(f["base_sha256"]), "base_size": int(f["base_size"])}
    return PointFile(**{**entry.__dict__, **encoded})


def _schema_mark(value: Any) -> SchemaMark | None:
    if value is None:
        return None
    version = value["version"]
    if version is not None and not isinstance(version, str):
        raise TypeError(f"schema.version: {version!r} is not a string")
    return SchemaMark(version)


def _read_json(path: Path) -> dict[str, Any]:
    data = json.loads(path.read_bytes())
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    return data


def verify_point(point: RestorePoint, target: Path | None = None) -> None:
    """Check every saved file against the point's SHA-256 manifest (exit 25); with
    `target`, also that every delta's base is there (see verify_points)."""
    verify_points([point], target)


def verify_points(points: Sequence[RestorePoint], target: Path | None = None) -> None:
    """Check the points a restore will use, in the order it uses them (a rollback chain:
    newest first), before anything is written: every blob against its SHA-256 and, with
    `target`, every delta's base: the file at its path must hold either the old bytes
    (already restored) or the version the delta was made against, as the target holds
    it now or as the newer points before it in `points` will leave it. RestorePointCorrupt
    (exit 25) names the first file that fails."""
    # path -> SHA-256 the path holds once the points before this one are restored
    # (None: absent); paths not in here hold what the target holds now.
    after: dict[str, str | None] = {}
    for point in points:
        for entry in point.files:
            _verify_blob(point, entry, target)
            if entry.storage != DELTA or target is None:
                continue
            have = after[entry.path] if entry.path in after else _installed_sha(target, entry)
            if have not in (entry.sha256, entry.base_sha256):
                found = f"SHA-256 {have}" if have else "missing or of another size"
                raise RestorePointCorrupt(
                    f"point {point.id}: {entry.path}: the installed file ({found}) is not the"
                    f" version {point.to_version} this point rebuilds the old one from; nothing"
                    f" restored (re-apply {point.to_version} to repair it, then roll back)"
                )
        after.update({entry.path: entry.sha256 for entry in point.files})
        after.update(dict.fromkeys(point.absent))


def _verify_blob(point: RestorePoint, entry: PointFile, target: Path | None) -> None:
    blob = point.blob_path(entry)
    want_size: int | None = entry.size
    want_sha: str | None = entry.sha256
    if entry.storage != FULL:
        want_size, want_sha = entry.stored_size, entry.stored_sha256
    try:
        size = os.stat(blob).st_size
        digest = digest_file(blob)[1] if size == want_size else None
    except OSError as exc:
        raise RestorePointCorrupt(
            f"point {point.id}: {entry.path}: saved copy {blob} unreadable: {exc.strerror}"
        ) from exc
    if digest != want_sha:
        shared = target is not None and _is_same_inode(blob, Path(target) / entry.path)
        why = (
            " (it is the installed file itself, which the update did not change: the file"
            " was written in place since)"
            if shared
            else ""
        )
        raise RestorePointCorrupt(
            f"point {point.id}: {entry.path}: saved copy {blob} does not match its SHA-256{why}"
        )


def _installed_sha(target: Path, entry: PointFile) -> str | None:
    """SHA-256 of the regular file at the entry's path in the target (None: none there,
    or one of neither size the entry knows, which cannot match either hash)."""
    check_target_path(target, entry.path)  # exit 11, as the restore itself would
    data = _read_installed(Path(target) / entry.path, {entry.size, entry.base_size})
    return None if data is None else hashlib.sha256(data).hexdigest()


def _read_installed(path: Path, sizes: set[int | None]) -> bytes | None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return None
        raise
    with os.fdopen(fd, "rb") as fh:
        st = os.fstat(fh.fileno())
        if not stat.S_ISREG(st.st_mode) or st.st_size not in sizes:
            return None
        return fh.read()


def restore_to_target(point: RestorePoint, target: Path, token: str) -> None:
    """Make every path the point covers exactly as it was. Idempotent, so a
    crash half-way is repaired by running it again.

    Writes the saved bytes back as new files rather than links: the restored file may
    later be written in place, and that must never alter the point. (A path that still
    holds the saved inode itself, a file the update did not change, is left as it is.)
    """
    target = Path(target)
    # A crash mid-restore may have left a temp file under this very token.
    remove_temp_files(target, point.paths)
    for entry in point.files:
        check_target_path(target, entry.path)
        ensure_parents(target, entry.path)
        dest = target / entry.path
        if entry.storage == FULL and _is_same_inode(point.blob_path(entry), dest):
            # A file the update left unchanged: the target still holds the saved inode
            # itself (verified), so only its mode may need to go back.
            _set_mode(dest, entry.mode)
        elif entry.storage == FULL:
            place_file(point.blob_path(entry), dest, entry.mode, token, link=False)
        else:
            _place_decoded(point, entry, dest, token)
    for rel in point.absent:
        check_target_path(target, rel)
        remove_file(target, rel)
    remove_temp_files(target, point.paths)
    remove_empty_dirs(target, point.absent_dirs)


def _place_decoded(point: RestorePoint, entry: PointFile, dest: Path, token: str) -> None:
    """Rebuild one old file from a zstd or delta blob: temp file next to `dest`, checked
    against the old SHA-256, fsync, rename, fsync of the directory."""
    blob = point.blob_path(entry)
    base = None
    if entry.storage == DELTA:
        base = _read_installed(dest, {entry.size, entry.base_size})
        have = None if base is None else hashlib.sha256(base).hexdigest()
        if have == entry.sha256:
            _set_mode(dest, entry.mode)  # restored before (a re-run after a crash)
            return
        if have != entry.base_sha256:
            raise RestorePointCorrupt(
                f"point {point.id}: {entry.path}: the installed file is not the version the"
                f" delta was made against; cannot rebuild the old one"
            )
    tmp = temp_path(dest, token)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(tmp, flags, 0o600)
    try:
        try:
            if base is not None:
                old = decode_delta(blob, base)
                del base
                _write_all(fd, old)
                digest = hashlib.sha256(old).hexdigest()
            else:
                with open(blob, "rb") as fh:
                    digest = decode_zstd(fh, lambda chunk: _write_all(fd, chunk))
            if digest != entry.sha256:
                raise RestorePointCorrupt(
                    f"point {point.id}: {entry.path}: saved copy {blob} does not decode to"
                    f" the old file's SHA-256"
                )
            os.fchmod(fd, entry.mode)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, dest)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(dest.parent)


def _is_same_inode(blob: Path, dest: Path) -> bool:
    try:
        a, b = os.lstat(blob), os.lstat(dest)
    except OSError:
        return False
    return stat.S_ISREG(b.st_mode) and (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _set_mode(path: Path, mode: int) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        if stat.S_IMODE(os.fstat(fd).st_mode) != mode:
            os.fchmod(fd, mode)
            os.fsync(fd)
    finally:
        os.close(fd)


def list_points(state_dir: Path) -> list[RestorePoint]:
    """Valid restore points, oldest first (ids sort by creation time)."""
    root = points_root(state_dir)
    try:
        ids = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    except FileNotFoundError:
        return []
    points = []
    for point_id in ids:
        try:
            points.append(load_point(state_dir, point_id))
        except RestorePointCorrupt:
            continue  # listed by `points` as corrupt, never chosen for rollback
    return points


def corrupt_point_ids(state_dir: Path) -> list[str]:
    root = points_root(state_dir)
    try:
        ids = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    except FileNotFoundError:
        return []
    valid = {p.id for p in list_points(state_dir)}
    return [i for i in ids if i not in valid]


def delete_point(state_dir: Path, point_id: str, *, remove: bool = True) -> Path | None:
    """Delete a point. Renamed first so a crash mid-delete leaves a `.tmp-` dir (swept)
    not a torn point; `remove=False` leaves that dir for the caller to remove later
    (outside the node lock) and returns it."""
    root = points_root(state_dir)
    path = root / point_id
    if not path.exists():
        return None
    doomed = root / f"{PARTIAL_PREFIX}del-{point_id}"
    os.rename(path, doomed)
    fsync_dir(root)
    if remove:
        shutil.rmtree(doomed, ignore_errors=True)
    return doomed


def created_at(point: RestorePoint) -> float | None:
    """The point's creation time (epoch seconds), None if point.json's is unreadable."""
    try:
        return float(calendar.timegm(time.strptime(point.created, "%Y-%m-%dT%H:%M:%SZ")))
    except (ValueError, OverflowError):
        return None


class DiskUse:
    """Bytes on disk the restore points hold: every inode in the points counted once,
    and only when all of its links are inside points (a blob still linked from the target
    would stay on disk without the points). Deleting points never changes which inodes
    qualify, so `of(ids)` tells what the remaining points would hold."""

    def __init__(self, points: Iterable[RestorePoint]) -> None:
        # (dev, ino) -> [bytes on disk, links, links inside points, ids of the points]
        inodes: dict[tuple[int, int], list[Any]] = {}
        for point in points:
            for dirpath, _dirs, names in os.walk(point.dir):
                for name in names:
                    try:
                        st = os.lstat(os.path.join(dirpath, name))
                    except OSError:
                        continue
                    slot = inodes.setdefault(
                        (st.st_dev, st.st_ino), [st.st_blocks * 512, st.st_nlink, 0, set()]
                    )
                    slot[2] += 1
                    slot[3].add(point.id)
        owned = [(size, ids) for size, links, inside, ids in inodes.values() if inside == links]
        self._owned: list[tuple[int, set[str]]] = owned

    def of(self, point_ids: Iterable[str]) -> int:
        wanted = set(point_ids)
        return sum(size for size, ids in self._owned if ids & wanted)


def points_disk_usage(state_dir: Path) -> int:
    """What every restore point of the state dir holds on disk, together (DiskUse)."""
    points = list_points(state_dir)
    return DiskUse(points).of(p.id for p in points)


def needed_points(state_dir: Path) -> set[str]:
    """Points no retention may delete: the ones a pending journal names (apply: its
    point; rollback: its chain) and the one a rollback of the installed version needs
    (the newest point made for the update to it)."""
    needed: set[str] = set()
    pending = Journal.load(Path(state_dir))  # unreadable: EngineError, nothing is pruned
    if pending is not None:
        if pending.get("point_id"):
            needed.add(str(pending.get("point_id")))
        needed.update(str(p) for p in pending.get("points") or [])
    installed = load_state(Path(state_dir)).installed_version
    if installed is not None:
        for point in reversed(list_points(state_dir)):
            if point.to_version == installed:
                needed.add(point.id)
                break
    return needed


def prune(
    state_dir: Path,
    keep: int | None,
    *,
    protect: Iterable[str] = (),
    max_age: float | None = None,
    max_bytes: int | None = None,
    now: float | None = None,
    remove: bool = True,
) -> list[str]:
    """Retention: delete the points beyond the newest `keep`, those older than `max_age`
    seconds, and then the oldest until the points hold at most `max_bytes` on disk
    (DiskUse); never one in `protect`. None switches a rule off. Returns the deleted
    ids, oldest first (`remove=False`: renamed to `.tmp-del-<id>`, see delete_point)."""
    points = list_points(state_dir)  # oldest first
    protected = set(protect)
    doomed: set[str] = set()
    if keep is not None:
        doomed.update(p.id for p in points[: max(len(points) - max(int(keep), 0), 0)])
    if max_age is not None:
        cutoff = (time.time() if now is None else now) - max_age
        for point in points:
            made = created_at(point)
            if made is not None and made < cutoff:
                doomed.add(point.id)
    doomed -= protected
    if max_bytes is not None:
        use = DiskUse(points)
        left = [p.id for p in points if p.id not in doomed]
        for point_id in list(left):
            if use.of(left) <= max_bytes:
                break
            if point_id not in protected:
                doomed.add(point_id)
                left.remove(point_id)
    deleted = [p.id for p in points if p.id in doomed]
    for point_id in deleted:
        delete_point(state_dir, point_id, remove=remove)
    return deleted


def sweep_partial(state_dir: Path) -> None:
    """Remove half-built or half-deleted points left by a crash."""
    root = points_root(state_dir)
    try:
        entries = [e for e in os.scandir(root) if e.name.startswith(PARTIAL_PREFIX)]
    except FileNotFoundError:
        return
    for entry in entries:
        shutil.rmtree(entry.path, ignore_errors=True)
    if entries:
        fsync_dir(root)
