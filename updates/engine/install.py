"""Filesystem primitives of the atomic install: put one file in place, remove
one, create parents, clean up temp files. Every step is durable before it
returns (file fsync before rename, directory fsync after), so a crash leaves
each path either at its old or its new content and never half-written.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Iterable
from pathlib import Path, PurePosixPath

from .errors import UnsafePath
from .paths import check_no_symlink_components
from .state import fsync_dir

TMP_MARK = ".themis-tmp-"
CHUNK = 8 << 20
# link(2) failures after which copying is the right answer, not an error.
_NO_LINK = {errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EACCES}


def temp_path(final: Path, token: str) -> Path:
    """Temp name next to `final`: same directory, so rename(2) is atomic."""
    return final.with_name(f".{final.name}{TMP_MARK}{token}")


def is_temp_name(name: str) -> bool:
    return name.startswith(".") and TMP_MARK in name


def check_target_path(target: Path, rel: str) -> None:
    """Refuse a manifest path that passes through (or is) a symlink in the target."""
    # Covers the last component too: rename over a symlink would replace the link,
    # and a hardlink of it would capture the link, not the file that was installed.
    check_no_symlink_components(Path(target), rel)


def missing_parents(target: Path, rel: str) -> list[str]:
    """Parent dirs of `rel` (relative, shallowest first) that do not exist yet."""
    missing: list[str] = []
    parts = PurePosixPath(rel).parts[:-1]
    for depth in range(1, len(parts) + 1):
        sub = "/".join(parts[:depth])
        if missing or not os.path.lexists(target / sub):
            missing.append(sub)
    return missing


def ensure_parents(target: Path, rel: str) -> None:
    cur = Path(target)
    for part in PurePosixPath(rel).parts[:-1]:
        cur = cur / part
        try:
            os.mkdir(cur, 0o755)
        except FileExistsError:
            if not stat.S_ISDIR(os.lstat(cur).st_mode):
                raise UnsafePath(f"{rel}: {cur} exists and is not a directory") from None
            continue
        fsync_dir(cur.parent)  # the new entry must survive a crash before its file does


def copy_fd(src_fd: int, dst_fd: int) -> int:
    """Copy to end of file; in-kernel where possible. Returns bytes copied."""
    total = 0
    try:
        while n := os.copy_file_range(src_fd, dst_fd, CHUNK):
            total += n
        return total
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
            raise
    while buf := os.read(src_fd, CHUNK):
        view = memoryview(buf)
        while view:
            view = view[os.write(dst_fd, view) :]
        total += len(buf)
    return total


def copy_file(src: Path, dst: Path) -> int:
    """Copy `src` to a new file `dst` (must not exist), fsynced. Returns bytes copied."""
    src_fd = os.open(src, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        dst_fd = os.open(dst, flags, 0o600)
        try:
            copied = copy_fd(src_fd, dst_fd)
            os.fsync(dst_fd)
        finally:
            os.close(dst_fd)
    finally:
        os.close(src_fd)
    return copied


def link_or_copy(src: Path, dst: Path) -> bool:
    """Hardlink `src` as `dst` (free), else copy it. True when linked."""
    try:
        os.link(src, dst, follow_symlinks=False)
        return True
    except OSError as exc:
        if exc.errno not in _NO_LINK:
            raise
    copy_file(src, dst)
    return False


def place_file(src: Path, dest: Path, mode: int, token: str, *, link: bool) -> bool:
    """Atomically make `dest` hold the bytes of `src` with `mode`.

    Temp file in dest's directory (created exclusively), fsync, chmod, rename(2)
    over dest, fsync the directory. With `link` the temp is a hardlink of `src`
    (no bytes copied; used for staged files that nothing else will write).
    Returns True when no bytes were copied.
    """
    tmp = temp_path(dest, token)
    if link:
        linked = link_or_copy(src, tmp)
    else:
        copy_file(src, tmp)
        linked = False
    try:
        fd = os.open(tmp, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            os.fchmod(fd, mode)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, dest)
    except BaseException:
        _unlink_quiet(tmp)
        raise
    if linked and os.path.lexists(tmp):
        # rename(2) of two links to one inode "does nothing, successfully": dest
        # already was src (a re-run), so the temp name is still there.
        os.unlink(tmp)
    fsync_dir(dest.parent)
    return linked


def remove_file(target: Path, rel: str) -> bool:
    path = Path(target) / rel
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    fsync_dir(path.parent)
    return True


def remove_empty_dirs(target: Path, rels: Iterable[str]) -> None:
    """rmdir the given dirs, deepest first, when empty (never anything else)."""
    for rel in sorted(set(rels), key=lambda r: r.count("/"), reverse=True):
        path = Path(target) / rel
        try:
            os.rmdir(path)
        except FileNotFoundError:
            continue
        except OSError as exc:
            if exc.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR):
                continue
            raise
        fsync_dir(path.parent)


def remove_temp_files(target: Path, rels: Iterable[str]) -> list[str]:
    """Delete our temp files next to the given paths (left by a crash)."""
    dirs = {Path(target)} | {(Path(target) / r).parent for r in rels}
    removed: list[str] = []
    for directory in sorted(dirs):
        try:
            entries = [e for e in os.scandir(directory) if is_temp_name(e.name)]
        except (FileNotFoundError, NotADirectoryError):
            continue
        for entry in entries:
            if not entry.is_dir(follow_symlinks=False):
                _unlink_quiet(Path(entry.path))
                removed.append(entry.path)
        if entries:
            fsync_dir(directory)
    return removed


def _unlink_quiet(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
