"""Signing with a key that stays in a hardware token, through PKCS#11.

The token signs the DER of the CMS signed attributes (contentType, messageDigest,
signingTime); everything else of the detached SignedData is assembled here with asn1crypto,
so the private key never leaves the token. The result is the same CMS a PEM key gives
(`cms.sign_manifest`): nodes and `openssl cms -verify` cannot tell them apart.

A key is named by an RFC 7512 URI, `pkcs11:token=LABEL;object=LABEL` (or `id=%01`), with
the token's library as `?module-path=...` (else $THEMIS_PKCS11_MODULE, else SoftHSM2's).
The user PIN comes from a pin source, never the command line: `file:/path` (the file's
first line) or `env:NAME`. The signer certificate is the token's certificate object of
the same label or id, or a PEM file (`cert_path`).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import unquote_to_bytes

import pkcs11
from asn1crypto import algos, cms
from asn1crypto import x509 as asn1_x509
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass
from pkcs11.util.ec import encode_ecdsa_signature

from .cms import check_detached_signature
from .errors import UsageError

DEFAULT_MODULE = "/usr/lib/softhsm/libsofthsm2.so"
MODULE_ENV = "THEMIS_PKCS11_MODULE"
_PATH_ATTRIBUTES = {"token", "object", "id", "type", "manufacturer", "serial", "model"}
_QUERY_ATTRIBUTES = {"module-path", "pin-source"}


@dataclass(frozen=True)
class Pkcs11Uri:
    """The parts of an RFC 7512 URI this signer uses."""

    token: str
    object_label: str | None
    object_id: bytes | None
    module_path: str | None
    pin_source: str | None

    @classmethod
    def parse(cls, uri: str) -> Pkcs11Uri:
        if not uri.startswith("pkcs11:"):
            raise UsageError(f"--pkcs11-uri: {uri!r} is not a pkcs11: URI (RFC 7512)")
        path, _, query = uri.removeprefix("pkcs11:").partition("?")
        attributes = _pairs(path, ";", _PATH_ATTRIBUTES, "path")
        options = _pairs(query, "&", _QUERY_ATTRIBUTES, "query")
        if "token" not in attributes:
            raise UsageError("--pkcs11-uri: name the token (token=LABEL)")
        if "object" not in attributes and "id" not in attributes:
            raise UsageError("--pkcs11-uri: name the key (object=LABEL or id=%XX)")
        if attributes.get("type", b"private") != b"private":
            raise UsageError("--pkcs11-uri: type must be private (the signing key)")
        return cls(
            token=attributes["token"].decode(),
            object_label=attributes["object"].decode() if "object" in attributes else None,
            object_id=attributes.get("id"),
            module_path=options["module-path"].decode() if "module-path" in options else None,
            pin_source=options["pin-source"].decode() if "pin-source" in options else None,
        )


def _pairs(text: str, separator: str, known: set[str], where: str) -> dict[str, bytes]:
    found: dict[str, bytes] = {}
    for part in filter(None, text.split(separator)):
        name, equals, value = part.partition("=")
        if not equals or name not in known:
            raise UsageError(f"--pkcs11-uri: {where} attribute {part!r} is not one this reads")
        found[name] = unquote_to_bytes(value)
    return found


def read_pin(source: str) -> str:
    """The PIN from `file:/path` (first line) or `env:NAME`; never a PIN itself."""
    kind, _, where = source.partition(":")
    if kind == "file" and where:
        try:
            lines = Path(where.removeprefix("//")).read_text().splitlines()
        except OSError as err:
            raise UsageError(f"--pin-source: cannot read {where!r}: {err.strerror}") from None
        if not lines or not lines[0]:
            raise UsageError(f"--pin-source: {where!r} is empty")
        return lines[0]
    if kind == "env" and where:
        pin = os.environ.get(where, "")
        if not pin:
            raise UsageError(f"--pin-source: ${where} is not set")
        return pin
    raise UsageError(f"--pin-source: {source!r}: use file:/path or env:NAME")


@dataclass(frozen=True)
class Pkcs11Signer:
    """A manifest signer (bundle.ManifestSigner) whose key is in a PKCS#11 token."""

    uri: str
    pin_source: str | None = None
    cert_path: Path | None = None
    chain_path: Path | None = None

    def __call__(self, manifest_bytes: bytes) -> bytes:
        where = Pkcs11Uri.parse(self.uri)
        pin = read_pin(self.pin_source or where.pin_source or "")
        module = where.module_path or os.environ.get(MODULE_ENV) or DEFAULT_MODULE
        chain = _pem_certificates(self.chain_path) if self.chain_path else []
        try:
            token = pkcs11.lib(module).get_token(token_label=where.token)
            with token.open(user_pin=pin) as session:
                key = session.get_key(
                    object_class=ObjectClass.PRIVATE_KEY,
                    label=where.object_label,
                    id=where.object_id,
                )
                cert = (
                    _pem_certificates(self.cert_path)[0]
                    if self.cert_path
                    else _token_certificate(session, where)
                )
                if not isinstance(key, pkcs11.SignMixin):
                    raise UsageError(f"PKCS#11: {where.object_label or 'the key'} cannot sign")
                return _signed_data(manifest_bytes, cert, chain, key)
        except pkcs11.PKCS11Error as err:
            # The library's own words (no such token, PIN incorrect, no such key...).
            raise UsageError(f"PKCS#11 ({module}): {type(err).__name__}: {err}") from None
        except OSError as err:
            raise UsageError(f"PKCS#11 module {module!r}: cannot load: {err}") from None


def _pem_certificates(path: Path) -> list[x509.Certificate]:
    try:
        certs = x509.load_pem_x509_certificates(Path(path).read_bytes())
    except (OSError, ValueError) as err:
        raise UsageError(f"signing material: cannot load {str(path)!r}: {err}") from None
    return certs


def _token_certificate(session: pkcs11.Session, where: Pkcs11Uri) -> x509.Certificate:
    wanted: dict[Attribute, object] = {Attribute.CLASS: ObjectClass.CERTIFICATE}
    if where.object_label is not None:
        wanted[Attribute.LABEL] = where.object_label
    if where.object_id is not None:
        wanted[Attribute.ID] = where.object_id
    for found in session.get_objects(wanted):
        return x509.load_der_x509_certificate(bytes(found[Attribute.VALUE]))
    raise UsageError("PKCS#11: no certificate beside the key in the token: pass --cert")


def _signed_data(
    manifest_bytes: bytes,
    cert: x509.Certificate,
    chain: list[x509.Certificate],
    key: pkcs11.SignMixin,
) -> bytes:
    attrs = cms.CMSAttributes(
        [
            cms.CMSAttribute({"type": "content_type", "values": ["data"]}),
            cms.CMSAttribute(
                {"type": "message_digest", "values": [hashlib.sha256(manifest_bytes).digest()]}
            ),
            cms.CMSAttribute(
                {
                    "type": "signing_time",
                    "values": [cms.Time({"utc_time": datetime.now(UTC).replace(microsecond=0)})],
                }
            ),
        ]
    )
    # The token signs the attributes' DER as a SET OF (RFC 5652 5.4).
    if key.key_type == KeyType.RSA:
        signature = key.sign(attrs.dump(), mechanism=Mechanism.SHA256_RSA_PKCS)
        algorithm = "sha256_rsa"
    elif key.key_type == KeyType.EC:
        # Plain ECDSA over our own SHA-256: every token has it (SoftHSM2 has no
        # CKM_ECDSA_SHA256), and it is the same signature.
        raw = key.sign(hashlib.sha256(attrs.dump()).digest(), mechanism=Mechanism.ECDSA)
        signature = encode_ecdsa_signature(raw)
        algorithm = "sha256_ecdsa"
    else:
        raise UsageError(f"PKCS#11: a {key.key_type.name} key cannot sign bundles (RSA or ECDSA)")
    leaf = asn1_x509.Certificate.load(cert.public_bytes(serialization.Encoding.DER))
    signer_info = cms.SignerInfo(
        {
            "version": "v1",
            "sid": cms.SignerIdentifier(
                {
                    "issuer_and_serial_number": cms.IssuerAndSerialNumber(
                        {"issuer": leaf.issuer, "serial_number": leaf.serial_number}
                    )
                }
            ),
            "digest_algorithm": algos.DigestAlgorithm({"algorithm": "sha256"}),
            "signed_attrs": attrs,
            "signature_algorithm": algos.SignedDigestAlgorithm({"algorithm": algorithm}),
            "signature": signature,
        }
    )
    extra = [asn1_x509.Certificate.load(c.public_bytes(serialization.Encoding.DER)) for c in chain]
    signed = cms.SignedData(
        {
            "version": "v1",
            "digest_algorithms": [algos.DigestAlgorithm({"algorithm": "sha256"})],
            "encap_content_info": {"content_type": "data"},  # detached: no content
            "certificates": [leaf, *extra],
            "signer_infos": [signer_info],
        }
    )
    der = cms.ContentInfo({"content_type": "signed_data", "content": signed}).dump()
    # The token's key must be the certificate's: a signature the nodes would refuse is
    # never written into a bundle.
    check_detached_signature(manifest_bytes, der, cert)
    return bytes(der)
