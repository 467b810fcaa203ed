"""A SoftHSM2 token with signing keys made inside it, for the tests that sign through
PKCS#11 (the engine's CLI, the dashboard's delta bundles)."""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pkcs11
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from pkcs11 import Attribute, CertificateType, KeyType, ObjectClass
from pkcs11.util.ec import encode_ec_public_key, encode_named_curve_parameters

from updates.engine.cms import TRUST_STORE_SIGNING
from updates.engine.devpki import Pki
from updates.engine.hsm import DEFAULT_MODULE

PIN = "1234"


@dataclass(frozen=True)
class Token:
    label: str
    pin_file: Path
    rsa_cert: Path  # also stored in the token, beside the RSA key
    ec_cert: Path  # only as a file
    ec_store_cert: Path  # the EC key as a trust-store signer (its EKU)

    def uri(self, key: str) -> str:
        return f"pkcs11:token={self.label};object={key}"


# Every token a test process uses. The library reads its token directory once, when it
# is first loaded: a token made after that is not seen, so they are all made before.
TOKENS = ("themis-test", "themis-dashboard")


def _softhsm_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """This process's SoftHSM2 configuration, with every token of TOKENS made."""
    if not shutil.which("softhsm2-util") or not Path(DEFAULT_MODULE).exists():
        pytest.fail("SoftHSM2 is not installed: run `make install`")
    existing = os.environ.get("SOFTHSM2_CONF", "")
    if existing.startswith(str(tmp_path_factory.getbasetemp())):
        return Path(existing).parent
    home = tmp_path_factory.mktemp("softhsm")
    (home / "tokens").mkdir()
    conf = home / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {home}/tokens\nobjectstore.backend = file\n")
    os.environ["SOFTHSM2_CONF"] = str(conf)
    for label in TOKENS:
        subprocess.run(
            ["softhsm2-util", "--init-token", "--free", "--label", label, "--pin", PIN,
             "--so-pin", "5678"],
            check=True, capture_output=True,
        )  # fmt: skip
    return home


def make_token(tmp_path_factory: pytest.TempPathFactory, pki: Pki, label: str) -> Token:
    """The token `label` (one of TOKENS) with an RSA-2048 and an ECDSA P-256 key generated
    inside it, and certificates from `pki`'s intermediate for them."""
    assert label in TOKENS, label
    home = _softhsm_home(tmp_path_factory) / label
    home.mkdir()
    pin_file = home / "pin"
    pin_file.write_text(PIN + "\n")
    secret = {Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False}
    with (
        pkcs11.lib(DEFAULT_MODULE)
        .get_token(token_label=label)
        .open(user_pin=PIN, rw=True) as session
    ):
        rsa_pub, _ = session.generate_keypair(
            KeyType.RSA, 2048, store=True, label="release-rsa", id=b"\x01",
            private_template=secret,
        )  # fmt: skip
        params = session.create_domain_parameters(
            KeyType.EC, {Attribute.EC_PARAMS: encode_named_curve_parameters("secp256r1")},
            local=True,
        )  # fmt: skip
        ec_pub, _ = params.generate_keypair(
            store=True, label="release-ec", id=b"\x02", private_template=secret
        )
        rsa_public = rsa.RSAPublicNumbers(
            int.from_bytes(rsa_pub[Attribute.PUBLIC_EXPONENT]),
            int.from_bytes(rsa_pub[Attribute.MODULUS]),
        ).public_key()
        ec_public = serialization.load_der_public_key(encode_ec_public_key(ec_pub))
        rsa_cert = _issue(pki, rsa_public, "hsm-rsa", home)
        ec_cert = _issue(pki, ec_public, "hsm-ec", home)
        ec_store_cert = _issue(pki, ec_public, "hsm-ec-store", home, eku=TRUST_STORE_SIGNING)
        stored = x509.load_pem_x509_certificate(rsa_cert.read_bytes())
        session.create_object({
            Attribute.CLASS: ObjectClass.CERTIFICATE,
            Attribute.CERTIFICATE_TYPE: CertificateType.X_509,
            Attribute.TOKEN: True,
            Attribute.LABEL: "release-rsa",
            Attribute.ID: b"\x01",
            Attribute.SUBJECT: stored.subject.public_bytes(),
            Attribute.VALUE: stored.public_bytes(serialization.Encoding.DER),
        })  # fmt: skip
    return Token(label, pin_file, rsa_cert, ec_cert, ec_store_cert)


def _issue(
    pki: Pki,
    public_key: object,
    name: str,
    where: Path,
    eku: x509.ObjectIdentifier = ExtendedKeyUsageOID.CODE_SIGNING,
) -> Path:
    """A code-signing certificate for a key that never left the token, from the test
    PKI's intermediate (only the public key is needed)."""
    issuer = x509.load_pem_x509_certificate(pki.chain.read_bytes())
    issuer_key = serialization.load_pem_private_key(pki.intermediate.key.read_bytes(), None)
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"HSM signer {name}")]))
        .issuer_name(issuer.subject)
        .public_key(public_key)  # type: ignore[arg-type]
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(True, False, False, False, False, False, False, False, False),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(public_key),  # type: ignore[arg-type]
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.public_key()),  # type: ignore[arg-type]
            critical=False,
        )
        .sign(issuer_key, hashes.SHA256())  # type: ignore[arg-type]
    )
    path = where / f"{name}.pem"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path
