"""Reads for tenant schedules, always scoped to the requesting user."""

from __future__ import annotations

from dataclasses import dataclass

from tenants.models import Tenant
from updates.models import Node, UpdateJob


@dataclass(frozen=True)
class RollbackStep:
    node: Node
    installed_version: str
    restore_point: str | None  # the point to pass to job_start_rollback
    target_version: str | None
    note: str = ""


def tenant_rollback_plan(tenant: Tenant) -> list[RollbackStep]:
    """Every node of the tenant and the restore point that takes it back to
    its previous release: the newest point holding another, non-empty version.
    Followers first, each cluster's leader last, as in a rolling update."""
    busy = set(
        UpdateJob.objects.filter(
            node__tenant=tenant, state__in=UpdateJob.ACTIVE_STATES
        ).values_list("node_id", flat=True)
    )
    nodes = sorted(
        Node.objects.filter(tenant=tenant).select_related("cluster"),
        key=lambda n: (n.cluster.name if n.cluster else "", n.raft_role == "leader", n.node_id),
    )
    return [rollback_step(node, node.pk in busy) for node in nodes]


def rollback_step(node: Node, busy: bool) -> RollbackStep:
    points = [p for p in node.restore_points or [] if isinstance(p, dict)]
    # Agents list points oldest first; "created" is ISO 8601 when present.
    points.sort(key=lambda p: str(p.get("created") or ""), reverse=True)
    previous = next(
        (p for p in points if p.get("version") and p.get("version") != node.installed_version),
        None,
    )
    note = "busy: an update job is active" if busy else ""
    if previous is None:
        return RollbackStep(
            node, node.installed_version, None, None, "no earlier version to restore"
        )
    return RollbackStep(
        node, node.installed_version, str(previous["id"]), str(previous["version"]), note
    )
