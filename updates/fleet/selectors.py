"""Reads, always scoped to the requesting user."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from django.shortcuts import get_object_or_404

from tenants.models import Tenant
from updates.models import Cluster, Node


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


def node_schema_history(node: Node) -> list[dict[str, Any]]:
    """The node's reported schema history, newest first; entries of another shape (an
    older dashboard's, a hand-edited row) are left out rather than shown half."""
    history = node.schema_history if isinstance(node.schema_history, list) else []
    return [
        entry
        for entry in reversed(history)
        if isinstance(entry, dict) and isinstance(entry.get("version"), str)
    ]


def get_node_for_user(user: Any, node_id: str) -> Node:
    """The one way views fetch a node: 404 when the user may not see it."""
    return get_object_or_404(
        Node.objects.visible_to(user).select_related("tenant", "cluster"), node_id=node_id
    )
