"""The canary health gate: the verdict on a completed stage, and its bake time.

Reads node-reported metrics and the rollout's gate options; calls only the
models and `records` (for when a stage completed). Deciding what follows is
the coordinator's (and the approval's, which asks the gate again).

Only metrics reported after a node's job ended plus the bake time count: until
every updated node has sent such a heartbeat the gate waits, for as long as a silent node
takes to be declared offline and out of its grace (`fresh_metrics_wait`), then fails naming
the silent nodes.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings

from updates.models import Node, Rollout, RolloutNode, StageDecision
from updates.rollout_options import GateOptions
from updates.rollouts.records import Decision


def fresh_metrics_wait(rollout: Rollout) -> timedelta:
    """How long the gate waits for a node's first metrics after its update (plus bake): a
    live agent reports every few seconds, so a node silent for longer than it takes to be
    declared offline, plus the rollout's grace for offline nodes, is not coming back soon."""
    return timedelta(seconds=settings.THEMIS_NODE_OFFLINE_AFTER + rollout.opts.offline_grace)


@dataclass(frozen=True)
class GateVerdict:
    passed: bool
    reason: str
    error_rate: float | None
    p99_ms: float | None
    unhealthy: list[str]
    # Not yet decided: some updated node has not reported since its update.
    waiting: bool = False

    def as_dict(self) -> dict[str, Any]:
        return {
            "reason": self.reason,
            "error_rate": self.error_rate,
            "p99_ms": self.p99_ms,
            "unhealthy": self.unhealthy,
        }


def canary_gate(rollout: Rollout, rows: list[RolloutNode], now: datetime) -> GateVerdict:
    """Node-reported metrics of the updated canary nodes against the thresholds,
    counting only metrics reported after each node's job ended plus the bake."""
    gate = rollout.opts.gate
    bake = timedelta(seconds=gate.bake_seconds)
    wait = fresh_metrics_wait(rollout)
    nodes = {n.pk: n for n in Node.objects.filter(pk__in=[r.node_id for r in rows])}
    stale: list[str] = []
    silent: list[str] = []
    for row in rows:
        node = nodes[row.node_id]
        ended = row.job.finished_at if row.job is not None else None
        if ended is None:
            continue
        fresh_from = ended + bake
        if node.last_heartbeat is None or node.last_heartbeat <= fresh_from:
            (silent if now > fresh_from + wait else stale).append(node.node_id)
    if silent:
        reason = (
            f"no metrics reported after the update from {', '.join(silent)} "
            f"within {int(wait.total_seconds())} s"
        )
        return GateVerdict(False, reason, None, None, silent)
    if stale:
        reason = "waiting for metrics reported after the update from " + ", ".join(stale)
        return GateVerdict(False, reason, None, None, [], waiting=True)
    rates = [n.error_rate for n in nodes.values() if n.error_rate is not None]
    p99s = [n.p99_latency_ms for n in nodes.values() if n.p99_latency_ms is not None]
    unhealthy = [
        n.node_id for n in nodes.values() if n.service_healthy is False or n.status != "online"
    ]
    rate = max(rates) if rates else None
    p99 = max(p99s) if p99s else None
    problems = metric_breaches(rate, p99, gate)
    if unhealthy:
        problems.append("unhealthy: " + ", ".join(sorted(unhealthy)))
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


def metric_breaches(rate: float | None, p99: float | None, gate: GateOptions) -> list[str]:
    """The gate's limits this error rate and p99 break, in words (none: within them). Also
    what a fleet tile says of a node's service."""
    problems = []
    if rate is not None and rate > gate.max_error_rate:
        problems.append(f"error rate {rate:.1%} above {gate.max_error_rate:.1%}")
    if p99 is not None and p99 > gate.max_p99_ms:
        problems.append(f"p99 latency {p99:.0f} ms above {gate.max_p99_ms:.0f} ms")
    return problems
