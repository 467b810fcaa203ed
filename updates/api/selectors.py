"""Reads of the API, always scoped to the requesting user."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from django.db.models import Q, QuerySet

from tenants.models import Blackout
from updates.api.models import ApiToken
from updates.models import Node


def tokens_for_user(user: Any) -> QuerySet[ApiToken]:
    return ApiToken.objects.filter(user=user).order_by("-created_at")


@dataclass(frozen=True)
class NodeFilter:
    tenant: str = ""
    cluster: str = ""
    status: str = ""
    version: str = ""
    search: str = ""


def nodes_for_user(user: Any, flt: NodeFilter) -> QuerySet[Node]:
    """The nodes `user` may see (`Node.objects.visible_to`), narrowed by the filters: tenant
    by slug, cluster by name or id, status, exact installed version, and a search in node id
    and host name."""
    nodes = (
        Node.objects.visible_to(user)
        .select_related("tenant", "cluster")
        .prefetch_related("components")
    )
    if flt.tenant:
        nodes = nodes.filter(tenant__slug=flt.tenant)
    if flt.cluster:
        wanted = Q(cluster__name=flt.cluster)
        if flt.cluster.isascii() and flt.cluster.isdigit() and len(flt.cluster) <= 18:
            wanted |= Q(cluster_id=int(flt.cluster))
        nodes = nodes.filter(wanted)
    if flt.status:
        nodes = nodes.filter(status=flt.status)
    if flt.version:
        nodes = nodes.filter(installed_version=flt.version)
    if flt.search:
        nodes = nodes.filter(Q(node_id__icontains=flt.search) | Q(hostname__icontains=flt.search))
    return nodes.order_by("node_id")


def fleet_blackouts() -> QuerySet[Blackout]:
    """The fleet-wide blackouts (every role sees them, as on the tenant list page)."""
    return Blackout.objects.filter(tenant__isnull=True).order_by("starts_at", "id")
