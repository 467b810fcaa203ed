"""Release artifacts: how nodes fetch them and how they leave storage.

Nodes download a job's bundle over HTTP with a short-lived token bound to that
one job, and resume interrupted downloads with `Range`. Deleting a release
removes its files only after the row is gone (on commit); a tombstone written
in the same transaction lets the beat task finish the job after a crash.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

from django.conf import settings

from updates.models import ArtifactTombstone, Release, ReleaseFile

log = logging.getLogger(__name__)


def stored_names(release: Release) -> list[str]:
    """Storage names (relative to MEDIA_ROOT) of every file a release holds."""
    names = [str(release.artifact.name)] if release.artifact else []
    extra = ReleaseFile.objects.filter(release=release).values_list("file", flat=True)
    names += [str(name) for name in extra if name]
    return list(dict.fromkeys(names))


def artifact_tombstones_cleanup() -> int:
    """Remove files whose release row is gone, then their tombstones. Safe to
    run any time and repeatedly; returns how many tombstones it cleared."""
    names = list(ArtifactTombstone.objects.values_list("path", flat=True).distinct())
    return reap(names)


def reap(names: Iterable[str]) -> int:
    done = [name for name in names if _remove(name)]
    deleted, _ = ArtifactTombstone.objects.filter(path__in=done).delete()
    return deleted


def _remove(name: str) -> bool:
    """Unlink one stored file; True when its tombstone can go."""
    path = media_path(name)
    if path is None:
        log.warning("tombstone %r points outside MEDIA_ROOT: dropped, nothing unlinked", name)
        return True
    if _still_referenced(name):
        # Storage reuses free names: a new release may own this path now.
        log.warning("tombstone %r: the path belongs to a live release again; kept its file", name)
        return True
    if path.is_dir() and not path.is_symlink():
        log.warning("tombstone %r is a directory: dropped, nothing unlinked", name)
        return True
    try:
        path.unlink(missing_ok=True)
    except OSError:
        log.exception("could not remove artifact %s; the beat task will retry", path)
        return False
    return True


def media_path(name: str) -> Path | None:
    """MEDIA_ROOT/name if that lies inside MEDIA_ROOT (its directory resolved,
    so `..` or a symlinked directory cannot lead out); None otherwise."""
    if not name or "\x00" in name:
        return None
    root = Path(settings.MEDIA_ROOT).resolve()
    candidate = root / name
    if candidate.name in {"", ".", ".."}:
        return None
    parent = candidate.parent.resolve()
    if not parent.is_relative_to(root):
        return None
    return parent / candidate.name


def _still_referenced(name: str) -> bool:
    return (
        Release.objects.filter(artifact=name).exists()
        or ReleaseFile.objects.filter(file=name).exists()
    )
