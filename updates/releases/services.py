"""Publishing releases: an uploaded bundle is verified by the engine (the same
code the nodes run) before anything is stored."""

from __future__ import annotations

import hashlib
import logging
import os
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from django.conf import settings
from django.core.files.uploadedfile import UploadedFile
from django.db import IntegrityError, transaction
from django.db.models import ProtectedError

from updates.audit import event_log
from updates.engine.bundle import verify_bundle
from updates.engine.errors import EngineError
from updates.models import ArtifactTombstone, Release, Rollout, UpdateJob
from updates.releases.deltas import deltas_wanted
from updates.releases.parts import release_parts_schedule
from updates.releases.storage import reap, stored_names
from updates.releases.trust import published_trust
from updates.taskqueue import TaskName, enqueue_on_commit

log = logging.getLogger(__name__)


class ReleaseRejected(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _releases_dir() -> Path:
    path = Path(settings.MEDIA_ROOT) / "releases"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _receive(chunks: Iterable[bytes], directory: Path, expected: Expected) -> tuple[Path, int, str]:
    """Stream the bundle's bytes to a private temp file, hashing as it goes."""
    max_bytes = settings.THEMIS_MAX_BUNDLE_BYTES
    tmp = directory / f".incoming-{uuid.uuid4().hex}.part"
    digest, size = hashlib.sha256(), 0
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as out:
            for chunk in chunks:
                size += len(chunk)
                if size > max_bytes:
                    raise ReleaseRejected("TOO_LARGE", f"bundle exceeds {max_bytes} bytes")
                if expected.size is not None and size > expected.size:
                    raise ReleaseRejected(
                        "SIZE_MISMATCH", f"bundle is larger than the {expected.size} bytes declared"
                    )
                digest.update(chunk)
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp, size, digest.hexdigest()


@dataclass(frozen=True)
class Expected:
    """What a release feed declared about a bundle. Checked besides everything an upload is
    checked for, before anything is stored; None is not declared."""

    version: str | None = None
    size: int | None = None
    sha256: str | None = None
    manifest_sha256: str | None = None


def release_publish(*, upload: UploadedFile[bytes], user: Any, channel: str = "stable") -> Release:
    """Verify an uploaded bundle and publish it; raise ReleaseRejected with the
    reason otherwise. A rejection stores nothing and is logged as an Event."""
    return _publish(
        chunks=upload.chunks(1 << 20), name=upload.name or "", user=user, channel=channel
    )


def release_import(
    *,
    chunks: Iterable[bytes],
    name: str,
    channel: str,
    actor_label: str,
    origin: Mapping[str, Any],
    expected: Expected,
) -> Release:
    """A bundle fetched from a release feed: published exactly as an upload is (the same
    verification, storage and events), plus the feed's own declarations (`expected`) and
    where it came from (`origin`, in the events). Errors the chunks raise (a broken
    download) pass through unlogged, with nothing stored."""
    return _publish(
        chunks=chunks,
        name=name,
        user=None,
        channel=channel,
        actor_label=actor_label,
        origin=origin,
        expected=expected,
    )


def _publish(
    *,
    chunks: Iterable[bytes],
    name: str,
    user: Any,
    channel: str,
    actor_label: str | None = None,
    origin: Mapping[str, Any] | None = None,
    expected: Expected | None = None,
) -> Release:
    expected = expected or Expected()
    origin = dict(origin or {})
    directory = _releases_dir()
    tmp: Path | None = None
    try:
        max_bytes = settings.THEMIS_MAX_BUNDLE_BYTES
        if expected.size is not None and expected.size > max_bytes:
            raise ReleaseRejected(
                "TOO_LARGE", f"bundle of {expected.size} bytes exceeds {max_bytes} bytes"
            )
        tmp, size, sha256 = _receive(chunks, directory, expected)
        _check_declared(expected, size, sha256)
        try:
            verified = verify_bundle(
                tmp, trust_anchor=published_trust()[0], product=settings.THEMIS_PRODUCT
            )
        except EngineError as err:
            raise ReleaseRejected(err.code, str(err)) from err
        except Exception as err:  # fail closed: anything unexpected is a rejection
            log.exception("bundle verification failed unexpectedly")
            raise ReleaseRejected("UNREADABLE", f"{type(err).__name__}: {err}") from err
        manifest = verified.manifest
        _check_declared_manifest(expected, manifest.version, verified.manifest_bytes)
        if Release.objects.filter(product=manifest.product, version=manifest.version).exists():
            raise ReleaseRejected(
                "ALREADY_PUBLISHED", f"{manifest.product} {manifest.version} is already published"
            )
        suffix = ".tar.zst" if name.endswith(".zst") else ".tar"
        # A unique name: a racing duplicate upload can never unlink our artifact.
        final = directory / f"{manifest.product}-{manifest.version}-{uuid.uuid4().hex[:12]}{suffix}"
        os.replace(tmp, final)
        tmp = final  # removed by `finally` unless the row is created
        try:
            release = Release.objects.create(
                product=manifest.product,
                version=manifest.version,
                channel=channel,
                manifest=manifest.raw,
                signer_subject=verified.signer,
                artifact=str(final.relative_to(settings.MEDIA_ROOT)),
                size=size,
                sha256=sha256,
                published_by=user,
            )
        except IntegrityError:
            raise ReleaseRejected(
                "ALREADY_PUBLISHED", f"{manifest.product} {manifest.version} is already published"
            ) from None
        tmp = None
    except ReleaseRejected as rejected:
        log.warning("release bundle %r rejected: %s", name, rejected.message)
        event_log(
            verb="release.rejected",
            actor=user,
            actor_label=actor_label,
            details={
                "file": name,
                "code": rejected.code,
                "reason": rejected.message,
                **origin,
            },
        )
        raise
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
    event_log(
        verb="release.published",
        actor=user,
        actor_label=actor_label,
        obj=release,
        details={
            "version": release.version,
            "sha256": sha256,
            "signer": release.signer_subject,
            **origin,
        },
    )
    _deltas_schedule(release)
    release_parts_schedule(release)
    return release


def _check_declared(expected: Expected, size: int, sha256: str) -> None:
    if expected.size is not None and size != expected.size:
        raise ReleaseRejected(
            "SIZE_MISMATCH", f"bundle has {size} bytes, {expected.size} were declared"
        )
    if expected.sha256 is not None and sha256 != expected.sha256.lower():
        raise ReleaseRejected(
            "SHA256_MISMATCH", f"bundle SHA-256 is {sha256}, {expected.sha256} was declared"
        )


def _check_declared_manifest(expected: Expected, version: str, manifest_bytes: bytes) -> None:
    if expected.version is not None and version != expected.version:
        raise ReleaseRejected(
            "VERSION_MISMATCH",
            f"the signed manifest says version {version}, the feed {expected.version}",
        )
    if expected.manifest_sha256 is not None:
        digest = hashlib.sha256(manifest_bytes).hexdigest()
        if digest != expected.manifest_sha256.lower():
            raise ReleaseRejected(
                "MANIFEST_MISMATCH",
                f"manifest SHA-256 is {digest}, {expected.manifest_sha256} was declared",
            )


def _deltas_schedule(release: Release) -> None:
    """Have the coordinator build delta bundles from earlier releases, once committed.
    A broker outage does not fail the publish: full bundles still work."""
    if deltas_wanted(release):
        enqueue_on_commit(TaskName.GENERATE_RELEASE_DELTAS, release.pk)


class ReleaseInUse(Exception):
    """The release is referenced by jobs or rollouts and so cannot be deleted."""


@transaction.atomic
def release_deprecate(*, release: Release, user: Any) -> bool:
    """Mark a release deprecated: no new updates or rollouts may use it. Returns
    False (and logs nothing) when it already was."""
    changed = Release.objects.filter(pk=release.pk, state=Release.State.PUBLISHED).update(
        state=Release.State.DEPRECATED
    )
    release.refresh_from_db(fields=["state"])
    if changed:
        event_log(
            verb="release.deprecated",
            actor=user,
            obj=release,
            details={"product": release.product, "version": release.version},
        )
    return bool(changed)


def release_delete(*, release: Release, user: Any) -> list[str]:
    """Delete a release and, once that has committed, its files (the artifact
    and every ReleaseFile). Returns the storage names removed.

    Refused with ReleaseInUse while any job or rollout references the release,
    finished ones included: they are its history (deprecate it instead)."""
    try:
        with transaction.atomic():
            names = _delete_row(release, user)
    except (ProtectedError, IntegrityError) as err:
        # A job or rollout was created for it between our check and the delete.
        raise ReleaseInUse(f"release {release.version} is in use: {err}") from err
    return names


def _delete_row(release: Release, user: Any) -> list[str]:
    locked = Release.objects.select_for_update().filter(pk=release.pk).first()
    if locked is None:
        return []  # already deleted (a double submit): nothing to do
    _refuse_if_referenced(locked)
    names = stored_names(locked)
    ArtifactTombstone.objects.bulk_create([ArtifactTombstone(path=name) for name in names])
    event_log(
        verb="release.deleted",
        actor=user,
        obj=locked,
        details={"product": locked.product, "version": locked.version, "files": names},
    )
    locked.delete()
    # Files go only after the row is gone for good; a crash in between leaves
    # tombstones that artifact_tombstones_cleanup() finishes.
    transaction.on_commit(lambda: reap(names), robust=True)
    return names


def _plan_references(release: Release) -> int:
    """Jobs that install `release` as a step of their plan, not as their own release: their
    token still opens its bundle and their page names it. Read in Python, as a JSON
    containment lookup is not portable across the databases we run on."""
    plans = (
        UpdateJob.objects.exclude(plan=[])
        .exclude(release=release)
        .values_list("plan", flat=True)
        .iterator()
    )
    return sum(
        any(isinstance(step, dict) and step.get("release_id") == release.pk for step in plan)
        for plan in plans
        if isinstance(plan, list)
    )


def _refuse_if_referenced(release: Release) -> None:
    jobs = UpdateJob.objects.filter(release=release).count() + _plan_references(release)
    rollouts = Rollout.objects.filter(release=release).count()
    if jobs or rollouts:
        raise ReleaseInUse(
            f"release {release.version} is referenced by {jobs} update job(s) and "
            f"{rollouts} rollout(s); releases with history are kept, deprecate it instead"
        )
