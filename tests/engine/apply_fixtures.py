"""Fixtures and helpers for the apply-engine tests. Import the `*_fixture`
functions into a test module to use the fixtures `bundles`, `node`, `small_tmpfs`.

Bundles are real: built with `bundle.create_bundle`, signed by a session PKI
from `devpki`. Trees are compared by `snapshot` (paths, types, modes, SHA-256).
"""

from __future__ import annotations

import hashlib
import os
import secrets
import shutil
import stat
import subprocess
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from updates.engine.bundle import create_bundle
from updates.engine.devpki import Pki
from updates.engine.manifest import Dependency

REPO = Path(__file__).resolve().parents[2]
PYTHON = REPO / ".venv" / "bin" / "python"

Files = Mapping[str, bytes | tuple[bytes, int]]
# path -> ("dir", mode) | ("file", mode, sha256) | ("other", st_mode)
Snapshot = dict[str, tuple[Any, ...]]

OLD_TREE: dict[str, bytes | tuple[bytes, int]] = {
    "bin/themisd": (b"#!/bin/sh\necho themisd 1.0\n" * 50, 0o755),
    "lib/libthemis.so": (b"\x7fELF old library" * 200, 0o644),
    "lib/old.so": (b"obsolete plugin" * 30, 0o644),
    "etc/themis.conf": (b"port = 7000\n", 0o600),
}
NEW_FILES: dict[str, bytes | tuple[bytes, int]] = {
    "bin/themisd": (b"#!/bin/sh\necho themisd 2.0\n" * 60, 0o755),
    "lib/libthemis.so": (b"\x7fELF new library" * 250, 0o644),
    "share/plugins/new.so": (b"brand new plugin" * 40, 0o640),
}
NEW_REMOVE = ["lib/old.so"]


def split(value: bytes | tuple[bytes, int]) -> tuple[bytes, int]:
    return value if isinstance(value, tuple) else (value, 0o644)


def write_tree(root: Path, files: Files) -> None:
    for rel, value in files.items():
        data, mode = split(value)
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        os.chmod(path, mode)


def snapshot(root: Path) -> Snapshot:
    """Every entry below root: dirs with mode, files with mode and SHA-256."""
    tree: Snapshot = {}
    if not root.exists():
        return tree
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            rel = str(path.relative_to(root))
            st = os.lstat(path)
            mode = stat.S_IMODE(st.st_mode)
            if stat.S_ISDIR(st.st_mode):
                tree[rel] = ("dir", mode)
            elif stat.S_ISREG(st.st_mode):
                tree[rel] = ("file", mode, hashlib.sha256(path.read_bytes()).hexdigest())
            else:
                tree[rel] = ("other", st.st_mode)
    return tree


def expected_new(old: Files, new: Files, remove: list[str]) -> dict[str, bytes | tuple[bytes, int]]:
    tree = {k: v for k, v in old.items() if k not in remove}
    tree.update(new)
    return tree


# ------------------------------------------------------------------ bundle making


@dataclass
class BundleMaker:
    workdir: Path
    pki: Pki

    @property
    def trust_anchor(self) -> Path:
        return self.pki.root

    def make(
        self,
        version: str,
        files: Files,
        *,
        remove: list[str] | None = None,
        dependencies: dict[str, str] | Sequence[Dependency] | None = None,
        product: str = "themisdb",
        name: str | None = None,
        min_version: str | None = None,
        manifest: dict[str, Any] | None = None,
    ) -> Path:
        src = self.workdir / f"src-{secrets.token_hex(4)}"
        write_tree(src, files)
        out = self.workdir / (name or f"themisdb-{version}-{secrets.token_hex(3)}.tar")
        extra: dict[str, Any] = {"remove": list(remove or [])}
        if isinstance(dependencies, dict):
            extra["dependencies"] = dependencies  # the older {name: specifier} form
        elif dependencies:
            extra["dependencies"] = [dependency.to_document() for dependency in dependencies]
        if min_version:
            extra["min_version"] = min_version
        extra.update(manifest or {})
        create_bundle(
            src,
            product=product,
            version=version,
            key_path=self.pki.leaf.key,
            cert_path=self.pki.leaf.cert,
            chain_path=self.pki.chain,
            out_path=out,
            extra_manifest=extra,
        )
        shutil.rmtree(src)
        return out


# ----------------------------------------------------------------------- fixtures


@pytest.fixture(name="bundles")
def bundles_fixture(tmp_path: Path, pki: Pki) -> BundleMaker:
    """Signs with the session PKI of tests/engine/conftest.py."""
    work = tmp_path / "bundles"
    work.mkdir()
    return BundleMaker(work, pki)


@dataclass
class Node:
    """A node on disk: target with the old version installed, empty state."""

    target: Path
    state: Path
    maker: BundleMaker

    @property
    def trust_anchor(self) -> Path:
        return self.maker.trust_anchor

    def kwargs(self, **extra: Any) -> dict[str, Any]:
        return {
            "target": self.target,
            "state_dir": self.state,
            "trust_anchor": self.trust_anchor,
            **extra,
        }

    def cli(self, *args: str | Path) -> list[str]:
        return [str(PYTHON), "-m", "updates.engine", *map(str, args)]


@pytest.fixture(name="node")
def node_fixture(tmp_path: Path, bundles: BundleMaker) -> Node:
    target = tmp_path / "target"
    write_tree(target, OLD_TREE)
    state = tmp_path / "state"
    return Node(target, state, bundles)


@pytest.fixture(name="small_tmpfs")
def small_tmpfs_fixture(tmp_path: Path) -> Iterator[Path]:
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], capture_output=True
    )
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs (needs root/CAP_SYS_ADMIN): {proc.stderr!r}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)
