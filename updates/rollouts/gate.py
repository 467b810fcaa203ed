"""The canary health gate: the verdict on a completed stage, and its bake time.

Reads node-reported metrics and the rollout's gate options; calls only the
models and `records` (for when a stage completed). Deciding what follows is
the coordinator's.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from updates.models import Node, Rollout, RolloutNode, StageDecision
from updates.rollouts.records import Decision


@dataclass(frozen=True)
class GateVerdict:
    passed: bool
    reason: str
    error_rate: float | None
    p99_ms: float | None
    unhealthy: list[str]

    def as_dict(self) -> dict[str, Any]:
        return {
            "reason": self.reason,
            "error_rate": self.error_rate,
            "p99_ms": self.p99_ms,
            "unhealthy": self.unhealthy,
        }


def canary_gate(rollout: Rollout, rows: list[RolloutNode]) -> GateVerdict:
    """Node-reported metrics of the updated canary nodes against the thresholds."""
    gate = rollout.opts.gate
    nodes = Node.objects.filter(pk__in=[r.node_id for r in rows])
    rates = [n.error_rate for n in nodes if n.error_rate is not None]
    p99s = [n.p99_latency_ms for n in nodes if n.p99_latency_ms is not None]
    unhealthy = [n.node_id for n in nodes if n.service_healthy is False or n.status != "online"]
    rate = max(rates) if rates else None
    p99 = max(p99s) if p99s else None
    problems = []
    if rate is not None and rate > gate.max_error_rate:
        problems.append(f"error rate {rate:.1%} above {gate.max_error_rate:.1%}")
    if p99 is not None and p99 > gate.max_p99_ms:
        problems.append(f"p99 latency {p99:.0f} ms above {gate.max_p99_ms:.0f} ms")
    if unhealthy:
        problems.append("unhealthy: " + ", ".join(unhealthy))
    reason = "; ".join(problems) or "within thresholds"
    return GateVerdict(not problems, reason, rate, p99, unhealthy)


def baking(rollout: Rollout, stage: int, now: datetime) -> bool:
    """Still inside the bake time after `stage` completed: metrics of freshly
    updated nodes need time to mean something."""
    bake = rollout.opts.gate.bake_seconds
    if bake <= 0:
        return False
    completed = (
        StageDecision.objects.filter(
            rollout=rollout, stage=stage, decision=Decision.STAGE_COMPLETED
        )
        .values_list("created_at", flat=True)
        .first()
    )
    return completed is not None and now < completed + timedelta(seconds=bake)
