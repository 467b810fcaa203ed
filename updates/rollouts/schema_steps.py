"""Expand/contract: which of a release's schema migrations run at which step of a rollout.

A release's manifest lists its migrations (`migrations`: `{"version", "phase"}`, phase
`expand` or `contract`; docs/bundle-format.md). `expand` ones run inside each node's update
(old and new code both work on their schema); `contract` ones only once every node of the
node's cluster runs the release (a standalone node: once it does), plus the rollout's
`contract_delay`. Plain Python: the coordinator, the plan page and the rollout page read it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from packaging.version import InvalidVersion, Version

EXPAND = "expand"
CONTRACT = "contract"
PHASES = (EXPAND, CONTRACT)
# Lines of the plan listing one contract group each; beyond, one line says how many more.
MAX_GROUP_LINES = 20


@dataclass(frozen=True)
class MigrationStep:
    version: str
    phase: str


def release_migrations(manifest: Mapping[str, Any] | None) -> tuple[MigrationStep, ...]:
    """The migrations a (verified, stored) manifest lists, in its order. Entries of another
    shape are left out: the engine refused such a bundle already, this only reads."""
    listed = (manifest or {}).get("migrations")
    if not isinstance(listed, list):
        return ()
    steps = []
    for item in listed:
        if not isinstance(item, Mapping):
            continue
        version, phase = item.get("version"), item.get("phase")
        if isinstance(version, str) and version and phase in PHASES:
            steps.append(MigrationStep(version[:64], str(phase)))
    return tuple(steps)


def contract_versions(manifest: Mapping[str, Any] | None) -> tuple[str, ...]:
    """The versions of the release's contract migrations (empty: no contract step)."""
    return tuple(m.version for m in release_migrations(manifest) if m.phase == CONTRACT)


def runs_at_least(installed: str, version: str) -> bool:
    """Whether a node on `installed` runs `version` or a newer one (a version that does not
    parse counts only when it is the very same text)."""
    if not installed:
        return False
    try:
        return Version(installed) >= Version(version)
    except InvalidVersion:
        return installed == version


@dataclass(frozen=True)
class ContractGroup:
    """Nodes whose contract waits for the same thing: a cluster (all its nodes), or one
    standalone node (itself)."""

    cluster: str | None  # the cluster's name; None for a standalone node
    node_ids: tuple[str, ...]

    @property
    def label(self) -> str:
        return f"cluster {self.cluster}" if self.cluster is not None else f"node {self.node_ids[0]}"


@dataclass(frozen=True)
class SchemaStepLine:
    """One line of a plan: a migration and when it runs."""

    phase: str
    versions: tuple[str, ...]
    when: str

    @property
    def text(self) -> str:
        return f"{self.phase} {', '.join(self.versions)} — {self.when}"


def _delay_text(seconds: int) -> str:
    if seconds <= 0:
        return ""
    if seconds % 3600 == 0:
        return f" (+{seconds // 3600} h)"
    if seconds % 60 == 0:
        return f" (+{seconds // 60} min)"
    return f" (+{seconds} s)"


def schema_plan(
    manifest: Mapping[str, Any] | None,
    release_version: str,
    groups: Sequence[ContractGroup],
    *,
    contract_delay: int = 0,
) -> list[SchemaStepLine]:
    """The plan's migration lines: expand ones in each node's update; contract ones per
    group, after the group runs the release (plus the delay). Empty without migrations."""
    steps = release_migrations(manifest)
    expand = tuple(m.version for m in steps if m.phase == EXPAND)
    contract = tuple(m.version for m in steps if m.phase == CONTRACT)
    lines: list[SchemaStepLine] = []
    if expand:
        lines.append(SchemaStepLine(EXPAND, expand, "in each node's update"))
    if not contract:
        return lines
    delay = _delay_text(contract_delay)
    for group in groups[:MAX_GROUP_LINES]:
        who = (
            f"every node of cluster {group.cluster}"
            if group.cluster is not None
            else f"node {group.node_ids[0]}"
        )
        lines.append(
            SchemaStepLine(CONTRACT, contract, f"after {who} runs {release_version}{delay}")
        )
    if len(groups) > MAX_GROUP_LINES:
        more = len(groups) - MAX_GROUP_LINES
        lines.append(
            SchemaStepLine(
                CONTRACT,
                contract,
                f"likewise for {more} more cluster{'s' if more != 1 else ''} or standalone"
                f" node{'s' if more != 1 else ''}",
            )
        )
    return lines
