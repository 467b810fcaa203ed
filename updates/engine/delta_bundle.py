"""Delta bundles: build them, and rebuild their staged patches on the node.

A delta bundle is an ordinary signed bundle whose manifest entries for
changed files carry `"delta": {"algorithm", "base_sha256", "patch_sha256",
"patch_size"}`; `size`/`sha256` still describe the installed file, so the
rest of the engine (restore points, journal, install) never sees a patch.

On the node, `rebuild_staged_deltas` (the apply engine's `rebuild_deltas`
hook) turns each staged patch into the full file using the installed file as
the base.  A node whose base is not the expected one (hand-patched, older
release, damaged) falls back to the full file from the full bundle, so a delta
bundle is never worse than a full one, only smaller.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .bundle import create_bundle, scan_source, verify_bundle
from .cms import ManifestSigner
from .delta import apply_patch, create_patch, read_header, write_atomic
from .errors import ManifestInvalid
from .paths import check_no_symlink_components

if TYPE_CHECKING:
    from .bundle import VerifiedBundle
    from .manifest import Manifest, ManifestFile

FallbackFetch = Callable[[str], Path]
# A patch must save at least this share of the full file, or the full file ships.
MIN_SAVING = 0.10


# --- node side ---------------------------------------------------------------


def rebuild_staged_deltas(
    verified_bundle: VerifiedBundle,
    target_dir: Path,
    fallback_fetch: FallbackFetch | None = None,
) -> list[str]:
    """Replace every staged patch with its rebuilt, verified target file.

    The base is `target_dir/<path>` (read only).  If it is missing or not the
    patch's base, or the patch fails, the full file from `fallback_fetch(path)`
    is staged instead (checked against the manifest too).  Returns the paths
    that fell back (`files_fallback`); raises ManifestInvalid when a file can
    be neither rebuilt nor fetched.
    """
    staging = verified_bundle.staging_dir
    if staging is None:
        raise ManifestInvalid("delta: bundle was verified without staging")
    entries = {e.path: e for e in verified_bundle.manifest.files}
    fallback: list[str] = []
    for rel in sorted(verified_bundle.delta_paths):
        entry = entries[rel]
        try:
            _rebuild_one(entry, Path(target_dir), staging / rel)
        except ManifestInvalid as err:
            if fallback_fetch is None:
                raise ManifestInvalid(f"delta: {rel}: {err}; no full file to fall back to") from err
            _stage_full(entry, fallback_fetch(rel), staging / rel)
            fallback.append(rel)
    return fallback


def delta_rebuilder(
    fallback_fetch: FallbackFetch | None,
) -> Callable[[VerifiedBundle, Path], list[str]]:
    """The two-argument `rebuild_deltas` hook of `apply.apply_bundle`/`NodeEngine`."""

    def rebuild(verified: VerifiedBundle, target: Path) -> list[str]:
        return rebuild_staged_deltas(verified, target, fallback_fetch)

    return rebuild


def _rebuild_one(entry: ManifestFile, target_dir: Path, staged: Path) -> None:

    # A symlink planted in the target must not pick the base (exit 11, no fallback).
    check_no_symlink_components(target_dir, entry.path)
    spec = entry.delta or {}
    header = read_header(staged)
    # The header must agree with the signed manifest: a patch for another
    # base or target is refused before it is decoded.
    if (header.algorithm, header.base_sha256) != (spec.get("algorithm"), spec.get("base_sha256")):
        raise ManifestInvalid("patch header disagrees with the manifest's delta entry")
    if (header.target_size, header.target_sha256) != (entry.size, entry.sha256):
        raise ManifestInvalid("patch target disagrees with the manifest's size/sha256")
    base = target_dir / entry.path
    apply_patch(base, staged, staged, expect_sha256=entry.sha256, mode=entry.mode)


def _stage_full(entry: ManifestFile, full: Path, staged: Path) -> None:
    """Stage the fetched full file, only if it is exactly the manifest's file."""
    data = Path(full).read_bytes()
    if len(data) != entry.size or hashlib.sha256(data).hexdigest() != entry.sha256:
        raise ManifestInvalid(f"delta: {entry.path}: fallback file does not match the manifest")
    write_atomic(staged, [data], mode=entry.mode)


@dataclass
class FullBundleFallback:
    """`fallback_fetch` backed by a full bundle, verified and staged on first use.

    The full bundle is signature-checked like any other; it is staged into
    its own `cache_dir` (not the node's state dir, whose staging the running
    apply owns).  Use as a context manager to drop that staging afterwards.
    """

    bundle: Path
    trust_anchor: Path
    cache_dir: Path
    product: str = "themisdb"
    _verified: VerifiedBundle | None = field(default=None, init=False)

    def __call__(self, rel: str) -> Path:
        if self._verified is None:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            self._verified = verify_bundle(
                self.bundle,
                trust_anchor=self.trust_anchor,
                product=self.product,
                state_dir=self.cache_dir,
                stage=True,
            )
        assert self._verified.staging_dir is not None
        if rel not in {e.path for e in self._verified.manifest.files}:
            raise ManifestInvalid(f"delta: {rel}: not in the full bundle {self.bundle}")
        return self._verified.staging_dir / rel

    def cleanup(self) -> None:
        if self._verified is not None:
            self._verified.cleanup()
            self._verified = None

    def __enter__(self) -> FullBundleFallback:
        return self

    def __exit__(self, *exc: object) -> None:
        self.cleanup()


# --- build side ---------------------------------------------------------------


@dataclass(frozen=True)
class DeltaBundleResult:
    manifest: Manifest
    delta_paths: list[str]
    full_paths: list[str]
    patch_bytes: int
    full_bytes: int


def create_delta_bundle(
    old_dir: Path,
    new_dir: Path,
    out_path: Path,
    *,
    product: str,
    version: str,
    key_path: Path | None = None,
    cert_path: Path | None = None,
    chain_path: Path | None = None,
    signer: ManifestSigner | None = None,
    expires_days: int = 90,
    extra_manifest: dict[str, Any] | None = None,
    algorithm: str = "auto",
    min_saving: float = MIN_SAVING,
) -> DeltaBundleResult:
    """Sign a bundle of `new_dir` whose files are patches against `old_dir`
    where that saves at least `min_saving`; new or incompressible files ship
    whole.  Unchanged files ship as (tiny) patches too, so every node's copy
    is still verified against the release."""

    old_dir, new_dir = Path(old_dir), Path(new_dir)
    out_path = Path(out_path)
    with _scratch(out_path.parent) as work:
        src = work / "src"
        deltas: dict[str, dict[str, Any]] = {}
        full: list[str] = []
        for rel, path, mode in scan_source(new_dir):
            spec = _try_patch(old_dir / rel, path, src / rel, algorithm, min_saving)
            if spec is None:
                _link_or_copy(path, src / rel)  # keeps the source's mode
                full.append(rel)
            else:
                os.chmod(src / rel, mode)  # create_bundle takes the mode from the file
                deltas[rel] = spec
        manifest = create_bundle(
            src,
            product=product,
            version=version,
            key_path=key_path,
            cert_path=cert_path,
            chain_path=chain_path,
            signer=signer,
            expires_days=expires_days,
            out_path=out_path,
            extra_manifest=extra_manifest,
            deltas=deltas,
        )
        patch_bytes = sum((src / rel).stat().st_size for rel in deltas)
    full_bytes = sum(f.size for f in manifest.files)
    return DeltaBundleResult(manifest, sorted(deltas), full, patch_bytes, full_bytes)


def _try_patch(
    old: Path, new: Path, out: Path, algorithm: str, min_saving: float
) -> dict[str, Any] | None:
    """The `deltas` spec for create_bundle, or None to ship `new` whole."""
    if old.is_symlink() or not old.is_file():
        return None
    out.parent.mkdir(parents=True, exist_ok=True)
    info = create_patch(old, new, out, algorithm=algorithm)
    if info.patch_size > (1 - min_saving) * info.header.target_size:
        out.unlink()
        return None
    return {
        "algorithm": info.header.algorithm,
        "base_sha256": info.header.base_sha256,
        "size": info.header.target_size,
        "sha256": info.header.target_sha256,
    }


def _link_or_copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)  # no copy of large files when on the same filesystem
    except OSError:
        shutil.copy2(src, dst)


@contextlib.contextmanager
def _scratch(near: Path) -> Iterator[Path]:
    # Next to the output, so hardlinks work and a failure cleans up after itself.
    path = Path(tempfile.mkdtemp(prefix=".delta-bundle-", dir=near))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
