"""Reads, always scoped to the requesting user."""

from __future__ import annotations

import math
import statistics
from collections import Counter
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from django.db import models
from django.db.models import Avg, BooleanField, Count, ExpressionWrapper, Q, QuerySet, Value
from django.shortcuts import get_object_or_404

from tenants.models import Tenant
from tenants.selectors import next_window_labels
from updates.models import Cluster, Node, Release, Rollout, RolloutNode, UpdateJob
from updates.rollouts.plan import Plan
from updates.rollouts.schema_steps import (
    ContractGroup,
    SchemaStepLine,
    release_migrations,
    schema_plan,
)


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
    plan = RolloutNode.objects.filter(rollout=rollout)
    counts: Counter[str] = Counter()
    contract: Counter[str] = Counter()
    grouped = plan.order_by().values_list("state", "contract_state").annotate(n=Count("pk"))
    for row_state, contract_state, n in grouped:
        counts[row_state] += n
        if contract_state:
            contract[contract_state] += n
    return _progress(rollout, counts, contract, _current_row(plan))


def _current_row(plan: QuerySet[RolloutNode]) -> RolloutNode | None:
    """The first row in flight: the node a person watching the rollout looks at."""
    return (
        plan.filter(state__in=[RolloutNode.State.RUNNING, RolloutNode.State.WAITING])
        .select_related("node")
        .order_by("position")
        .first()
    )


def _progress(
    rollout: Rollout, counts: Counter[str], contract: Counter[str], current: RolloutNode | None
) -> dict[str, Any]:
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


# Rows of the plan per page of the rollout's page: bounded, whatever the plan's size.
PLAN_PAGE_SIZE = 100
# The row states the page can filter on, in the order its filter lists them.
PLAN_FILTERS = (
    RolloutNode.State.FAILED,
    RolloutNode.State.ROLLED_BACK,
    RolloutNode.State.WAITING,
    RolloutNode.State.RUNNING,
    RolloutNode.State.PENDING,
    RolloutNode.State.DONE,
    RolloutNode.State.SKIPPED,
)


@dataclass(frozen=True)
class PlanLine:
    """A row of the plan's table, with its tenant's next window when its job waits."""

    row: RolloutNode
    next_window: str


@dataclass(frozen=True)
class RolloutDetail:
    """The rollout's page: counts over the plan (from one GROUP BY), one page of rows.

    Someone who reads every tenant sees every node; a tenant admin sees their tenants'
    nodes only, the rest as a count per state (`hidden_counts`)."""

    lines: list[PlanLine]
    progress: dict[str, Any]
    metrics: MetricsComparison
    hidden_counts: dict[str, int]
    sees_everything: bool
    # Row states of the visible rows, per stage and over the plan.
    stage_counts: dict[int, dict[str, int]]
    state_counts: dict[str, int]
    state: str  # the table's filter; "" for every row
    page: int
    pages: int
    # (node_id, cluster_id) of every visible row when the release has migrations, else [].
    schema_nodes: list[tuple[str, int | None]]

    @property
    def hidden_total(self) -> int:
        return sum(self.hidden_counts.values())

    @property
    def filters(self) -> list[tuple[str, int]]:
        """The table's filter choices with their counts: every row ("") first, then each
        row state the plan has, those that need a look first."""
        return [("", sum(self.state_counts.values())), *self.state_counts.items()]

    @property
    def shown_total(self) -> int:
        if self.state:
            return self.state_counts.get(self.state, 0)
        return sum(self.state_counts.values())


def rollout_detail_for_user(
    user: Any, rollout: Rollout, *, state: str, page: int, at: datetime
) -> RolloutDetail:
    """The rollout's page in a fixed number of queries however large its plan: counts by
    GROUP BY, canary metrics by aggregate, one page of rows, each waiting tenant's next
    window worked out once."""
    sees_everything = bool(user.has_perm("tenants.view_all_tenants"))
    plan = RolloutNode.objects.filter(rollout=rollout)
    visible: set[int] | None = None  # None: every tenant
    if sees_everything:
        plan_mine = plan
        is_mine: Any = Value(True)
    else:
        visible = set(Tenant.objects.visible_to(user).values_list("pk", flat=True))
        mine = Q(node__tenant_id__in=visible)
        plan_mine = plan.filter(mine)
        is_mine = ExpressionWrapper(mine, output_field=BooleanField())
    grouped = (
        plan.order_by()
        .annotate(mine=is_mine)
        .values_list("stage", "state", "contract_state", "mine")
        .annotate(n=Count("pk"))
    )
    counts: Counter[str] = Counter()
    contract: Counter[str] = Counter()
    hidden: Counter[str] = Counter()
    visible_counts: Counter[str] = Counter()
    stage_counts: dict[int, Counter[str]] = {}
    for stage, row_state, contract_state, visible_row, n in grouped:
        counts[row_state] += n
        if contract_state:
            contract[contract_state] += n
        if not visible_row:
            hidden[str(row_state)] += n
            continue
        visible_counts[row_state] += n
        stage_counts.setdefault(stage, Counter())[row_state] += n
    current = _current_row(plan)
    progress = _progress(rollout, counts, contract, current)
    if current is not None and visible is not None and current.node.tenant_id not in visible:
        progress["current_node"] = None
    state = state if state in PLAN_FILTERS else ""
    shown = visible_counts.get(state, 0) if state else sum(visible_counts.values())
    pages = max(1, math.ceil(shown / PLAN_PAGE_SIZE))
    page = min(max(1, page), pages)
    table = plan_mine.filter(state=state) if state else plan_mine
    start = (page - 1) * PLAN_PAGE_SIZE
    rows = list(
        table.select_related("node", "node__tenant", "job", "contract_job").order_by("position")[
            start : start + PLAN_PAGE_SIZE
        ]
    )
    windows = next_window_labels(
        {r.node.tenant_id for r in rows if r.job is not None and r.job.wait_reason}, at
    )
    lines = [PlanLine(r, windows.get(r.node.tenant_id, "")) for r in rows]
    return RolloutDetail(
        lines=lines,
        progress=progress,
        metrics=_canary_metrics(plan_mine, visible_counts),
        hidden_counts=dict(hidden),
        sees_everything=sees_everything,
        stage_counts={stage: dict(c) for stage, c in sorted(stage_counts.items())},
        state_counts={s: visible_counts[s] for s in PLAN_FILTERS if visible_counts.get(s)},
        state=state,
        page=page,
        pages=pages,
        schema_nodes=_schema_nodes(rollout, plan_mine),
    )


def _canary_metrics(plan: QuerySet[RolloutNode], counts: Counter[str]) -> MetricsComparison:
    """`rollout_metrics` by one aggregate: the database averages (NULLs left out, as there)."""
    done = Q(state=RolloutNode.State.DONE)
    pending = Q(state=RolloutNode.State.PENDING)
    means = plan.aggregate(
        canary_error_rate=Avg("node__error_rate", filter=done),
        baseline_error_rate=Avg("node__error_rate", filter=pending),
        canary_p99_ms=Avg("node__p99_latency_ms", filter=done),
        baseline_p99_ms=Avg("node__p99_latency_ms", filter=pending),
    )
    return MetricsComparison(
        **means,
        canary_count=counts.get(RolloutNode.State.DONE, 0),
        baseline_count=counts.get(RolloutNode.State.PENDING, 0),
    )


def _schema_nodes(rollout: Rollout, plan: QuerySet[RolloutNode]) -> list[tuple[str, int | None]]:
    """Two narrow columns of every visible row, read only when the release has migrations
    (their contract groups span the whole plan, not one page)."""
    if not release_migrations(rollout.release.manifest):
        return []
    return list(plan.order_by("position").values_list("node__node_id", "node__cluster_id"))


def rollout_schema_lines(
    rollout: Rollout, nodes: list[tuple[str, int | None]]
) -> list[SchemaStepLine]:
    """The migration lines of a rollout's page, over the (node_id, cluster_id) of its rows."""
    return schema_plan(
        rollout.release.manifest,
        rollout.release.version,
        _contract_groups(nodes),
        contract_delay=rollout.opts.contract_delay,
    )


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


# --- the rollouts list: filters and what each release achieved --------------------------


class RolloutPhase(models.TextChoices):
    ACTIVE = "active", "active"
    PLANNED = "planned", "planned or scheduled"
    FINISHED = "finished", "finished"


@dataclass(frozen=True)
class RolloutFilter:
    phase: str = ""
    state: str = ""
    strategy: str = ""
    version: str = ""  # a release version, or its beginning
    oldest_first: bool = False


ROLLOUT_LIST_SIZE = 200


def rollouts_filtered(user: Any, flt: RolloutFilter) -> list[Rollout]:
    rollouts = rollouts_for_user(user)
    if flt.phase == RolloutPhase.ACTIVE:
        rollouts = rollouts.filter(state__in=Rollout.ACTIVE_STATES)
    elif flt.phase == RolloutPhase.PLANNED:
        rollouts = rollouts.filter(state=Rollout.State.PLANNED)
    elif flt.phase == RolloutPhase.FINISHED:
        rollouts = rollouts.filter(state__in=Rollout.FINAL_STATES)
    if flt.state:
        rollouts = rollouts.filter(state=flt.state)
    if flt.strategy:
        rollouts = rollouts.filter(strategy=flt.strategy)
    if flt.version:
        rollouts = rollouts.filter(release__version__startswith=flt.version)
    order = ("created_at", "pk") if flt.oldest_first else ("-created_at", "-pk")
    return list(rollouts.order_by(*order)[:ROLLOUT_LIST_SIZE])


@dataclass(frozen=True)
class ReleaseOutcomes:
    """What updates to one release did on the nodes this user may see."""

    release: Release
    updated: int
    failed: int
    rolled_back: int
    running: int
    median_seconds: float | None  # of the updates that finished well

    @property
    def success_rate(self) -> float | None:
        ended = self.updated + self.failed + self.rolled_back
        return self.updated / ended if ended else None


# The median is taken over each release's latest finished updates, at most this many: the
# page reads a bounded number of rows whatever the fleet's size.
MEDIAN_SAMPLE = 1_000


def release_outcomes(user: Any, releases: list[Release]) -> list[ReleaseOutcomes]:
    """Per release (newest first): nodes updated, failed, rolled back, still running, and
    the median duration of a successful update. One grouped count, then one bounded read of
    durations per release."""
    S = UpdateJob.State
    jobs = UpdateJob.objects.visible_to(user).filter(
        kind=UpdateJob.Kind.UPDATE, release__in=releases
    )
    counts: dict[int, dict[str, int]] = {}
    for row in jobs.values("release_id", "state").annotate(n=Count("pk")).order_by():
        counts.setdefault(row["release_id"], {})[row["state"]] = row["n"]
    outcomes = []
    for release in releases:
        by_state = counts.get(release.pk, {})
        if not by_state:
            continue
        spans = (
            jobs.filter(release=release, state=S.DONE)
            .exclude(started_at=None)
            .exclude(finished_at=None)
            .order_by("-finished_at")
            .values_list("started_at", "finished_at")[:MEDIAN_SAMPLE]
        )
        seconds = [(end - start).total_seconds() for start, end in spans if start and end]
        outcomes.append(
            ReleaseOutcomes(
                release=release,
                updated=by_state.get(S.DONE, 0),
                failed=by_state.get(S.FAILED, 0) + by_state.get(S.LOST, 0),
                rolled_back=by_state.get(S.ROLLED_BACK, 0),
                running=sum(n for state, n in by_state.items() if state in UpdateJob.ACTIVE_STATES),
                median_seconds=statistics.median(seconds) if seconds else None,
            )
        )
    return outcomes
