"""Test-only fault hook for the agent's reports: drop or duplicate them.

Off unless `THEMIS_AGENT_FAULTS` is set, to JSON such as
`{"seed": 7, "drop": 0.1, "duplicate": 0.1}`. The chaos suite uses it to show
that the dashboard copes with lost and repeated agent messages; the seeded RNG
makes a run replayable. A malformed value is refused at agent start.
"""

from __future__ import annotations

import json
import random
import threading
from dataclasses import dataclass
from enum import StrEnum

ENV_VAR = "THEMIS_AGENT_FAULTS"


class Fault(StrEnum):
    NONE = "none"
    DROP = "drop"
    DUPLICATE = "duplicate"


@dataclass(frozen=True)
class FaultSpec:
    seed: int
    drop: float
    duplicate: float

    @classmethod
    def parse(cls, text: str | None) -> FaultSpec | None:
        """None when unset or empty; ValueError naming the problem otherwise."""
        if not text:
            return None
        try:
            data = json.loads(text)
        except ValueError:
            raise ValueError(f"{ENV_VAR}: not JSON: {text[:80]!r}") from None
        if not isinstance(data, dict):
            raise ValueError(f"{ENV_VAR}: expected a JSON object")
        unknown = set(data) - {"seed", "drop", "duplicate"}
        if unknown:
            raise ValueError(f"{ENV_VAR}: unknown keys {sorted(unknown)}")
        seed = data.get("seed", 0)
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise ValueError(f"{ENV_VAR}: seed must be an integer")
        drop, duplicate = _probability(data, "drop"), _probability(data, "duplicate")
        if drop + duplicate > 1:
            raise ValueError(f"{ENV_VAR}: drop + duplicate must not exceed 1")
        return cls(seed=seed, drop=drop, duplicate=duplicate)


def _probability(data: dict[str, object], key: str) -> float:
    value = data.get(key, 0)
    if not isinstance(value, int | float) or isinstance(value, bool) or not 0 <= value <= 1:
        raise ValueError(f"{ENV_VAR}: {key} must be a number between 0 and 1")
    return float(value)


class FaultInjector:
    """One seeded decision per report, in the order reports are sent."""

    def __init__(self, spec: FaultSpec) -> None:
        self.spec = spec
        self._rng = random.Random(spec.seed)  # noqa: S311 - replayable test faults, not secrets
        self._lock = threading.Lock()
        self.injected = 0

    def decide(self) -> Fault:
        with self._lock:
            roll = self._rng.random()
            if roll < self.spec.drop:
                fault = Fault.DROP
            elif roll < self.spec.drop + self.spec.duplicate:
                fault = Fault.DUPLICATE
            else:
                return Fault.NONE
            self.injected += 1
            return fault
