"""Reads for multi-component updates: what a node runs, and the plan that takes it to a
release (every component the release needs, in the order they go on).

The resolver itself is the engine's (`updates.engine.resolve`, no Django): here the
node's components and the published releases are turned into its inputs, and its steps
back into releases. Releases are fleet-wide; the caller has already scoped the node.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

from updates.engine.manifest import Dependency
from updates.engine.resolve import (
    Candidate,
    ResolutionFailed,
    UpdatePlan,
    installed_conflicts,
    resolve,
)
from updates.models import (
    PRIMARY_PRODUCT,
    Event,
    JobPlanStep,
    ManifestUnreadable,
    Node,
    NodeComponent,
    Release,
    UpdateJob,
)

__all__ = [
    "ComponentRow",
    "JobPlan",
    "JobPlanStep",
    "PlanFn",
    "PlanGroup",
    "PlanPreview",
    "PlanResolver",
    "PlanUnresolvable",
    "job_plan_preview",
    "job_plan_resolve",
    "node_component_conflicts",
    "node_components",
    "node_installed_versions",
    "plan_groups_for_nodes",
    "product_versions",
    "release_candidate",
]


class PlanUnresolvable(Exception):
    """No set of published releases takes the node to the release: `explanation` says
    which dependency could not be met (or which cycle was found)."""

    def __init__(self, explanation: str) -> None:
        super().__init__(explanation)
        self.explanation = explanation


# ------------------------------------------------------------------ components


@dataclass(frozen=True)
class ComponentRow:
    product: str
    version: str
    primary: bool


def node_installed_versions(
    node: Node, rows: Iterable[NodeComponent] | None = None
) -> dict[str, str]:
    """product -> installed version (`rows`: the node's components, when already read).
    A node that never reported components runs the primary product alone, at its
    `installed_version`; `installed_version` is also what counts for the primary product
    (a finished job updates it before the next heartbeat)."""
    if rows is None:
        rows = NodeComponent.objects.filter(node=node)
    versions = {row.product: row.version for row in rows}
    if node.installed_version:
        versions[PRIMARY_PRODUCT] = node.installed_version
    return versions


def product_versions(nodes: Sequence[Node], product: str) -> dict[int, str]:
    """node pk -> the version of `product` each node runs ("" when it does not), in one
    query: what a rollout of a release of `product` plans against."""
    if product == PRIMARY_PRODUCT:
        return {node.pk: node.installed_version for node in nodes}
    rows = NodeComponent.objects.filter(node__in=[n.pk for n in nodes], product=product)
    found = dict(rows.values_list("node_id", "version"))
    return {node.pk: found.get(node.pk, "") for node in nodes}


def node_components(node: Node, versions: Mapping[str, str] | None = None) -> list[ComponentRow]:
    """The node's components for its page: the primary one first, then by name."""
    if versions is None:
        versions = node_installed_versions(node)
    return [
        ComponentRow(product=product, version=versions[product], primary=product == PRIMARY_PRODUCT)
        for product in sorted(versions, key=lambda p: (p != PRIMARY_PRODUCT, p))
    ]


# ------------------------------------------------------------------ releases


def release_candidate(release: Release) -> Candidate:
    """A release as the resolver sees it; its key is the release's id."""
    return Candidate(
        product=release.product,
        version=release.version,
        dependencies=release.dependencies,
        key=str(release.pk),
    )


@dataclass(frozen=True)
class _Available:
    candidates: dict[str, list[Candidate]]  # product -> its releases
    releases: dict[str, Release]  # candidate key (release id) -> release


def _available(target: Release) -> _Available:
    """Every release a plan may use: the published ones (not deprecated), and the target
    itself. A release whose manifest cannot be read is left out, never guessed at."""
    releases = {str(r.pk): r for r in Release.objects.filter(state=Release.State.PUBLISHED)}
    releases[str(target.pk)] = target
    candidates: dict[str, list[Candidate]] = {}
    for release in releases.values():
        try:
            candidates.setdefault(release.product, []).append(release_candidate(release))
        except ManifestUnreadable:
            continue
    return _Available(candidates, releases)


# ------------------------------------------------------------------ plans


@dataclass(frozen=True)
class JobPlan:
    steps: tuple[JobPlanStep, ...]

    @property
    def labels(self) -> tuple[str, ...]:
        return tuple(step.label for step in self.steps)

    def to_json(self) -> list[dict[str, Any]]:
        return [step.to_json() for step in self.steps]

    @classmethod
    def from_json(cls, value: Any) -> JobPlan:
        """A stored job plan; entries of another shape are left out."""
        items = value if isinstance(value, list) else []
        return cls(tuple(JobPlanStep.from_json(i) for i in items if isinstance(i, dict)))


def _job_plan(update: UpdatePlan, releases: Mapping[str, Release]) -> JobPlan:
    steps = []
    for step in update.steps:
        release = releases.get(step.key)
        if release is None:  # the resolver only picks what it was given
            raise PlanUnresolvable(f"{step.product} {step.version} is not a known release")
        steps.append(
            JobPlanStep(
                product=release.product,
                version=release.version,
                from_version=step.from_version or "",
                release_id=release.pk,
            )
        )
    return JobPlan(tuple(steps))


def _resolve(release: Release, installed: Mapping[str, str], available: _Available) -> JobPlan:
    try:
        update = resolve(release.product, release.version, installed, available.candidates)
    except ResolutionFailed as failed:
        raise PlanUnresolvable(failed.explanation) from None
    plan = _job_plan(update, available.releases)
    if not any(step.release_id == release.pk for step in plan.steps):
        # The node already runs the release: the job is still about it (the node decides
        # whether it installs it again), so its release stays a step, the last.
        again = JobPlanStep(
            product=release.product,
            version=release.version,
            from_version=installed.get(release.product, ""),
            release_id=release.pk,
        )
        plan = JobPlan((*plan.steps, again))
    return plan


def job_plan_resolve(*, node: Node, release: Release) -> JobPlan:
    """The steps that take `node` to `release`: PlanUnresolvable when none do."""
    try:
        release_candidate(release)
    except ManifestUnreadable as err:
        raise PlanUnresolvable(str(err)) from None
    return _resolve(release, node_installed_versions(node), _available(release))


class PlanFn(Protocol):
    """Where a job's plan comes from: `job_plan_resolve`, or a `PlanResolver`."""

    def __call__(self, *, node: Node, release: Release) -> JobPlan: ...


class PlanResolver:
    """`job_plan_resolve` for many nodes going to one release (a rollout's drive): the
    published releases are read once, the components of the nodes named to `prefetch` in
    one query, and each combination of installed versions is resolved once. Made per drive:
    a release published or withdrawn meanwhile is seen by the next one."""

    def __init__(self, release: Release) -> None:
        self._release = release
        self._available: _Available | None = None
        self._components: dict[int, list[NodeComponent]] = {}
        self._plans: dict[tuple[tuple[str, str], ...], JobPlan | PlanUnresolvable] = {}

    def prefetch(self, nodes: Sequence[Node]) -> None:
        """Read the components of `nodes` in one query (the others are read one by one)."""
        wanted = [n.pk for n in nodes if n.pk not in self._components]
        for pk in wanted:
            self._components[pk] = []
        for row in NodeComponent.objects.filter(node__in=wanted):
            self._components[row.node_id].append(row)

    def __call__(self, *, node: Node, release: Release) -> JobPlan:
        if release.pk != self._release.pk:
            return job_plan_resolve(node=node, release=release)
        installed = node_installed_versions(node, self._components.get(node.pk))
        key = tuple(sorted(installed.items()))
        if key not in self._plans:
            self._plans[key] = self._resolve(installed)
        plan = self._plans[key]
        if isinstance(plan, PlanUnresolvable):
            raise PlanUnresolvable(plan.explanation)
        return plan

    def _resolve(self, installed: Mapping[str, str]) -> JobPlan | PlanUnresolvable:
        try:
            release_candidate(self._release)
            if self._available is None:
                self._available = _available(self._release)
            return _resolve(self._release, installed, self._available)
        except ManifestUnreadable as err:
            return PlanUnresolvable(str(err))
        except PlanUnresolvable as failed:
            return failed


@dataclass(frozen=True)
class PlanPreview:
    """A plan to show before the operator confirms: its steps, or why there is none."""

    plan: JobPlan | None
    explanation: str = ""


def job_plan_preview(*, node: Node, release: Release) -> PlanPreview:
    try:
        return PlanPreview(plan=job_plan_resolve(node=node, release=release))
    except PlanUnresolvable as failed:
        return PlanPreview(plan=None, explanation=failed.explanation)


@dataclass
class PlanGroup:
    """Nodes whose plans are the same (or fail the same way), for a rollout preview."""

    labels: tuple[str, ...]
    explanation: str
    node_ids: list[str] = field(default_factory=list)

    @property
    def failed(self) -> bool:
        return bool(self.explanation)


def plan_groups_for_nodes(release: Release, nodes: Sequence[Node]) -> list[PlanGroup]:
    """Each node's plan to `release`, identical plans grouped (largest group first), so a
    preview of many nodes stays short; the releases and components are read once."""
    available = _available(release)
    unreadable = ""
    try:
        release_candidate(release)
    except ManifestUnreadable as err:
        unreadable = str(err)
    components = NodeComponent.objects.filter(node__in=[n.pk for n in nodes])
    by_node: dict[int, list[NodeComponent]] = {}
    for row in components:
        by_node.setdefault(row.node_id, []).append(row)
    groups: dict[tuple[tuple[str, ...], str], PlanGroup] = {}
    # Nodes that run the same versions get the same plan: resolved once per combination,
    # so a preview of thousands of alike nodes costs a handful of resolutions.
    resolved: dict[tuple[tuple[str, str], ...], tuple[tuple[str, ...], str]] = {}
    for node in nodes:
        installed = node_installed_versions(node, by_node.get(node.pk, []))
        same = tuple(sorted(installed.items()))
        if same not in resolved:
            resolved[same] = _labels_or_explanation(release, installed, available, unreadable)
        key = resolved[same]
        labels, explanation = key
        groups.setdefault(key, PlanGroup(labels=labels, explanation=explanation))
        groups[key].node_ids.append(node.node_id)
    return sorted(groups.values(), key=lambda g: (-len(g.node_ids), g.node_ids[0]))


def _labels_or_explanation(
    release: Release, installed: Mapping[str, str], available: _Available, unreadable: str
) -> tuple[tuple[str, ...], str]:
    if unreadable:
        return (), unreadable
    try:
        return _resolve(release, installed, available).labels, ""
    except PlanUnresolvable as failed:
        return (), failed.explanation


def node_component_conflicts(node: Node, installed: Mapping[str, str] | None = None) -> list[str]:
    """What the node runs that its own releases say must not be (a required component
    missing or at a version outside a constraint, a conflicting one installed).
    `installed`: the node's versions, when already read."""
    if installed is None:
        installed = node_installed_versions(node)
    releases = Release.objects.filter(product__in=list(installed))
    declared: dict[str, tuple[Dependency, ...]] = {}
    for release in releases:
        if installed.get(release.product) != release.version:
            continue
        try:
            declared[release.product] = release.dependencies
        except ManifestUnreadable:
            continue
    return installed_conflicts(installed, declared)


# --- a job's deployment log -------------------------------------------------------------

# A log this long is one that went wrong in a loop: its start and its end tell the story.
JOB_LOG_LIMIT = 500


@dataclass(frozen=True)
class JobLogLine:
    """One thing that happened to a job, as the audit log recorded it: the agent's reports
    (each step, with its figures), the dashboard's sends and deadlines, the outcome."""

    at: datetime
    what: str  # the event's verb without "job.", e.g. "downloading", "update.queued"
    who: str  # "node:a-1", a username, or "system"
    details: Mapping[str, Any]


def job_log(job: UpdateJob) -> list[JobLogLine]:
    """The job's log, oldest first (one indexed range read of the audit log)."""
    events = Event.objects.filter(
        object_type=UpdateJob._meta.model_name or "", object_id=str(job.pk)
    ).order_by("created_at", "id")[:JOB_LOG_LIMIT]
    return [
        JobLogLine(
            at=event.created_at,
            what=event.verb.removeprefix("job."),
            who=event.actor_label,
            details=event.details if isinstance(event.details, Mapping) else {},
        )
        for event in events
    ]
