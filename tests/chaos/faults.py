"""The seeded fault plan: which process dies when, and for how long. Drawn from the seed
and the run number alone, so a seed replays the same plan (the moments a fault meets are
still those of the real processes)."""

from __future__ import annotations

import random
from dataclasses import dataclass
from enum import StrEnum


class FaultKind(StrEnum):
    REDIS = "kill -9 redis"
    COORDINATOR = "kill -9 coordinator"
    BEAT = "kill -9 beat"
    # Fired when an agent's job is seen in APPLYING or HEALTH_CHECK.
    AGENT_MID_APPLY = "kill -9 agent mid-apply"


# How often each kind is drawn: agents and coordinators are where work is lost or doubled.
WEIGHTS = {
    FaultKind.REDIS: 2,
    FaultKind.COORDINATOR: 3,
    FaultKind.BEAT: 1,
    FaultKind.AGENT_MID_APPLY: 4,
}


@dataclass(frozen=True)
class PlannedFault:
    # Seconds after the run's rollouts started.
    at: float
    kind: FaultKind
    # Which coordinator (0 or 1), or which of the candidate agents; ignored otherwise.
    pick: int
    # Seconds the process stays down before it is started again.
    down_for: float


def plan_faults(seed: int, run: int, *, window: float = 9.0) -> list[PlannedFault]:
    rng = random.Random(f"themis-chaos:{seed}:{run}")
    kinds = list(WEIGHTS)
    weights = [WEIGHTS[k] for k in kinds]
    planned = [
        PlannedFault(
            at=round(rng.uniform(0.3, window), 2),
            kind=rng.choices(kinds, weights)[0],
            pick=rng.randrange(1000),
            down_for=round(rng.uniform(0.2, 1.5), 2),
        )
        for _ in range(rng.randint(3, 5))
    ]
    return sorted(planned, key=lambda f: f.at)
