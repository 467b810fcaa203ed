"""The node apply engine: pre-flight, lock, stage, restore point, atomic
install, health check, commit; plus rollback, recover and retention.

Public API (used by `themis-update` and by the node agent's Celery task):

    apply_bundle(bundle, target=, state_dir=, trust_anchor=, ...) -> ApplyResult
    rollback(target=, state_dir=, point_id=None, lower_highest=False) -> dict
    recover(target=, state_dir=) -> dict
    list_points(state_dir) -> list[dict];  prune_points(state_dir, keep) -> list[str]
    preflight(bundle, target=, state_dir=) -> PreflightReport   (from .preflight)
    NodeEngine: the HotReloadEngine seam over all of the above

An apply walks the journal states LOCKED -> STAGED -> RESTORE_POINT ->
SWITCHING -> SWITCHED -> VERIFYING -> COMMITTED (see journal.py); the commit
point is marked `# ---- COMMIT POINT ----` below.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import stat
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import journal as J
from .bundle import VerifiedBundle, check_manifest_policy, read_manifest, verify_bundle
from .cms import TrustAnchor, verify_manifest_signature
from .delta_bundle import rebuild_staged_deltas
from .errors import (
    ApplyFailed,
    EngineError,
    HealthCheckFailed,
    MigrationFailed,
    MigrationTampered,
    RecoveryNeeded,
    UsageError,
    VerificationFailed,
)
from .health import DEFAULT_TIMEOUT, HealthResult, run_health_check
from .install import check_target_path, ensure_parents, place_file, remove_file
from .journal import Journal
from .lock import NodeLock
from .manifest import parse_manifest
from .migrate import Migration, MigrationResult
from .point_storage import NewFile
from .preflight import DEFAULT_MIN_MEMORY_MB, PreflightReport, preflight
from .restore import (
    RestorePoint,
    SchemaMark,
    create_point,
    delete_point,
    forget_hashes,
    load_point,
    prune,
    record_hashes,
    restore_to_target,
    sha256_file,
    sweep_partial,
    verify_point,
    verify_points,
)
from .restore import list_points as _list_point_objects
from .retention import Retention, cleanup_points
from .schema import load_migrations, roll_schema_back, run_expand, schema_version
from .state import (
    NodeState,
    fsync_dir,
    load_state,
    record_installed,
    save_state,
    sweep_dead_writers_temps,
    write_json_atomic,
)
from .supervisor import (
    ReloadResult,
    ServiceControlError,
    control_socket,
    reload_service,
    service_base_url,
)
from .truststore import trust_for
from .verify import CheckResult, measure_baselines, run_verification

if TYPE_CHECKING:
    from .bundle import VerifiedBundle
    from .manifest import Manifest

log = logging.getLogger("themis_update.apply")

ProgressFn = Callable[[str, int, dict[str, Any]], None]
# Delta hook (`rebuild_deltas=`; default delta_bundle.rebuild_staged_deltas):
# turn the staged patches of `verified.delta_paths` into full files at their
# manifest paths inside `verified.staging_dir`, reading bases from the target
# (never writing it); returns the paths that fell back to a full file. Called
# at `# ---- DELTA HOOK ----` in _ApplyRun._prepare: after STAGED, after the
# symlink checks, before the restore point, so a failure leaves the target as is.
RebuildDeltas = Callable[["VerifiedBundle", Path], list[str]]

DEFAULT_KEEP = 3
STAGING_DIR = "staging"
# An interrupted apply's complete staging, kept for a re-run of the same bundle.
RESUME_FILE = "staging-resume.json"
PARTS_ORIGIN = "parts"
PERCENT = {
    "PREFLIGHT": 2,
    J.LOCKED: 5,
    J.STAGED: 30,
    J.RESTORE_POINT: 45,
    J.SWITCHING: 50,
    J.SWITCHED: 80,
    J.VERIFYING: 85,
    J.COMMITTED: 100,
    J.ROLLED_BACK: 100,
}


@dataclass
class ApplyResult:
    product: str
    version_from: str | None
    version_to: str
    files_changed: int
    files_added: list[str]
    files_removed: list[str]
    restore_point: str
    files_fallback: list[str]
    linked_files: int  # placed by hardlink from staging: no bytes copied
    pruned_points: list[str]
    durations_ms: dict[str, float]
    recovered: dict[str, Any] | None = None
    health: dict[str, Any] | None = None
    resumed_staging: bool = False
    # The reload onto the new files (with a supervisor), and the bundle's checks.
    service: dict[str, Any] | None = None
    verification: list[dict[str, Any]] = field(default_factory=list)
    # The expand migrations the apply ran, and the schema version after them (None:
    # the bundle has no migrations).
    migrations: list[dict[str, Any]] = field(default_factory=list)
    schema_version: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"ok": True, **asdict(self)}


class _Timer:
    def __init__(self) -> None:
        self.ms: dict[str, float] = {}
        self._start = time.perf_counter()

    @contextmanager
    def __call__(self, step: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.ms[step] = round((time.perf_counter() - start) * 1000, 2)

    def total(self) -> dict[str, float]:
        return {**self.ms, "total": round((time.perf_counter() - self._start) * 1000, 2)}


def _emit(progress: ProgressFn | None, step: str, detail: dict[str, Any]) -> None:
    if progress is None:
        return
    try:
        progress(step, PERCENT.get(step, 0), detail)
    except Exception:  # a broken reporter (broker down) must never break an update
        log.warning("progress callback failed at %s", step, exc_info=True)


# --------------------------------------------------------------------------- apply


def apply_bundle(
    bundle_path: Path | str,
    *,
    target: Path | str,
    state_dir: Path | str,
    trust_anchor: Path | str,
    health_cmd: str | None = None,
    health_url: str | None = None,
    health_timeout: float = DEFAULT_TIMEOUT,
    allow_downgrade: bool = False,
    product: str = "themisdb",
    keep: int = DEFAULT_KEEP,
    min_memory_mb: int = DEFAULT_MIN_MEMORY_MB,
    progress: ProgressFn | None = None,
    rebuild_deltas: RebuildDeltas | None = None,
    verify_url: str | None = None,
    database_url: str | None = None,
    components: Mapping[str, str] | None = None,
) -> ApplyResult:
    """Verify, back up and atomically install a bundle; roll back on failure.

    Raises an EngineError whose exit code is the CLI's: 20 pre-flight, 21 lock
    held, 10-13 bundle rejected, 22 restore point failed (target untouched),
    23 apply failed and rolled back, 24 health check failed (or the reloaded service
    never got ready) and rolled back, 26 post-update verification failed, rolled back,
    27 a schema migration failed (schema, files and service rolled back), 28 a migration
    already applied here comes with another checksum (nothing changed).

    The bundle's `expand` migrations run on the node database (`database_url`, default
    `schema.node_database_url`) after the switch and before the reload.

    The manifest's `dependencies` are checked in pre-flight against the node's other
    components: `components` (product -> installed version) and those the state dir
    records; an unmet one is DependencyUnmet (exit 20) before anything is written.

    With a service supervisor in `state_dir` (`themis-update service run`), the new
    files are served by a new process (reload) before the health check; a rollback
    reloads the old files again. `verify_url` is the service's base URL for the
    bundle's HTTP checks (default: the supervisor's first listening address).
    """
    run = _ApplyRun(
        bundle=Path(bundle_path),
        target=Path(target),
        state_dir=Path(state_dir),
        # The node's installed trust store, when it has one, stands for the bootstrap
        # anchor (updates.engine.truststore).
        trust_anchor=trust_for(Path(state_dir), Path(trust_anchor)),
        health_cmd=health_cmd,
        health_url=health_url,
        health_timeout=health_timeout,
        allow_downgrade=allow_downgrade,
        product=product,
        keep=keep,
        min_memory_mb=min_memory_mb,
        progress=progress,
        rebuild_deltas=rebuild_deltas,
        verify_url=verify_url,
        database_url=database_url,
        components=dict(components or {}),
    )
    return run.execute()


@dataclass
class _ApplyRun:
    bundle: Path
    target: Path
    state_dir: Path
    trust_anchor: TrustAnchor
    health_cmd: str | None
    health_url: str | None
    health_timeout: float
    allow_downgrade: bool
    product: str
    keep: int
    min_memory_mb: int
    progress: ProgressFn | None
    rebuild_deltas: RebuildDeltas | None
    verify_url: str | None = None
    database_url: str | None = None
    components: dict[str, str] = field(default_factory=dict)
    timer: _Timer = field(default_factory=_Timer)
    journal: Journal | None = None
    verified: VerifiedBundle | None = None
    point: RestorePoint | None = None
    current: str = ""  # the path being changed, named in an ApplyFailed message
    _linked: int = 0
    _resumed: bool = False
    # The supervisor's control socket (None: no supervisor), and what the reload did.
    _service_socket: Path | None = None
    _reloaded: ReloadResult | None = None
    _service_url: str | None = None
    _checks: list[CheckResult] = field(default_factory=list)
    # The bundle's migrations, the schema version found before (None: no migrations
    # in the bundle), and what the migrate step did.
    _migrations: tuple[Migration, ...] = ()
    _schema_from: SchemaMark | None = None
    _migrated: list[MigrationResult] = field(default_factory=list)
    _schema_after: str | None = None

    def execute(self) -> ApplyResult:
        with self.timer("preflight"):
            report = preflight(
                self.bundle,
                target=self.target,
                state_dir=self.state_dir,
                min_memory_mb=self.min_memory_mb,
                components=self.components,
            )
        _emit(self.progress, "PREFLIGHT", {"ok": report.ok, "checks": len(report.checks)})
        report.raise_if_failed()  # exit 20: nothing written yet
        with self.timer("lock"):
            lock = NodeLock(self.state_dir, command="apply").acquire()
        try:
            with self.timer("recover"):
                recovered = recover_locked(self.target, self.state_dir)
            result = self._locked()
            result.recovered = recovered if recovered["action"] != "none" else None
            return result
        finally:
            lock.release()

    def _advance(self, state: str, **fields: Any) -> None:
        assert self.journal is not None
        self.journal.advance(state, **fields)
        detail = {k: v for k, v in fields.items() if isinstance(v, str | int | None)}
        _emit(self.progress, state, {"txid": self.journal.txid, **detail})

    def _locked(self) -> ApplyResult:
        before = load_state(self.state_dir)
        self.journal = Journal.begin(
            self.state_dir,
            "apply",
            target=str(self.target.absolute()),
            bundle=str(self.bundle),
            keep=self.keep,
            product=self.product,
            version_from=before.installed_version,
            staging_before=_staging_entries(self.state_dir),
        )
        _emit(self.progress, J.LOCKED, {"txid": self.journal.txid})
        try:
            fallback = self._prepare(before)
        except BaseException:
            self._abort()
            raise
        manifest = self._manifest
        self._service_socket = control_socket(self.state_dir)
        # Asked once: the supervisor's address does not change during the apply.
        self._service_url = self._base_url()
        baselines = measure_baselines(self._service_url, manifest.verify)
        health = self._switch_and_verify(baselines)
        # ---- COMMIT POINT ----
        # Durable COMMITTED means: keep the new version. A crash before this line
        # (health check included) is undone by recover; after it, recover finishes.
        self._advance(J.COMMITTED)
        with self.timer("commit"):
            pruned = _finish_commit(self.journal, self.state_dir, manifest)
        assert self.point is not None
        return ApplyResult(
            product=manifest.product,
            version_from=before.installed_version,
            version_to=manifest.version,
            files_changed=len(manifest.files),
            files_added=list(self.point.absent),
            files_removed=[f.path for f in self.point.files if f.path in manifest.remove],
            restore_point=self.point.id,
            files_fallback=fallback,
            linked_files=self._linked,
            pruned_points=pruned,
            durations_ms=self.timer.total(),
            health=asdict(health) if health else None,
            resumed_staging=self._resumed,
            service=self._reloaded.to_json() if self._reloaded else None,
            verification=[check.to_dict() for check in self._checks],
            migrations=[result.to_dict() for result in self._migrated],
            schema_version=self._schema_after,
        )

    @property
    def _manifest(self) -> Manifest:
        assert self.verified is not None
        return self.verified.manifest

    def _prepare(self, before: NodeState) -> list[str]:
        """Everything before the first change to the target: stage, deltas,
        path checks, restore point. A failure here leaves the target untouched."""
        record = _read_resume(self.state_dir)
        # A staging handed over by a parts fetch is no interrupted apply's leftover.
        resumable = record is not None and record.get("origin") != PARTS_ORIGIN
        with self.timer("stage"):
            self.verified = _verify_and_stage(self)
        self._resumed = resumable and _read_resume(self.state_dir) is not None
        manifest = self._manifest
        self._advance(
            J.STAGED,
            staging_dir=str(self.verified.staging_dir),
            manifest_sha256=hashlib.sha256(self.verified.manifest_bytes).hexdigest(),
            version_to=manifest.version,
        )
        _drop_resume(self.state_dir, keep_staging=True)  # the journal owns it now
        # Exit 11 on a symlink in the target; before the delta hook reads any base.
        for rel in (*(f.path for f in manifest.files), *manifest.remove):
            check_target_path(self.target, rel)
        self._read_migrations()
        fallback: list[str] = []
        if self.verified.delta_paths:
            # ---- DELTA HOOK ---- (see RebuildDeltas above)
            with self.timer("deltas"):
                fallback = (self.rebuild_deltas or _default_rebuild_deltas)(
                    self.verified, self.target
                )
        with self.timer("restore_point"):
            self.point = create_point(
                self.target,
                self.state_dir,
                replaced=[f.path for f in manifest.files],
                removed=list(manifest.remove),
                version=before.installed_version,
                to_version=manifest.version,
                product=manifest.product,
                txid=self._txid,
                schema=self._schema_from,
                new_files=self._staged_files(),
            )
        self._advance(J.RESTORE_POINT, point_id=self.point.id)
        return fallback

    def _staged_files(self) -> dict[str, NewFile]:
        """The files the switch will put in place (staged, verified), for a lean point."""
        assert self.verified is not None and self.verified.staging_dir is not None
        staging = Path(self.verified.staging_dir)
        return {f.path: NewFile(staging / f.path, f.sha256, f.size) for f in self._manifest.files}

    def _read_migrations(self) -> None:
        """Parse the bundle's migrations (exit 12 on a bad one) and note the schema
        version they start from, before anything changes."""
        assert self.verified is not None and self.verified.staging_dir is not None
        if not self._manifest.migrations:
            return
        self._migrations = load_migrations(self._manifest, Path(self.verified.staging_dir))
        self._schema_from = SchemaMark(schema_version(self.state_dir, self.database_url))

    def _migrate(self) -> None:
        """The bundle's expand migrations, on the switched files' behalf, before the
        new code is started on them. A failure was undone by the migrator already."""
        if not self._migrations:
            return
        _emit(self.progress, "MIGRATING", {"migrations": len(self._migrations)})
        with self.timer("migrate"):
            self._migrated, self._schema_after = run_expand(
                self._migrations, self.state_dir, self.database_url
            )
        _emit(self.progress, "MIGRATED", {"applied": len(self._migrated)})

    @property
    def _txid(self) -> str:
        assert self.journal is not None
        return self.journal.txid

    def _switch_and_verify(self, baselines: dict[str, float]) -> HealthResult | None:
        self._advance(J.SWITCHING)
        try:
            with self.timer("switch"):
                self._linked = self._switch()
            self._advance(J.SWITCHED)
            self._migrate()
            self._advance(J.VERIFYING)
            self._reload_service()
            health = None
            if self.health_cmd or self.health_url:
                with self.timer("health"):
                    health = self._health()
                if not health.ok:
                    raise _HealthFailure(health.detail)
            self._verify(baselines)
        except _HealthFailure as failure:
            self._undo()
            raise HealthCheckFailed(f"{failure}; rolled back to {self._old_version}") from None
        except _VerifyFailure as failure:
            self._undo()
            error = VerificationFailed(f"{failure}; rolled back to {self._old_version}")
            error.details = {"verification": [check.to_dict() for check in self._checks]}
            raise error from None
        except MigrationTampered:
            self._undo()
            raise
        except MigrationFailed as failure:
            self._undo()
            raise MigrationFailed(f"{failure}; rolled back to {self._old_version}") from None
        except BaseException as exc:
            self._undo()
            if not isinstance(exc, Exception):
                raise
            where = self.current or "apply"
            raise ApplyFailed(
                f"{where}: {_describe(exc)}; rolled back to {self._old_version}"
            ) from exc
        return health

    @property
    def _old_version(self) -> str:
        return str(self.point.version if self.point else None)

    def _switch(self) -> int:
        """Put every file in place, then remove what the bundle removes."""
        assert self.verified is not None and self.verified.staging_dir is not None
        staging = Path(self.verified.staging_dir)
        self.target.mkdir(parents=True, exist_ok=True)
        linked = 0
        for entry in self._manifest.files:
            self.current = entry.path
            ensure_parents(self.target, entry.path)
            dest = self.target / entry.path
            # Staged files are ours alone: hardlink them in (no copy) when the
            # state dir shares the target's filesystem.
            linked += place_file(staging / entry.path, dest, entry.mode, self._txid, link=True)
        for rel in self._manifest.remove:
            self.current = rel
            remove_file(self.target, rel)  # the restore point holds its bytes
        self.current = ""
        return linked

    def _base_url(self) -> str | None:
        if self.verify_url:
            return self.verify_url.rstrip("/")
        if self._service_socket is None:
            return None
        return service_base_url(self._service_socket)

    def _reload_service(self) -> None:
        """The new files served by a new process, before anything checks them."""
        if self._service_socket is None:
            return
        with self.timer("reload"):
            try:
                result = reload_service(self._service_socket, timeout=self.health_timeout)
            except ServiceControlError as err:
                raise _HealthFailure(f"service reload: {err}") from None
        _emit(self.progress, "RELOADED", result.to_json())
        if not result.ok:
            # The old process was never stopped: it serves on, and the files go back.
            raise _HealthFailure(f"service reload: {result.error}")
        self._reloaded = result

    def _verify(self, baselines: dict[str, float]) -> None:
        spec = self._manifest.verify
        if spec.empty:
            return
        with self.timer("verify"):
            # Smoke commands run in the install dir, on the files they check.
            self._checks = run_verification(
                spec,
                base_url=self._service_url,
                env=self._check_env(),
                baselines=baselines,
                cwd=self.target,
            )
        failed = [check for check in self._checks if not check.ok]
        _emit(self.progress, "VERIFIED", {"checks": len(self._checks), "failed": len(failed)})
        if failed:
            names = ", ".join(f"{check.name} ({check.detail})" for check in failed[:3])
            raise _VerifyFailure(f"verification failed: {names}")

    def _check_env(self) -> dict[str, str]:
        return {
            "THEMIS_TARGET": str(self.target.absolute()),
            "THEMIS_VERSION": self._manifest.version,
            "THEMIS_VERSION_FROM": str(self.point.version if self.point else ""),
        }

    def _health(self) -> HealthResult:
        return run_health_check(
            cmd=self.health_cmd,
            url=self.health_url,
            timeout=self.health_timeout,
            env=self._check_env(),
        )

    def _undo(self) -> None:
        """Automatic rollback after the first change (exit 23/24 follow)."""
        assert self.journal is not None and self.point is not None
        if self.point.schema is not None:
            roll_schema_back(self.point.schema.version, self.state_dir, self.database_url)
        try:
            restore_to_target(self.point, self.target, f"undo-{self._txid}")
            _discard_apply(self.journal, self.state_dir)
        except Exception as exc:
            raise RecoveryNeeded(
                f"rollback after a failed apply did not finish ({_describe(exc)});"
                f" the journal is kept: run `themis-update recover`"
            ) from exc
        if self._reloaded is not None and self._service_socket is not None:
            # The new version was serving: the old files get a process of their own again.
            back = _reload_quietly(self._service_socket, self.health_timeout)
            _emit(self.progress, "RELOADED", back)
        _emit(self.progress, J.ROLLED_BACK, {"txid": self._txid, "version": self.point.version})

    def _abort(self) -> None:
        """Failure before the first change: drop staging and the point, close."""
        if self.journal is None:
            return
        try:
            _discard_apply(self.journal, self.state_dir, outcome=J.ABORTED)
        except Exception:  # the original error matters more; recover will retry
            log.warning("cleanup after a rejected apply failed", exc_info=True)


class _HealthFailure(Exception):
    pass


class _VerifyFailure(Exception):
    pass


def _describe(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.strerror} ({exc.filename})" if exc.filename else exc.strerror
    return str(exc) or type(exc).__name__


def _default_rebuild_deltas(verified: VerifiedBundle, target: Path) -> list[str]:
    """Rebuild from the installed bases, no full-file fallback (the node agent
    passes `delta_bundle.delta_rebuilder(fetch)` when it has one)."""
    return rebuild_staged_deltas(verified, target)


def _verify_and_stage(run: _ApplyRun) -> VerifiedBundle:
    """Signature, paths, version rule and payload into staging (exit 10-13);
    reuses the staging of the same manifest left by an interrupted apply."""

    resumed = _resume_staging(run)
    if resumed is not None:
        return resumed
    _drop_resume(run.state_dir)
    return verify_bundle(
        run.bundle,
        trust_anchor=run.trust_anchor,
        product=run.product,
        state_dir=run.state_dir,
        allow_downgrade=run.allow_downgrade,
        stage=True,
    )


def _resume_staging(run: _ApplyRun) -> VerifiedBundle | None:
    """The staged payload of an interrupted apply of the very same manifest.

    The signature and policy are checked again (the anchor or the clock may
    have changed) and every staged file is re-hashed: staging is not fsynced,
    so after a power loss it may hold anything.
    """

    record = _read_resume(run.state_dir)
    if record is None:
        return None
    manifest_bytes, signature = read_manifest(run.bundle)
    if hashlib.sha256(manifest_bytes).hexdigest() != record.get("manifest_sha256"):
        return None
    staging = Path(str(record.get("staging_dir")))
    if staging.parent != _staging_root(run.state_dir) or not staging.is_dir():
        return None
    signer = verify_manifest_signature(manifest_bytes, signature, run.trust_anchor)
    manifest = parse_manifest(manifest_bytes)
    check_manifest_policy(
        manifest, product=run.product, state_dir=run.state_dir, allow_downgrade=run.allow_downgrade
    )
    patches = set()
    for entry in manifest.files:
        staged = staging / entry.path
        if entry.delta and _staged_ok(staged, entry.payload_size, entry.payload_sha256):
            patches.add(entry.path)  # still a patch: rebuild it again
        elif not _staged_ok(staged, entry.size, entry.sha256):  # full, or rebuilt
            return None
    log.info("resuming from staged payload %s", staging)
    return VerifiedBundle(
        manifest=manifest,
        manifest_bytes=manifest_bytes,
        signer=signer,
        staging_dir=staging,
        delta_paths=frozenset(patches),
    )


def _staged_ok(path: Path, size: int, sha256: str) -> bool:

    try:
        st = os.lstat(path)
        return stat.S_ISREG(st.st_mode) and st.st_size == size and sha256_file(path) == sha256
    except OSError:
        return False


def _read_resume(state_dir: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((Path(state_dir) / RESUME_FILE).read_bytes())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _drop_resume(state_dir: Path, *, keep_staging: bool = False) -> None:
    record = _read_resume(state_dir)
    if record is None:
        return
    staging = Path(str(record.get("staging_dir")))
    if not keep_staging and staging.parent == _staging_root(state_dir):
        shutil.rmtree(staging, ignore_errors=True)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(Path(state_dir) / RESUME_FILE)
    fsync_dir(state_dir)


def adopt_resumable_staging(state_dir: Path, manifest_bytes: bytes, staging_dir: Path) -> None:
    """Hand a complete staging of `manifest_bytes` (delivery by parts, engine.parts) to the
    next apply of that manifest, which takes it as it takes an interrupted apply's staging:
    signature and policy checked again and every staged file re-hashed before any use."""
    state_dir, staging_dir = Path(state_dir), Path(staging_dir)
    if staging_dir.parent != _staging_root(state_dir) or not staging_dir.is_dir():
        raise UsageError(f"staging: {staging_dir} is not a staging dir of {state_dir}")
    record = _read_resume(state_dir)
    if record is not None and record.get("staging_dir") != str(staging_dir):
        _drop_resume(state_dir)  # an older interrupted apply's staging: superseded
    sha = hashlib.sha256(manifest_bytes).hexdigest()
    record = {"manifest_sha256": sha, "staging_dir": str(staging_dir), "origin": PARTS_ORIGIN}
    write_json_atomic(state_dir / RESUME_FILE, record)


def drop_resumable_staging(state_dir: Path, staging_dir: Path) -> None:
    """Remove a staging handed over with adopt_resumable_staging if no apply took it."""
    record = _read_resume(Path(state_dir))
    if record is not None and record.get("staging_dir") == str(staging_dir):
        _drop_resume(Path(state_dir))


def _keep_for_resume(journal: Journal, state_dir: Path) -> bool:
    """After a crash, keep the complete staging for the next identical apply."""
    staging, sha = journal.get("staging_dir"), journal.get("manifest_sha256")
    if not staging or not sha or not Path(staging).is_dir():
        return False
    _drop_resume(state_dir)
    record = {"manifest_sha256": sha, "staging_dir": staging, "txid": journal.txid}
    write_json_atomic(Path(state_dir) / RESUME_FILE, record)
    return True


# ------------------------------------------------------------- commit / discard


def _staging_root(state_dir: Path) -> Path:
    return Path(state_dir) / STAGING_DIR


def _staging_entries(state_dir: Path) -> list[str]:
    try:
        return sorted(os.listdir(_staging_root(state_dir)))
    except FileNotFoundError:
        return []


def _drop_staging(journal: Journal, state_dir: Path) -> None:
    """Delete this operation's staging dir (or, if it never got recorded, the
    staging entries that appeared since the journal began)."""
    root = _staging_root(state_dir)
    recorded = journal.get("staging_dir")
    if recorded:
        doomed = [Path(recorded)]
    else:
        before = set(journal.get("staging_before") or [])
        doomed = [root / name for name in _staging_entries(state_dir) if name not in before]
    for path in doomed:
        if path.parent == root:  # never follow a journal outside the state dir
            shutil.rmtree(path, ignore_errors=True)


def _finish_commit(
    journal: Journal, state_dir: Path, manifest: Manifest | None = None
) -> list[str]:
    """After the commit point; idempotent, so recover can run it again."""
    record_installed(state_dir, journal.get("version_to"), journal.get("product"))
    pruned = prune(
        state_dir, int(journal.get("keep", DEFAULT_KEEP)), protect=[journal.get("point_id")]
    )
    _drop_staging(journal, state_dir)  # before the stats below: unlinking changes ctime
    if manifest is not None:
        installed = [(f.path, f.sha256) for f in manifest.files]
        record_hashes(state_dir, Path(journal.get("target")), installed, manifest.remove)
    else:  # finished by recover: the manifest is gone, so hash afresh next time
        forget_hashes(state_dir)
    journal.close(J.DONE)
    return pruned


def _discard_apply(
    journal: Journal, state_dir: Path, outcome: str = J.ROLLED_BACK, *, resumable: bool = False
) -> None:
    """The target is at the old version: drop this apply's point and staging
    (or keep the staging for a re-run of the same bundle)."""
    for point in _list_point_objects(state_dir):
        if point.txid == journal.txid:
            delete_point(state_dir, point.id)
    sweep_partial(state_dir)
    if not (resumable and _keep_for_resume(journal, state_dir)):
        _drop_staging(journal, state_dir)
    journal.close(outcome)


# ---------------------------------------------------------------------- recover


def recover(*, target: Path | str, state_dir: Path | str) -> dict[str, Any]:
    """Finish or undo an operation a crash interrupted (exit 21 while locked); a
    supervised service is reloaded onto what recovery left, so it runs those files."""
    with NodeLock(Path(state_dir), command="recover"):
        result = recover_locked(Path(target), Path(state_dir))
        if result["action"] != "none":
            result["service"] = _reload_after_restore(Path(state_dir), _Timer())
        return result


def _reload_after_restore(state_dir: Path, timer: _Timer) -> dict[str, Any] | None:
    """Files went back (rollback, recovery): a supervised service runs them again. If the
    restored version does not get ready, the supervisor keeps what serves and the
    answer says so (the files are already whole; nothing else to undo)."""
    socket_path = control_socket(state_dir)
    if socket_path is None:
        return None
    with timer("reload"):
        return _reload_quietly(socket_path, DEFAULT_TIMEOUT)


def recover_locked(target: Path, state_dir: Path) -> dict[str, Any]:
    """`recover` for a caller that already holds the lock."""
    if not Path(state_dir).is_dir():
        return {"action": "none"}
    sweep_dead_writers_temps(Path(state_dir))
    sweep_partial(state_dir)
    journal = Journal.load(state_dir)
    if journal is None:
        return {"action": "none"}
    recorded = journal.get("target")
    if recorded and os.path.realpath(recorded) != os.path.realpath(target):
        raise UsageError(
            f"target: the pending journal in {state_dir} belongs to {recorded}, not {target}"
        )
    if journal.op == "rollback":
        return _recover_rollback(journal, target, state_dir)
    return _recover_apply(journal, target, state_dir)


def _recover_apply(journal: Journal, target: Path, state_dir: Path) -> dict[str, Any]:
    state = journal.state
    summary = {"op": "apply", "txid": journal.txid, "interrupted_in": state}
    if state == J.COMMITTED:
        _finish_commit(journal, state_dir)
        return {"action": "finished", "version": journal.get("version_to"), **summary}
    if state in J.TARGET_TOUCHED:
        point = load_point(state_dir, journal.get("point_id"))
        verify_point(point, target)  # exit 25, journal kept: never restore from bad bytes
        if point.schema is not None:
            # The old code must not start on the new schema: schema first, then files.
            roll_schema_back(point.schema.version, state_dir)
        restore_to_target(point, target, f"undo-{journal.txid}")
    _discard_apply(journal, state_dir, resumable=True)
    return {"action": "undone", "version": journal.get("version_from"), **summary}


# --------------------------------------------------------------------- rollback


def rollback(
    *,
    target: Path | str,
    state_dir: Path | str,
    point_id: str | None = None,
    lower_highest: bool = False,
    progress: ProgressFn | None = None,
) -> dict[str, Any]:
    """Return the target to a restore point (default: the one made before the
    installed version). Every point on the way is checked first (exit 25)."""
    target, state_dir = Path(target), Path(state_dir)
    timer = _Timer()
    with NodeLock(state_dir, command="rollback"):
        recovered = recover_locked(target, state_dir)
        before = load_state(state_dir)
        chain = _rollback_chain(state_dir, before.installed_version, point_id)
        with timer("verify"):
            verify_points(chain, target)
        journal = Journal.begin(
            state_dir,
            "rollback",
            target=str(target.absolute()),
            points=[p.id for p in chain],
            version_from=before.installed_version,
            version_to=chain[-1].version,
            lower_highest=lower_highest,
        )
        _emit(progress, J.LOCKED, {"txid": journal.txid})
        journal.advance(J.SWITCHING)
        _emit(progress, J.SWITCHING, {"txid": journal.txid})
        with timer("restore"):
            _run_rollback(journal, target, state_dir)
        _emit(progress, J.COMMITTED, {"txid": journal.txid})
        service = _reload_after_restore(state_dir, timer)
    return {
        "ok": True,
        "version_from": before.installed_version,
        "version_to": chain[-1].version,
        "points": [p.id for p in chain],
        "files_restored": sum(len(p.files) for p in chain),
        "files_deleted": sum(len(p.absent) for p in chain),
        "recovered": recovered if recovered["action"] != "none" else None,
        "durations_ms": timer.total(),
        "service": service,
    }


def _rollback_chain(
    state_dir: Path, installed: str | None, point_id: str | None
) -> list[RestorePoint]:
    """Points to restore, newest first: each undoes one update, so going back
    several versions means undoing each of them in turn."""
    newest_first = list(reversed(_list_point_objects(state_dir)))
    if point_id is not None and point_id not in {p.id for p in newest_first}:
        if (Path(state_dir) / "points" / point_id).is_dir():
            load_point(state_dir, point_id)  # exit 25: it exists but is unreadable
        raise UsageError(f"point: no restore point {point_id!r} in {state_dir}")
    chain: list[RestorePoint] = []
    version = installed
    for point in newest_first:
        if point.to_version != version or version is None:
            continue
        chain.append(point)
        version = point.version
        if point_id is None or point.id == point_id:
            return chain
    wanted = f"point {point_id!r}" if point_id else "a restore point"
    raise UsageError(
        f"point: {wanted} leading back from installed version {installed} not found in {state_dir}"
    )


def _run_rollback(journal: Journal, target: Path, state_dir: Path) -> None:
    """Restore every point of the chain, then record the version. Idempotent as
    a whole: recover runs it again after a crash. Each restored point is recorded in
    the journal (`restored`), and a re-run goes on from the first point not recorded:
    replaying a newer point over files an older one already restored could not work
    for a delta (its base would be gone), and is needless for the rest."""
    points = [load_point(state_dir, point_id) for point_id in journal.get("points")]
    marks = [point.schema for point in points if point.schema is not None]
    if marks:
        # The oldest update in the chain that migrated: its schema is the one to return to.
        roll_schema_back(marks[-1].version, state_dir)
    restored = list(journal.get("restored") or [])
    try:
        for point in points:
            if point.id in restored:
                continue
            restore_to_target(point, target, f"rb-{journal.txid}")
            restored.append(point.id)
            journal.advance(J.SWITCHING, restored=restored)
    except Exception as exc:
        raise RecoveryNeeded(
            f"rollback did not finish ({_describe(exc)}); run `themis-update recover`"
        ) from exc
    journal.advance(J.SWITCHED)
    forget_hashes(state_dir)
    _record_rolled_back(state_dir, journal.get("version_to"), bool(journal.get("lower_highest")))
    journal.advance(J.COMMITTED)
    journal.close(J.DONE)


def _record_rolled_back(state_dir: Path, version: str | None, lower_highest: bool) -> None:
    state = load_state(state_dir)
    state.installed_version = version
    if lower_highest:
        state.highest_version = version
    save_state(state_dir, state)


def _recover_rollback(journal: Journal, target: Path, state_dir: Path) -> dict[str, Any]:
    state = journal.state
    summary = {"op": "rollback", "txid": journal.txid, "interrupted_in": state}
    if state == J.LOCKED:
        journal.close(J.ABORTED)  # nothing was restored yet
        return {"action": "undone", "version": journal.get("version_from"), **summary}
    if state == J.COMMITTED:
        journal.close(J.DONE)
    else:
        restored = set(journal.get("restored") or [])
        remaining = [load_point(state_dir, p) for p in journal.get("points") if p not in restored]
        verify_points(remaining, target)
        _run_rollback(journal, target, state_dir)
    return {"action": "finished", "version": journal.get("version_to"), **summary}


# -------------------------------------------------------------------- retention


def list_points(state_dir: Path | str) -> list[dict[str, Any]]:
    """Restore points, oldest first, as JSON-ready dicts."""
    return [p.summary() for p in _list_point_objects(Path(state_dir))]


def prune_points(
    state_dir: Path | str,
    keep: int | None = DEFAULT_KEEP,
    *,
    max_age: float | None = None,
    max_bytes: int | None = None,
) -> list[str]:
    """Retention under the lock (retention.cleanup_points): all but the newest `keep`,
    those older than `max_age` seconds, then the oldest until the points hold at most
    `max_bytes`; never a point a pending journal or a rollback of the installed
    version needs."""
    return cleanup_points(state_dir, Retention(keep, max_age, max_bytes))


# ------------------------------------------------------------------ the seam


class NodeEngine:
    """HotReloadEngine (protocols.py) for one node: a target and a state dir."""

    def __init__(
        self,
        target: Path | str,
        state_dir: Path | str,
        trust_anchor: Path | str,
        *,
        product: str = "themisdb",
        keep: int = DEFAULT_KEEP,
        progress: ProgressFn | None = None,
        rebuild_deltas: RebuildDeltas | None = None,
        **defaults: Any,
    ) -> None:
        self.target = Path(target)
        self.state_dir = Path(state_dir)
        self.trust_anchor = Path(trust_anchor)
        self.product = product
        self.keep = keep
        self.progress = progress
        self.rebuild_deltas = rebuild_deltas
        self.defaults = defaults  # e.g. health_cmd, health_url, health_timeout

    def apply(self, bundle: Path, **options: Any) -> Mapping[str, Any]:
        kwargs = {
            "target": self.target,
            "state_dir": self.state_dir,
            "trust_anchor": self.trust_anchor,
            "product": self.product,
            "keep": self.keep,
            "progress": self.progress,
            "rebuild_deltas": self.rebuild_deltas,
            **self.defaults,
            **options,
        }
        return apply_bundle(bundle, **kwargs).to_dict()

    def rollback(self, point_id: str | None = None) -> Mapping[str, Any]:
        return rollback(
            target=self.target, state_dir=self.state_dir, point_id=point_id, progress=self.progress
        )

    def recover(self) -> Mapping[str, Any]:
        return recover(target=self.target, state_dir=self.state_dir)

    def list_restore_points(self) -> Sequence[Mapping[str, Any]]:
        return list_points(self.state_dir)

    def dry_run(self, bundle: Path) -> Mapping[str, Any]:
        """Pre-flight plus full verification, nothing staged or installed."""

        report: PreflightReport = preflight(bundle, target=self.target, state_dir=self.state_dir)
        verified = verify_bundle(
            bundle,
            trust_anchor=trust_for(self.state_dir, self.trust_anchor),
            product=self.product,
            state_dir=self.state_dir,
        )
        manifest = verified.manifest
        return {
            "ok": report.ok,
            "preflight": report.to_dict(),
            "version_from": load_state(self.state_dir).installed_version,
            "version_to": manifest.version,
            "signer": verified.signer,
            "files": [f.path for f in manifest.files],
            "remove": list(manifest.remove),
        }


__all__ = [
    "ApplyResult",
    "EngineError",
    "NodeEngine",
    "PreflightReport",
    "apply_bundle",
    "list_points",
    "preflight",
    "prune_points",
    "recover",
    "rollback",
]


def _reload_quietly(socket_path: Path, timeout: float) -> dict[str, Any]:
    """A reload whose failure must not hide the error being reported: logged, returned."""
    try:
        result = reload_service(socket_path, timeout=timeout).to_json()
    except ServiceControlError as err:
        result = {"ok": False, "error": str(err)}
    if not result.get("ok"):
        log.error("service reload after restoring the files failed: %s", result.get("error"))
    return result
