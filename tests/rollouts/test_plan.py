"""Rollout planning rules, without a database."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from updates.rollouts.plan import NodeInfo, PlanError, parse_stages, plan_rollout, stage_sizes


def _nodes(
    n: int, *, cluster: int | None = 1, leader: int | None = 0, version: str = "1.6.0"
) -> list[NodeInfo]:
    return [NodeInfo(i + 1, f"n{i:03d}", cluster, i == leader, version) for i in range(n)]


def test_rolling_puts_the_leader_last() -> None:
    nodes = _nodes(3, leader=0)
    plan = plan_rollout("rolling", "1.7.0", nodes)
    order = [p.node.node_id for p in plan.nodes]
    assert order == ["n001", "n002", "n000"]
    assert plan.stage_sizes == [3]


def test_rolling_groups_by_cluster_leader_last_in_each() -> None:
    nodes = [
        NodeInfo(1, "a1", 1, True, "1.6.0"),
        NodeInfo(2, "a2", 1, False, "1.6.0"),
        NodeInfo(3, "b1", 2, False, "1.6.0"),
        NodeInfo(4, "b2", 2, True, "1.6.0"),
    ]
    order = [p.node.node_id for p in plan_rollout("rolling", "1.7.0", nodes).nodes]
    assert order == ["a2", "a1", "b1", "b2"]


@pytest.mark.parametrize(
    ("total", "fractions", "sizes"),
    [
        (10, (0.01, 0.05, 0.25, 1.0), [1, 2, 7]),
        (3, (0.01, 0.05, 0.25, 1.0), [1, 2]),
        (1000, (0.01, 0.05, 0.25, 1.0), [10, 40, 200, 750]),
        (1, (0.5, 1.0), [1]),
    ],
)
def test_stage_sizes(total: int, fractions: tuple[float, ...], sizes: list[int]) -> None:
    assert stage_sizes(total, fractions) == sizes


@given(
    total=st.integers(min_value=1, max_value=2000),
    cuts=st.lists(st.floats(min_value=0.001, max_value=0.99), min_size=0, max_size=5, unique=True),
)
def test_stage_sizes_never_exceed_their_fraction_and_cover_everyone(
    total: int, cuts: list[float]
) -> None:
    fractions = sorted(cuts) + [1.0]
    sizes = stage_sizes(total, fractions)
    assert sum(sizes) == total
    assert all(size >= 1 for size in sizes)
    done = 0
    kept = [f for f in fractions if math.ceil(f * total) > 0]
    cumulative = sorted({min(total, math.ceil(f * total)) for f in kept})
    assert len(sizes) == len(cumulative)
    for fraction, size in zip(_fractions_kept(fractions, total), sizes, strict=True):
        done += size
        # at most the fraction, except where "one more node per stage" needs more
        assert done <= math.ceil(fraction * total)


def _fractions_kept(fractions: list[float], total: int) -> list[float]:
    """The fraction of each stage that runs (the first to reach each new count)."""
    kept: list[float] = []
    done = 0
    for fraction in fractions:
        upto = total if fraction >= 1 else min(total, math.ceil(fraction * total))
        if upto > done:
            kept.append(fraction)
            done = upto
    return kept


def test_canary_choice_is_deterministic_and_leaders_last() -> None:
    nodes = _nodes(10, leader=3)
    first = plan_rollout("canary", "1.7.0", nodes)
    again = plan_rollout("canary", "1.7.0", list(reversed(nodes)))
    assert [p.node.node_id for p in first.nodes] == [p.node.node_id for p in again.nodes]
    assert first.nodes[-1].node.node_id == "n003"
    assert [p.stage for p in first.nodes] == [0, 1, 1, 2, 2, 2, 2, 2, 2, 2]


def test_nodes_already_on_the_version_are_skipped() -> None:
    nodes = _nodes(3) + [NodeInfo(9, "new", 1, False, "1.7.0")]
    plan = plan_rollout("rolling", "1.7.0", nodes)
    assert "new" not in [p.node.node_id for p in plan.nodes]
    assert plan.skipped[0][0].node_id == "new"


def test_version_skew_guard_refuses_two_minor_jump() -> None:
    with pytest.raises(PlanError, match="version skew"):
        plan_rollout("rolling", "1.8.0", _nodes(3, version="1.6.0"))
    with pytest.raises(PlanError, match="version skew"):
        plan_rollout("rolling", "2.0.0", _nodes(3, version="1.9.0"))
    assert plan_rollout("rolling", "1.7.0", _nodes(3, version="1.6.0")).nodes


def test_skew_ignores_standalone_nodes() -> None:
    nodes = _nodes(2, cluster=None, leader=None, version="1.2.0")
    assert len(plan_rollout("rolling", "1.7.0", nodes).nodes) == 2


def test_blue_green_updates_only_the_idle_colour() -> None:
    nodes = [
        NodeInfo(1, "b1", 1, False, "1.6.0", "blue"),
        NodeInfo(2, "g1", 1, False, "1.6.0", "green"),
        NodeInfo(3, "g2", 1, True, "1.6.0", "green"),
    ]
    plan = plan_rollout("blue_green", "1.7.0", nodes, idle_color="green")
    assert [p.node.node_id for p in plan.nodes] == ["g1", "g2"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "at least one"),
        ("5, 1, 100", "increase"),
        ("1, 50", "end at 100"),
        ("a,b", "not a"),
        ("1, nan, 100", "not a number"),
        ("1, inf", "not a number"),
        ("-inf, 100", "not a number"),
    ],
)
def test_bad_stage_text(text: str, message: str) -> None:
    with pytest.raises(PlanError, match=message):
        parse_stages(text)


def test_parse_stages() -> None:
    assert parse_stages("1, 5%, 25, 100") == (0.01, 0.05, 0.25, 1.0)


def test_nothing_to_do_is_an_error() -> None:
    with pytest.raises(PlanError, match="nothing to update"):
        plan_rollout("rolling", "1.6.0", _nodes(2, version="1.6.0"))
