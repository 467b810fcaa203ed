"""Kill `themis-update apply` at every filesystem syscall touching the target
or the state dir; after `recover` the target is exactly old or exactly new,
and applying again converges to new. See crashcheck.py for the method."""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from collections import Counter
from pathlib import Path

import pytest

from tests.engine import crashcheck
from tests.engine.apply_fixtures import (  # noqa: F401  (fixtures)
    NEW_FILES,
    NEW_REMOVE,
    OLD_TREE,
    REPO,
    BundleMaker,
    bundles_fixture,
    expected_new,
    snapshot,
    split,
    write_tree,
)
from updates.engine.apply import apply_bundle, recover
from updates.engine.errors import StaleOrDowngrade
from updates.engine.journal import JOURNAL_FILE
from updates.engine.state import load_state


@pytest.fixture(autouse=True)
def _strace() -> None:
    if not os.path.exists(crashcheck.STRACE):
        pytest.fail("strace is not installed: run `make install`")


VERSIONS = {"old": "1.0", "new": "2.0"}


def _scenario(tmp_path: Path, bundles: BundleMaker) -> crashcheck.Scenario:
    """Old: 1.0 installed by apply (so the state dir has a point to prune).
    New: 2.0 replaces two files, adds one in new dirs, removes one."""
    tpl_target, tpl_state = tmp_path / "tpl-target", tmp_path / "tpl-state"
    anchor = bundles.trust_anchor
    v1 = bundles.make("1.0", OLD_TREE)
    apply_bundle(v1, target=tpl_target, state_dir=tpl_state, trust_anchor=anchor, keep=1)
    v2 = bundles.make("2.0", NEW_FILES, remove=NEW_REMOVE)
    ref_new = tmp_path / "ref-new"
    write_tree(ref_new, expected_new(OLD_TREE, NEW_FILES, NEW_REMOVE))
    python = str(REPO / ".venv/bin/python")

    def apply_argv(target: Path, state: Path) -> list[str]:
        return [
            python, "-m", "updates.engine", "apply", str(v2), "--target", str(target),
            "--state-dir", str(state), "--trust-anchor", str(anchor), "--keep", "1",
        ]  # fmt: skip

    def recover_argv(target: Path, state: Path) -> list[str]:
        return [python, "-m", "updates.engine", "recover", "--target", str(target),
                "--state-dir", str(state)]  # fmt: skip

    def converge(target: Path, state: Path) -> None:
        # Already at 2.0: the version rule refuses and the tree stays new.
        with contextlib.suppress(StaleOrDowngrade):
            apply_bundle(v2, target=target, state_dir=state, trust_anchor=anchor, keep=1)

    def consistent(state: Path, which: str) -> list[str]:
        problems = []
        installed = load_state(state).installed_version
        if installed != VERSIONS[which]:
            problems.append(f"tree is {which} but node state says {installed}")
        if (state / JOURNAL_FILE).exists():
            problems.append("journal still pending after recover")
        leftovers = [p.name for p in state.glob(".*.tmp")] + [
            p.name for p in (state / "points").glob(".tmp-*")
        ]
        if leftovers:
            problems.append(f"temp files left in the state dir: {leftovers}")
        return problems

    return crashcheck.Scenario(
        template_target=tpl_target,
        template_state=tpl_state,
        old=snapshot(tpl_target),
        new=snapshot(ref_new),
        snapshot=snapshot,
        apply_argv=apply_argv,
        recover_argv=recover_argv,
        recover_inproc=lambda target, state: recover(target=target, state_dir=state),
        converge=converge,
        consistent=consistent,
        cwd=REPO,
        pycache=tmp_path / "pycache",
    )


@pytest.mark.slow
def test_kill_at_every_fs_syscall(tmp_path: Path, bundles: BundleMaker) -> None:
    scenario = _scenario(tmp_path, bundles)
    syscalls = crashcheck.supported_syscalls()
    work = tmp_path / "runs"
    work.mkdir()
    crashcheck.count(scenario, syscalls, work)  # warm-up: the runs' .pyc files, page cache
    assert list(scenario.pycache.rglob("apply.cpython-*.pyc")), "the runs' bytecode cache"
    points = crashcheck.count(scenario, syscalls, work)
    assert len(points) > 50, "the trace should see the whole update"
    # Every occurrence by default; THEMIS_CRASH_MAX_PER_TYPE=N keeps the first N
    # of each syscall type for a quick run.
    cap = int(os.environ.get("THEMIS_CRASH_MAX_PER_TYPE", "0"))
    if cap:
        seen: Counter[str] = Counter()
        points = [p for p in points if (seen.update([p.syscall]) or seen[p.syscall]) <= cap]
    start = time.monotonic()
    # The recover CLI costs ~0.5 s of Python start-up per run: it runs at every
    # 4th point and the first of each syscall type, the same code in-process at
    # the rest. THEMIS_CRASH_CLI_EVERY=1 runs the CLI at every point.
    cli_every = int(os.environ.get("THEMIS_CRASH_CLI_EVERY", "4"))
    outcomes = crashcheck.run_all(scenario, points, syscalls, work, cli_every=cli_every)
    elapsed = time.monotonic() - start

    by_type = Counter(p.syscall for p in points)
    raw = Counter(o.before_recover for o in outcomes)
    after = Counter(o.after_recover for o in outcomes)
    line = crashcheck.summary(outcomes)
    print(f"\n{line} ({elapsed:.0f}s; syscall types {dict(by_type)})")
    print(f"left by the kill itself: {dict(raw)}; after recover: {dict(after)}")
    # A few points past the end of what the runs make are the listing run's tail: said,
    # not failed; more than that would mean the listing is not the apply's calls.
    tail = [o.point for o in outcomes if crashcheck.past_the_runs_calls(o)]
    print(f"points past the runs' calls (the listing run's tail): {tail}")
    assert len(tail) <= crashcheck.TAIL_CALLS, tail
    problems = [(o.point, o.problems) for o in outcomes if o.problems and o.point not in tail]
    assert not problems, problems[:5]
    assert all(o.killed for o in outcomes if o.point not in tail)
    assert after["torn"] == 0, line
    assert all(o.converged for o in outcomes)
    # The kills really landed mid-update: some left a torn tree for recover to fix,
    # and both outcomes occur (undo before the commit point, finish after it).
    assert raw["torn"] > 0 and after["old"] > 0 and after["new"] > 0
    assert line.startswith(f"{len(points)} crash points, 0 torn, "), line


def test_negative_control_checker_catches_a_torn_tree(tmp_path: Path, bundles: BundleMaker) -> None:
    scenario = _scenario(tmp_path, bundles)
    mixed = tmp_path / "mixed"
    shutil.copytree(scenario.template_target, mixed)
    data, mode = split(NEW_FILES["bin/themisd"])
    (mixed / "bin/themisd").write_bytes(data)  # one file new, the rest old
    assert crashcheck.classify(snapshot(mixed), scenario.old, scenario.new) == "torn"
    os.chmod(mixed / "bin/themisd", 0o644)
    (mixed / "bin/themisd").write_bytes(split(OLD_TREE["bin/themisd"])[0])
    assert crashcheck.classify(snapshot(mixed), scenario.old, scenario.new) == "torn"  # mode
    os.chmod(mixed / "bin/themisd", 0o755)  # noqa: S103
    assert crashcheck.classify(snapshot(mixed), scenario.old, scenario.new) == "old"
    (mixed / "bin/.themisd.themis-tmp-x").write_bytes(b"")  # a leftover temp file
    assert crashcheck.classify(snapshot(mixed), scenario.old, scenario.new) == "torn"
    fake = [crashcheck.Outcome(crashcheck.CrashPoint("write", 1, ""), True, "torn", "torn", False)]
    assert crashcheck.summary(fake) == "1 crash points, 1 torn, 0 run again (not reached at first)"


def test_a_point_no_run_reaches_is_run_again_and_stays_a_problem(
    tmp_path: Path, bundles: BundleMaker
) -> None:
    """The retry of a missed point never hides one: a call the apply never makes (the
    60,000th openat; strace counts to 65,535) is tried 1 + MISSED_RETRIES times and still
    reported."""
    scenario = _scenario(tmp_path, bundles)
    work = tmp_path / "runs"
    work.mkdir()
    syscalls = crashcheck.supported_syscalls()
    beyond = crashcheck.CrashPoint("openat", 60_000, "")
    [outcome] = crashcheck.run_all(scenario, [beyond], syscalls, work)
    assert outcome.retried and not outcome.killed
    assert len(outcome.problems) == 1
    assert outcome.problems[0].startswith("not killed (rc 0; this run made ")
    assert "the listing run at least 60000" in outcome.problems[0]
    assert crashcheck.summary([outcome]).endswith(", 1 run again (not reached at first)")
    assert outcome.after_recover == "new"  # the apply ran to its end each time
    # Far past the runs' calls: not the listing run's tail, so not excused either.
    assert not crashcheck.past_the_runs_calls(outcome)


def test_only_a_point_a_few_calls_past_the_runs_end_counts_as_the_listings_tail() -> None:
    def missed(nth: int, made: int, after: str = "new") -> crashcheck.Outcome:
        problem = (
            f"{crashcheck.NOT_KILLED} (rc 0; this run made {made} openat calls, the listing"
            f" run at least {nth}): "
        )
        point = crashcheck.CrashPoint("openat", nth, "")
        return crashcheck.Outcome(point, False, "new", after, True, [problem])

    assert crashcheck.past_the_runs_calls(missed(604, 601))
    assert crashcheck.past_the_runs_calls(missed(601 + crashcheck.TAIL_CALLS, 601))
    assert not crashcheck.past_the_runs_calls(missed(602 + crashcheck.TAIL_CALLS, 601))
    assert not crashcheck.past_the_runs_calls(missed(500, 601))  # reachable: a real miss
    assert not crashcheck.past_the_runs_calls(missed(604, 601, after="torn"))
    extra = missed(604, 601)
    extra.problems.append("recover exit 1: boom")
    assert not crashcheck.past_the_runs_calls(extra)
