"""A release as parts: its signed manifest, the signature, and one object per file.

Nodes that already run an earlier release fetch only the files they lack (workers/parts.py),
verifying the signed manifest first and every file against it as it arrives. The parts of a
release are extracted from its bundle once, in the background (`release_parts_extract`, run
by the coordinator task `workers.tasks.extract_release_parts`, queued when the release is
published and again when a job finds none), after the engine has verified the bundle again
(the same code the nodes run). They live under MEDIA_ROOT:

    parts/objects/<aa>/<sha256>                     one per file content, shared by releases
    parts/releases/<bundle sha256>/manifest.json    the manifest's exact signed bytes
    parts/releases/<bundle sha256>/manifest.json.p7s
    parts/releases/<bundle sha256>/ready.json       written last: the parts are complete

An object is written only by renaming a file the engine has just verified, under its SHA-256,
so an object that exists holds those bytes. Nothing here is trusted by a node: it checks the
signature and every hash itself. `release_parts_gc()` removes what no release references;
it runs with the tombstone cleanup.

Serving (`job_parts_response`) uses the job's download token, like the bundle, with Range and
the SHA-256 as ETag; a job may fetch only its own release's objects.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import re
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

from django.conf import settings
from django.http import HttpResponse
from django.http.response import HttpResponseBase
from django.urls import reverse

from updates.engine.bundle import read_manifest, verify_bundle
from updates.engine.errors import EngineError
from updates.models import Release, UpdateJob
from updates.releases.artifacts import artifact_response
from updates.taskqueue import TaskName, enqueue_on_commit

log = logging.getLogger(__name__)

PARTS_DIR = "parts"
MANIFEST = "manifest.json"
SIGNATURE = "manifest.json.p7s"
READY = "ready.json"
PENDING = "pending"
# A queued extraction is not queued again for this long (a lost one is, after it).
PENDING_SECONDS = 600
WORK_PREFIX = ".work-"
STALE_WORK_SECONDS = 6 * 3600
_SHA256 = re.compile(r"[0-9a-f]{64}")


def parts_root() -> Path:
    return Path(settings.MEDIA_ROOT) / PARTS_DIR


def _object_path(sha256: str) -> Path:
    return parts_root() / "objects" / sha256[:2] / sha256


def _release_dir(release: Release) -> Path | None:
    sha = (release.sha256 or "").lower()
    return parts_root() / "releases" / sha if _SHA256.fullmatch(sha) else None


def release_parts_ready(release: Release) -> bool:
    directory = _release_dir(release)
    return directory is not None and (directory / READY).is_file()


def release_parts_summary(release: Release) -> dict[str, Any] | None:
    """What `ready.json` says (files, bytes, manifest SHA-256), or None without parts."""
    directory = _release_dir(release)
    if directory is None:
        return None
    try:
        data = json.loads((directory / READY).read_bytes())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def release_parts_schedule(release: Release) -> bool:
    """Queue the extraction of a release's parts (after commit) unless they exist or one
    was queued in the last PENDING_SECONDS; True when queued."""
    if not settings.THEMIS_RELEASE_PARTS or release.pk is None:
        return False
    directory = _release_dir(release)
    if directory is None or not release.artifact or release_parts_ready(release):
        return False
    marker = directory.parent / f"{directory.name}.{PENDING}"
    try:
        if time.time() - marker.stat().st_mtime < PENDING_SECONDS:
            return False
    except FileNotFoundError:
        pass
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.touch()
    enqueue_on_commit(TaskName.EXTRACT_RELEASE_PARTS, release.pk)
    return True


def job_parts_url(job: UpdateJob) -> str | None:
    """Where the job's node fetches its release by parts (objects are `<url><name>`), or
    None when the release has no parts yet (their extraction is queued then)."""
    release = job.release
    if release is None or not settings.THEMIS_RELEASE_PARTS:
        return None
    if not release_parts_ready(release):
        release_parts_schedule(release)
        return None
    path = reverse("artifact_job_parts", kwargs={"job_id": job.pk, "name": MANIFEST})
    return f"{settings.THEMIS_PUBLIC_URL.rstrip('/')}{path.removesuffix(MANIFEST)}"


# ---------------------------------------------------------------- extraction


def release_parts_extract(*, release_id: int) -> bool:
    """Verify the release's bundle and store its parts; True when they are there.
    Idempotent; a failure leaves no partial parts (objects are whole or absent)."""
    release = Release.objects.filter(pk=release_id).first()
    if release is None or not release.artifact:
        return False
    directory = _release_dir(release)
    if directory is None:
        return False
    if release_parts_ready(release):
        return True
    marker = directory.parent / f"{directory.name}.{PENDING}"
    root = parts_root()
    work = root / f"{WORK_PREFIX}{uuid.uuid4().hex}"
    work.mkdir(parents=True)
    done = False
    try:
        bundle = Path(release.artifact.path)
        try:
            verified = verify_bundle(
                bundle,
                trust_anchor=settings.THEMIS_TRUST_ANCHOR,
                product=release.product,
                state_dir=work,
                stage=True,
                allow_downgrade=True,
            )
        except EngineError as err:
            log.warning("release %s: no parts (%s: %s)", release.version, err.code, err)
            return False
        with verified:
            manifest = verified.manifest
            if any(entry.delta is not None for entry in manifest.files):
                log.info("release %s: a delta bundle has no parts", release.version)
                return False
            _, signature = read_manifest(bundle)
            staging = verified.staging_dir
            assert staging is not None
            for entry in manifest.files:
                _store_object(staging / entry.path, entry.sha256)
            _write_release_dir(directory, verified.manifest_bytes, signature, manifest)
            done = True
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if done:
            with contextlib.suppress(FileNotFoundError):
                marker.unlink()
        else:  # tried now: the next try waits PENDING_SECONDS (each try reads the bundle)
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.touch()
    log.info("release %s: parts stored (%d files)", release.version, len(manifest.files))
    return True


def _store_object(staged: Path, sha256: str) -> None:
    dest = _object_path(sha256)
    if dest.is_file():
        return  # the same content, from this or another release
    dest.parent.mkdir(parents=True, exist_ok=True)
    os.chmod(staged, 0o644)
    os.replace(staged, dest)


def _write_release_dir(
    directory: Path, manifest_bytes: bytes, signature: bytes, manifest: Any
) -> None:
    tmp = directory.with_name(f"{WORK_PREFIX}{directory.name}-{uuid.uuid4().hex[:8]}")
    tmp.mkdir(parents=True)
    try:
        (tmp / MANIFEST).write_bytes(manifest_bytes)
        (tmp / SIGNATURE).write_bytes(signature)
        summary = {
            "manifest_sha256": hashlib.sha256(manifest_bytes).hexdigest(),
            "files": len(manifest.files),
            "bytes": manifest.total_size,
            "version": manifest.version,
        }
        (tmp / READY).write_text(json.dumps(summary, sort_keys=True))
        shutil.rmtree(directory, ignore_errors=True)  # a half-made one from a dead run
        os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ---------------------------------------------------------------- serving


def job_parts_response(
    job: UpdateJob, name: str, *, range_header: str | None, if_range: str | None
) -> HttpResponseBase:
    """One part of the job's release: its manifest, the signature, or a file object named
    by SHA-256 that the release's manifest lists (206 with Range, like the bundle)."""
    release = job.release
    assert release is not None  # job_for_download guarantees it
    directory = _release_dir(release)
    if directory is None or not release_parts_ready(release):
        return _missing(f"job {job.pk}: its release has no parts")
    if name in (MANIFEST, SIGNATURE):
        return artifact_response(
            directory / name, sha256="", range_header=range_header, if_range=if_range
        )
    if not _SHA256.fullmatch(name) or name not in _stored_objects(directory / MANIFEST):
        return _missing(f"job {job.pk}: its release has no part {name[:80]!r}")
    return artifact_response(
        _object_path(name), sha256=name, range_header=range_header, if_range=if_range
    )


def _manifest_objects(manifest: Any) -> set[str]:
    """The SHA-256 of every file a manifest (as JSON) lists."""
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, list):
        return set()
    return {
        entry["sha256"].lower()
        for entry in files
        if isinstance(entry, dict) and isinstance(entry.get("sha256"), str)
    }


def _stored_objects(manifest_path: Path) -> frozenset[str]:
    """The objects the manifest stored at extraction lists (the signed one, verified then);
    read once per change of the file."""
    try:
        stamp = manifest_path.stat().st_mtime_ns
    except FileNotFoundError:
        return frozenset()
    return _read_objects(str(manifest_path), stamp)


@functools.lru_cache(maxsize=16)
def _read_objects(path: str, _stamp: int) -> frozenset[str]:
    try:
        return frozenset(_manifest_objects(json.loads(Path(path).read_bytes())))
    except (OSError, ValueError):
        return frozenset()


def _missing(reason: str) -> HttpResponse:
    return HttpResponse(f"{reason}\n", status=404, content_type="text/plain")


# ---------------------------------------------------------------- garbage


def release_parts_gc(*, now: float | None = None) -> int:
    """Remove the parts no release references any more, and scratch folders of dead
    extractions; returns how many entries went. Objects of a release being extracted
    are safe: its row exists, so its manifest references them."""
    root = parts_root()
    if not root.is_dir():
        return 0
    # What is on disk first, then which releases exist: parts a release stored after the
    # listing are not looked at, and a release that stored its parts before it is in the
    # query (its row exists before its extraction begins).
    release_entries = list((root / "releases").glob("*")) if (root / "releases").is_dir() else []
    work_entries = list(root.glob(f"{WORK_PREFIX}*"))
    objects = root / "objects"
    object_entries = list(objects.glob("*/*")) if objects.is_dir() else []
    releases = list(Release.objects.values_list("sha256", "manifest"))
    live_dirs = {str(sha).lower() for sha, _ in releases}
    live_objects: set[str] = set()
    for sha, manifest in releases:
        live_objects |= _manifest_objects(manifest)
        # What its extraction stored (a row may carry no manifest of its own).
        live_objects |= _stored_objects(root / "releases" / str(sha).lower() / MANIFEST)
    removed = 0
    cutoff = (now if now is not None else time.time()) - STALE_WORK_SECONDS
    for path in release_entries:
        name = path.name
        if name.startswith(WORK_PREFIX):
            stale = _mtime(path) < cutoff
        else:
            stale = name.split(".", 1)[0] not in live_dirs
        if stale:
            _remove(path)
            removed += 1
    for path in work_entries:
        if _mtime(path) < cutoff:
            _remove(path)
            removed += 1
    for path in object_entries:
        if path.name not in live_objects and not path.name.endswith(".tmp"):
            _remove(path)
            removed += 1
    return removed


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return float("inf")  # gone already: nothing to remove


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
