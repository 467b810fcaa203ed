"""The mutation score's arithmetic (tests/mutation_score.py, run by `make mutate`)."""

from __future__ import annotations

from pathlib import Path

from tests import mutation_score

M = "updates.rollouts.gate"


def test_the_score_counts_kills_and_timeouts_over_the_mutants_not_listed_equivalent() -> None:
    codes = {f"{M}.x_f__mutmut_{i}": code for i, code in enumerate([1, 1, 36, 0, 33, 0, -11], 1)}
    equivalents = {f"{M}.x_f__mutmut_4": "why"}
    score = mutation_score.score_module("updates/rollouts/gate.py", codes, equivalents)
    assert (score.killed, score.timeout, score.equivalent) == (2, 1, 1)
    assert score.survived == [f"{M}.x_f__mutmut_6"]
    assert score.no_tests == [f"{M}.x_f__mutmut_5"]
    assert score.other == [f"{M}.x_f__mutmut_7 (exit -11)"]
    assert score.score == 50.0  # 3 of the 6 not listed


def test_a_listed_equivalent_no_run_judged_is_unchecked_not_equivalent() -> None:
    codes = {f"{M}.x_f__mutmut_1": None, f"{M}.x_f__mutmut_2": 1}
    equivalents = {f"{M}.x_f__mutmut_1": "renumbered onto another change?"}
    score = mutation_score.score_module("updates/rollouts/gate.py", codes, equivalents)
    assert (score.not_checked, score.equivalent, score.killed) == (1, 0, 1)


def test_a_listed_equivalent_the_tests_kill_or_that_is_gone_is_stale() -> None:
    codes = {f"{M}.x_f__mutmut_1": 1, f"{M}.x_f__mutmut_2": 0}
    equivalents = {
        f"{M}.x_f__mutmut_1": "killed now",
        f"{M}.x_f__mutmut_2": "still survives",
        f"{M}.x_f__mutmut_9": "no longer made",
        "workers.agent.x_g__mutmut_1": "another module's",
    }
    stale = mutation_score.stale_equivalents(codes, equivalents, [M])
    assert stale == [
        f"{M}.x_f__mutmut_1: killed by the tests, so not equivalent",
        f"{M}.x_f__mutmut_9: no such mutant (renumbered? run `mutmut show` on it)",
    ]


def test_the_list_of_equivalents_is_read_line_by_line(tmp_path: Path) -> None:
    listed = tmp_path / "eq.md"
    listed.write_text(f"# Equivalent\n\n- `{M}.x_f__mutmut_3` — a reason\nnot an entry\n")
    assert mutation_score.read_equivalents(listed) == {f"{M}.x_f__mutmut_3": "a reason"}
