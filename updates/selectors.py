"""Reads, always scoped to the requesting user."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from django.db.models import Prefetch, QuerySet
from django.shortcuts import get_object_or_404

from tenants.models import Tenant

from .models import Cluster, Event, Node, Release, ReleaseFile, Rollout, RolloutNode


@dataclass
class ClusterGroup:
    cluster: Cluster
    nodes: list[Node] = field(default_factory=list)


@dataclass
class TenantGroup:
    tenant: Tenant
    clusters: list[ClusterGroup] = field(default_factory=list)
    standalone: list[Node] = field(default_factory=list)

    @property
    def node_count(self) -> int:
        return len(self.standalone) + sum(len(c.nodes) for c in self.clusters)


def fleet_for_user(user: Any) -> list[TenantGroup]:
    """The fleet grouped tenant -> cluster -> node, in a constant number of queries."""
    tenants = {t.pk: TenantGroup(tenant=t) for t in Tenant.objects.visible_to(user)}
    clusters: dict[int, ClusterGroup] = {}
    for cluster in Cluster.objects.filter(tenant_id__in=tenants).order_by("name"):
        clusters[cluster.pk] = ClusterGroup(cluster=cluster)
        tenants[cluster.tenant_id].clusters.append(clusters[cluster.pk])
    for node in Node.objects.filter(tenant_id__in=tenants).order_by("node_id"):
        if node.cluster_id is None:
            tenants[node.tenant_id].standalone.append(node)
        else:
            clusters[node.cluster_id].nodes.append(node)
    return list(tenants.values())


def fleet_status_counts(groups: list[TenantGroup]) -> dict[str, int]:
    counts = {status: 0 for status in Node.Status.values}
    for group in groups:
        for node in group.standalone:
            counts[node.status] += 1
        for cluster in group.clusters:
            for node in cluster.nodes:
                counts[node.status] += 1
    return counts


def get_node_for_user(user: Any, node_id: str) -> Node:
    """The one way views fetch a node: 404 when the user may not see it."""
    return get_object_or_404(
        Node.objects.visible_to(user).select_related("tenant", "cluster"), node_id=node_id
    )


def releases_for_user(user: Any) -> QuerySet[Release]:
    # Releases are fleet-wide artefacts, readable by every signed-in role.
    return Release.objects.select_related("published_by").order_by("-created_at")


def release_rows_for_user(user: Any) -> list[Release]:
    """The releases page: each release with `deltas` (its delta bundles, each
    with `percent_saved`) and `deltas_generating` (a delta run is under way)."""
    from .deltas import deltas_in_progress, percent_saved

    deltas = ReleaseFile.objects.filter(kind=ReleaseFile.Kind.DELTA).order_by("-created_at")
    releases = list(
        releases_for_user(user).prefetch_related(Prefetch("files", deltas, to_attr="deltas"))
    )
    generating = deltas_in_progress([r.pk for r in releases]) if releases else set()
    for release in releases:
        release.deltas_generating = release.pk in generating  # type: ignore[attr-defined]
        for delta in release.deltas:  # type: ignore[attr-defined]
            delta.percent_saved = percent_saved(delta.size, release.size)
    return releases


@dataclass(frozen=True)
class EventFilter:
    tenant: Tenant | None = None
    node: Node | None = None
    verb: str = ""
    since: datetime | None = None
    until: datetime | None = None


def events_for_user(user: Any, flt: EventFilter) -> QuerySet[Event]:
    events = Event.objects.visible_to(user).select_related("tenant")
    if flt.tenant is not None:
        events = events.filter(tenant=flt.tenant)
    if flt.node is not None:
        events = events.filter(object_type="node", object_id=str(flt.node.pk))
    if flt.verb:
        events = events.filter(verb__startswith=flt.verb)
    if flt.since is not None:
        events = events.filter(created_at__gte=flt.since)
    if flt.until is not None:
        events = events.filter(created_at__lt=flt.until)
    return events.order_by("-created_at", "-id")


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
