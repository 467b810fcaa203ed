"""Restore points: what the target looked like before an update, made before
the first byte of the target changes (DESIGN.md invariant).

Layout, `<state_dir>/points/<id>/`:

    point.json   version before/after, SHA-256 + mode + size of every old file,
                 manifest paths that did not exist before, dirs that did not exist
    blobs/<n>    the old bytes: a hardlink to the old inode (free: the new file
                 arrives by rename, so the old inode is never written again),
                 a copy only when linking fails (e.g. EXDEV)

A point is built in `points/.tmp-<id>` and renamed into place when complete,
so a half-built point is never mistaken for a real one.
"""

from __future__ import annotations

import contextlib
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
    ensure_parents,
    link_or_copy,
    missing_parents,
    place_file,
    remove_empty_dirs,
    remove_file,
    remove_temp_files,
)
from .state import fsync_dir, write_json_atomic

POINTS_DIR = "points"
POINT_FILE = "point.json"
PARTIAL_PREFIX = ".tmp-"
# SHA-256 of the files the last commit installed, keyed by their stat, so the
# next restore point need not re-read them (200 MB of SHA-256 costs ~1 s).
HASH_CACHE = "installed-files.json"


@dataclass(frozen=True)
class PointFile:
    path: str
    sha256: str
    mode: int
    size: int
    blob: str


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
) -> RestorePoint:
    """Record the current bytes of every path the update replaces or removes.

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
        cache = load_hash_cache(state_dir)
        files, absent, linked, copied = _capture(
            Path(target), tmp / "blobs", replaced, removed, cache
        )
        absent_dirs = list(dict.fromkeys(d for r in replaced for d in missing_parents(target, r)))
        data: dict[str, Any] = {
            "id": point_id,
            "version": version,
            "to_version": to_version,
            "product": product,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "txid": txid,
            "files": [f.__dict__ for f in files],
            "absent": absent,
            "absent_dirs": absent_dirs,
            "linked": linked,
            "copied_bytes": copied,
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


def _capture(
    target: Path,
    blobs: Path,
    replaced: Sequence[str],
    removed: Sequence[str],
    cache: Mapping[str, Any],
) -> tuple[list[PointFile], list[str], int, int]:
    files: list[PointFile] = []
    absent: list[str] = []
    linked = copied = 0
    wanted = set(replaced)
    for rel in dict.fromkeys([*replaced, *removed]):
        path = target / rel
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
        blob = blobs / str(len(files))
        try:
            if link_or_copy(path, blob):
                linked += 1
                digest = _cached_sha(cache, rel, st, blob) or sha256_file(blob)
            else:
                copied += st.st_size
                digest = sha256_file(blob)
        except OSError as exc:
            raise RestorePointFailed(f"{rel}: cannot save {path}: {exc.strerror}") from exc
        files.append(PointFile(rel, digest, stat.S_IMODE(st.st_mode), st.st_size, blob.name))
    return files, absent, linked, copied


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
        files = tuple(
            PointFile(
                _safe_rel(f["path"], pdir),
                str(f["sha256"]),
                int(f["mode"]),
                int(f["size"]),
                str(int(f["blob"])),
            )
            for f in data["files"]
        )
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


def verify_point(point: RestorePoint) -> None:
    """Check every saved file against the point's SHA-256 manifest (exit 25)."""
    for entry in point.files:
        blob = point.blob_path(entry)
        try:
            size = os.stat(blob).st_size
            digest = sha256_file(blob) if size == entry.size else None
        except OSError as exc:
            raise RestorePointCorrupt(
                f"point {point.id}: {entry.path}: saved copy {blob} unreadable: {exc.strerror}"
            ) from exc
        if digest != entry.sha256:
            raise RestorePointCorrupt(
                f"point {point.id}: {entry.path}: saved copy {blob} does not match its SHA-256"
            )


def restore_to_target(point: RestorePoint, target: Path, token: str) -> None:
    """Make every path the point covers exactly as it was. Idempotent, so a
    crash half-way is repaired by running it again.

    Copies rather than links the saved bytes back: the restored file may later
    be written in place, and that must never alter the point.
    """
    target = Path(target)
    for entry in point.files:
        check_target_path(target, entry.path)
        ensure_parents(target, entry.path)
        place_file(point.blob_path(entry), target / entry.path, entry.mode, token, link=False)
    for rel in point.absent:
        check_target_path(target, rel)
        remove_file(target, rel)
    remove_temp_files(target, point.paths)
    remove_empty_dirs(target, point.absent_dirs)


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


def delete_point(state_dir: Path, point_id: str) -> None:
    root = points_root(state_dir)
    path = root / point_id
    if not path.exists():
        return
    # Rename first so a crash mid-delete leaves a `.tmp-` dir (swept) not a torn point.
    doomed = root / f"{PARTIAL_PREFIX}del-{point_id}"
    os.rename(path, doomed)
    fsync_dir(root)
    shutil.rmtree(doomed, ignore_errors=True)


def prune(state_dir: Path, keep: int, *, protect: Iterable[str] = ()) -> list[str]:
    """Delete all but the newest `keep` points; returns the deleted ids."""
    keep = max(int(keep), 0)
    protected = set(protect)
    points = [p.id for p in list_points(state_dir)]
    doomed = [p for p in points[: max(len(points) - keep, 0)] if p not in protected]
    for point_id in doomed:
        delete_point(state_dir, point_id)
    return doomed


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
