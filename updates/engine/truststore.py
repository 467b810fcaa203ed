"""A node's trust store: the roots it trusts, the certificates it refuses, signed and
versioned, so trust can change without touching a node by hand.

A node starts from its bootstrap anchor (`--trust-anchor`, a PEM file). A trust store
replaces it: a document (canonical JSON) listing the roots, the revoked certificates (by
issuer and serial number, or by SHA-256 fingerprint), a version and an expiry, with a detached CMS
signature by a certificate that carries the trust-store signing EKU and chains to what the
node trusts now (TUF's rule for root metadata: the current trust signs the next). A node
takes a store only if

- the signature verifies against its current trust (not revoked by it, nor by the new
  store itself);
- its version is higher than the installed one's (a replayed older store is refused);
- it has not expired, and it names at least one root.

Anything else is refused with nothing written. The installed store is one file in the
state dir, written atomically; a store that cannot be read is refused, never skipped (a
node that fell back to its bootstrap root could trust a root revoked since).

Every bundle is then checked against the installed store instead of the bootstrap anchor:
its roots (several at once for a root rollover), its revocations (a bundle signed by a
revoked certificate is refused, exit 10) and its expiry (an expired store refuses every
bundle until a newer one arrives).
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from .cms import (
    ManifestSigner,
    Purpose,
    Trust,
    TrustAnchor,
    load_trust,
    manifest_signer,
    verify_manifest_signature,
)
from .errors import ManifestInvalid, SignatureInvalid, StaleOrDowngrade
from .state import write_json_atomic

TRUST_STORE_FILE = "trust-store.json"
FORMAT = 1
MAX_ENVELOPE_BYTES = 1 << 20
MAX_ROOTS = 32
MAX_REVOKED = 10_000
_FINGERPRINT = re.compile(r"^[0-9a-f]{64}$")
_SERIAL = re.compile(r"^[0-9a-f]{1,40}$")


@dataclass(frozen=True)
class TrustStore:
    """An installed (or offered) trust store."""

    version: int
    expires: datetime
    trust: Trust
    signer: str  # the subject that signed it
    envelope: bytes  # as distributed: the document and its signature

    def summary(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "expires": _timestamp(self.expires),
            "roots": [root.subject.rfc4514_string() for root in self.trust.roots],
            "revoked_serials": [
                {"issuer": issuer, "serial": f"{serial:x}"}
                for issuer, serial in sorted(self.trust.revoked_serials)
            ],
            "revoked_fingerprints": sorted(self.trust.revoked_fingerprints),
            "signer": self.signer,
        }


# --- making one -----------------------------------------------------------------------


def make_trust_store(
    *,
    version: int,
    expires: datetime,
    roots: Sequence[x509.Certificate],
    revoked_certificates: Iterable[x509.Certificate] = (),
    revoked_fingerprints: Iterable[str] = (),
    key_path: Path | None = None,
    cert_path: Path | None = None,
    chain_path: Path | None = None,
    signer: ManifestSigner | None = None,
) -> bytes:
    """A signed trust store, as distributed (the envelope a node installs): signed by
    `signer` (a key in a token) or else the PEM `key_path` and `cert_path`."""
    document = {
        "format": FORMAT,
        "version": version,
        "expires": _timestamp(expires),
        "roots": [root.public_bytes(serialization.Encoding.PEM).decode("ascii") for root in roots],
        "revoked": {
            "serials": [
                {"issuer": issuer, "serial": f"{serial:x}"}
                for issuer, serial in sorted(
                    {(c.issuer.rfc4514_string(), c.serial_number) for c in revoked_certificates}
                )
            ],
            "fingerprints": sorted({f.lower() for f in revoked_fingerprints}),
        },
    }
    document_bytes = _canonical(document)
    _parse_document(document_bytes)  # what a node would refuse is never signed
    signature = manifest_signer(signer, key_path, cert_path, chain_path)(document_bytes)
    return _canonical(
        {
            "store": base64.b64encode(document_bytes).decode("ascii"),
            "signature": base64.b64encode(signature).decode("ascii"),
        }
    )


# --- taking one -----------------------------------------------------------------------


def check_trust_store(
    envelope: bytes, *, current: Trust, current_version: int, now: datetime | None = None
) -> TrustStore:
    """The store in `envelope` if a node trusting `current` (at `current_version`) may take
    it; else the EngineError of the first reason: 12 malformed, 10 signature, 13 not newer
    or expired. Reads and writes nothing."""
    now = now or datetime.now(UTC)
    document, signature, store = _opened(envelope)
    offered, version, expires = store.trust, store.version, store.expires
    # Signed under the current trust, by a certificate that neither it nor the new store
    # revokes: a leaked store-signing key is revoked by the very store that replaces it.
    signer = verify_manifest_signature(document, signature, current, now, Purpose.TRUST_STORE)
    verify_manifest_signature(
        document,
        signature,
        Trust(current.roots, offered.revoked_serials, offered.revoked_fingerprints),
        now,
        Purpose.TRUST_STORE,
    )
    if version <= current_version:
        raise StaleOrDowngrade(
            f"trust store: version {version} is not newer than the installed {current_version}"
        )
    if expires <= now:
        raise StaleOrDowngrade(f"trust store: version {version} expired at {_timestamp(expires)}")
    return TrustStore(version, expires, offered, signer, envelope)


def install_trust_store(
    state_dir: Path, envelope: bytes, *, anchor: TrustAnchor, now: datetime | None = None
) -> TrustStore:
    """Check `envelope` against what the node trusts now (its installed store, else
    `anchor`) and install it atomically; on any refusal nothing is written."""
    installed = installed_trust_store(state_dir)
    current, version = (
        (installed.trust, installed.version) if installed else (load_trust(anchor), 0)
    )
    store = check_trust_store(envelope, current=current, current_version=version, now=now)
    Path(state_dir).mkdir(parents=True, exist_ok=True)
    write_json_atomic(Path(state_dir) / TRUST_STORE_FILE, json.loads(envelope))
    return store


def installed_trust_store(state_dir: Path) -> TrustStore | None:
    """The state dir's trust store, None when there is none; SignatureInvalid when one is
    there but cannot be read (never a silent fall back to the bootstrap anchor)."""
    path = Path(state_dir) / TRUST_STORE_FILE
    try:
        envelope = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as err:
        raise SignatureInvalid(f"trust store {path}: cannot read: {err.strerror}") from None
    try:
        return parse_trust_store(envelope)
    except ManifestInvalid as err:
        raise SignatureInvalid(f"trust store {path} is damaged ({err}): install it again") from None


def parse_trust_store(envelope: bytes) -> TrustStore:
    """What a store says, its signature not checked (ManifestInvalid if malformed): for a
    store already checked when it was taken."""
    return _opened(envelope)[2]


def _opened(envelope: bytes) -> tuple[bytes, bytes, TrustStore]:
    """The envelope's document and signature, and the store the document describes."""
    document, signature = _open_envelope(envelope)
    version, expires, roots, serials, fingerprints = _parse_document(document)
    trust = Trust(
        roots=tuple(roots),
        revoked_serials=frozenset(serials),
        revoked_fingerprints=frozenset(fingerprints),
        expires=expires,
        name=f"trust store version {version}",
    )
    return document, signature, TrustStore(version, expires, trust, "", envelope)


def trust_for(state_dir: Path, anchor: TrustAnchor) -> TrustAnchor:
    """What a node checks bundles against: its installed trust store, else `anchor`."""
    installed = installed_trust_store(state_dir)
    return installed.trust if installed is not None else anchor


def trust_store_version(state_dir: Path) -> int:
    """The installed store's version (0: none installed, the bootstrap anchor holds); -1
    when one is there but cannot be read."""
    try:
        installed = installed_trust_store(state_dir)
    except SignatureInvalid:
        return -1
    return installed.version if installed is not None else 0


# --- the formats ----------------------------------------------------------------------


def _canonical(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


def _timestamp(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _open_envelope(envelope: bytes) -> tuple[bytes, bytes]:
    if len(envelope) > MAX_ENVELOPE_BYTES:
        raise ManifestInvalid(f"trust store: {len(envelope)} bytes exceed {MAX_ENVELOPE_BYTES}")
    try:
        outer = json.loads(envelope)
        if not isinstance(outer, dict) or set(outer) != {"store", "signature"}:
            raise ValueError("expected exactly the keys 'store' and 'signature'")
        return (
            base64.b64decode(outer["store"], validate=True),
            base64.b64decode(outer["signature"], validate=True),
        )
    except (ValueError, TypeError, binascii.Error) as err:
        raise ManifestInvalid(f"trust store: not a trust store envelope: {err}") from None


Parsed = tuple[int, datetime, list[x509.Certificate], set[tuple[str, int]], set[str]]


def _parse_document(document: bytes) -> Parsed:
    try:
        data = json.loads(document)
        if not isinstance(data, dict):
            raise ValueError("not an object")
        if data.get("format") != FORMAT:
            raise ValueError(f"format {data.get('format')!r} (this node reads {FORMAT})")
        version = data["version"]
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise ValueError(f"version {version!r} is not a positive integer")
        expires = datetime.strptime(data["expires"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
        roots = _roots(data["roots"])
        revoked = data["revoked"]
        serials = _issuer_serials(revoked["serials"])
        fingerprints = set(_strings(revoked["fingerprints"], _FINGERPRINT, "fingerprint"))
    except (ValueError, TypeError, KeyError) as err:
        raise ManifestInvalid(f"trust store: {err}") from None
    return version, expires, roots, serials, fingerprints


def _roots(raw: Any) -> list[x509.Certificate]:
    if not isinstance(raw, list) or not 1 <= len(raw) <= MAX_ROOTS:
        raise ValueError(f"roots: between 1 and {MAX_ROOTS} certificates")
    roots = []
    for pem in raw:
        if not isinstance(pem, str):
            raise ValueError("roots: each one a PEM certificate")
        root = x509.load_pem_x509_certificate(pem.encode("ascii"))
        constraints = root.extensions.get_extension_for_class(x509.BasicConstraints).value
        if not constraints.ca:
            raise ValueError(f"roots: {root.subject.rfc4514_string()!r} is not a CA")
        roots.append(root)
    return roots


def _issuer_serials(raw: Any) -> set[tuple[str, int]]:
    if not isinstance(raw, list) or len(raw) > MAX_REVOKED:
        raise ValueError(f"revoked serials: a list of at most {MAX_REVOKED}")
    revoked = set()
    for item in raw:
        if (
            not isinstance(item, dict)
            or set(item) != {"issuer", "serial"}
            or not isinstance(item["issuer"], str)
            or not isinstance(item["serial"], str)
            or not _SERIAL.match(item["serial"])
        ):
            raise ValueError(f"revoked serial {item!r}: {{'issuer': DN, 'serial': lowercase hex}}")
        revoked.add((item["issuer"], int(item["serial"], 16)))
    return revoked


def _strings(raw: Any, pattern: re.Pattern[str], what: str) -> list[str]:
    if not isinstance(raw, list) or len(raw) > MAX_REVOKED:
        raise ValueError(f"revoked {what}s: a list of at most {MAX_REVOKED}")
    for item in raw:
        if not isinstance(item, str) or not pattern.match(item):
            raise ValueError(f"revoked {what} {item!r}: lowercase hex")
    return list(raw)
