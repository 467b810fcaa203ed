"""Delta bundles of a release: built and signed by the dashboard in the background.

When a release is published, `release_deltas_generate` (run by the Celery task
`workers.tasks.generate_release_deltas`) builds one delta bundle per recent
earlier release of the same product (the last THEMIS_DELTA_BASES of them): both
bundles are verified and staged by the engine, `create_delta_bundle` patches
the new files against the old ones and signs the result with the release
pipeline's key. Each delta is stored as a ReleaseFile(kind="delta",
base_version=...) next to the full artifact; nodes on that base version get
it (updates.jobs), and fall back to the full bundle for any file whose base
does not match.

Progress lives in Events (no model change): `release.delta_started` when a run
begins, `release.delta_created` / `release.delta_skipped` per base, and
`release.delta_finished` when it ends; the release page shows "generating
deltas…" while a start has no later finish.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import tempfile
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from django.conf import settings
from django.db import transaction
from packaging.version import InvalidVersion, Version

from updates.audit import event_log
from updates.engine.bundle import verify_bundle
from updates.engine.delta_bundle import create_delta_bundle
from updates.engine.errors import EngineError, ManifestInvalid
from updates.engine.hsm import Pkcs11Signer
from updates.models import Event, Release, ReleaseFile

log = logging.getLogger(__name__)

# A delta must be smaller than this share of the full bundle, or it is not kept.
MAX_DELTA_SHARE = 0.9
_RESERVED = frozenset({"format", "product", "version", "created", "expires", "files"})

Progress = Callable[[int, int, str], None]  # (done, total, base_version)


def _version(text: str) -> Version | None:
    try:
        return Version(text)
    except InvalidVersion:
        return None


def delta_bases(release: Release, count: int | None = None) -> list[Release]:
    """The last `count` (default THEMIS_DELTA_BASES) published releases of the
    same product older than `release`, newest first."""
    count = settings.THEMIS_DELTA_BASES if count is None else count
    new = _version(release.version)
    if new is None or count <= 0:
        return []
    candidates = Release.objects.filter(
        product=release.product, state=Release.State.PUBLISHED
    ).exclude(pk=release.pk)
    older = [
        (v, r)
        for r in candidates
        if r.artifact and (v := _version(r.version)) is not None and v < new
    ]
    older.sort(key=lambda pair: pair[0], reverse=True)
    return [r for _, r in older[:count]]


def signing_configured() -> bool:
    """A key to sign delta bundles with: in a PKCS#11 token (THEMIS_SIGNING_PKCS11_URI, its
    certificate a file or the token's own), or a PEM key and certificate."""
    if settings.THEMIS_SIGNING_PKCS11_URI:
        return True
    return (
        Path(settings.THEMIS_SIGNING_KEY).is_file() and Path(settings.THEMIS_SIGNING_CERT).is_file()
    )


def _token_signer() -> Pkcs11Signer | None:
    """The delta bundles' signer when the key is in a token; None for the PEM key."""
    if not settings.THEMIS_SIGNING_PKCS11_URI:
        return None
    cert = Path(settings.THEMIS_SIGNING_CERT)
    return Pkcs11Signer(
        settings.THEMIS_SIGNING_PKCS11_URI,
        pin_source=settings.THEMIS_SIGNING_PIN_SOURCE or None,
        cert_path=cert if cert.is_file() else None,
        chain_path=_chain(),
    )


def deltas_wanted(release: Release) -> bool:
    """Whether publishing `release` should start a delta run at all."""
    return settings.THEMIS_DELTA_BASES > 0 and signing_configured() and bool(delta_bases(release))


def deltas_in_progress(release_ids: list[int]) -> set[int]:
    """Releases with a `release.delta_started` Event and no later `..._finished`."""
    ids = [str(pk) for pk in release_ids]
    latest: dict[str, str] = {}
    events = (
        Event.objects.filter(
            object_type="release",
            object_id__in=ids,
            verb__in=["release.delta_started", "release.delta_finished"],
        )
        .order_by("pk")
        .values_list("object_id", "verb")
    )
    for object_id, verb in events:
        latest[object_id] = verb
    return {int(pk) for pk, verb in latest.items() if verb == "release.delta_started"}


def percent_saved(delta_size: int, full_size: int) -> int:
    if full_size <= 0:
        return 0
    return max(0, round(100 * (1 - delta_size / full_size)))


@dataclass(frozen=True)
class _Outcome:
    file: ReleaseFile | None
    reason: str = ""


WORK_PREFIX = ".delta-work-"
STALE_WORK_SECONDS = 6 * 3600


def sweep_stale_work_dirs(*, now: float | None = None) -> list[str]:
    """Scratch folders of delta builds that died with their worker: removed
    once older than any build could run."""
    import shutil
    import time

    cutoff = (now if now is not None else time.time()) - STALE_WORK_SECONDS
    removed = []
    for path in _releases_dir().glob(f"{WORK_PREFIX}*"):
        if path.is_dir() and not path.is_symlink() and path.stat().st_mtime < cutoff:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path.name)
    return removed


def release_deltas_generate(
    *, release_id: int, progress: Progress | None = None
) -> list[ReleaseFile]:
    """Build, sign and store the delta bundles of a release from its recent
    predecessors. Idempotent: a base that already has a delta is left alone.
    Returns the delta ReleaseFiles of the release (new and existing)."""
    release = Release.objects.filter(pk=release_id).first()
    if release is None or not release.artifact:
        log.info("release %s: gone or without artifact; no deltas", release_id)
        return []
    if not signing_configured():
        log.warning(
            "release %s: no signing key/cert (%s, %s); delta bundles skipped",
            release.version,
            settings.THEMIS_SIGNING_KEY,
            settings.THEMIS_SIGNING_CERT,
        )
        return []
    bases = delta_bases(release)
    if not bases:
        return _deltas_of(release)
    event_log(
        verb="release.delta_started",
        obj=release,
        details={"version": release.version, "bases": [b.version for b in bases]},
    )
    summary: dict[str, Any] = {"created": [], "skipped": {}}
    sweep_stale_work_dirs()
    try:
        with tempfile.TemporaryDirectory(prefix=WORK_PREFIX, dir=_releases_dir()) as tmp:
            work = Path(tmp)
            new_dir = _stage(release, work / "new")
            for done, base in enumerate(bases):
                if progress is not None:
                    progress(done, len(bases), base.version)
                outcome = _one(release, base, new_dir, work / f"old-{done}")
                if outcome.file is not None:
                    summary["created"].append(base.version)
                elif outcome.reason:
                    summary["skipped"][base.version] = outcome.reason
            if progress is not None:
                progress(len(bases), len(bases), "")
    except EngineError as err:
        summary["error"] = f"{release.version}: {err}"
        log.warning("release %s: its own bundle failed to verify: %s", release.version, err)
    finally:
        event_log(verb="release.delta_finished", obj=release, details=summary)
    return _deltas_of(release)


def _deltas_of(release: Release) -> list[ReleaseFile]:
    return list(
        ReleaseFile.objects.filter(release=release, kind=ReleaseFile.Kind.DELTA).order_by("pk")
    )


def _releases_dir() -> Path:
    path = Path(settings.MEDIA_ROOT) / "releases"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _stage(release: Release, state_dir: Path) -> Path:
    """Verify `release`'s bundle with the engine and return a directory holding
    its files at their manifest paths."""
    state_dir.mkdir(parents=True)
    verified = verify_bundle(
        Path(release.artifact.path),
        trust_anchor=settings.THEMIS_TRUST_ANCHOR,
        product=settings.THEMIS_PRODUCT,
        state_dir=state_dir,
        stage=True,
    )
    if verified.delta_paths:
        verified.cleanup()
        raise ManifestInvalid(f"{release.version} is itself a delta bundle")
    assert verified.staging_dir is not None
    return verified.staging_dir


def _one(release: Release, base: Release, new_dir: Path, work: Path) -> _Outcome:
    if ReleaseFile.objects.filter(
        release=release, kind=ReleaseFile.Kind.DELTA, base_version=base.version
    ).exists():
        return _Outcome(None)
    try:
        old_dir = _stage(base, work)
    except EngineError as err:
        return _skip(release, base, f"base bundle did not verify: {err}")
    suffix = ".tar.zst" if str(release.artifact.name).endswith(".zst") else ".tar"
    name = f"{release.product}-{release.version}-delta-{base.version}-{uuid.uuid4().hex[:12]}"
    out = _releases_dir() / f"{name}{suffix}"
    try:
        result = create_delta_bundle(
            old_dir,
            new_dir,
            out,
            product=release.product,
            version=release.version,
            key_path=Path(settings.THEMIS_SIGNING_KEY),
            cert_path=Path(settings.THEMIS_SIGNING_CERT),
            chain_path=_chain(),
            signer=_token_signer(),
            expires_days=_expires_days(release),
            extra_manifest={k: v for k, v in release.manifest.items() if k not in _RESERVED},
        )
    except EngineError as err:
        out.unlink(missing_ok=True)
        return _skip(release, base, f"delta bundle could not be built: {err}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    size = out.stat().st_size
    if size >= MAX_DELTA_SHARE * release.size:
        out.unlink(missing_ok=True)
        return _skip(
            release,
            base,
            f"delta of {size} bytes saves too little on the full {release.size} bytes",
            delta_size=size,
        )
    return _Outcome(_store(release, base, out, size, result.delta_paths))


def _store(
    release: Release, base: Release, out: Path, size: int, patched: list[str]
) -> ReleaseFile | None:
    digest = _sha256(out)
    name = str(out.relative_to(settings.MEDIA_ROOT))
    with transaction.atomic():
        if ReleaseFile.objects.filter(
            release=release, kind=ReleaseFile.Kind.DELTA, base_version=base.version
        ).exists():  # another run got there first
            transaction.on_commit(lambda: out.unlink(missing_ok=True))
            return None
        if not Release.objects.filter(pk=release.pk).exists():  # deleted meanwhile
            transaction.on_commit(lambda: out.unlink(missing_ok=True))
            return None
        stored = ReleaseFile.objects.create(
            release=release,
            kind=ReleaseFile.Kind.DELTA,
            base_version=base.version,
            file=name,
            size=size,
            sha256=digest,
        )
        event_log(
            verb="release.delta_created",
            obj=release,
            details={
                "version": release.version,
                "base_version": base.version,
                "full_size": release.size,
                "delta_size": size,
                "percent_saved": percent_saved(size, release.size),
                "patched_files": len(patched),
                "sha256": digest,
            },
        )
    return stored


def _skip(release: Release, base: Release, reason: str, **extra: Any) -> _Outcome:
    log.info("release %s: no delta from %s: %s", release.version, base.version, reason)
    event_log(
        verb="release.delta_skipped",
        obj=release,
        details={
            "version": release.version,
            "base_version": base.version,
            "full_size": release.size,
            "reason": reason[:500],
            **extra,
        },
    )
    return _Outcome(None, reason)


def _chain() -> Path | None:
    chain = Path(settings.THEMIS_SIGNING_CHAIN)
    return chain if chain.is_file() else None


def _expires_days(release: Release) -> int:
    """The delta expires no later than (about) the full bundle does."""
    try:
        expires = datetime.fromisoformat(str(release.manifest.get("expires", "")))
    except ValueError:
        return 90
    if expires.tzinfo is None:
        expires = expires.replace(tzinfo=UTC)
    return max(1, (expires - datetime.now(UTC)).days)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
