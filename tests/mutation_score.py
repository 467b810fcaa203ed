"""Run mutmut module by module and print a mutation score per module (`make mutate`).

Usage: python tests/mutation_score.py [--report-only | --resume | --unchecked |
       --recheck-survivors]
       [--jobs N] [--min PERCENT] [MODULE ...]

The modules are pyproject.toml `[tool.mutmut] only_mutate` (a MODULE argument, dotted or a
path, narrows the run to some of them). Each module gets its own `mutmut run` with one
worker, so its wall time is measured on its own and the machine keeps a CPU for others.

score = killed / (total - equivalent)

A mutant that times out counts as killed (the tests noticed: the code hung). Every other
verdict that is not a kill (survived, no tests, suspicious, a crashed worker) counts
against the score. Equivalent mutants (they cannot change behaviour) are listed in
docs/mutation-equivalents.md, one line each, `- \\`mutant name\\` — why`; a listed mutant
that tests now kill, or that no longer exists, is reported so the list does not rot (mutmut
numbers mutants per function, so editing a function renumbers its mutants).

Exit status 1 when a module scores below --min (default 85) or a run was incomplete.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
import tomllib
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from updates.engine.devpki import make_pki

ROOT = Path(__file__).resolve().parent.parent
MUTANTS = ROOT / "mutants"
EQUIVALENTS = ROOT / "docs" / "mutation-equivalents.md"
TIMES = MUTANTS / "mutation-times.json"

# mutmut's exit codes per mutant (mutmut.stats.status_by_exit_code), as this score reads them.
KILLED_CODES = {1, 3}
TIMEOUT_CODES = {36, 24, -24, 152, 255}
SURVIVED_CODES = {0}
NO_TESTS_CODES = {5, 33}
# tests/conftest.py's TEST_PKI_DIR_ENV: the PKI every mutant's session shares.
TEST_PKI_DIR_ENV = "THEMIS_TEST_PKI_DIR"
EQUIVALENT_LINE = re.compile(r"^- `(?P<name>[^`]+)`\s+[—-]+\s+(?P<reason>\S.*)$")


@dataclass
class ModuleScore:
    module: str
    killed: int = 0
    timeout: int = 0
    survived: list[str] = field(default_factory=list)
    no_tests: list[str] = field(default_factory=list)
    other: list[str] = field(default_factory=list)
    not_checked: int = 0
    equivalent: int = 0
    total: int = 0

    @property
    def score(self) -> float:
        judged = self.total - self.equivalent
        return 100.0 * (self.killed + self.timeout) / judged if judged else 100.0


def mutated_paths() -> list[str]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["mutmut"]
    return [str(p) for p in config["only_mutate"]]


def module_name(path: str) -> str:
    return path.removesuffix(".py").replace("/", ".")


def read_equivalents(path: Path = EQUIVALENTS) -> dict[str, str]:
    """Mutant name -> the reason it cannot change behaviour."""
    found: dict[str, str] = {}
    if not path.exists():
        return found
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.startswith("- `"):
            continue
        match = EQUIVALENT_LINE.match(line)
        if match is None:
            raise SystemExit(f"{path}:{number}: expected - `mutant` — reason, got {line!r}")
        found[match["name"]] = match["reason"]
    return found


def exit_codes(path: str) -> dict[str, int | None]:
    meta = MUTANTS / f"{path}.meta"
    if not meta.exists():
        return {}
    codes: dict[str, int | None] = json.loads(meta.read_text())["exit_code_by_key"]
    return codes


def score_module(
    path: str, codes: Mapping[str, int | None], equivalents: Mapping[str, str]
) -> ModuleScore:
    result = ModuleScore(module=module_name(path), total=len(codes))
    for name, code in sorted(codes.items()):
        if code is None:
            # Listed as equivalent or not, a mutant no run has judged yet is unscored: a
            # listed one may have been renumbered onto another change (see `main`).
            result.not_checked += 1
        elif name in equivalents:
            result.equivalent += 1
        elif code in KILLED_CODES:
            result.killed += 1
        elif code in TIMEOUT_CODES:
            result.timeout += 1
        elif code in SURVIVED_CODES:
            result.survived.append(name)
        elif code in NO_TESTS_CODES:
            result.no_tests.append(name)
        else:
            result.other.append(f"{name} (exit {code})")
    return result


def stale_equivalents(
    all_codes: Mapping[str, int | None], equivalents: Mapping[str, str], modules: Sequence[str]
) -> list[str]:
    """Listed equivalents of the scored modules that no longer exist or that tests kill."""
    stale = []
    for name in sorted(equivalents):
        if not any(name.startswith(m + ".") for m in modules):
            continue
        if name not in all_codes:
            stale.append(f"{name}: no such mutant (renumbered? run `mutmut show` on it)")
        elif all_codes[name] in KILLED_CODES | TIMEOUT_CODES:
            stale.append(f"{name}: killed by the tests, so not equivalent")
    return stale


def run_mutmut(path: str, *, jobs: int = 1, names: Sequence[str] = ()) -> float:
    """One `mutmut run` over one module's mutants (or only `names`: mutmut runs named
    mutants again even when they have a result); returns its wall time in seconds."""
    # The test database is private to the mutants copy and made fresh for each module:
    # mutants reuse it (`--reuse-db`), so nothing a killed mutant left behind outlives the run.
    db = Path(os.environ.setdefault("THEMIS_TEST_DB", str(MUTANTS / "test.sqlite3")))
    db.unlink(missing_ok=True)
    # One PKI for every mutant's session, made here before mutmut runs two at once.
    pki = Path(os.environ.setdefault(TEST_PKI_DIR_ENV, str(MUTANTS / "test-pki")))
    make_pki(pki)
    mutmut = Path(sys.executable).parent / "mutmut"
    started = time.monotonic()
    subprocess.run(
        [str(mutmut), "run", "--max-children", str(jobs), *(names or [f"{module_name(path)}.*"])],
        cwd=ROOT,
        check=True,
    )
    return time.monotonic() - started


def report(paths: Sequence[str], times: Mapping[str, float], minimum: float) -> int:
    equivalents = read_equivalents()
    all_codes: dict[str, int | None] = {}
    scores = []
    for path in paths:
        codes = exit_codes(path)
        all_codes.update(codes)
        scores.append(score_module(path, codes, equivalents))
    header = (
        f"{'module':32} {'score':>7} {'killed':>6} {'total':>6} {'equiv':>6} "
        f"{'surv':>5} {'other':>5} {'wall':>8}"
    )
    print(header)
    print("-" * len(header))
    failed = 0
    for s in scores:
        wall = f"{times[s.module]:.0f} s" if s.module in times else "-"
        left = len(s.survived) + len(s.no_tests) + len(s.other)
        print(
            f"{s.module:32} {s.score:6.1f}% {s.killed + s.timeout:6} {s.total:6} "
            f"{s.equivalent:6} {len(s.survived):5} {left - len(s.survived):5} {wall:>8}"
        )
        if s.total == 0 or s.not_checked:
            print(f"  incomplete: {s.not_checked} of {s.total} mutants not checked")
            failed = 1
        elif s.score < minimum:
            failed = 1
    for s in scores:
        for label, names in (
            ("survived", s.survived),
            ("no tests", s.no_tests),
            ("other", s.other),
        ):
            for name in names:
                print(f"  {label}: {name}")
    for line in stale_equivalents(all_codes, equivalents, [s.module for s in scores]):
        print(f"  stale equivalent: {line}")
    statuses = Counter(
        "ok" if s.score >= minimum and s.total and not s.not_checked else "below" for s in scores
    )
    print(f"{statuses['ok']} of {len(scores)} modules at or above {minimum:.0f} %")
    return failed


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("modules", nargs="*", help="dotted module or path; default: all")
    parser.add_argument("--report-only", action="store_true", help="score the last run")
    parser.add_argument("--min", type=float, default=85.0, help="per-module target, percent")
    parser.add_argument("--jobs", type=int, default=1, help="mutants run at once (default 1)")
    parser.add_argument(
        "--recheck-survivors",
        action="store_true",
        help="run only the mutants that survived last time (after new tests), then score",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="run only the mutants not checked yet and last time's survivors, then score",
    )
    parser.add_argument(
        "--unchecked",
        action="store_true",
        help="run only the mutants no run has judged yet (new or changed functions), then score",
    )
    args = parser.parse_args(argv)
    paths = mutated_paths()
    if args.modules:
        wanted = {module_name(m) for m in args.modules}
        unknown = wanted - {module_name(p) for p in paths}
        if unknown:
            parser.error(f"not in [tool.mutmut] only_mutate: {', '.join(sorted(unknown))}")
        paths = [p for p in paths if module_name(p) in wanted]
    times: dict[str, float] = json.loads(TIMES.read_text()) if TIMES.exists() else {}
    if args.recheck_survivors or args.resume or args.unchecked:
        equivalents = read_equivalents()
        for path in paths:
            # A listed equivalent is run too when no run has judged it (its function changed,
            # so mutmut numbered its mutants afresh): if the tests kill it, the report calls
            # its entry stale instead of counting a real mutant as equivalent.
            again = [
                name
                for name, code in exit_codes(path).items()
                if (code is None and (args.resume or args.unchecked))
                or (code is not None and code not in KILLED_CODES | TIMEOUT_CODES)
                and name not in equivalents
                and not args.unchecked
            ]
            if again:
                run_mutmut(path, jobs=args.jobs, names=sorted(again))
    elif not args.report_only:
        for path in paths:
            times[module_name(path)] = run_mutmut(path, jobs=args.jobs)
            TIMES.write_text(json.dumps(times, indent=2))
    return report(paths, times, args.min)


if __name__ == "__main__":
    sys.exit(main())
