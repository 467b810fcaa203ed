"""`themis-update trust`: make, install and show a node's signed trust store
(updates.engine.truststore). Each prints one JSON document on stdout; failures are
EngineErrors (exit code + one stderr line, handled by cli.main)."""

from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography import x509

from ..cms import load_trust
from ..errors import UsageError
from ..hsm import Pkcs11Signer
from ..truststore import (
    check_trust_store,
    install_trust_store,
    installed_trust_store,
    make_trust_store,
)


def register(sub: Any) -> None:
    trust = sub.add_parser("trust", help="a node's signed trust store: make, install, show")
    commands = trust.add_subparsers(dest="trust_command", metavar="TRUST_COMMAND")
    _create_parser(commands)
    _install_parser(commands)
    _show_parser(commands)


def _create_parser(commands: Any) -> None:
    p = commands.add_parser("create", help="make and sign a trust store")
    p.add_argument("--version", required=True, type=int, help="higher than every earlier one")
    p.add_argument("--expires-days", type=int, default=365, metavar="DAYS")
    p.add_argument("--root", required=True, action="append", type=Path, help="a root (PEM); repeat")
    p.add_argument(
        "--revoke-cert", action="append", default=[], type=Path, metavar="PEM",
        help="revoke this certificate (by its issuer and serial number); repeat",
    )  # fmt: skip
    p.add_argument(
        "--revoke-fingerprint", action="append", default=[], metavar="SHA256_HEX",
        help="revoke the certificate with this SHA-256 fingerprint; repeat",
    )  # fmt: skip
    p.add_argument("--key", type=Path, help="the trust-store signer's key (PEM)")
    p.add_argument("--cert", type=Path, help="its certificate (the trust-store signing EKU)")
    p.add_argument("--pkcs11-uri", metavar="URI", help="sign with a key in a PKCS#11 token")
    p.add_argument("--pin-source", metavar="SOURCE", help="the token's PIN: file:/path or env:NAME")
    p.add_argument("--chain", type=Path, help="intermediates to embed")
    p.add_argument("-o", "--output", required=True, type=Path)
    p.set_defaults(handler=_cmd_create)


def _install_parser(commands: Any) -> None:
    p = commands.add_parser("install", help="take a newer signed trust store")
    p.add_argument("store", type=Path)
    p.add_argument("--state-dir", required=True, type=Path, help="node state directory")
    p.add_argument(
        "--trust-anchor",
        required=True,
        type=Path,
        help="the bootstrap root (PEM), what the node trusts while it has no store",
    )
    p.set_defaults(handler=_cmd_install)


def _show_parser(commands: Any) -> None:
    p = commands.add_parser("show", help="the installed store, or check a store file")
    p.add_argument("store", nargs="?", type=Path, help="a store file to check (nothing written)")
    p.add_argument("--state-dir", type=Path, help="node state directory")
    p.add_argument("--trust-anchor", type=Path, help="with STORE: check it against this root")
    p.set_defaults(handler=_cmd_show)


def _cmd_create(args: argparse.Namespace) -> int:
    if args.expires_days < 1:
        raise UsageError("--expires-days: at least 1")
    try:
        roots = [x509.load_pem_x509_certificate(path.read_bytes()) for path in args.root]
        revoked_certs = [x509.load_pem_x509_certificate(p.read_bytes()) for p in args.revoke_cert]
    except (OSError, ValueError) as err:
        raise UsageError(f"trust create: {err}") from None
    envelope = make_trust_store(
        version=args.version,
        expires=datetime.now(UTC) + timedelta(days=args.expires_days),
        roots=roots,
        revoked_certificates=revoked_certs,
        revoked_fingerprints=[f.lower().replace(":", "") for f in args.revoke_fingerprint],
        key_path=args.key,
        cert_path=args.cert,
        chain_path=args.chain,
        signer=(
            Pkcs11Signer(args.pkcs11_uri, args.pin_source, args.cert, args.chain)
            if args.pkcs11_uri
            else None
        ),
    )
    args.output.write_bytes(envelope)
    _print({"created": str(args.output), "version": args.version})
    return 0


def _cmd_install(args: argparse.Namespace) -> int:
    envelope = _read(args.store)
    store = install_trust_store(args.state_dir, envelope, anchor=args.trust_anchor)
    _print({"installed": True, **store.summary()})
    return 0


def _cmd_show(args: argparse.Namespace) -> int:
    if args.store is not None:
        if args.trust_anchor is None:
            raise UsageError("trust show STORE: --trust-anchor names what to check it against")
        store = check_trust_store(
            _read(args.store), current=load_trust(args.trust_anchor), current_version=0
        )
        _print({"valid": True, **store.summary()})
        return 0
    if args.state_dir is None:
        raise UsageError("trust show: --state-dir, or a STORE file to check")
    installed = installed_trust_store(args.state_dir)
    _print(
        {"installed": False} if installed is None else {"installed": True, **installed.summary()}
    )
    return 0


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as err:
        raise UsageError(f"{path}: cannot read: {err.strerror}") from None


def _print(document: dict[str, Any]) -> None:
    json.dump(document, sys.stdout, indent=2, sort_keys=True)
    sys.stdout.write("\n")
