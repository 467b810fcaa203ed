"""Reads, always scoped to the requesting user."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

from django.db import models
from django.db.models import Case, Count, F, Max, QuerySet, Value, When
from django.shortcuts import get_object_or_404
from django.template.defaultfilters import filesizeformat
from django.urls import reverse
from django.utils import timezone

from tenants.models import Tenant
from updates.models import Cluster, Node, NodeQuerySet
from updates.rollout_options import GateOptions
from updates.rollouts.gate import metric_breaches

# The node list shows at most this many tiles at once; the rest is a page away.
FLEET_PAGE_SIZE = 100

# How long a node write may take between its timestamp and its commit. A poll re-sends the
# tiles stamped within this window before the version it was given, and the version counts
# them, so a write that commits after a later one was already seen is not lost.
CHANGE_WINDOW = timedelta(seconds=10)

# The summary names this many versions and tenants; the filters reach the rest.
SUMMARY_VERSIONS = 12
SUMMARY_TENANTS = 100

# Problem statuses first: what an operator sorting by status is looking for.
_STATUS_RANK = Case(
    When(status=Node.Status.FAILED, then=Value(0)),
    When(status=Node.Status.OFFLINE, then=Value(1)),
    When(status=Node.Status.UNKNOWN, then=Value(2)),
    When(status=Node.Status.UPDATING, then=Value(3)),
    default=Value(4),
)

# sort key in the query string -> order; node_id last keeps pages stable under ties.
FLEET_SORTS: dict[str, tuple[str, tuple[Any, ...]]] = {
    "node": ("node id", ("node_id",)),
    "-node": ("node id, descending", ("-node_id",)),
    "heartbeat": (
        "last heartbeat, oldest first",
        (F("last_heartbeat").asc(nulls_first=True), "node_id"),
    ),
    "-heartbeat": (
        "last heartbeat, newest first",
        (F("last_heartbeat").desc(nulls_last=True), "node_id"),
    ),
    "status": ("status, problems first", (_STATUS_RANK.asc(), "node_id")),
    "-status": ("status, problems last", (_STATUS_RANK.desc(), "node_id")),
    "version": ("version", ("installed_version", "node_id")),
    "-version": ("version, descending", ("-installed_version", "node_id")),
}
DEFAULT_SORT = "node"

# Only what a tile shows: never the JSON columns (restore points, schema history).
_TILE_COLUMNS = (
    "node_id",
    "tenant_id",
    "cluster__name",
    "status",
    "installed_version",
    "raft_role",
    "last_heartbeat",
    "disk_free_bytes",
    "updated_at",
    "service_healthy",
    "error_rate",
    "p99_latency_ms",
)

# A service over these is degraded: the canary gate's defaults, so a tile turns amber where a
# default rollout would stop.
_GATE = GateOptions()


class ServiceState(models.TextChoices):
    """The managed service's health as its node last reported it (not the host's)."""

    HEALTHY = "healthy", "service healthy"
    DEGRADED = "degraded", "service degraded"
    FAILING = "failing", "service failing"
    UNKNOWN = "unknown", "service not reported"


@dataclass(frozen=True)
class ServiceHealth:
    state: ServiceState
    detail: str  # what made it so, for a title or the node page ("" when healthy or unknown)
    error_rate: float | None = None
    p99_ms: float | None = None

    @property
    def label(self) -> str:
        return str(self.state.label)

    @property
    def error_rate_text(self) -> str:
        return "—" if self.error_rate is None else f"{self.error_rate:.2%}"

    @property
    def p99_text(self) -> str:
        return "—" if self.p99_ms is None else f"{self.p99_ms:,.0f} ms"


def service_health(
    healthy: bool | None, error_rate: float | None, p99_ms: float | None
) -> ServiceHealth:
    """Failing when the service's own health check says so; degraded when its error rate or
    p99 is over the canary gate's default limits; unknown when it reported nothing."""
    figures = {"error_rate": error_rate, "p99_ms": p99_ms}
    if healthy is False:
        return ServiceHealth(ServiceState.FAILING, "its health check fails", **figures)
    over = metric_breaches(error_rate, p99_ms, _GATE)
    if over:
        return ServiceHealth(ServiceState.DEGRADED, "; ".join(over), **figures)
    if healthy is None and error_rate is None and p99_ms is None:
        return ServiceHealth(ServiceState.UNKNOWN, "")
    return ServiceHealth(ServiceState.HEALTHY, "", **figures)


@dataclass(frozen=True)
class NodeFilter:
    """What the fleet page's query string asks for; blank fields filter nothing."""

    search: str = ""
    tenant: Tenant | None = None
    cluster_id: int | None = None
    status: str = ""
    version: str = ""
    tag: str = ""
    sort: str = DEFAULT_SORT


@dataclass(frozen=True)
class Tile:
    """One node as its tile shows it, formatted once here rather than per template tag."""

    node_id: str
    url: str
    status: str
    status_label: str
    version: str
    leader: bool
    place: str
    seen: str
    seen_iso: str
    disk_free: str
    updated_at: datetime
    service: ServiceHealth


# Exact to the microsecond both ways (a float timestamp is not).
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)


@dataclass(frozen=True)
class FleetVersion:
    """Where the user's visible fleet stands: the newest `updated_at`, how many nodes, and
    how many were stamped within CHANGE_WINDOW of the newest. Any write, deletion or late
    commit changes at least one of the three."""

    latest: datetime | None
    total: int
    recent: int

    @property
    def token(self) -> str:
        stamp = 0 if self.latest is None else (self.latest - _EPOCH) // _MICROSECOND
        return f"{stamp}.{self.total}.{self.recent}"

    @classmethod
    def from_token(cls, token: str) -> FleetVersion | None:
        """The version a page was given; None for anything malformed (then the poll
        sends the whole page, as if everything had changed)."""
        parts = token.split(".")
        if len(parts) != 3 or not all(p.isascii() and p.isdigit() and len(p) <= 18 for p in parts):
            return None
        stamp, total, recent = (int(p) for p in parts)
        latest = _EPOCH + stamp * _MICROSECOND if stamp else None
        return cls(latest=latest, total=total, recent=recent)


@dataclass(frozen=True)
class TenantCount:
    tenant: Tenant
    total: int
    # (status, count) of the statuses that need attention, only those present.
    problems: tuple[tuple[str, int], ...]


@dataclass(frozen=True)
class FleetSummary:
    total: int
    by_status: tuple[tuple[str, str, int], ...]  # (status, label, count), every status
    by_version: tuple[tuple[str, int], ...]  # most common first, SUMMARY_VERSIONS at most
    other_versions: int  # how many more versions there are
    by_tenant: tuple[TenantCount, ...]  # by name, SUMMARY_TENANTS at most
    other_tenants: int

    @property
    def signature(self) -> str:
        """Changes whenever anything the summary shows changes."""
        counts = (
            self.by_status,
            self.by_version,
            self.other_versions,
            [(t.tenant.pk, t.total, t.problems) for t in self.by_tenant],
        )
        return _digest(repr(counts))


@dataclass(frozen=True)
class FleetPage:
    number: int
    num_pages: int
    count: int  # nodes matching the filter
    start: int  # 1-based index of the first tile shown (0 when none)
    end: int
    tiles: list[Tile]

    @property
    def signature(self) -> str:
        """Which nodes the page shows, in which order: if this is unchanged, the tiles that
        changed can be swapped one by one; otherwise the whole list is sent again."""
        ids = "|".join(t.node_id for t in self.tiles)
        return _digest(f"{self.number}/{self.num_pages}/{self.count}/{ids}")

    @property
    def has_previous(self) -> bool:
        return self.number > 1

    @property
    def has_next(self) -> bool:
        return self.number < self.num_pages

    @property
    def previous_number(self) -> int:
        return max(self.number - 1, 1)

    @property
    def next_number(self) -> int:
        return min(self.number + 1, self.num_pages)


_PROBLEMS = (Node.Status.FAILED, Node.Status.OFFLINE, Node.Status.UPDATING)


def fleet_tenants(user: Any) -> list[Tenant]:
    """The tenants whose nodes the user may see, by name: every fleet read below is
    scoped to these."""
    return list(Tenant.objects.visible_to(user).order_by("name"))


def fleet_clusters(tenant: Tenant | None) -> list[Cluster]:
    """The clusters a cluster filter can name: the chosen tenant's (none without one)."""
    if tenant is None:
        return []
    return list(Cluster.objects.filter(tenant=tenant).order_by("name"))


def _visible_nodes(tenants: list[Tenant]) -> NodeQuerySet:
    return Node.objects.filter(tenant_id__in=[t.pk for t in tenants])


def fleet_version(tenants: list[Tenant]) -> FleetVersion:
    """Two aggregate queries on the (tenant, updated_at) index alone, whatever the
    fleet's size."""
    nodes = _visible_nodes(tenants).order_by()
    totals = nodes.aggregate(latest=Max("updated_at"), total=Count("pk"))
    latest = totals["latest"]
    recent = 0 if latest is None else nodes.filter(updated_at__gt=latest - CHANGE_WINDOW).count()
    return FleetVersion(latest=latest, total=totals["total"], recent=recent)


def fleet_summary(tenants: list[Tenant]) -> FleetSummary:
    """Counts by status, by installed version and by tenant, counted by the database in
    one grouped query that reads the (tenant, status, version) index in its own order."""
    rows = (
        _visible_nodes(tenants)
        .order_by()
        .values_list("tenant_id", "status", "installed_version")
        .annotate(n=Count("pk"))
    )
    by_status = {status: 0 for status in Node.Status.values}
    by_version: dict[str, int] = {}
    per_tenant: dict[int, dict[str, int]] = {}
    for tenant_id, status, version, n in rows:
        by_status[status] = by_status.get(status, 0) + n
        by_version[version] = by_version.get(version, 0) + n
        statuses = per_tenant.setdefault(tenant_id, {})
        statuses[status] = statuses.get(status, 0) + n
    versions = sorted(by_version.items(), key=lambda item: (-item[1], item[0]))
    tenant_counts = [
        TenantCount(
            tenant=tenant,
            total=sum(per_tenant[tenant.pk].values()),
            problems=tuple(
                (status, per_tenant[tenant.pk][status])
                for status in _PROBLEMS
                if per_tenant[tenant.pk].get(status)
            ),
        )
        for tenant in tenants
        if tenant.pk in per_tenant
    ]
    labels = dict(Node.Status.choices)
    return FleetSummary(
        total=sum(by_status.values()),
        by_status=tuple((s, labels.get(s, s), n) for s, n in by_status.items()),
        by_version=tuple(versions[:SUMMARY_VERSIONS]),
        other_versions=max(len(versions) - SUMMARY_VERSIONS, 0),
        by_tenant=tuple(tenant_counts[:SUMMARY_TENANTS]),
        other_tenants=max(len(tenant_counts) - SUMMARY_TENANTS, 0),
    )


def fleet_nodes(tenants: list[Tenant], flt: NodeFilter) -> QuerySet[Node]:
    """The visible nodes the filter matches."""
    return _visible_nodes(tenants).matching(
        search=flt.search,
        tenant_id=flt.tenant.pk if flt.tenant is not None else None,
        cluster_id=flt.cluster_id,
        status=flt.status,
        version=flt.version,
        tag=flt.tag,
    )


def fleet_page(tenants: list[Tenant], flt: NodeFilter, number: Any) -> FleetPage:
    """One page of tiles: a count (on an index, without the cluster join) and one sorted
    slice of only the columns tiles show. A page number that is not one gives the first
    page; one past the end, the last."""
    nodes = fleet_nodes(tenants, flt)
    count = nodes.order_by().count()
    num_pages = max(1, -(-count // FLEET_PAGE_SIZE))
    text = str(number or "1").strip()
    wanted = int(text) if text.isascii() and text.isdigit() and len(text) <= 9 else 1
    page_number = min(max(wanted, 1), num_pages)
    offset = (page_number - 1) * FLEET_PAGE_SIZE
    _label, order = FLEET_SORTS.get(flt.sort, FLEET_SORTS[DEFAULT_SORT])
    rows = nodes.order_by(*order).values(*_TILE_COLUMNS)[offset : offset + FLEET_PAGE_SIZE]
    names = {t.pk: t.name for t in tenants}
    prefix, suffix = reverse("node_detail", args=[_NODE_PLACEHOLDER]).split(_NODE_PLACEHOLDER)
    today = timezone.localdate()
    tiles = [_tile(row, names, prefix, suffix, today) for row in rows]
    return FleetPage(
        number=page_number,
        num_pages=num_pages,
        count=count,
        start=offset + 1 if tiles else 0,
        end=offset + len(tiles),
        tiles=tiles,
    )


def fleet_changed_tiles(tenants: list[Tenant], page: FleetPage, since: FleetVersion) -> list[Tile]:
    """The page's tiles written after `since`. Also those stamped within CHANGE_WINDOW
    before it if that window no longer holds as many nodes as `since` counted: a write
    stamped before the newest one committed after the page read the version (or a node in
    the window changed again, or went). One aggregate query."""
    if since.latest is None:
        return page.tiles
    start = since.latest - CHANGE_WINDOW
    window = (
        _visible_nodes(tenants).filter(updated_at__gt=start, updated_at__lte=since.latest).count()
    )
    cutoff = since.latest if window == since.recent else start
    return [tile for tile in page.tiles if tile.updated_at > cutoff]


# A slug no node id needs: the node page's URL is reversed once per page, not per tile.
_NODE_PLACEHOLDER = "node-id-placeholder"
_STATUS_LABELS = dict(Node.Status.choices)


def _tile(
    row: dict[str, Any], names: dict[int, str], prefix: str, suffix: str, today: date
) -> Tile:
    seen: datetime | None = row["last_heartbeat"]
    local = timezone.localtime(seen) if seen is not None else None
    # An absolute time: a tile is only re-sent when its node changes, so "5 s ago" would
    # go stale on a node that went silent.
    if local is None:
        seen_text = ""
    elif local.date() == today:
        seen_text = local.strftime("%H:%M:%S")
    else:
        seen_text = local.strftime("%d %b %H:%M")
    cluster = row["cluster__name"]
    tenant = names.get(row["tenant_id"], "")
    return Tile(
        node_id=row["node_id"],
        url=f"{prefix}{row['node_id']}{suffix}",
        status=row["status"],
        status_label=_STATUS_LABELS.get(row["status"], row["status"]),
        version=row["installed_version"],
        leader=row["raft_role"] == Node.RaftRole.LEADER,
        place=f"{tenant} › {cluster}" if cluster else f"{tenant} › standalone",
        seen=seen_text,
        seen_iso=local.isoformat() if local is not None else "",
        disk_free="" if row["disk_free_bytes"] is None else filesizeformat(row["disk_free_bytes"]),
        updated_at=row["updated_at"],
        service=service_health(row["service_healthy"], row["error_rate"], row["p99_latency_ms"]),
    )


def _digest(text: str) -> str:
    return str(hashlib.blake2b(text.encode(), digest_size=8).hexdigest())


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


def nodes_for_user(user: Any, node_ids: list[str]) -> tuple[list[Node], list[str]]:
    """The named nodes this user may see, by id, and the names that are none of them (not a
    node, or another tenant's: the same answer, as a 404 would give)."""
    wanted = sorted(set(node_ids))
    found = list(
        Node.objects.visible_to(user)
        .filter(node_id__in=wanted)
        .select_related("tenant", "cluster")
        .order_by("node_id")
    )
    known = {node.node_id for node in found}
    return found, [node_id for node_id in wanted if node_id not in known]
