"""Hand-built bundles for the malicious-bundle corpus.

`create_bundle` only makes well-formed bundles, so these helpers assemble tar
archives member by member (any type, mode, pax header, order) around a
manifest that is usually *validly signed*: most attacks must get past the
signature to reach the check they target.
"""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import tarfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import zstandard

from updates.engine.cms import sign_manifest
from updates.engine.devpki import KeyPair


@dataclass
class Member:
    name: str
    data: bytes = b""
    type: bytes = tarfile.REGTYPE
    mode: int = 0o644
    linkname: str = ""
    pax: dict[str, str] = field(default_factory=dict)
    size: int | None = None  # declared size, when it must differ from len(data)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def manifest_doc(
    files: Mapping[str, bytes],
    *,
    product: str = "themisdb",
    version: str = "1.7.0",
    expires_in: timedelta = timedelta(days=30),
    created_ago: timedelta = timedelta(days=1),
    modes: Mapping[str, str] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    now = datetime.now(UTC).replace(microsecond=0)
    return {
        "format": 1,
        "product": product,
        "version": version,
        "created": _iso(now - created_ago),
        "expires": _iso(now + expires_in),
        "files": [
            {
                "path": path,
                "size": len(data),
                "sha256": sha256(data),
                "mode": (modes or {}).get(path, "0644"),
            }
            for path, data in files.items()
        ],
        "remove": [],
        **extra,
    }


def _iso(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def encode(doc: Mapping[str, Any]) -> bytes:
    return json.dumps(doc, indent=2).encode()


def sign(manifest: bytes, signer: KeyPair, chain: Path | None) -> bytes:
    return sign_manifest(manifest, key_path=signer.key, cert_path=signer.cert, chain_path=chain)


def openssl_sign(
    manifest: bytes, workdir: Path, signers: Iterable[KeyPair], chain: Path | None, *extra: str
) -> bytes:
    """Sign with the openssl CLI (the interop reference in DESIGN.md)."""
    src, out = workdir / "manifest.json", workdir / "manifest.json.p7s"
    src.write_bytes(manifest)
    args = ["openssl", "cms", "-sign", "-binary", "-md", "sha256", "-outform", "DER"]
    for signer in signers:
        args += ["-signer", str(signer.cert), "-inkey", str(signer.key)]
    if chain is not None:
        args += ["-certfile", str(chain)]
    subprocess.run([*args, *extra, "-in", str(src), "-out", str(out)], check=True)
    return out.read_bytes()


def build_tar(members: Iterable[Member], *, fmt: int = tarfile.PAX_FORMAT) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=fmt) as tar:
        for member in members:
            info = tarfile.TarInfo(member.name)
            info.type = member.type
            info.mode = member.mode
            info.linkname = member.linkname
            info.size = len(member.data) if member.size is None else member.size
            info.pax_headers = dict(member.pax)
            data = io.BytesIO(member.data) if info.type in (tarfile.REGTYPE, b"S") else None
            if member.size is not None and member.size > len(member.data):
                data = io.BytesIO(member.data + b"\0" * (member.size - len(member.data)))
            tar.addfile(info, data)
    return buffer.getvalue()


def zstd(data: bytes) -> bytes:
    return zstandard.ZstdCompressor(level=3).compress(data)


def payload(files: Mapping[str, bytes]) -> list[Member]:
    return [Member(f"payload/{path}", data, mode=0o644) for path, data in files.items()]


def head(manifest: bytes, signature: bytes) -> list[Member]:
    return [Member("manifest.json", manifest), Member("manifest.json.p7s", signature)]
