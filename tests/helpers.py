"""Helpers shared by integration tests."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

from django.core.files import File

from updates.engine.devpki import KeyPair
from updates.models import Release


class MakeBundle(Protocol):
    """The `make_bundle` fixture: builds a real signed bundle and returns its path."""

    def __call__(
        self,
        version: str = ...,
        *,
        signer: KeyPair | None = ...,
        chain: Path | None = ...,
        files: Mapping[str, bytes] | None = ...,
        name: str | None = ...,
        extra_manifest: dict[str, Any] | None = ...,
    ) -> Path: ...


def publish_bundle(path: Path, version: str) -> Release:
    """Store a bundle as a published Release (what an upload leaves behind)."""
    release = Release(product="themisdb", version=version, size=path.stat().st_size)
    release.sha256 = hashlib.sha256(path.read_bytes()).hexdigest()
    with open(path, "rb") as fh:
        release.artifact.save(path.name, File(fh), save=False)
    release.save()
    return release


def tree(root: Path) -> dict[str, bytes]:
    """Every file under `root` with its bytes (for before/after comparisons)."""
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }
