"""Reads, always scoped to the requesting user."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

from django.db.models import QuerySet
from django.shortcuts import get_object_or_404

from updates.models import Node, Rollout, RolloutNode


def rollouts_for_user(user: Any) -> QuerySet[Rollout]:
    """The rollouts `user` may see (`Rollout.objects.visible_to`: tenant admins
    read-only those touching their tenants' nodes)."""
    return Rollout.objects.select_related("release", "tenant", "cluster").visible_to(user)


def get_rollout_for_user(user: Any, rollout_id: int) -> Rollout:
    return get_object_or_404(rollouts_for_user(user), pk=rollout_id)


@dataclass
class MetricsComparison:
    canary_error_rate: float | None
    baseline_error_rate: float | None
    canary_p99_ms: float | None
    baseline_p99_ms: float | None
    canary_count: int
    baseline_count: int


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def rollout_metrics(rollout: Rollout) -> MetricsComparison:
    """Canary (updated by this rollout) vs baseline (not yet) node metrics."""
    rows = list(rollout.plan.select_related("node"))
    canary = [r.node for r in rows if r.state == RolloutNode.State.DONE]
    baseline = [r.node for r in rows if r.state in (RolloutNode.State.PENDING,)]

    def rates(nodes: list[Node]) -> list[float]:
        return [n.error_rate for n in nodes if n.error_rate is not None]

    def p99s(nodes: list[Node]) -> list[float]:
        return [n.p99_latency_ms for n in nodes if n.p99_latency_ms is not None]

    return MetricsComparison(
        canary_error_rate=_mean(rates(canary)),
        baseline_error_rate=_mean(rates(baseline)),
        canary_p99_ms=_mean(p99s(canary)),
        baseline_p99_ms=_mean(p99s(baseline)),
        canary_count=len(canary),
        baseline_count=len(baseline),
    )


def rollout_progress(rollout: Rollout) -> dict[str, Any]:
    """Nodes updated / total, current node, status and the count per row state."""
    counts = Counter(RolloutNode.objects.filter(rollout=rollout).values_list("state", flat=True))
    current = (
        RolloutNode.objects.filter(
            rollout=rollout, state__in=[RolloutNode.State.RUNNING, RolloutNode.State.WAITING]
        )
        .select_related("node")
        .order_by("position")
        .first()
    )
    return {
        "nodes_updated": counts.get(RolloutNode.State.DONE, 0),
        "nodes_total": sum(counts.values()),
        "current_node": current.node.node_id if current else None,
        "status": rollout.state,
        "counts": dict(counts),
    }


def active_rollout_ids() -> list[int]:
    return list(
        Rollout.objects.filter(state__in=Rollout.ACTIVE_STATES).values_list("pk", flat=True)
    )
