"""Fixtures and helpers for the apply-engine tests (import them in test modules).

Bundles are built with the real `bundle.create_bundle` and signed by a session
PKI from `devpki` when those exist; until `bundle.py` lands, `fake_bundles`
swaps verification for an unsigned stand-in so the layers below it can still
be tested (the CLI and crash tests need the real thing and skip without it).
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import os
import secrets
import shutil
import stat
import tarfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from updates.engine.manifest import Manifest, parse_manifest
from updates.engine.state import check_version_rule, load_state

REPO = Path(__file__).resolve().parents[2]
PYTHON = REPO / ".venv" / "bin" / "python"
HAVE_BUNDLE = importlib.util.find_spec("updates.engine.bundle") is not None

Files = Mapping[str, bytes | tuple[bytes, int]]

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


def snapshot(root: Path) -> dict[str, tuple[Any, ...]]:
    """Every entry below root: dirs with mode, files with mode and SHA-256."""
    tree: dict[str, tuple[Any, ...]] = {}
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


def expected_new(old: Files, new: Files, remove: list[str]) -> dict[str, bytes | tuple]:
    tree = {k: v for k, v in old.items() if k not in remove}
    tree.update(new)
    return tree


# ------------------------------------------------------------------ bundle making


@dataclass
class BundleMaker:
    workdir: Path
    pki: Any | None  # devpki.Pki in real mode

    @property
    def trust_anchor(self) -> Path:
        return self.pki.root if self.pki else self.workdir / "no-anchor.pem"

    def make(
        self,
        version: str,
        files: Files,
        *,
        remove: list[str] | None = None,
        dependencies: dict[str, str] | None = None,
        product: str = "themisdb",
        name: str | None = None,
    ) -> Path:
        src = self.workdir / f"src-{secrets.token_hex(4)}"
        write_tree(src, files)
        out = self.workdir / (name or f"themisdb-{version}-{secrets.token_hex(3)}.tar")
        extra: dict[str, Any] = {"remove": list(remove or [])}
        if dependencies:
            extra["dependencies"] = dependencies
        if self.pki is not None:
            from updates.engine.bundle import create_bundle

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
        else:
            _fake_bundle(src, out, product=product, version=version, extra=extra)
        shutil.rmtree(src)
        return out


def _fake_bundle(src: Path, out: Path, *, product: str, version: str, extra: dict) -> None:
    now = datetime.now(UTC)
    entries = []
    for path in sorted(p for p in src.rglob("*") if p.is_file()):
        data = path.read_bytes()
        entries.append(
            {
                "path": str(path.relative_to(src)),
                "size": len(data),
                "sha256": hashlib.sha256(data).hexdigest(),
                "mode": f"{stat.S_IMODE(path.stat().st_mode):04o}",
            }
        )
    doc = {
        "format": 1,
        "product": product,
        "version": version,
        "created": (now - timedelta(minutes=1)).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "expires": (now + timedelta(days=30)).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "files": entries,
        **extra,
    }
    with tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as tar:
        _add(tar, "manifest.json", json.dumps(doc).encode())
        _add(tar, "manifest.json.p7s", b"unsigned stand-in")
        for entry in entries:
            _add(tar, f"payload/{entry['path']}", (src / entry["path"]).read_bytes())


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


@dataclass
class FakeVerified:
    manifest: Manifest
    manifest_bytes: bytes
    signer: str
    staging_dir: Path | None
    delta_paths: frozenset[str] = frozenset()

    def cleanup(self) -> None:
        if self.staging_dir:
            shutil.rmtree(self.staging_dir, ignore_errors=True)


def fake_read_manifest(bundle_path: Path) -> tuple[bytes, bytes]:
    with tarfile.open(bundle_path) as tar:
        return (
            tar.extractfile("manifest.json").read(),  # type: ignore[union-attr]
            tar.extractfile("manifest.json.p7s").read(),  # type: ignore[union-attr]
        )


def fake_verify_bundle(bundle_path: Path, **kw: Any) -> FakeVerified:
    raw, _ = fake_read_manifest(bundle_path)
    manifest = parse_manifest(raw)
    if kw.get("state_dir") is not None:
        check_version_rule(
            manifest.version, load_state(kw["state_dir"]), allow_downgrade=kw.get("allow_downgrade")
        )
    staging = None
    if kw.get("stage"):
        staging = Path(kw["state_dir"]) / "staging" / secrets.token_hex(6)
        staging.mkdir(parents=True)
        with tarfile.open(bundle_path) as tar:
            for entry in manifest.files:
                data = tar.extractfile(f"payload/{entry.path}").read()  # type: ignore[union-attr]
                dest = staging / entry.path
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.write_bytes(data)
                os.chmod(dest, entry.mode)
    return FakeVerified(manifest, raw, "fake signer", staging)


# ----------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def apply_pki(tmp_path_factory: pytest.TempPathFactory) -> Any | None:
    """A session PKI for signing test bundles (None until bundle.py exists)."""
    if not HAVE_BUNDLE:
        return None
    from updates.engine.devpki import make_pki

    return make_pki(tmp_path_factory.mktemp("apply-pki"))


@pytest.fixture
def bundles(
    tmp_path: Path, apply_pki: Any | None, monkeypatch: pytest.MonkeyPatch
) -> Iterator[BundleMaker]:
    work = tmp_path / "bundles"
    work.mkdir()
    if apply_pki is None:  # bundle.py not there yet: unsigned stand-in
        from updates.engine import apply as apply_mod
        from updates.engine import preflight as preflight_mod

        monkeypatch.setattr(
            preflight_mod,
            "read_bundle_manifest",
            lambda path: parse_manifest(fake_read_manifest(path)[0]),
        )
        monkeypatch.setattr(
            apply_mod,
            "_verify_and_stage",
            lambda run: fake_verify_bundle(
                run.bundle,
                state_dir=run.state_dir,
                allow_downgrade=run.allow_downgrade,
                stage=True,
            ),
        )
    yield BundleMaker(work, apply_pki)


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


@pytest.fixture
def node(tmp_path: Path, bundles: BundleMaker) -> Node:
    target = tmp_path / "target"
    write_tree(target, OLD_TREE)
    state = tmp_path / "state"
    return Node(target, state, bundles)
