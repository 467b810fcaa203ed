"""Reads, always scoped to the requesting user."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

from django.db.models import QuerySet
from django.shortcuts import get_object_or_404

from tenants.models import Tenant
from updates.models import Cluster, Node, Release, Rollout, RolloutNode
from updates.rollouts.plan import Plan
from updates.rollouts.schema_steps import ContractGroup, SchemaStepLine, schema_plan


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


def rollout_metrics(rollout: Rollout, rows: list[RolloutNode] | None = None) -> MetricsComparison:
    """Canary (updated by this rollout) vs baseline (not yet) node metrics, over `rows`
    (default: the whole plan)."""
    if rows is None:
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
    states = list(
        RolloutNode.objects.filter(rollout=rollout).values_list("state", "contract_state")
    )
    counts = Counter(state for state, _ in states)
    contract = Counter(c for _, c in states if c)
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
        "contract_counts": dict(contract),
        "contract_failed": contract.get(RolloutNode.ContractState.FAILED, 0),
    }


def active_rollout_ids() -> list[int]:
    return list(
        Rollout.objects.filter(state__in=Rollout.ACTIVE_STATES).values_list("pk", flat=True)
    )


@dataclass(frozen=True)
class RolloutPage:
    """What a user may see of a rollout. Someone who reads every tenant sees every node; a
    tenant admin sees their tenants' nodes only, the rest as a count per state."""

    rows: list[RolloutNode]
    progress: dict[str, Any]
    metrics: MetricsComparison
    hidden_counts: dict[str, int]
    sees_everything: bool

    @property
    def hidden_total(self) -> int:
        return sum(self.hidden_counts.values())


def rollout_page_for_user(user: Any, rollout: Rollout) -> RolloutPage:
    plan = list(
        rollout.plan.select_related("node", "node__tenant", "job", "contract_job").order_by(
            "position"
        )
    )
    progress = rollout_progress(rollout)
    if user.has_perm("tenants.view_all_tenants"):
        return RolloutPage(plan, progress, rollout_metrics(rollout, plan), {}, True)
    visible = set(Tenant.objects.visible_to(user).values_list("pk", flat=True))
    mine = [row for row in plan if row.node.tenant_id in visible]
    hidden = Counter(str(row.state) for row in plan if row.node.tenant_id not in visible)
    if progress["current_node"] not in {row.node.node_id for row in mine}:
        progress = {**progress, "current_node": None}
    return RolloutPage(mine, progress, rollout_metrics(rollout, mine), dict(hidden), False)


def _contract_groups(nodes: list[tuple[str, int | None]]) -> list[ContractGroup]:
    """(node_id, cluster_id) in plan order -> one group per cluster (in the order its first
    node comes) and one per standalone node."""
    names = dict(
        Cluster.objects.filter(pk__in={c for _, c in nodes if c is not None}).values_list(
            "pk", "name"
        )
    )
    clusters: dict[int, list[str]] = {}
    order: list[int | str] = []
    for node_id, cluster_id in nodes:
        if cluster_id is None:
            order.append(node_id)
            continue
        if cluster_id not in clusters:
            clusters[cluster_id] = []
            order.append(cluster_id)
        clusters[cluster_id].append(node_id)
    return [
        ContractGroup(names.get(key, str(key)), tuple(clusters[key]))
        if isinstance(key, int)
        else ContractGroup(None, (key,))
        for key in order
    ]


def plan_schema_steps(release: Release, plan: Plan, *, contract_delay: int) -> list[SchemaStepLine]:
    """The plan page's migration lines: which of the release's migrations run at which step."""
    groups = _contract_groups([(p.node.node_id, p.node.cluster_id) for p in plan.nodes])
    return schema_plan(release.manifest, release.version, groups, contract_delay=contract_delay)


def rollout_schema_steps(rollout: Rollout, rows: list[RolloutNode]) -> list[SchemaStepLine]:
    """The same for a rollout, over the plan rows the user may see."""
    groups = _contract_groups([(r.node.node_id, r.node.cluster_id) for r in rows])
    return schema_plan(
        rollout.release.manifest,
        rollout.release.version,
        groups,
        contract_delay=rollout.opts.contract_delay,
    )
