"""Releases N and N+1 as real signed bundles, and a node that runs N: for delivery by parts."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.agent.file_server import FileServer
from tests.releases.conftest import payload
from updates.engine import apply as engine
from updates.engine.bundle import create_bundle, read_manifest
from updates.engine.devpki import KeyPair, Pki

KiB = 1 << 10
PREFIX = "parts/r"


def release_n() -> dict[str, bytes]:
    files = {f"lib/mod{i}.so": payload(40 * KiB + i, seed=i) for i in range(8)}
    files["bin/themisd"] = payload(64 * KiB, seed=100)
    files["share/VERSION"] = b"1.0.0\n"
    files["etc/old.conf"] = b"old = true\n"
    return files


def release_n1() -> dict[str, bytes]:
    """N+1: the binary and two libraries change, a file is added, one is the same bytes at a
    new path (nothing to fetch), one is gone."""
    files = release_n()
    files["bin/themisd"] = payload(70 * KiB, seed=101)
    files["lib/mod2.so"] = payload(41 * KiB, seed=202)
    files["lib/mod5.so"] = payload(40 * KiB + 5, seed=205)
    files["share/VERSION"] = b"1.1.0\n"
    files["lib/plugins/new.so"] = payload(20 * KiB, seed=300)
    files["lib/moved.so"] = files["lib/mod7.so"]
    del files["etc/old.conf"]
    return files


CHANGED = ["bin/themisd", "lib/mod2.so", "lib/mod5.so", "share/VERSION", "lib/plugins/new.so"]


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def build(
    directory: Path,
    pki: Pki,
    version: str,
    files: Mapping[str, bytes],
    *,
    signer: KeyPair | None = None,
    chain: Path | None = None,
    remove: list[str] | None = None,
) -> Path:
    src = directory / f"src-{version}-{(signer or pki.leaf).cert.name}"
    for rel, data in files.items():
        path = src / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        path.chmod(0o755 if rel.startswith("bin/") else 0o644)
    out = directory / f"themisdb-{version}-{src.name}.tar"
    create_bundle(
        src,
        product="themisdb",
        version=version,
        key_path=(signer or pki.leaf).key,
        cert_path=(signer or pki.leaf).cert,
        chain_path=chain or pki.chain,
        out_path=out,
        extra_manifest={"remove": remove} if remove else None,
    )
    return out


def served_parts(bundle: Path, files: Mapping[str, bytes]) -> dict[str, bytes]:
    """What the dashboard serves for a release: manifest, signature, one object per file."""
    manifest, signature = read_manifest(bundle)
    served = {f"{PREFIX}/manifest.json": manifest, f"{PREFIX}/manifest.json.p7s": signature}
    for data in files.values():
        served[f"{PREFIX}/{sha(data)}"] = data
    return served


def tree(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


@dataclass
class Node:
    target: Path
    state: Path
    pki: Pki

    def install(self, bundle: Path) -> None:
        engine.apply_bundle(
            bundle, target=self.target, state_dir=self.state, trust_anchor=self.pki.root
        )

    def staging_entries(self) -> list[str]:
        root = self.state / "staging"
        return sorted(p.name for p in root.iterdir()) if root.exists() else []

    def leftovers(self) -> list[str]:
        """Files a parts fetch may leave in the state dir: none, after a failure."""
        names = ["parts-staging.json", "staging-resume.json"]
        found = [name for name in names if (self.state / name).exists()]
        downloads = self.state / "downloads"
        if downloads.exists():
            found += [f"downloads/{p.name}" for p in downloads.iterdir()]
        return found + [f"staging/{name}" for name in self.staging_entries()]


@dataclass
class Releases:
    n: Path
    n1: Path
    files_n: dict[str, bytes]
    files_n1: dict[str, bytes]


@pytest.fixture
def releases(tmp_path: Path, test_pki: Pki) -> Releases:
    work = tmp_path / "releases"
    work.mkdir()
    files_n, files_n1 = release_n(), release_n1()
    return Releases(
        n=build(work, test_pki, "1.0.0", files_n),
        n1=build(work, test_pki, "1.1.0", files_n1, remove=["etc/old.conf"]),
        files_n=files_n,
        files_n1=files_n1,
    )


@pytest.fixture
def node(tmp_path: Path, test_pki: Pki) -> Node:
    state = tmp_path / "node" / "state"
    state.mkdir(parents=True)
    return Node(tmp_path / "node" / "install", state, test_pki)


@pytest.fixture
def parts_server(releases: Releases) -> Iterator[FileServer]:
    server = FileServer(served_parts(releases.n1, releases.files_n1))
    yield server
    server.close()
