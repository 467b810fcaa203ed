"""`themis-update` node commands: apply, rollback, recover, points, prune,
preflight. Each prints one JSON document on stdout; failures are EngineErrors
(exit code + one stderr line, handled by cli.main)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from ..apply import apply_bundle, list_points, prune_points, recover, rollback
from ..health import DEFAULT_TIMEOUT
from ..preflight import DEFAULT_MIN_MEMORY_MB, preflight
from ..restore import corrupt_point_ids, points_disk_usage
from ..retention import DEFAULT_KEEP, parse_duration, parse_size


def register(sub: Any) -> None:
    _apply_parser(sub)
    _rollback_parser(sub)
    _recover_parser(sub)
    _points_parser(sub)
    _prune_parser(sub)
    _preflight_parser(sub)


def _node_dirs(parser: argparse.ArgumentParser, *, target: bool = True) -> None:
    if target:
        parser.add_argument("--target", required=True, type=Path, help="install directory")
    parser.add_argument("--state-dir", required=True, type=Path, help="node state directory")


def _apply_parser(sub: Any) -> None:
    p = sub.add_parser("apply", help="pre-flight, back up, install atomically, health-check")
    p.add_argument("bundle", type=Path)
    _node_dirs(p)
    p.add_argument("--trust-anchor", required=True, type=Path, help="root CA certificate (PEM)")
    p.add_argument("--health-cmd", help="shell command that must exit 0 after install")
    p.add_argument("--health-url", help="URL that must answer 2xx after install")
    p.add_argument("--health-timeout", type=float, default=DEFAULT_TIMEOUT, metavar="SECONDS")
    p.add_argument(
        "--verify-url",
        help="the service's base URL for the bundle's HTTP checks"
        " (default: the supervisor's listening address)",
    )
    p.add_argument(
        "--database-url",
        help="the node database the bundle's migrations run on"
        " (default: $THEMIS_NODE_DATABASE_URL, else SQLite in STATE_DIR/data)",
    )
    p.add_argument("--allow-downgrade", action="store_true")
    p.add_argument("--product", default="themisdb")
    p.add_argument("--keep", type=int, default=3, help="restore points to keep (default 3)")
    p.add_argument("--min-memory-mb", type=int, default=DEFAULT_MIN_MEMORY_MB)
    p.set_defaults(handler=_cmd_apply)


def _rollback_parser(sub: Any) -> None:
    p = sub.add_parser("rollback", help="restore a restore point (checked first)")
    _node_dirs(p)
    p.add_argument("--point", help="restore point id (default: the latest)")
    p.add_argument("--lower-highest", action="store_true", help="also lower highest_version")
    p.set_defaults(handler=_cmd_rollback)


def _recover_parser(sub: Any) -> None:
    p = sub.add_parser("recover", help="finish or undo an update interrupted by a crash")
    _node_dirs(p)
    p.set_defaults(handler=_cmd_recover)


def _points_parser(sub: Any) -> None:
    p = sub.add_parser("points", help="list restore points as JSON")
    _node_dirs(p, target=False)
    p.set_defaults(handler=_cmd_points)


def _prune_parser(sub: Any) -> None:
    p = sub.add_parser(
        "prune",
        help="restore point retention: by count, age and disk use (never the point a"
        " pending update or a rollback of the installed version needs)",
    )
    _node_dirs(p, target=False)
    p.add_argument(
        "--keep",
        type=_count,
        default=None,
        metavar="N",
        help="keep the newest N points (default 3 when no other rule is given)",
    )
    p.add_argument(
        "--max-age",
        type=_duration,
        default=None,
        metavar="AGE",
        help="delete points older than AGE (seconds, or 90m, 36h, 7d, 2w)",
    )
    p.add_argument(
        "--max-bytes",
        type=_size,
        default=None,
        metavar="SIZE",
        help="delete the oldest points until they hold at most SIZE on disk (bytes, or 500M, 2G)",
    )
    p.set_defaults(handler=_cmd_prune)


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a whole number >= 0")
    return value


def _duration(text: str) -> float:
    try:
        return parse_duration(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _preflight_parser(sub: Any) -> None:
    p = sub.add_parser("preflight", help="disk, memory and dependency checks; JSON report")
    p.add_argument("bundle", type=Path)
    _node_dirs(p)
    p.add_argument("--min-memory-mb", type=int, default=DEFAULT_MIN_MEMORY_MB)
    p.set_defaults(handler=_cmd_preflight)


def print_json(doc: Any) -> None:
    json.dump(doc, sys.stdout, indent=2, sort_keys=False, default=str)
    sys.stdout.write("\n")
    sys.stdout.flush()


def _cmd_apply(args: argparse.Namespace) -> int:

    result = apply_bundle(
        args.bundle,
        target=args.target,
        state_dir=args.state_dir,
        trust_anchor=args.trust_anchor,
        health_cmd=args.health_cmd,
        health_url=args.health_url,
        health_timeout=args.health_timeout,
        allow_downgrade=args.allow_downgrade,
        product=args.product,
        keep=args.keep,
        min_memory_mb=args.min_memory_mb,
        verify_url=args.verify_url,
        database_url=args.database_url,
    )
    print_json(result.to_dict())
    return 0


def _cmd_rollback(args: argparse.Namespace) -> int:

    print_json(
        rollback(
            target=args.target,
            state_dir=args.state_dir,
            point_id=args.point,
            lower_highest=args.lower_highest,
        )
    )
    return 0


def _cmd_recover(args: argparse.Namespace) -> int:

    print_json(recover(target=args.target, state_dir=args.state_dir))
    return 0


def _cmd_points(args: argparse.Namespace) -> int:

    # One list, oldest first; unreadable points are listed (never chosen for
    # rollback) so an operator sees them.
    points = [{**p, "corrupt": False} for p in list_points(args.state_dir)]
    points += [
        {"id": i, "version": None, "created": None, "file_count": 0, "size": 0, "corrupt": True}
        for i in corrupt_point_ids(args.state_dir)
    ]
    print_json(sorted(points, key=lambda p: str(p["id"])))
    return 0


def _cmd_prune(args: argparse.Namespace) -> int:

    keep = args.keep
    if keep is None and args.max_age is None and args.max_bytes is None:
        keep = DEFAULT_KEEP
    pruned = prune_points(args.state_dir, keep, max_age=args.max_age, max_bytes=args.max_bytes)
    # What the points left hold on disk together (what --max-bytes measures).
    print_json({"pruned": pruned, "restore_points_bytes": points_disk_usage(args.state_dir)})
    return 0


def _cmd_preflight(args: argparse.Namespace) -> int:

    report = preflight(
        args.bundle,
        target=args.target,
        state_dir=args.state_dir,
        min_memory_mb=args.min_memory_mb,
    )
    print_json(report.to_dict())
    report.raise_if_failed()  # exit 20 with the first failed check on stderr
    return 0
