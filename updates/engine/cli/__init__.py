"""`themis-update`: the node-side command line (a contract, see DESIGN.md).

Each command group lives in its own module and registers its sub-parsers here;
every expected failure is an `EngineError` whose exit code the CLI returns,
with one line on stderr naming the cause.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from ..errors import EngineError
from . import bundle as bundle_commands
from . import delta as delta_commands
from . import migrate as migrate_commands
from . import node as node_commands
from . import service as service_commands
from . import trust as trust_commands

log = logging.getLogger("themis_update")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="themis-update",
        description="Verify and apply signed ThemisDB update bundles.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug detail")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    bundle_commands.register(sub)
    node_commands.register(sub)
    delta_commands.register(sub)
    service_commands.register(sub)
    migrate_commands.register(sub)
    trust_commands.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="themis-update: %(message)s",
    )
    handler = getattr(args, "handler", None)
    if handler is None:
        parser.print_usage(sys.stderr)
        return 2
    try:
        return int(handler(args) or 0)
    except EngineError as err:
        print(f"themis-update: {err.code}: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("themis-update: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # fail closed: never a traceback as the only message
        log.debug("unexpected error", exc_info=True)
        print(f"themis-update: UNEXPECTED: {type(err).__name__}: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
