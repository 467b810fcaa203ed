"""Pre-flight: will this bundle fit and run here? Checked before anything is
written (exit 20), from the manifest alone so it stays in the ~10 ms range:

- free space on the filesystems of the target and of the state dir, each at
  least 2x the bundle size (staging plus the new files),
- available memory above a floor,
- manifest `dependencies` (name -> PEP 440 specifier) against the node's
  installed components (NodeState.components).

The manifest is read but not trusted here: nothing is decided from it except
whether to stop early. The signature is verified by apply before any change.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from packaging.specifiers import InvalidSpecifier, SpecifierSet
from packaging.version import InvalidVersion, Version

from .bundle import read_manifest
from .errors import PreflightFailed
from .manifest import Manifest, parse_manifest
from .state import load_state

DEFAULT_MIN_MEMORY_MB = 64
DISK_FACTOR = 2
MB = 1 << 20


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

    def failures(self) -> list[Check]:
        return [c for c in self.checks if not c.ok]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def raise_if_failed(self) -> None:
        failed = self.failures()
        if failed:
            first = failed[0]
            more = f" (+{len(failed) - 1} more)" if len(failed) > 1 else ""
            raise PreflightFailed(f"{first.name}: {first.detail}{more}")


def preflight(
    bundle_path: Path,
    *,
    target: Path,
    state_dir: Path,
    min_memory_mb: int = DEFAULT_MIN_MEMORY_MB,
    components: Mapping[str, str] | None = None,
    manifest: Manifest | None = None,
) -> PreflightReport:
    """Run every check and return the report; never writes anything."""
    start = time.perf_counter()
    bundle_path = Path(bundle_path)
    bundle_size = os.stat(bundle_path).st_size
    if manifest is None:
        manifest = read_bundle_manifest(bundle_path)
    state = load_state(Path(state_dir))
    if components is None:
        components = state.components
    need = DISK_FACTOR * bundle_size
    checks = [
        _disk_check("disk_target", Path(target), need),
        _disk_check("disk_state_dir", Path(state_dir), need),
        _memory_check(min_memory_mb),
        *(_dependency_check(n, s, components) for n, s in manifest.dependencies.items()),
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


def _disk_check(name: str, path: Path, need: int) -> Check:
    where = _existing(path)
    st = os.statvfs(where)
    free = st.f_bavail * st.f_frsize
    ok = free >= need
    detail = f"{free} bytes free on the filesystem of {path}, need {need} (2x bundle size)"
    return Check(name, ok, free, need, "bytes", detail)


def _memory_check(min_memory_mb: int) -> Check:
    import psutil

    available = psutil.virtual_memory().available
    need = int(min_memory_mb) * MB
    ok = available >= need
    detail = f"{available // MB} MiB available, need {min_memory_mb} MiB"
    return Check("memory", ok, available, need, "bytes", detail)


def _dependency_check(name: str, spec: str, components: Mapping[str, str]) -> Check:
    check_name = f"dependency:{name}"
    installed = components.get(name)
    if installed is None:
        return Check(check_name, False, None, spec, "", f"{name} is not installed, need {spec}")
    try:
        ok = SpecifierSet(spec).contains(Version(installed), prereleases=True)
    except (InvalidSpecifier, InvalidVersion) as exc:
        return Check(check_name, False, installed, spec, "", f"{name}: {exc}")
    verdict = "satisfies" if ok else "does not satisfy"
    return Check(check_name, ok, installed, spec, "", f"{name} {installed} {verdict} {spec}")


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
