"""`themis-update migrate`: the node database's schema (status) and the contract step
a rollout asks for once every node of the cluster runs the new version."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..lock import NodeLock
from ..schema import DATABASE_URL_ENV, run_contract, schema_status
from .node import print_json


def register(sub: Any) -> None:
    group = sub.add_parser("migrate", help="schema version and history; the contract step")
    commands = group.add_subparsers(dest="migrate_command", metavar="COMMAND", required=True)
    status = commands.add_parser("status", help="schema version and history as JSON")
    _database(status)
    status.set_defaults(handler=_cmd_status)
    contract = commands.add_parser(
        "contract",
        help="run the installed version's contract migrations and the column drops whose"
        " grace period has ended",
    )
    contract.add_argument("--target", required=True, type=Path, help="install directory")
    _database(contract)
    contract.set_defaults(handler=_cmd_contract)


def _database(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--state-dir", required=True, type=Path, help="node state directory")
    parser.add_argument(
        "--database-url",
        help=f"the node database (default: ${DATABASE_URL_ENV}, else SQLite in STATE_DIR/data)",
    )


def _cmd_status(args: argparse.Namespace) -> int:
    print_json(schema_status(args.state_dir, args.database_url))
    return 0


def _cmd_contract(args: argparse.Namespace) -> int:
    # Under the node lock: never beside an apply, a rollback or a recovery.
    with NodeLock(args.state_dir, command="migrate contract"):
        print_json(run_contract(args.target, args.state_dir, args.database_url))
    return 0
