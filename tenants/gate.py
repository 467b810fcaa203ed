"""The update gate's types: what a gate answers and how it is called.

Owns GateDecision and GateFn only; `tenants.services.update_gate` is the real
gate, and updates.jobs and the rollout coordinator accept any GateFn.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from updates.models import Node, Release


@dataclass(frozen=True)
class GateDecision:
    allowed: bool
    wait_state: str | None = None  # UpdateJob.State.WAITING_FOR_WINDOW / WAITING_FOR_CONSENT
    reason: str = ""
    next_window_utc: datetime | None = None
    next_window_label: str = ""  # "Sat 02:00 America/New_York (in 3 h 12 m)"


class GateFn(Protocol):
    """May `node` start updating to `release` at `at` (default: now)? A rollback
    passes `release=None`."""

    def __call__(
        self, *, node: Node, release: Release | None, at: datetime | None = None
    ) -> GateDecision: ...
