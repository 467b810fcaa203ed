"""Reads, always scoped to the requesting user."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from django.db.models import QuerySet
from django.shortcuts import get_object_or_404

from tenants.models import Tenant
from updates.models import Node, Rollout, RolloutNode


def rollouts_for_user(user: Any) -> QuerySet[Rollout]:
    """Operators and responders see every rollout; a tenant admin those that
    touch one of their tenants' nodes (read-only)."""
    rollouts = Rollout.objects.select_related("release", "tenant", "cluster")
    if not user.is_authenticated:
        return rollouts.none()
    if user.has_perm("tenants.view_all_tenants"):
        return rollouts
    visible = Tenant.objects.visible_to(user)
    return rollouts.filter(plan__node__tenant__in=visible).distinct()


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
