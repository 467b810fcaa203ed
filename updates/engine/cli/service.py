"""`themis-update service`: run the node's service under the supervisor that owns its
sockets (run), reload it onto the installed files (reload), and ask how it is (status).
See updates/engine/supervisor.py."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from ..errors import UsageError
from ..supervisor import (
    CONTROL_SOCKET,
    DEFAULT_GRACE,
    DEFAULT_READY_TIMEOUT,
    Listen,
    ServiceControlError,
    Supervisor,
    SupervisorConfig,
    SupervisorError,
    control_request,
    reload_service,
)


def register(sub: Any) -> None:
    service = sub.add_parser("service", help="run and reload the node's service")
    commands = service.add_subparsers(dest="service_command", metavar="SERVICE_COMMAND")

    run = commands.add_parser("run", help="supervise CMD on sockets it inherits (-- CMD...)")
    run.add_argument("--listen", action="append", required=True, metavar="HOST:PORT")
    run.add_argument("--state-dir", required=True, type=Path, help="node state directory")
    run.add_argument("--cwd", type=Path, help="the service's working directory")
    run.add_argument("--ready-url", help="ready once this URL answers 2xx (default: READY=1)")
    run.add_argument("--ready-timeout", type=float, default=DEFAULT_READY_TIMEOUT)
    run.add_argument("--grace", type=float, default=DEFAULT_GRACE, help="drain period")
    run.add_argument("service_argv", nargs=argparse.REMAINDER, metavar="-- CMD...")
    run.set_defaults(handler=_cmd_run)

    reload = commands.add_parser("reload", help="start the installed version, drain the old")
    reload.add_argument("--state-dir", required=True, type=Path)
    reload.add_argument("--timeout", type=float, default=DEFAULT_READY_TIMEOUT)
    reload.set_defaults(handler=_cmd_reload)

    status = commands.add_parser("status", help="the serving process, as JSON")
    status.add_argument("--state-dir", required=True, type=Path)
    status.set_defaults(handler=_cmd_status)


def _cmd_run(args: argparse.Namespace) -> int:
    argv = list(args.service_argv)
    if argv[:1] == ["--"]:
        argv = argv[1:]
    if not argv:
        raise UsageError("service run: give the service's command after --")
    logging.getLogger("themis_update").setLevel(logging.INFO)
    try:
        config = SupervisorConfig(
            command=argv,
            listen=[Listen.parse(text) for text in args.listen],
            state_dir=args.state_dir,
            cwd=args.cwd,
            ready_url=args.ready_url,
            ready_timeout=args.ready_timeout,
            grace=args.grace,
        )
        supervisor = Supervisor(config)
        supervisor.run(args.state_dir / CONTROL_SOCKET)
    except SupervisorError as err:
        raise UsageError(f"service run: {err}") from None
    return 0


def _cmd_reload(args: argparse.Namespace) -> int:
    try:
        result = reload_service(args.state_dir / CONTROL_SOCKET, timeout=args.timeout)
    except ServiceControlError as err:
        raise UsageError(str(err)) from None
    _print(result.to_json())
    return 0 if result.ok else 24


def _cmd_status(args: argparse.Namespace) -> int:
    try:
        answer = control_request(args.state_dir / CONTROL_SOCKET, {"op": "status"}, timeout=10)
    except ServiceControlError as err:
        raise UsageError(str(err)) from None
    _print(answer)
    return 0 if answer.get("ok") else 1


def _print(value: Any) -> None:
    json.dump(value, sys.stdout, indent=2, sort_keys=True)
    sys.stdout.write("\n")
