"""Runs the migrator in a process of its own and kills it (os._exit(137), a SIGKILL as
far as the database can tell: no cleanup, no rollback in Python) at the n-th time it
passes a named step. Used by test_crash.py:

    python -m tests.engine.migrate.crash_runner '{"url": ..., "state": ..., "action": ...}'

Exits 3 if the run ended without reaching the step (the test then knows it tested nothing).
"""

from __future__ import annotations

import json
import os
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

from updates.engine.migrate import SchemaMigrator, parse_migration

NOT_REACHED = 3
KILLED = 137


def main(args: dict[str, Any]) -> int:
    seen: dict[str, int] = {}

    def fault(step: str) -> None:
        seen[step] = seen.get(step, 0) + 1
        if step == args["step"] and seen[step] == args.get("nth", 1):
            os._exit(KILLED)

    migrations = [
        parse_migration(json.dumps(doc).encode(), name=f"migrations/{doc['version']}.json")
        for doc in args.get("migrations", [])
    ]
    migrator = SchemaMigrator(
        args["url"], state_dir=Path(args["state"]), plugins=[], fault=fault,
        chunk_rows=args.get("chunk_rows", 100),
        now=lambda: datetime.fromisoformat(args["now"]),
    )  # fmt: skip
    action = args["action"]
    if action == "apply_all":
        migrator.apply_all(migrations)
    elif action == "rollback_to":
        migrator.rollback_to(args.get("version"))
    elif action == "finish_grace":
        migrator.finish_grace()
    migrator.close()
    return NOT_REACHED


if __name__ == "__main__":
    sys.exit(main(json.loads(sys.argv[1])))
