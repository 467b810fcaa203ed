"""Pre-flight: will this bundle fit and run here? Checked before anything is
written (exit 20), from the manifest alone so it stays in the ~10 ms range:

- free space on the filesystems of the target and of the state dir for what the
  update will write there, sized from the manifest, not the bundle file (a bundle may
  be compressed, a delta, or only a manifest whose files arrived by parts):
  the unpacked files (manifest sizes) staged in the state dir, plus a delta bundle's
  patches next to them, less what a resumable staging of this manifest already holds;
  plus the restore point, at most the sizes of the files the update replaces or
  removes (less those the last commit installed with the very bytes the bundle
  brings: the point links them for free); plus, on a target on another filesystem,
  the new files again (they are copied in, not linked),
- available memory above a floor,
- manifest `dependencies` against the node's installed components: those the state
  dir records (NodeState.components), and those the caller names (the agent: every
  component of the node with the version installed). A miss is DependencyUnmet.

The manifest is read but not trusted here: nothing is decided from it except
whether to stop early. The signature is verified by apply before any change.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import time
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from packaging.version import InvalidVersion, Version

from .bundle import read_manifest
from .errors import DependencyUnmet, PreflightFailed
from .manifest import Dependency, Manifest, parse_manifest
from .restore import _stat_key, load_hash_cache
from .state import load_state

DEFAULT_MIN_MEMORY_MB = 64
MB = 1 << 20
# apply.RESUME_FILE and apply.STAGING_DIR (apply imports this module, not the reverse).
RESUME_FILE = "staging-resume.json"
STAGING_DIR = "staging"
# The name of a dependency's check: this prefix and the product.
DEPENDENCY_CHECK = "dependency:"


@dataclass
class Check:
    name: str
    ok: bool
    value: Any  # the measured figure
    threshold: Any  # what it had to meet
    unit: str = ""
    detail: str = ""


@dataclass
class PreflightReport:
    ok: bool
    bundle: str
    bundle_size: int
    product: str
    version: str
    checks: list[Check] = field(default_factory=list)
    duration_ms: float = 0.0
    # What the disk checks asked for, in bytes (DiskNeed).
    disk: dict[str, int] = field(default_factory=dict)

    def failures(self) -> list[Check]:
        return [c for c in self.checks if not c.ok]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def raise_if_failed(self) -> None:
        """DependencyUnmet when a dependency failed (named first: it will not pass on a
        retry, unlike a full disk), else PreflightFailed; both exit 20."""
        failed = self.failures()
        if not failed:
            return
        unmet = [c for c in failed if c.name.startswith(DEPENDENCY_CHECK)]
        first = (unmet or failed)[0]
        more = f" (+{len(failed) - 1} more)" if len(failed) > 1 else ""
        error = DependencyUnmet if unmet else PreflightFailed
        raise error(f"{first.name}: {first.detail}{more}")


def preflight(
    bundle_path: Path,
    *,
    target: Path,
    state_dir: Path,
    min_memory_mb: int = DEFAULT_MIN_MEMORY_MB,
    components: Mapping[str, str] | None = None,
    manifest: Manifest | None = None,
) -> PreflightReport:
    """Run every check and return the report; never writes anything. `components`
    (product -> installed version) adds to what the state dir records."""
    start = time.perf_counter()
    bundle_path = Path(bundle_path)
    bundle_size = os.stat(bundle_path).st_size
    manifest_sha256 = None
    if manifest is None:
        manifest_bytes, _signature = read_manifest(bundle_path)
        manifest = parse_manifest(manifest_bytes)
        manifest_sha256 = hashlib.sha256(manifest_bytes).hexdigest()
    state = load_state(Path(state_dir))
    # Named by the caller wins: it knows the node's components as they are now.
    components = {**state.components, **(components or {})}
    need = disk_need(manifest, Path(target), Path(state_dir), manifest_sha256)
    checks = [
        *_disk_checks(need, Path(target), Path(state_dir)),
        _memory_check(min_memory_mb),
        *dependency_checks(manifest.dependencies, components),
        *_min_version_check(manifest.min_version, state.installed_version),
    ]
    return PreflightReport(
        ok=all(c.ok for c in checks),
        bundle=str(bundle_path),
        bundle_size=bundle_size,
        product=manifest.product,
        version=manifest.version,
        checks=checks,
        duration_ms=round((time.perf_counter() - start) * 1000, 2),
        disk=asdict(need),
    )


def read_bundle_manifest(bundle_path: Path) -> Manifest:
    """The manifest only (the payload is not read)."""

    manifest_bytes, _signature = read_manifest(Path(bundle_path))
    return parse_manifest(manifest_bytes)


def _existing(path: Path) -> Path:
    # A first install may name a target that does not exist yet: measure the
    # filesystem it will be created on.
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


@dataclass(frozen=True)
class DiskNeed:
    """Bytes an update writes, by where they go (see the module docstring)."""

    unpacked_bytes: int  # the manifest's files, as installed
    staging_bytes: int  # staged beyond them: a delta bundle's patches
    already_staged_bytes: int  # of the unpacked files, already in a resumable staging
    restore_point_bytes: int  # upper bound: old files the point may have to keep
    shared_filesystem: int  # 1 when the target and the state dir share a filesystem

    @property
    def state_dir(self) -> int:
        """On the state dir's filesystem: staging and the restore point."""
        staged = self.unpacked_bytes + self.staging_bytes - self.already_staged_bytes
        return max(staged, 0) + self.restore_point_bytes

    @property
    def target(self) -> int:
        """On the target's: nothing more when it is the state dir's (the staged files are
        linked in), else the new files, copied in."""
        return self.state_dir if self.shared_filesystem else self.unpacked_bytes

    def explain(self, which: str) -> str:
        if which == "target" and not self.shared_filesystem:
            return f"{self.unpacked_bytes} new files copied in from the state dir"
        parts = [f"{self.unpacked_bytes} unpacked files"]
        if self.staging_bytes:
            parts.append(f"{self.staging_bytes} delta patches")
        if self.already_staged_bytes:
            parts.append(f"- {self.already_staged_bytes} already staged")
        parts.append(f"{self.restore_point_bytes} restore point (at most)")
        shared = ", shared with the target" if self.shared_filesystem else ""
        return " + ".join(parts).replace("+ -", "-") + shared


def disk_need(
    manifest: Manifest, target: Path, state_dir: Path, manifest_sha256: str | None = None
) -> DiskNeed:
    """What the update of `target` to `manifest` writes where; reads only metadata (the
    target's stat, the hash cache, a resumable staging's stat)."""
    shared = _device(target) == _device(state_dir)
    cache = load_hash_cache(state_dir)
    new_sha = {f.path: f.sha256 for f in manifest.files}
    point = 0
    for rel in dict.fromkeys([*new_sha, *manifest.remove]):
        try:
            st = os.lstat(Path(target) / rel)
        except OSError:
            continue  # nothing there to keep (or pre-flight cannot see it: apply will)
        if not stat.S_ISREG(st.st_mode):
            continue
        entry = cache.get(rel)
        unchanged = (
            isinstance(entry, dict)
            and entry.get("stat") == _stat_key(st)
            and entry.get("sha256") == new_sha.get(rel)
        )
        if not (unchanged and shared):
            point += st.st_size
    return DiskNeed(
        unpacked_bytes=sum(f.size for f in manifest.files),
        staging_bytes=sum(f.payload_size for f in manifest.files if f.delta),
        already_staged_bytes=_already_staged(manifest, state_dir, manifest_sha256),
        restore_point_bytes=point,
        shared_filesystem=int(shared),
    )


def _already_staged(manifest: Manifest, state_dir: Path, manifest_sha256: str | None) -> int:
    """Bytes of this manifest's files a resumable staging holds (an interrupted apply's,
    or one a fetch by parts handed over): the apply takes them as they are."""
    if manifest_sha256 is None:
        return 0
    try:
        record = json.loads((Path(state_dir) / RESUME_FILE).read_bytes())
        staging = Path(str(record["staging_dir"]))
        if record.get("manifest_sha256") != manifest_sha256:
            return 0
    except (OSError, ValueError, KeyError, TypeError):
        return 0
    if staging.parent != Path(state_dir) / STAGING_DIR:
        return 0
    held = 0
    for entry in manifest.files:
        try:
            st = os.lstat(staging / entry.path)
        except OSError:
            continue
        if stat.S_ISREG(st.st_mode) and st.st_size == entry.size:
            held += entry.size
    return held


def _device(path: Path) -> int:
    return os.stat(_existing(path)).st_dev


def _disk_checks(need: DiskNeed, target: Path, state_dir: Path) -> list[Check]:
    return [
        _disk_check("disk_target", target, need.target, need.explain("target")),
        _disk_check("disk_state_dir", state_dir, need.state_dir, need.explain("state_dir")),
    ]


def _disk_check(name: str, path: Path, need: int, why: str) -> Check:
    where = _existing(path)
    st = os.statvfs(where)
    free = st.f_bavail * st.f_frsize
    ok = free >= need
    verdict = "enough" if ok else f"{need - free} bytes short"
    detail = f"{free} bytes free on the filesystem of {path}, need {need} ({why}): {verdict}"
    return Check(name, ok, free, need, "bytes", detail)


def _memory_check(min_memory_mb: int) -> Check:
    import psutil

    available = psutil.virtual_memory().available
    need = int(min_memory_mb) * MB
    ok = available >= need
    detail = f"{available // MB} MiB available, need {min_memory_mb} MiB"
    return Check("memory", ok, available, need, "bytes", detail)


def dependency_checks(
    dependencies: Iterable[Dependency], components: Mapping[str, str]
) -> list[Check]:
    """One check per dependency against `components` (product -> installed version; a
    product not in it is not installed)."""
    return [_dependency_check(dependency, components) for dependency in dependencies]


def _dependency_check(dependency: Dependency, components: Mapping[str, str]) -> Check:
    name, spec = dependency.product, dependency.constraint
    check_name = f"{DEPENDENCY_CHECK}{name}"
    installed = components.get(name)
    if installed is None:
        ok = not dependency.required
        detail = f"{name} is not installed" + ("" if ok else f", need {dependency.describe()}")
        return Check(check_name, ok, None, spec, "", detail)
    try:
        Version(installed)
    except InvalidVersion as exc:
        return Check(check_name, False, installed, spec, "", f"{name}: {exc}")
    # What is installed is judged as it is, pre-release or not.
    allowed = dependency.allows(installed, prereleases=True)
    if dependency.conflicts:
        verdict = "is within" if allowed else "is outside"
        excluded = spec or "any version"
        detail = f"{name} {installed} {verdict} {excluded}, which this release excludes"
        return Check(check_name, not allowed, installed, spec, "", detail)
    verdict = "satisfies" if allowed else "does not satisfy"
    return Check(check_name, allowed, installed, spec, "", f"{name} {installed} {verdict} {spec}")


def _min_version_check(min_version: str | None, installed: str | None) -> list[Check]:
    """A bundle may need an upgrade path: at least `min_version` installed first.
    A node with nothing installed yet takes any bundle (a fresh install)."""
    if not min_version or not installed:
        return []
    try:
        ok = Version(installed) >= Version(min_version)
    except InvalidVersion as exc:
        return [Check("min_version", False, installed, min_version, "", str(exc))]
    detail = f"installed {installed}, bundle needs at least {min_version} installed first"
    return [Check("min_version", ok, installed, min_version, "", detail)]
