"""Detached CMS SignedData over the manifest: signing and verification.

Verification is fail-closed: any exception raised while parsing or checking
(asn1crypto, cryptography, a bug of ours) becomes SignatureInvalid, never a
crash and never an accept. asn1crypto parses the structure; cryptography does
every cryptographic check (signature, chain building, validity, EKU).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any

from asn1crypto import cms, core
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.serialization import pkcs7
from cryptography.x509.oid import ExtendedKeyUsageOID
from cryptography.x509.verification import Criticality, ExtensionPolicy, PolicyBuilder, Store

from .errors import SignatureInvalid, UsageError

log = logging.getLogger("themis_update.bundle")

MIN_RSA_BITS = 2048
MAX_RSA_BITS = 16384
ALLOWED_CURVES = ("secp256r1", "secp384r1")
MAX_CERTIFICATES = 16  # in the SignedData set: leaf + a few intermediates
MAX_CHAIN_DEPTH = 6

# A certificate with this extended key usage may sign a trust store (updates.engine.trust):
# a release signer (codeSigning) may not, and a trust-store signer may not sign releases.
# An OID under the UUID arc (2.25, ITU-T X.667): no registry needed, no clash.
TRUST_STORE_SIGNING = x509.ObjectIdentifier("2.25.186331452373011622513302658493516231547")


class Purpose(StrEnum):
    """What a signature is for, and so which extended key usage its signer needs."""

    RELEASE = "release"  # a bundle's manifest: codeSigning
    TRUST_STORE = "trust store"  # a node's trust store: TRUST_STORE_SIGNING


@dataclass(frozen=True)
class Trust:
    """What a signature is checked against: the roots, the certificates revoked under
    them (by issuer and serial number, or by SHA-256 fingerprint; leaf or intermediate),
    until when it holds, and what it is (named in refusals)."""

    roots: tuple[x509.Certificate, ...]
    # (issuer as RFC 4514, serial): a serial number is unique only within its issuer.
    revoked_serials: frozenset[tuple[str, int]] = frozenset()
    revoked_fingerprints: frozenset[str] = frozenset()
    expires: datetime | None = None
    name: str = "the trust anchor"

    def revoked(self, cert: x509.Certificate) -> bool:
        issued = (cert.issuer.rfc4514_string(), cert.serial_number)
        fingerprint = cert.fingerprint(hashes.SHA256()).hex()
        return issued in self.revoked_serials or fingerprint in self.revoked_fingerprints


TrustAnchor = Path | x509.Certificate | Sequence[x509.Certificate] | Trust


class _Reject(Exception):
    """A known reason to reject, with a message fit for the operator."""


# --------------------------------------------------------------------- signing


def sign_manifest(
    manifest_bytes: bytes,
    *,
    key_path: Path,
    cert_path: Path,
    chain_path: Path | None = None,
    password: bytes | None = None,
) -> bytes:
    """A DER detached CMS SignedData over `manifest_bytes` (SHA-256, signed
    attributes contentType/messageDigest/signingTime, certificates embedded)."""
    try:
        key = serialization.load_pem_private_key(Path(key_path).read_bytes(), password)
        cert = x509.load_pem_x509_certificate(Path(cert_path).read_bytes())
        chain = x509.load_pem_x509_certificates(Path(chain_path).read_bytes()) if chain_path else []
    except (OSError, ValueError, TypeError) as exc:
        raise UsageError(f"signing material: cannot load: {exc}") from None
    if not isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):
        raise UsageError(f"--key: {type(key).__name__} keys cannot sign bundles (RSA or ECDSA)")
    if _public_der(key.public_key()) != _public_der(cert.public_key()):
        raise UsageError(f"--key: {str(key_path)!r} does not match --cert {str(cert_path)!r}")
    builder = pkcs7.PKCS7SignatureBuilder().set_data(manifest_bytes)
    builder = builder.add_signer(cert, key, hashes.SHA256())
    for extra in chain:
        builder = builder.add_certificate(extra)
    options = [
        pkcs7.PKCS7Options.DetachedSignature,
        pkcs7.PKCS7Options.Binary,  # sign the bytes as they are, no CRLF translation
        pkcs7.PKCS7Options.NoCapabilities,  # only contentType, messageDigest, signingTime
    ]
    return builder.sign(serialization.Encoding.DER, options)


# Signs a manifest (or trust store) and returns the detached CMS SignedData (DER): a PEM
# key (`manifest_signer`) or a key in a PKCS#11 token (hsm.Pkcs11Signer).
ManifestSigner = Callable[[bytes], bytes]


def manifest_signer(
    signer: ManifestSigner | None,
    key_path: Path | None,
    cert_path: Path | None,
    chain_path: Path | None = None,
) -> ManifestSigner:
    """`signer` (a key in a token), else one signing with the PEM key and certificate."""
    if signer is not None:
        return signer
    if key_path is None or cert_path is None:
        raise UsageError("signing: --key and --cert, or a PKCS#11 key (--pkcs11-uri)")
    pem_key, pem_cert = key_path, cert_path

    def sign(manifest_bytes: bytes) -> bytes:
        return sign_manifest(
            manifest_bytes, key_path=pem_key, cert_path=pem_cert, chain_path=chain_path
        )

    return sign


def check_detached_signature(
    manifest_bytes: bytes, signature: bytes, cert: x509.Certificate
) -> None:
    """UsageError unless `signature` is a SignedData over `manifest_bytes` by `cert`'s key
    (the signer's own check before writing: no chain, no time, no trust)."""
    try:
        _check_signature(_signer_over(manifest_bytes, _signed_data(signature)), cert.public_key())
    except _Reject as err:
        raise UsageError(f"the signing key does not match the certificate: {err}") from None


def _public_der(key: Any) -> bytes:
    return bytes(
        key.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )


# ---------------------------------------------------------------- verification


def load_trust(anchor: TrustAnchor) -> Trust:
    if isinstance(anchor, Trust):
        return anchor
    if isinstance(anchor, x509.Certificate):
        return Trust((anchor,))
    if isinstance(anchor, Path | str):
        try:
            certs = x509.load_pem_x509_certificates(Path(anchor).read_bytes())
        except (OSError, ValueError) as exc:
            raise SignatureInvalid(f"trust anchor: cannot load {str(anchor)!r}: {exc}") from None
        return Trust(tuple(certs), name=f"trust anchor {str(anchor)!r}")
    return Trust(tuple(anchor))


def load_trust_anchors(anchor: TrustAnchor) -> list[x509.Certificate]:
    return list(load_trust(anchor).roots)


def verify_manifest_signature(
    manifest_bytes: bytes,
    signature: bytes,
    trust_anchor_cert: TrustAnchor,
    now: datetime | None = None,
    purpose: Purpose = Purpose.RELEASE,
) -> str:
    """Verify the detached CMS `signature` over `manifest_bytes` against the
    trust anchor; return the signer's subject (RFC 4514) or raise
    SignatureInvalid. Fail-closed: every error is a rejection."""
    try:
        return check_signature(
            manifest_bytes, signature, load_trust(trust_anchor_cert), now, purpose
        )
    except SignatureInvalid as err:
        log.info("bundle rejected (%s): %s", err.code, err)
        raise


def check_signature(
    manifest_bytes: bytes,
    signature: bytes,
    anchors: list[x509.Certificate] | Trust,
    now: datetime | None = None,
    purpose: Purpose = Purpose.RELEASE,
) -> str:
    """`verify_manifest_signature` without the log line (callers log once)."""
    trust = anchors if isinstance(anchors, Trust) else Trust(tuple(anchors))
    try:
        return _verify(manifest_bytes, signature, trust, now or datetime.now(UTC), purpose)
    except _Reject as exc:
        message = f"signature: {exc}"
    except Exception as exc:  # fail closed: malformed input must not crash or pass
        message = f"signature: unreadable or invalid CMS ({type(exc).__name__}: {exc})"
    raise SignatureInvalid(message)


@dataclass
class CmsSignatureValidator:
    """The real `SignatureValidator` (protocols.py)."""

    trust_anchor: TrustAnchor
    clock: Callable[[], datetime] | None = None

    def verify(self, manifest_bytes: bytes, signature: bytes) -> str:
        now = self.clock() if self.clock else None
        return verify_manifest_signature(manifest_bytes, signature, self.trust_anchor, now)


def _verify(
    manifest_bytes: bytes, signature: bytes, trust: Trust, now: datetime, purpose: Purpose
) -> str:
    if not trust.roots:
        raise _Reject("no trust anchor")
    if trust.expires is not None and now >= trust.expires:
        # Fail closed, as TUF does: a node cut off from newer trust decisions (a freeze
        # attack) must not go on trusting what may since have been revoked.
        raise _Reject(f"{trust.name} expired at {trust.expires:%Y-%m-%dT%H:%M:%SZ}: update it")
    signed_data = _signed_data(signature)
    signer_info = _signer_over(manifest_bytes, signed_data)
    certs = _certificates(signed_data)
    index = _signer_index(signer_info, certs)
    leaf = x509.load_der_x509_certificate(certs[index].dump())
    key = _checked_public_key(leaf)
    _check_signature(signer_info, key)
    intermediates = [
        x509.load_der_x509_certificate(c.dump()) for i, c in enumerate(certs) if i != index
    ]
    chain = _verify_chain(leaf, intermediates, trust, now, purpose)
    for cert in chain:
        if trust.revoked(cert):
            raise _Reject(
                f"certificate {cert.subject.rfc4514_string()!r} (serial {cert.serial_number:x})"
                f" is revoked by {trust.name}"
            )
    return leaf.subject.rfc4514_string()


def _signer_over(manifest_bytes: bytes, signed_data: cms.SignedData) -> cms.SignerInfo:
    """The single signer, whose signed messageDigest is that of `manifest_bytes`."""
    signer_info = _single_signer(signed_data)
    attrs = _signed_attributes(signer_info)
    digest = hashlib.sha256(manifest_bytes).digest()
    if not hmac.compare_digest(attrs["message_digest"], digest):
        raise _Reject("messageDigest does not match the manifest (tampered?)")
    return signer_info


def _signed_data(signature: bytes) -> cms.SignedData:
    info = cms.ContentInfo.load(signature, strict=True)
    if info["content_type"].native != "signed_data":
        raise _Reject(f"CMS content type is {info['content_type'].native!r}, not signed_data")
    signed_data = info["content"]
    encap = signed_data["encap_content_info"]
    if encap["content_type"].native != "data":
        raise _Reject("encapsulated content type is not id-data")
    if not isinstance(encap["content"], core.Void):
        raise _Reject("signature is not detached (it embeds content)")
    return signed_data


def _single_signer(signed_data: cms.SignedData) -> cms.SignerInfo:
    signer_infos = signed_data["signer_infos"]
    if len(signer_infos) != 1:
        raise _Reject(f"expected exactly one SignerInfo, found {len(signer_infos)}")
    signer_info = signer_infos[0]
    if signer_info["digest_algorithm"]["algorithm"].native != "sha256":
        raise _Reject("digest algorithm is not SHA-256")
    return signer_info


def _signed_attributes(signer_info: cms.SignerInfo) -> dict[str, Any]:
    attrs = signer_info["signed_attrs"]
    if isinstance(attrs, core.Void) or len(attrs) == 0:
        raise _Reject("signed attributes are missing")
    found: dict[str, Any] = {}
    for attr in attrs:
        kind = attr["type"].native
        if kind in found:
            raise _Reject(f"signed attribute {kind!r} appears twice")
        values = attr["values"]
        if len(values) != 1:
            raise _Reject(f"signed attribute {kind!r} must have one value")
        found[kind] = values[0].native
    if found.get("content_type") != "data":
        raise _Reject("contentType attribute is missing or not id-data")
    if not isinstance(found.get("message_digest"), bytes):
        raise _Reject("messageDigest attribute is missing")
    return found


def _certificates(signed_data: cms.SignedData) -> list[Any]:
    certs = signed_data["certificates"]
    # .native would decode every certificate; only ask whether it is there.
    if isinstance(certs, core.Void) or len(certs) == 0:
        raise _Reject("no certificates embedded")
    if len(certs) > MAX_CERTIFICATES:
        raise _Reject(f"more than {MAX_CERTIFICATES} certificates embedded")
    result = []
    for choice in certs:
        if choice.name != "certificate":
            raise _Reject(f"unsupported certificate choice {choice.name!r}")
        result.append(choice.chosen)
    return result


def _signer_index(signer_info: cms.SignerInfo, certs: list[Any]) -> int:
    sid = signer_info["sid"]
    for index, cert in enumerate(certs):
        if sid.name == "issuer_and_serial_number":
            wanted = sid.chosen
            # Signers copy the issuer's DER into the SignerIdentifier, so exact
            # bytes match (and are much cheaper than RFC 4518 name matching).
            if (
                cert.issuer.dump() == wanted["issuer"].dump()
                and cert.serial_number == wanted["serial_number"].native
            ):
                return index
        elif sid.name == "subject_key_identifier" and cert.key_identifier == sid.chosen.native:
            return index
    raise _Reject("the signer's certificate is not embedded")


def _checked_public_key(cert: x509.Certificate) -> Any:
    key = cert.public_key()
    if isinstance(key, rsa.RSAPublicKey):
        if not MIN_RSA_BITS <= key.key_size <= MAX_RSA_BITS:
            raise _Reject(f"RSA key of {key.key_size} bits (need at least {MIN_RSA_BITS})")
    elif isinstance(key, ec.EllipticCurvePublicKey):
        if key.curve.name not in ALLOWED_CURVES:
            raise _Reject(f"EC curve {key.curve.name} is not allowed")
    else:
        raise _Reject(f"{type(key).__name__} signer keys are not allowed")
    return key


def _check_signature(signer_info: cms.SignerInfo, key: Any) -> None:
    # The signature covers the DER of the signed attributes as a SET OF
    # (tag 0x31), not the [0] IMPLICIT form they are carried in (RFC 5652 5.4).
    encoded = signer_info["signed_attrs"].dump()
    signed_bytes = b"\x31" + encoded[1:]
    signature = signer_info["signature"].native
    algorithm = signer_info["signature_algorithm"]
    name = algorithm["algorithm"].native
    try:
        if name in ("rsassa_pkcs1v15", "sha256_rsa") and isinstance(key, rsa.RSAPublicKey):
            key.verify(signature, signed_bytes, padding.PKCS1v15(), hashes.SHA256())
        elif name == "rsassa_pss" and isinstance(key, rsa.RSAPublicKey):
            key.verify(signature, signed_bytes, _pss_padding(algorithm), hashes.SHA256())
        elif name in ("sha256_ecdsa", "ecdsa") and isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(signature, signed_bytes, ec.ECDSA(hashes.SHA256()))
        else:
            raise _Reject(f"signature algorithm {name!r} does not fit the signer's key")
    except InvalidSignature:
        raise _Reject("signature over the signed attributes does not verify") from None


def _pss_padding(algorithm: Any) -> padding.PSS:
    params = algorithm["parameters"]
    mgf = params["mask_gen_algorithm"]
    if (
        params["hash_algorithm"]["algorithm"].native != "sha256"
        or mgf["algorithm"].native != "mgf1"
        or mgf["parameters"]["algorithm"].native != "sha256"
        or params["trailer_field"].native != "trailer_field_bc"
    ):
        raise _Reject("RSASSA-PSS parameters must use SHA-256 and MGF1-SHA-256")
    return padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=params["salt_length"].native)


# ----------------------------------------------------------------------- chain


def _require_code_signing(_policy: Any, _cert: x509.Certificate, eku: Any) -> None:
    if ExtendedKeyUsageOID.CODE_SIGNING not in eku:
        raise ValueError("the signer certificate lacks the codeSigning extended key usage")


def _require_trust_store_signing(_policy: Any, _cert: x509.Certificate, eku: Any) -> None:
    if TRUST_STORE_SIGNING not in eku:
        raise ValueError("the signer certificate lacks the trust-store signing extended key usage")


_EKU_CHECKS = {
    Purpose.RELEASE: _require_code_signing,
    Purpose.TRUST_STORE: _require_trust_store_signing,
}


def _require_digital_signature(_policy: Any, _cert: x509.Certificate, usage: Any) -> None:
    if usage is not None and (not usage.digital_signature or usage.key_cert_sign):
        raise ValueError("the signer certificate's key usage does not allow digitalSignature")


def _verify_chain(
    leaf: x509.Certificate,
    intermediates: list[x509.Certificate],
    trust: Trust,
    now: datetime,
    purpose: Purpose,
) -> list[x509.Certificate]:
    """The chain from `leaf` to one of the roots (leaf first), or _Reject."""
    # The WebPKI end-entity defaults, except that signing certificates carry no
    # subjectAltName and must carry the extended key usage of their purpose.
    ee_policy = (
        ExtensionPolicy.webpki_defaults_ee()
        .may_be_present(x509.SubjectAlternativeName, Criticality.AGNOSTIC, None)
        .require_present(x509.ExtendedKeyUsage, Criticality.AGNOSTIC, _EKU_CHECKS[purpose])
        .may_be_present(x509.KeyUsage, Criticality.AGNOSTIC, _require_digital_signature)
    )
    # A fresh verifier per check: the time is part of it.
    verifier = (
        PolicyBuilder()
        .store(Store(list(trust.roots)))
        .time(now)
        .max_chain_depth(MAX_CHAIN_DEPTH)
        .extension_policies(ca_policy=ExtensionPolicy.webpki_defaults_ca(), ee_policy=ee_policy)
        .build_client_verifier()
    )
    try:
        verified = verifier.verify(leaf, intermediates)
    except x509.verification.VerificationError as exc:
        raise _Reject(f"certificate chain rejected: {_short(exc)}") from None
    return list(verified.chain)


def _short(exc: Exception) -> str:
    # cryptography appends "(encountered processing <Certificate(...)>)"; keep the cause.
    return str(exc).split(" (encountered processing", 1)[0]
