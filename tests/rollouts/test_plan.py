"""Rollout planning rules, without a database."""

from __future__ import annotations

import hashlib
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from updates.rollouts.plan import (
    NodeInfo,
    PlanError,
    check_version_skew,
    parse_stages,
    plan_rollout,
    stage_sizes,
)


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


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "stages: at least one stage is needed"),
        ("5, 5, 100", "stages: percentages must increase"),
        ("0, 50, 100", "stages: must be above 0 and end at 100"),
        ("1, 50", "stages: must be above 0 and end at 100"),
    ],
)
def test_bad_stage_text_is_refused_with_the_whole_reason(text: str, message: str) -> None:
    # The message is shown as is in the rollout form: it must read right, not just match.
    with pytest.raises(PlanError) as refused:
        parse_stages(text)
    assert str(refused.value) == message


def test_a_single_stage_of_100_percent() -> None:
    assert parse_stages("100") == (1.0,)


def test_a_fraction_at_or_beyond_the_whole_is_everyone_even_unbounded() -> None:
    assert stage_sizes(7, (0.5, math.inf)) == [4, 3]
    assert stage_sizes(7, (1.5,)) == [7]


def test_rolling_takes_standalone_nodes_before_any_cluster() -> None:
    nodes = [
        NodeInfo(1, "a-follower", 1, False, "1.6.0"),
        NodeInfo(2, "z-solo", None, False, "1.6.0"),
        NodeInfo(3, "a-leader", 1, True, "1.6.0"),
    ]
    order = [p.node.node_id for p in plan_rollout("rolling", "1.7.0", nodes).nodes]
    assert order == ["z-solo", "a-follower", "a-leader"]


def _refusal(version: str, nodes: list[NodeInfo]) -> str:
    with pytest.raises(PlanError) as refused:
        check_version_skew(version, nodes)
    return str(refused.value)


def test_version_skew_refusal_names_the_cluster_and_what_to_do() -> None:
    nodes = [NodeInfo(1, "a", 1, False, "1.5.0"), NodeInfo(2, "b", 1, True, "1.6.0")]
    assert _refusal("1.7.0", nodes) == (
        "version skew: 1.7.0 with a=1.5.0, b=1.6.0 would put nodes of one cluster "
        "more than one minor version apart; update in smaller steps"
    )


def test_version_skew_is_judged_per_cluster() -> None:
    # 1.6 and 1.8 are two minors apart, but in different clusters: each is within one of 1.7.
    check_version_skew(
        "1.7.0", [NodeInfo(1, "a", 1, False, "1.6.0"), NodeInfo(2, "b", 2, False, "1.8.0")]
    )


def test_invalid_versions_are_named_with_where_they_come_from() -> None:
    assert _refusal("seven", []) == "release: 'seven' is not a valid version"
    assert (
        _refusal("1.7.0", [NodeInfo(1, "a", 1, False, "garbage")])
        == "a: 'garbage' is not a valid version"
    )
    with pytest.raises(PlanError) as refused:
        plan_rollout("rolling", "1.7.0", [NodeInfo(1, "a", None, False, "v?")])
    assert str(refused.value) == "a: 'v?' is not a valid version"
    with pytest.raises(PlanError) as refused:
        plan_rollout("rolling", "latest", [NodeInfo(1, "a", None, False, "1.6.0")])
    assert str(refused.value) == "release: 'latest' is not a valid version"


def test_blue_green_without_an_idle_colour_takes_the_uncoloured_nodes() -> None:
    nodes = [NodeInfo(1, "plain", 1, False, "1.6.0"), NodeInfo(2, "g", 1, False, "1.6.0", "green")]
    plan = plan_rollout("blue_green", "1.7.0", nodes)
    assert [p.node.node_id for p in plan.nodes] == ["plain"]
    assert [(n.node_id, why) for n, why in plan.skipped] == [("g", "serves colour green")]


def test_blue_green_lists_every_node_it_leaves_out_and_why() -> None:
    nodes = [
        NodeInfo(1, "done", 1, False, "1.7.0", "green"),
        NodeInfo(2, "blue", 1, False, "1.6.0", "blue"),
        NodeInfo(3, "plain", 1, False, "1.6.0"),
        NodeInfo(4, "green", 1, False, "1.6.0", "green"),
    ]
    plan = plan_rollout("blue_green", "1.7.0", nodes, idle_color="green")
    assert [p.node.node_id for p in plan.nodes] == ["green"]
    assert [(n.node_id, why) for n, why in plan.skipped] == [
        ("done", "already on 1.7.0"),
        ("blue", "serves colour blue"),
        ("plain", "serves colour (none)"),
    ]


def test_nothing_to_update_says_so_in_full() -> None:
    with pytest.raises(PlanError) as refused:
        plan_rollout("canary", "1.6.0", _nodes(2, version="1.6.0"))
    assert str(refused.value) == (
        "nothing to update: every targeted node is already on this version"
    )


@pytest.mark.parametrize("version", ["1.7.0", "1.7.1", "2.0.0"])
def test_canary_order_is_the_hash_of_release_and_node(version: str) -> None:
    # Each release picks its own canaries: the order hashes the release version too.
    nodes = _nodes(12, cluster=None, leader=None)

    def digest(node: NodeInfo) -> str:
        return hashlib.sha256(f"{version}:{node.node_id}".encode()).hexdigest()

    plan = plan_rollout("canary", version, nodes, stages=(1.0,))
    assert [p.node.node_id for p in plan.nodes] == [n.node_id for n in sorted(nodes, key=digest)]


def test_an_unknown_strategy_is_refused_by_name() -> None:
    with pytest.raises(PlanError) as refused:
        plan_rollout("big_bang", "1.7.0", _nodes(2))
    assert str(refused.value) == "strategy: unknown 'big_bang'"
