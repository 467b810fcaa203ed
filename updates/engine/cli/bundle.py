"""`themis-update bundle create|verify` (DESIGN.md, the CLI contract)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

from ..bundle import DEFAULT_PRODUCT, create_bundle, verify_bundle
from ..errors import UsageError
from ..hsm import Pkcs11Signer
from ..manifest import Dependency, dependency_from_text


def register(sub: Any) -> None:
    bundle = sub.add_parser("bundle", help="create or verify signed update bundles")
    group = bundle.add_subparsers(dest="bundle_command", metavar="ACTION")
    group.required = True

    create = group.add_parser("create", help="build and sign a bundle from a directory")
    create.add_argument("src_dir", type=Path, metavar="SRC_DIR")
    create.add_argument("--product", required=True)
    create.add_argument("--version", required=True)
    create.add_argument("--key", type=Path, help="signer private key (PEM)")
    create.add_argument(
        "--cert", type=Path, help="signer certificate (PEM; with a token, its own by default)"
    )
    create.add_argument(
        "--pkcs11-uri",
        metavar="URI",
        help="sign with a key in a PKCS#11 token instead of --key:"
        " 'pkcs11:token=LABEL;object=LABEL' (RFC 7512; ?module-path=LIB names the library)",
    )
    create.add_argument(
        "--pin-source", metavar="SOURCE", help="the token's PIN: file:/path or env:NAME"
    )
    create.add_argument("--chain", type=Path, help="intermediate certificates (PEM)")
    create.add_argument("--expires-days", type=int, default=90)
    create.add_argument("-o", "--output", required=True, type=Path, metavar="OUT")
    needs = "repeatable; PRODUCT followed by a PEP 440 constraint, e.g. 'themis-storage>=1.4,<2'"
    create.add_argument(
        "--depends", action="append", default=[], metavar="SPEC", help=f"required; {needs}"
    )
    create.add_argument(
        "--depends-optional",
        action="append",
        default=[],
        metavar="SPEC",
        help=f"must be satisfied only if installed; {needs}",
    )
    create.add_argument(
        "--conflicts",
        action="append",
        default=[],
        metavar="SPEC",
        help=f"must not be installed; {needs}",
    )
    create.set_defaults(handler=_create)

    verify = group.add_parser("verify", help="verify a bundle without installing it")
    verify.add_argument("bundle", type=Path, metavar="BUNDLE")
    verify.add_argument("--trust-anchor", required=True, type=Path, metavar="ROOT.pem")
    verify.add_argument("--product", default=DEFAULT_PRODUCT)
    verify.add_argument(
        "--state-dir", type=Path, help="check the version rule against this node state"
    )
    verify.add_argument("--allow-downgrade", action="store_true")
    verify.set_defaults(handler=_verify)


def _create(args: argparse.Namespace) -> int:
    manifest = create_bundle(
        args.src_dir,
        product=args.product,
        version=args.version,
        key_path=args.key,
        cert_path=args.cert,
        chain_path=args.chain,
        signer=_token_signer(args),
        expires_days=args.expires_days,
        out_path=args.output,
        dependencies=_dependencies(args),
    )
    summary = {
        "bundle": str(args.output),
        "product": manifest.product,
        "version": manifest.version,
        "files": len(manifest.files),
        "total_size": manifest.total_size,
        "expires": manifest.raw["expires"],
    }
    print(json.dumps(summary, indent=2))
    return 0


def _token_signer(args: argparse.Namespace) -> Pkcs11Signer | None:
    """The PKCS#11 signer the options name, or None for a PEM key (--key and --cert)."""
    if args.pkcs11_uri is None:
        if args.key is None or args.cert is None:
            raise UsageError("bundle create: --key and --cert, or --pkcs11-uri")
        return None
    if args.key is not None:
        raise UsageError("bundle create: --key or --pkcs11-uri, not both")
    return Pkcs11Signer(
        args.pkcs11_uri, pin_source=args.pin_source, cert_path=args.cert, chain_path=args.chain
    )


def _dependencies(args: argparse.Namespace) -> list[Dependency]:
    """The --depends, --depends-optional and --conflicts options, in that order; the
    manifest parser checks them like any other entry."""
    return [
        *(dependency_from_text(text) for text in args.depends),
        *(dependency_from_text(text, optional=True) for text in args.depends_optional),
        *(dependency_from_text(text, conflicts=True) for text in args.conflicts),
    ]


def _verify(args: argparse.Namespace) -> int:
    bar = ProgressBar(sys.stderr) if sys.stderr.isatty() else None
    try:
        verified = verify_bundle(
            args.bundle,
            trust_anchor=args.trust_anchor,
            product=args.product,
            state_dir=args.state_dir,
            allow_downgrade=args.allow_downgrade,
            progress=bar.update if bar else None,
        )
    finally:
        if bar:
            bar.finish()
    print(json.dumps(verified.summary(), indent=2))
    return 0


class ProgressBar:
    """A one-line bar on a terminal, redrawn at most ten times a second."""

    def __init__(self, stream: TextIO, clock: Callable[[], float] = time.monotonic) -> None:
        self.stream = stream
        self.clock = clock
        self.last = float("-inf")
        self.drawn = False

    def update(self, done: int, total: int) -> None:
        now = self.clock()
        if now - self.last < 0.1 and done < total:
            return
        self.last = now
        fraction = done / total if total else 1.0
        filled = int(fraction * 30)
        self.stream.write(f"\rverifying [{'#' * filled}{'.' * (30 - filled)}] {fraction:4.0%}")
        self.stream.flush()
        self.drawn = True

    def finish(self) -> None:
        if self.drawn:
            self.stream.write("\n")
            self.stream.flush()
