"""A multi-component update: the `plan` of an apply command, and its durable journal.

The dashboard sends one apply job whose `plan` lists several bundles, one per component
of the node, in the order they go on (`[{"product", "version", "artifact_url",
"sha256", "size"}, ...]`). They go on all or not at all: a failed step undoes every
step before it, newest first, each to the restore point its own apply made.

The plan journal (`plan-journal.json` in the primary state dir, replaced atomically)
records each step's component, version before, restore point and state, so an agent
killed half way knows at start what to undo. Nothing here imports Django.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, replace
from enum import StrEnum
from pathlib import Path
from typing import Any

from packaging.version import InvalidVersion, Version

from updates.engine.errors import EngineError
from updates.engine.state import write_json_atomic
from workers.components import Component

JOURNAL_FILE = "plan-journal.json"
MAX_STEPS = 32
_STEP_KEYS = frozenset({"product", "version", "artifact_url", "sha256", "size"})
_HEX64 = re.compile(r"^[0-9a-fA-F]{64}$")


class PlanInvalid(EngineError):
    """The plan names a component this node does not run, or is malformed: refused
    before anything is written."""

    code = "PLAN_INVALID"


class PlanOutcome(StrEnum):
    RUNNING = ""  # steps may be half done: recovery undoes every one begun
    DONE = "done"  # every step applied: the plan stands
    UNDONE = "undone"  # failed, and every step begun is back on its old version


class StepState(StrEnum):
    NOT_STARTED = "not_started"
    APPLYING = "applying"  # handed to the engine; a crash here is undone by its recover
    APPLIED = "applied"  # committed by the engine
    FAILED = "failed"  # the engine failed it and put the old version back
    ROLLED_BACK = "rolled_back"  # applied (or half applied), then undone


@dataclass(frozen=True)
class PlanStep:
    product: str
    version: str
    artifact_url: str
    sha256: str
    size: int | None

    def label(self, index: int, count: int) -> str:
        """`step 2 of 3 (themis-query 1.4.5)` (index is 1-based)."""
        return f"step {index} of {count} ({self.product} {self.version})"


def parse_plan(value: Any, components: dict[str, Component]) -> list[PlanStep]:
    """The steps of a signed command's `plan`; PlanInvalid naming the step otherwise.
    Every product must be one of `components` (by product), each at most once."""
    if not isinstance(value, list) or not value:
        raise PlanInvalid("plan: expected a non-empty list of steps")
    if len(value) > MAX_STEPS:
        raise PlanInvalid(f"plan: {len(value)} steps, at most {MAX_STEPS}")
    steps = [_step(entry, index, len(value)) for index, entry in enumerate(value, start=1)]
    seen: set[str] = set()
    for index, step in enumerate(steps, start=1):
        where = step.label(index, len(steps))
        if step.product not in components:
            known = ", ".join(sorted(components))
            raise PlanInvalid(f"{where}: {step.product} is not a component of this node ({known})")
        if step.product in seen:
            raise PlanInvalid(f"{where}: {step.product} is in the plan twice")
        seen.add(step.product)
    return steps


def _step(entry: Any, index: int, count: int) -> PlanStep:
    where = f"plan: step {index} of {count}"
    if not isinstance(entry, dict):
        raise PlanInvalid(f"{where}: expected an object")
    unknown = sorted(set(entry) - _STEP_KEYS)
    if unknown:
        raise PlanInvalid(f"{where}: unknown keys {unknown}")
    for key in ("product", "version", "artifact_url", "sha256"):
        if not isinstance(entry.get(key), str) or not entry[key]:
            raise PlanInvalid(f"{where}: {key!r} missing or not a non-empty string")
    try:
        Version(entry["version"])
    except InvalidVersion:
        raise PlanInvalid(f"{where}: version {entry['version']!r} is not a version") from None
    if not _HEX64.match(entry["sha256"]):
        raise PlanInvalid(f"{where}: sha256 is not a SHA-256 hex digest")
    size = entry.get("size")
    if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size < 0):
        raise PlanInvalid(f"{where}: size must be a whole number of bytes")
    return PlanStep(
        product=entry["product"],
        version=entry["version"],
        artifact_url=entry["artifact_url"],
        sha256=entry["sha256"].lower(),
        size=size,
    )


@dataclass(frozen=True)
class JournalStep:
    """One step as the journal keeps it: enough to undo it without the command."""

    product: str
    version: str
    install_dir: str
    state_dir: str
    version_from: str | None
    highest_from: str | None
    state: StepState = StepState.NOT_STARTED
    point_id: str | None = None

    @property
    def target(self) -> Path:
        return Path(self.install_dir)

    @property
    def state_path(self) -> Path:
        return Path(self.state_dir)


@dataclass
class PlanJournal:
    """The plan of one job, on disk at every change of a step's state."""

    path: Path
    job_id: str
    steps: list[JournalStep]
    outcome: PlanOutcome = PlanOutcome.RUNNING

    @classmethod
    def begin(cls, state_dir: Path, job_id: str, steps: list[JournalStep]) -> PlanJournal:
        journal = cls(state_dir / JOURNAL_FILE, job_id, steps)
        journal.save()
        return journal

    @classmethod
    def load(cls, state_dir: Path) -> PlanJournal | None:
        """The journal left in `state_dir`, or None. A journal that cannot be read raises
        ValueError: recovery must not guess what to undo."""
        path = state_dir / JOURNAL_FILE
        try:
            data = json.loads(path.read_bytes())
        except FileNotFoundError:
            return None
        try:
            steps = [
                JournalStep(**{**step, "state": StepState(step["state"])}) for step in data["steps"]
            ]
            outcome = PlanOutcome(data.get("outcome", ""))
            return cls(path, str(data["job_id"]), steps, outcome)
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{path}: not a plan journal ({err})") from None

    def save(self) -> None:
        steps = [{**asdict(step), "state": step.state.value} for step in self.steps]
        document = {"job_id": self.job_id, "outcome": self.outcome.value, "steps": steps}
        write_json_atomic(self.path, document)

    def mark(self, index: int, state: StepState, *, point_id: str | None = None) -> None:
        """Step `index` (0-based) is now in `state` (durably, before the caller goes on)."""
        step = self.steps[index]
        self.steps[index] = replace(step, state=state, point_id=point_id or step.point_id)
        self.save()

    def close(self, outcome: PlanOutcome) -> None:
        self.outcome = outcome
        self.save()

    def states(self) -> list[dict[str, str]]:
        """The plan as the final report shows it."""
        return [
            {"product": s.product, "version": s.version, "state": s.state.value} for s in self.steps
        ]

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)
