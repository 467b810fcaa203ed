"""The chaos suite's own checks, on hand-written logs: a checker that misses an overlap
or a double apply would let the suite pass while the fleet misbehaves."""

from __future__ import annotations

import json

from tests.chaos import invariants as inv
from tests.chaos.faults import plan_faults


def _drain_log(*events: tuple[str, float, str]) -> str:
    return "".join(
        json.dumps({"node": "n", "job": job, "event": event, "t": at}) + "\n"
        for event, at, job in events
    )


def test_drain_log_as_the_agent_writes_it_gives_intervals() -> None:
    text = _drain_log(("drain", 100.0, "7"), ("rejoin", 103.5, "7"), ("drain", 110.0, "9"))
    events = inv.parse_drain_log(text + "\nnot a record\n")
    assert [(e.hook, e.at, e.job_id) for e in events] == [
        (inv.Hook.DRAIN, 100.0, "7"),
        (inv.Hook.REJOIN, 103.5, "7"),
        (inv.Hook.DRAIN, 110.0, "9"),
    ]
    assert inv.drained_intervals("n", events) == [
        inv.Drained("n", 100.0, 103.5, "7"),
        inv.Drained("n", 110.0, None, "9"),  # never rejoined: still drained
    ]


def test_a_second_drain_without_rejoin_keeps_the_node_drained_from_the_first() -> None:
    events = inv.parse_drain_log(
        _drain_log(("drain", 1.0, "1"), ("drain", 5.0, "1"), ("rejoin", 6.0, "1"))
    )
    assert inv.drained_intervals("n", events) == [inv.Drained("n", 1.0, 6.0, "1")]


def test_plain_text_drain_lines_are_read_too() -> None:
    events = inv.parse_drain_log("1764700000.25 drain job=12\n2026-12-02T10:00:00Z rejoined 12\n")
    assert [(e.hook, e.job_id) for e in events] == [
        (inv.Hook.DRAIN, "12"),
        (inv.Hook.REJOIN, "12"),
    ]
    assert events[0].at == 1764700000.25


def test_overlaps_find_two_nodes_drained_at_once_and_only_then() -> None:
    a = inv.Drained("a", 0.0, 2.0)
    b = inv.Drained("b", 2.0, 4.0)  # starts when a rejoins: not an overlap
    c = inv.Drained("c", 3.0, 5.0)  # overlaps b
    assert [sorted(d.node_id for d in o.drained) for o in inv.overlaps([a, b, c], 1, 10)] == [
        ["b", "c"]
    ]
    assert inv.overlaps([a, b, c], 2, 10) == []


def test_a_node_left_drained_overlaps_every_later_drain() -> None:
    stuck = inv.Drained("a", 0.0, None)
    later = inv.Drained("b", 50.0, 51.0)
    found = inv.overlaps([stuck, later], 1, now=60.0)
    assert len(found) == 1 and found[0].at == 50.0
    assert inv.overlaps([stuck, later], 1, now=40.0) == []  # b had not started by then


def test_applies_log_counts_lines_per_job() -> None:
    text = "".join(
        json.dumps({"job": job, "kind": "apply", "t": 1.0}) + "\n" for job in ("4", "5", "4")
    )
    assert inv.parse_applies_log(text + "\n1764700000.5 job=6 apply\n") == {
        "4": 2,
        "5": 1,
        "6": 1,
    }


def test_a_seed_replays_the_same_fault_plan() -> None:
    assert plan_faults(7, 3) == plan_faults(7, 3)
    assert plan_faults(7, 3) != plan_faults(8, 3)
    plans = [plan_faults(1313, run) for run in range(1, 11)]
    assert all(3 <= len(plan) <= 5 for plan in plans)
    assert all(p.at <= q.at for plan in plans for p, q in zip(plan, plan[1:], strict=False))
