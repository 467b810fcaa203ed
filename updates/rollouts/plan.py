"""Rollout planning: which nodes, in which order, in which stage.

Plain Python (no Django) so the rules read and test on their own:
- rolling: per cluster, non-leaders first and the Raft leader last;
- canary: a deterministic order (hash of release version and node id, leaders
  last), cut into stages by cumulative fraction, at least one node per stage;
- blue/green: the idle colour's nodes, leaders last.
A plan that would put two nodes of a cluster more than one minor version apart
is refused (version-skew guard).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from packaging.version import InvalidVersion, Version

from updates.rollout_options import DEFAULT_STAGE_FRACTIONS


class PlanError(ValueError):
    """The rollout cannot be planned as asked; the message says why."""


@dataclass(frozen=True)
class NodeInfo:
    pk: int
    node_id: str
    cluster_id: int | None
    is_leader: bool
    installed_version: str
    color: str = ""


@dataclass(frozen=True)
class PlannedNode:
    node: NodeInfo
    position: int
    stage: int


@dataclass
class Plan:
    nodes: list[PlannedNode]
    stage_sizes: list[int]
    skipped: list[tuple[NodeInfo, str]] = field(default_factory=list)

    @property
    def stage_count(self) -> int:
        return len(self.stage_sizes)


def parse_stages(text: str) -> tuple[float, ...]:
    """'1, 5, 25, 100' (percent) -> (0.01, 0.05, 0.25, 1.0); strictly increasing, ends at 100."""
    try:
        percents = [float(part) for part in text.replace("%", "").split(",") if part.strip()]
    except ValueError:
        raise PlanError(f"stages: {text!r} is not a comma-separated list of percentages") from None
    if not percents:
        raise PlanError("stages: at least one stage is needed")
    if not all(math.isfinite(p) for p in percents):
        raise PlanError(f"stages: {text!r} holds a value that is not a number")
    if any(b <= a for a, b in zip(percents, percents[1:], strict=False)):
        raise PlanError("stages: percentages must increase")
    if percents[0] <= 0 or percents[-1] != 100:
        raise PlanError("stages: must be above 0 and end at 100")
    return tuple(p / 100 for p in percents)


def stage_sizes(total: int, fractions: Sequence[float]) -> list[int]:
    """Nodes per stage: a stage reaches ceil(fraction * total) nodes in all.
    A stage whose fraction allows no node beyond the previous stage is dropped
    rather than exceeded: never more nodes than a stage allows, and at least
    one node in every stage that runs."""
    sizes: list[int] = []
    done = 0
    for fraction in fractions:
        upto = total if fraction >= 1 else min(total, math.ceil(fraction * total))
        if upto > done:
            sizes.append(upto - done)
            done = upto
    return sizes


def _canary_key(version: str, node: NodeInfo) -> tuple[bool, str]:
    digest = hashlib.sha256(f"{version}:{node.node_id}".encode()).hexdigest()
    return (node.is_leader, digest)


def _rolling_key(node: NodeInfo) -> tuple[int, bool, str]:
    return (node.cluster_id or 0, node.is_leader, node.node_id)


def check_version_skew(version: str, nodes: Sequence[NodeInfo]) -> None:
    """Refuse a plan that puts two nodes of a cluster more than one minor apart."""
    target = _version(version, "release")
    by_cluster: dict[int, list[NodeInfo]] = {}
    for node in nodes:
        if node.cluster_id is not None:
            by_cluster.setdefault(node.cluster_id, []).append(node)
    for members in by_cluster.values():
        versions = [target] + [
            _version(n.installed_version, n.node_id) for n in members if n.installed_version
        ]
        for a in versions:
            for b in versions:
                if a.major != b.major or abs(a.minor - b.minor) > 1:
                    names = ", ".join(f"{n.node_id}={n.installed_version}" for n in members)
                    raise PlanError(
                        f"version skew: {version} with {names} would put nodes of one cluster "
                        "more than one minor version apart; update in smaller steps"
                    )


def _version(text: str, what: str) -> Version:
    try:
        return Version(text)
    except InvalidVersion:
        raise PlanError(f"{what}: {text!r} is not a valid version") from None


def plan_rollout(
    strategy: str,
    version: str,
    nodes: Sequence[NodeInfo],
    *,
    stages: Sequence[float] = DEFAULT_STAGE_FRACTIONS,
    idle_color: str = "",
) -> Plan:
    target = _version(version, "release")
    skipped = [
        (n, f"already on {n.installed_version}")
        for n in nodes
        if n.installed_version and _version(n.installed_version, n.node_id) >= target
    ]
    skipped_ids = {n.pk for n, _ in skipped}
    candidates = [n for n in nodes if n.pk not in skipped_ids]
    if strategy == "blue_green":
        skipped += [
            (n, f"serves colour {n.color or '(none)'}") for n in candidates if n.color != idle_color
        ]
        candidates = [n for n in candidates if n.color == idle_color]
    if not candidates:
        raise PlanError("nothing to update: every targeted node is already on this version")
    check_version_skew(version, candidates)
    if strategy == "canary":
        ordered = sorted(candidates, key=lambda n: _canary_key(version, n))
        sizes = stage_sizes(len(ordered), stages)
    elif strategy in {"rolling", "blue_green"}:
        ordered = sorted(candidates, key=_rolling_key)
        sizes = [len(ordered)]
    else:
        raise PlanError(f"strategy: unknown {strategy!r}")
    planned, position = [], 0
    for stage, size in enumerate(sizes):
        for node in ordered[position : position + size]:
            planned.append(PlannedNode(node=node, position=position, stage=stage))
            position += 1
    return Plan(nodes=planned, stage_sizes=sizes, skipped=skipped)
