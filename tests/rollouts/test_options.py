"""Rollout options: defaults in one place, partial JSON merged, wrong types refused."""

from __future__ import annotations

import pytest

from updates.models import Rollout
from updates.rollout_options import (
    DEFAULT_STAGE_FRACTIONS,
    GateOptions,
    OptionsError,
    RolloutOptions,
    StageOptions,
)
from updates.rollouts.coordinator import DriveOutcome


def test_empty_json_gives_the_defaults() -> None:
    opts = RolloutOptions.from_json({})
    assert opts == RolloutOptions()
    assert RolloutOptions.from_json(None) == RolloutOptions()
    assert opts.stage_fractions == DEFAULT_STAGE_FRACTIONS
    assert opts.gate == GateOptions(max_error_rate=0.05, max_p99_ms=500.0, automatic=False)


def test_partial_gate_is_merged_key_by_key_and_unknown_keys_ignored() -> None:
    opts = RolloutOptions.from_json(
        {"gate": {"automatic": True}, "parallel": True, "colour": "teal", "max_parallel": None}
    )
    assert opts.gate.automatic is True
    assert opts.gate.max_error_rate == 0.05
    assert opts.parallel is True
    assert opts.max_parallel == 0


def test_round_trip_through_json() -> None:
    opts = RolloutOptions(
        max_unavailable=2,
        stages=(StageOptions(0.1, auto_promote=True), StageOptions(1.0)),
        gate=GateOptions(max_p99_ms=250, bake_seconds=60),
    )
    stored = opts.to_json()
    assert stored["stages"] == [
        {"fraction": 0.1, "auto_promote": True},
        {"fraction": 1.0, "auto_promote": False},
    ]
    assert RolloutOptions.from_json(stored) == opts


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"max_unavailable": "2"}, "max_unavailable must be an integer"),
        ({"max_unavailable": True}, "max_unavailable must be an integer"),
        ({"parallel": 1}, "parallel must be true or false"),
        ({"gate": {"max_p99_ms": "fast"}}, "gate.max_p99_ms must be a number"),
        ({"gate": []}, "gate must be an object"),
        ({"stages": "1, 5, 100"}, "stages must be a list"),
        ({"stages": [{"auto_promote": True}]}, r"stages\[0\].fraction is missing"),
    ],
)
def test_wrong_types_are_refused_with_the_key(data: dict[str, object], message: str) -> None:
    with pytest.raises(OptionsError, match=message):
        RolloutOptions.from_json(data)


def test_rollout_reads_its_options_through_opts() -> None:
    rollout = Rollout(options={"health_timeout": 90})
    assert rollout.opts.health_timeout == 90
    assert rollout.opts.rollback_on_failure is True


def test_drive_outcome_names_every_rollout_state() -> None:
    assert set(Rollout.State.values) | {"BUSY"} == set(DriveOutcome.values)
