"""Dependency resolution on a large catalogue (plain script, no database):

    .venv/bin/python bench/bench_resolve.py [--runs 9] [--seed 18]

500 products with 20 releases each and about 5,000 constraints among them (seeded
random; a product depends only on products after it, so there is no cycle). A "good"
release of each product satisfies every constraint of the other good releases, so a
solution exists; the other releases ask for random ranges, so the resolver has to
choose. 100 products are installed at or below their good release.

1. Resolve the first product (it reaches most of the others) to its newest release that
   fits: median of --runs. Aim: <= 100 ms.
2. The same catalogue with a clash no release can settle (a component needs another at
   a version that a third one it also needs forbids, for every release), once among the
   target's own dependencies and once two levels down among components decided late:
   the time to fail with the explanation. Aim: <= 1 s.
Each figure is printed with its ratio to the aim (<= 1 meets it).
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from updates.engine.manifest import Dependency  # noqa: E402
from updates.engine.resolve import Candidate, ResolutionFailed, UpdatePlan, resolve  # noqa: E402

PRODUCTS = 500
RELEASES = 20
CONSTRAINTS = 5_000
INSTALLED = 100
TARGET = "themis-p000"
AIM_RESOLVE_S = 0.100
AIM_EXPLAIN_S = 1.0

Catalogue = dict[str, list[Candidate]]


def _version(index: int) -> str:
    return f"{1 + index // 10}.{index % 10}.0"  # 1.0.0 ... 2.9.0


def build(seed: int) -> tuple[Catalogue, dict[str, str]]:
    rng = random.Random(seed)
    names = [f"themis-p{i:03d}" for i in range(PRODUCTS)]
    good = {name: rng.randrange(RELEASES // 2, RELEASES) for name in names}
    needs: dict[tuple[int, int], list[Dependency]] = {}
    for _ in range(CONSTRAINTS):
        p = rng.randrange(PRODUCTS - 1)
        q = rng.randrange(p + 1, PRODUCTS)
        release = rng.randrange(RELEASES)
        needs.setdefault((p, release), []).append(
            _constraint(rng, names[q], good[names[q]], release, good[names[p]])
        )
    catalogue = {
        name: [
            Candidate(name, _version(r), tuple(needs.get((i, r), ())), f"{name}@{r}")
            for r in range(RELEASES)
        ]
        for i, name in enumerate(names)
    }
    installed = {
        name: _version(rng.randrange(good[name] + 1)) for name in rng.sample(names[1:], INSTALLED)
    }
    return catalogue, installed


def _constraint(
    rng: random.Random, product: str, good: int, release: int, own_good: int
) -> Dependency:
    """A good release's constraint admits the other product's good release; the other
    releases ask for a random range, which the good release may miss. 30% are capped
    above, 10% are optional."""
    if release == own_good:
        low = rng.randrange(good + 1)
        high = rng.randrange(good + 1, RELEASES + 1)
    else:
        low = rng.randrange(RELEASES)
        high = rng.randrange(low + 1, RELEASES + 1)
    text = f">={_version(low)}"
    if rng.random() < 0.3 and high < RELEASES:
        text += f",<{_version(high)}"
    optional = rng.random() < 0.1
    return Dependency(product, text, optional=optional)


def with_clash(catalogue: Catalogue, via: str, middle: str, deep: str) -> Catalogue:
    """Every target release needs `via`; every `via` release needs `middle` and `deep`
    >=2.9.0 (the target itself when `via` is the target); every `middle` release
    forbids that. The further down the graph, the more the search must undo."""
    clashed = dict(catalogue)
    if via != TARGET:
        clashed[TARGET] = _adding(catalogue[TARGET], Dependency(via))
    clashed[via] = _adding(clashed[via], Dependency(middle), Dependency(deep, ">=2.9.0"))
    clashed[middle] = _adding(catalogue[middle], Dependency(deep, "<2.9.0"))
    return clashed


def _adding(releases: list[Candidate], *needs: Dependency) -> list[Candidate]:
    return [Candidate(c.product, c.version, (*c.dependencies, *needs), c.key) for c in releases]


# (name, via, middle, deep): a clash among the target's own dependencies, and one two
# levels down among components decided late.
CLASHES = [
    ("no solution, explained (near the target)", TARGET, "themis-p001", "themis-p002"),
    ("no solution, explained (deep)", "themis-p300", "themis-p485", "themis-p490"),
]


def timed(call: Callable[[], object]) -> tuple[float, float, object]:
    """Wall and CPU seconds: on a busy machine the CPU time is the steadier figure."""
    start, start_cpu = time.perf_counter(), time.process_time()
    try:
        result: object = call()
    except ResolutionFailed as failed:
        result = failed
    return time.perf_counter() - start, time.process_time() - start_cpu, result


def measure(runs: int, call: Callable[[], object]) -> tuple[list[float], list[float], object]:
    walls, cpus, result = [], [], None
    for _ in range(runs):
        wall, cpu, result = timed(call)
        walls.append(wall)
        cpus.append(cpu)
    return walls, cpus, result


def report(name: str, walls: list[float], cpus: list[float], aim: float) -> None:
    wall, cpu = statistics.median(walls), statistics.median(cpus)
    print(
        f"  {name + ':':40} {wall * 1000:8.1f} ms  ratio {wall / aim:.2f} to the aim of"
        f" {aim * 1000:.0f} ms  (CPU {cpu * 1000:.1f} ms, ratio {cpu / aim:.2f}; min wall"
        f" {min(walls) * 1000:.1f} ms)"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=9)
    parser.add_argument("--seed", type=int, default=18)
    args = parser.parse_args()
    catalogue, installed = build(args.seed)
    constraints = sum(len(c.dependencies) for releases in catalogue.values() for c in releases)
    print(
        f"catalogue: {PRODUCTS} products x {RELEASES} releases, {constraints} constraints,"
        f" {len(installed)} installed; median of {args.runs} runs"
    )

    walls, cpus, plan = measure(args.runs, lambda: resolve(TARGET, None, installed, catalogue))
    if not isinstance(plan, UpdatePlan):
        print(f"  resolve failed: {plan}")
        return 1
    report(f"resolve {TARGET} (newest that fits)", walls, cpus, AIM_RESOLVE_S)
    print(
        f"    first (cold caches) {walls[0] * 1000:.1f} ms; plan: {len(plan.steps)} steps,"
        f" ending {plan.steps[-1].product} {plan.steps[-1].version}"
    )

    for name, via, middle, deep in CLASHES:
        clashed = with_clash(catalogue, via, middle, deep)
        walls, cpus, failure = measure(
            args.runs, partial(resolve, TARGET, None, installed, clashed)
        )
        if not isinstance(failure, ResolutionFailed):
            print(f"  {name}: the clash was not detected")
            return 1
        report(name, walls, cpus, AIM_EXPLAIN_S)
        print(f"    {failure.explanation}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
