"""CMS structure rules, one mutation of a valid signature at a time."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from asn1crypto import cms
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
)

from tests.engine.malicious import encode, manifest_doc, openssl_sign, sign
from updates.engine.cms import sign_manifest, verify_manifest_signature
from updates.engine.devpki import Pki
from updates.engine.errors import SignatureInvalid, UsageError

MANIFEST = encode(manifest_doc({"bin/themisd": b"x"}))


def _mutated(pki: Pki, change: Callable[[Any, Any], None]) -> bytes:
    info = cms.ContentInfo.load(sign(MANIFEST, pki.leaf, pki.chain))
    signed_data = info["content"]
    change(signed_data, signed_data["signer_infos"][0])
    dumped: bytes = info.dump(force=True)  # asn1crypto is untyped
    return dumped


def _attrs(signer_info: Any) -> list[Any]:
    return list(signer_info["signed_attrs"])


def _set_attrs(signer_info: Any, attrs: list[Any]) -> None:
    signer_info["signed_attrs"] = cms.CMSAttributes(attrs)


def _attr(kind: str, *values: Any) -> Any:
    return cms.CMSAttribute({"type": kind, "values": list(values)})


MUTATIONS: dict[str, tuple[Callable[[Any, Any], None], str]] = {
    "encapsulated_type": (
        lambda sd, si: sd["encap_content_info"].__setitem__("content_type", "signed_data"),
        "not id-data",
    ),
    "digest_sha384": (
        lambda sd, si: si["digest_algorithm"].__setitem__("algorithm", "sha384"),
        "not SHA-256",
    ),
    "no_signed_attrs": (lambda sd, si: si.__setitem__("signed_attrs", None), "missing"),
    "attr_twice": (lambda sd, si: _set_attrs(si, _attrs(si) + _attrs(si)[:1]), "appears twice"),
    "attr_two_values": (
        lambda sd, si: _set_attrs(si, [_attr("content_type", "data", "data")]),
        "one value",
    ),
    "content_type_attr": (
        lambda sd, si: _set_attrs(
            si,
            [a for a in _attrs(si) if a["type"].native != "content_type"]
            + [_attr("content_type", "signed_data")],
        ),
        "contentType",
    ),
    "no_message_digest": (
        lambda sd, si: _set_attrs(
            si, [a for a in _attrs(si) if a["type"].native != "message_digest"]
        ),
        "messageDigest attribute is missing",
    ),
    "no_certificates": (lambda sd, si: sd.__setitem__("certificates", None), "no certificates"),
    "too_many_certificates": (
        lambda sd, si: sd.__setitem__("certificates", list(sd["certificates"]) * 9),
        "more than 16",
    ),
    "algorithm_does_not_fit_key": (
        lambda sd, si: si["signature_algorithm"].__setitem__("algorithm", "sha256_ecdsa"),
        "does not fit",
    ),
    "signer_not_embedded": (
        lambda sd, si: sd.__setitem__(
            "certificates",
            [c for c in sd["certificates"] if "signer" not in c.chosen.subject.human_friendly],
        ),
        "not embedded",
    ),
}


@pytest.mark.parametrize("name", sorted(MUTATIONS))
def test_cms_structure_rules(pki: Pki, name: str) -> None:
    change, message = MUTATIONS[name]
    with pytest.raises(SignatureInvalid, match=message):
        verify_manifest_signature(MANIFEST, _mutated(pki, change), pki.root)


def test_outer_content_type_must_be_signed_data(pki: Pki) -> None:
    data = cms.ContentInfo({"content_type": "data", "content": b"x"}).dump()
    with pytest.raises(SignatureInvalid, match="not signed_data"):
        verify_manifest_signature(MANIFEST, data, pki.root)


def test_subject_key_identifier_signer_is_found(pki: Pki, tmp_path: Path) -> None:
    signature = openssl_sign(MANIFEST, tmp_path, [pki.leaf], pki.chain, "-keyid")
    assert "release signer (leaf)" in verify_manifest_signature(MANIFEST, signature, pki.root)


def test_pss_with_other_hashes_is_rejected(pki: Pki, tmp_path: Path) -> None:
    signature = openssl_sign(
        MANIFEST, tmp_path, [pki.leaf], pki.chain,
        "-keyopt", "rsa_padding_mode:pss", "-keyopt", "rsa_mgf1_md:sha1",
    )  # fmt: skip
    with pytest.raises(SignatureInvalid, match="RSASSA-PSS parameters"):
        verify_manifest_signature(MANIFEST, signature, pki.root)


def test_signing_refuses_unusable_keys(pki: Pki, tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="cannot load"):
        sign_manifest(MANIFEST, key_path=tmp_path / "none.key", cert_path=pki.leaf.cert)
    key = tmp_path / "ed.key"
    key.write_bytes(
        ed25519.Ed25519PrivateKey.generate().private_bytes(
            Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()
        )
    )
    with pytest.raises(UsageError, match="cannot sign bundles"):
        sign_manifest(MANIFEST, key_path=key, cert_path=pki.leaf.cert)


def test_certificate_objects_are_accepted_as_anchor(pki: Pki) -> None:
    from cryptography import x509

    root = x509.load_pem_x509_certificate(pki.root.read_bytes())
    signature = sign(MANIFEST, pki.ec_leaf, pki.chain)
    assert "ec-leaf" in verify_manifest_signature(MANIFEST, signature, root)
