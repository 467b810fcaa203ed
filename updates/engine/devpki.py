"""A throw-away code-signing PKI made with the `openssl` CLI.

For tests and for the local demo (`make run`) only: every subject says DEMO,
keys are unencrypted and live next to the certificates. Besides the normal
root -> intermediate -> code-signing leaf chain it makes the broken signers the
malicious-bundle tests need (expired, not yet valid, no codeSigning EKU,
RSA-1024, and a rogue hierarchy with the same names but different keys).

`openssl ca` is used for every issued certificate because it is the only
OpenSSL 3.0 command that can set arbitrary notBefore/notAfter dates.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from dataclasses import dataclass, fields
from pathlib import Path

ORG = "/O=Themis DEMO (not for production)"
ROOT_SUBJECT = f"{ORG}/CN=Themis DEMO Root CA"
INTERMEDIATE_SUBJECT = f"{ORG}/CN=Themis DEMO Intermediate CA"
NEXT_ROOT_SUBJECT = f"{ORG}/CN=Themis DEMO Root CA 2"
NEXT_INTERMEDIATE_SUBJECT = f"{ORG}/CN=Themis DEMO Intermediate CA 2"
# Named for what the directory holds: a directory made before the trust-store signers
# existed is made again.
DONE_MARKER = "pki.complete.2"
# The trust-store signing extended key usage (updates.engine.cms.TRUST_STORE_SIGNING).
TRUST_STORE_EKU = "2.25.186331452373011622513302658493516231547"

_CA_CONFIG = """\
[ ca ]
default_ca = ca_default

[ ca_default ]
dir = {dir}
database = $dir/index.txt
new_certs_dir = $dir/issued
serial = $dir/serial
default_md = sha256
default_days = 3650
policy = policy_any
unique_subject = no
copy_extensions = none
email_in_dn = no
preserve = yes

[ policy_any ]
organizationName = optional
commonName = supplied

[ req ]
distinguished_name = req_dn
prompt = no
[ req_dn ]
CN = unused

[ v3_root ]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash

[ v3_intermediate ]
basicConstraints = critical, CA:TRUE, pathlen:0
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid:always

[ v3_codesign ]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = codeSigning
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid:always

[ v3_truststore ]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = {trust_store_eku}
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid:always

[ v3_serverauth ]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = serverAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid:always
"""


@dataclass(frozen=True)
class KeyPair:
    cert: Path
    key: Path


@dataclass(frozen=True)
class Pki:
    directory: Path
    root: Path  # the trust anchor
    root_key: Path
    intermediate: KeyPair
    chain: Path  # intermediates to embed next to the leaf
    leaf: KeyPair  # RSA-2048, codeSigning: the good signer
    ec_leaf: KeyPair  # ECDSA P-256, codeSigning: also good
    expired_leaf: KeyPair
    not_yet_valid_leaf: KeyPair
    no_codesign_leaf: KeyPair  # serverAuth only
    rsa1024_leaf: KeyPair
    rogue_root: Path  # same subject names as the real hierarchy, other keys
    rogue_chain: Path
    rogue_leaf: KeyPair
    store_signer: KeyPair  # signs trust stores (its own EKU), under the root
    # A second hierarchy, for a root rollover: its root, intermediate, a release signer
    # and a trust-store signer.
    next_root: Path
    next_chain: Path
    next_leaf: KeyPair
    next_store_signer: KeyPair


def _openssl(*args: str | Path) -> None:
    result = subprocess.run(
        ["openssl", *map(str, args)], capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        raise RuntimeError(f"openssl {args[0]} failed: {result.stderr.strip()}")


def _key(path: Path, kind: str) -> Path:
    if kind == "ec":
        _openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", path)
    else:
        bits = kind.removeprefix("rsa")
        _openssl(
            "genpkey", "-algorithm", "RSA", "-pkeyopt", f"rsa_keygen_bits:{bits}", "-out", path
        )
    return path


class _Ca:
    """One `openssl ca` database: a CA certificate plus its issuing state."""

    def __init__(self, directory: Path, subject: str, *, issuer: _Ca | None = None) -> None:
        self.dir = directory
        (directory / "issued").mkdir(parents=True, exist_ok=True)
        (directory / "index.txt").write_text("")
        (directory / "serial").write_text("1000\n")
        self.config = directory / "ca.cnf"
        self.config.write_text(_CA_CONFIG.format(dir=directory, trust_store_eku=TRUST_STORE_EKU))
        self.key = _key(directory / "ca.key", "rsa2048")
        self.cert = directory / "ca.pem"
        if issuer is None:
            _openssl(
                "req", "-config", self.config, "-new", "-x509", "-key", self.key,
                "-subj", subject, "-days", "7300", "-sha256", "-extensions", "v3_root",
                "-out", self.cert,
            )  # fmt: skip
        else:
            issuer.issue(self.key, subject, self.cert, extensions="v3_intermediate")

    def issue(
        self,
        key: Path,
        subject: str,
        out: Path,
        *,
        extensions: str = "v3_codesign",
        dates: tuple[str, str] | None = None,
    ) -> Path:
        csr = out.with_suffix(".csr")
        _openssl("req", "-config", self.config, "-new", "-key", key, "-subj", subject, "-out", csr)
        window = ["-startdate", dates[0], "-enddate", dates[1]] if dates else ["-days", "3650"]
        _openssl(
            "ca", "-batch", "-config", self.config, "-cert", self.cert, "-keyfile", self.key,
            "-in", csr, "-out", out, "-extensions", extensions, "-notext", *window,
        )  # fmt: skip
        csr.unlink()
        return out


def _leaf(
    ca: _Ca,
    directory: Path,
    name: str,
    *,
    kind: str = "rsa2048",
    extensions: str = "v3_codesign",
    dates: tuple[str, str] | None = None,
) -> KeyPair:
    key = _key(directory / f"{name}.key", kind)
    subject = f"{ORG}/CN=Themis DEMO release signer ({name})"
    cert = ca.issue(key, subject, directory / f"{name}.pem", extensions=extensions, dates=dates)
    return KeyPair(cert=cert, key=key)


def _paths(directory: Path) -> Pki:
    def pair(name: str) -> KeyPair:
        return KeyPair(cert=directory / f"{name}.pem", key=directory / f"{name}.key")

    return Pki(
        directory=directory,
        root=directory / "root.pem",
        root_key=directory / "ca-root" / "ca.key",
        intermediate=KeyPair(
            cert=directory / "ca-intermediate" / "ca.pem",
            key=directory / "ca-intermediate" / "ca.key",
        ),
        chain=directory / "chain.pem",
        leaf=pair("leaf"),
        ec_leaf=pair("ec-leaf"),
        expired_leaf=pair("expired-leaf"),
        not_yet_valid_leaf=pair("not-yet-valid-leaf"),
        no_codesign_leaf=pair("no-codesign-leaf"),
        rsa1024_leaf=pair("rsa1024-leaf"),
        rogue_root=directory / "rogue-root.pem",
        rogue_chain=directory / "rogue-chain.pem",
        rogue_leaf=pair("rogue-leaf"),
        store_signer=pair("store-signer"),
        next_root=directory / "next-root.pem",
        next_chain=directory / "next-chain.pem",
        next_leaf=pair("next-leaf"),
        next_store_signer=pair("next-store-signer"),
    )


def make_pki(directory: Path) -> Pki:
    """Create the demo/test PKI in `directory`, or reuse a complete one."""
    directory = Path(directory).resolve()
    pki = _paths(directory)
    if (directory / DONE_MARKER).exists():
        return pki
    directory.mkdir(parents=True, exist_ok=True)
    root = _Ca(directory / "ca-root", ROOT_SUBJECT)
    inter = _Ca(directory / "ca-intermediate", INTERMEDIATE_SUBJECT, issuer=root)
    shutil.copyfile(root.cert, pki.root)
    shutil.copyfile(inter.cert, pki.chain)
    _leaf(inter, directory, "leaf")
    _leaf(inter, directory, "ec-leaf", kind="ec")
    _leaf(inter, directory, "expired-leaf", dates=("200101000000Z", "210101000000Z"))
    _leaf(inter, directory, "not-yet-valid-leaf", dates=("450101000000Z", "460101000000Z"))
    _leaf(inter, directory, "no-codesign-leaf", extensions="v3_serverauth")
    _leaf(inter, directory, "rsa1024-leaf", kind="rsa1024")
    rogue_root = _Ca(directory / "ca-rogue-root", ROOT_SUBJECT)
    rogue_inter = _Ca(directory / "ca-rogue-intermediate", INTERMEDIATE_SUBJECT, issuer=rogue_root)
    shutil.copyfile(rogue_root.cert, pki.rogue_root)
    shutil.copyfile(rogue_inter.cert, pki.rogue_chain)
    _leaf(rogue_inter, directory, "rogue-leaf")
    _leaf(inter, directory, "store-signer", extensions="v3_truststore")
    next_root = _Ca(directory / "ca-next-root", NEXT_ROOT_SUBJECT)
    next_inter = _Ca(
        directory / "ca-next-intermediate", NEXT_INTERMEDIATE_SUBJECT, issuer=next_root
    )
    shutil.copyfile(next_root.cert, pki.next_root)
    shutil.copyfile(next_inter.cert, pki.next_chain)
    _leaf(next_inter, directory, "next-leaf")
    _leaf(next_inter, directory, "next-store-signer", extensions="v3_truststore")
    (directory / DONE_MARKER).write_text("complete\n")
    return pki


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Create a DEMO code-signing PKI (not for production)."
    )
    parser.add_argument("directory", type=Path)
    args = parser.parse_args(argv)
    pki = make_pki(args.directory)
    for item in fields(pki):
        print(f"{item.name}: {getattr(pki, item.name)}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
