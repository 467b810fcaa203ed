"""Fail `make test` when a guarded package drops below its line-coverage floor.

Usage: python tests/coverage_gate.py var/coverage.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

# package prefix -> minimum line coverage in percent
FLOORS = {
    "updates/engine/": 80.0,
    # the rollout coordinator: planning, driving, jobs
    "updates/rollouts/": 80.0,
    "updates/jobs/": 80.0,
}


def main(report_path: str) -> int:
    files = json.loads(Path(report_path).read_text())["files"]
    failed = False
    for prefix, floor in FLOORS.items():
        covered = statements = 0
        for name, data in files.items():
            if name.startswith(prefix):
                covered += data["summary"]["covered_lines"]
                statements += data["summary"]["num_statements"]
        if not statements:  # a floor over nothing is a floor that cannot fail
            print(f"coverage {prefix}: no measured file matches (renamed?) FAIL")
            failed = True
            continue
        percent = 100.0 * covered / statements
        ok = percent >= floor
        failed |= not ok
        print(f"coverage {prefix}: {percent:.1f} % (floor {floor:.0f} %) {'ok' if ok else 'FAIL'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
