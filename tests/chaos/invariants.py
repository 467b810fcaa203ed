"""What the chaos suite checks after each run, on what the nodes themselves wrote: the
agent's `drain.log` (drain and rejoin times) and `applies.log` (one line per apply it
ran), read without the dashboard's help. Pure functions, so they are tested alone."""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any


class Hook(StrEnum):
    DRAIN = "drain"
    REJOIN = "rejoin"


@dataclass(frozen=True)
class HookEvent:
    at: float
    hook: Hook
    job_id: str = ""


@dataclass(frozen=True)
class Drained:
    """A node out of service from `start` until `end` (None: still drained)."""

    node_id: str
    start: float
    end: float | None
    job_id: str = ""

    def until(self, now: float) -> float:
        return now if self.end is None else self.end


@dataclass(frozen=True)
class Overlap:
    at: float
    drained: tuple[Drained, ...]

    @property
    def key(self) -> frozenset[tuple[str, float]]:
        return frozenset((d.node_id, d.start) for d in self.drained)


_EPOCH = re.compile(r"^\d{9,11}(\.\d+)?$")
_JOB = re.compile(r"^(?:job(?:_id)?[=:])?(\d+)$")


def _timestamp(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        if _EPOCH.match(value):
            return float(value)
        try:
            return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
        except ValueError:
            return None
    return None


def _hook(word: str) -> Hook | None:
    word = word.lower()
    if word.startswith("drain"):
        return Hook.DRAIN
    if word.startswith("rejoin"):
        return Hook.REJOIN
    return None


def _json_line(line: str) -> dict[str, Any] | None:
    try:
        data = json.loads(line)
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


def parse_drain_log(text: str) -> list[HookEvent]:
    """Drain/rejoin events of one node, in file order. A line is a JSON object (a hook
    word under `event`/`hook`/`action`/`kind`, a time under `at`/`time`/`ts`) or
    whitespace-separated words holding a time, a hook word and maybe a job id."""
    events: list[HookEvent] = []
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        data = _json_line(line)
        at: float | None = None
        hook: Hook | None = None
        job = ""
        if data is not None:
            for key in ("event", "hook", "action", "kind", "what", "step"):
                if isinstance(data.get(key), str):
                    hook = hook or _hook(data[key])
            for key in ("t", "at", "time", "ts", "timestamp"):
                at = at if at is not None else _timestamp(data.get(key))
            job = str(data.get("job_id", data.get("job", "")) or "")
        else:
            for word in line.replace(",", " ").split():
                hook = hook or _hook(word)
                stamp = _timestamp(word)
                if at is None and stamp is not None and (_EPOCH.match(word) or "T" in word):
                    at = stamp
                match = _JOB.match(word)
                if match and not _EPOCH.match(word):
                    job = job or match.group(1)
        if at is not None and hook is not None:
            events.append(HookEvent(at, hook, job))
    return events


def drained_intervals(node_id: str, events: Iterable[HookEvent]) -> list[Drained]:
    """A drain starts an interval and the next rejoin ends it; a second drain before a
    rejoin (the agent died drained, then drained again) keeps the first one open."""
    intervals: list[Drained] = []
    start: HookEvent | None = None
    for event in sorted(events, key=lambda e: e.at):
        if event.hook == Hook.DRAIN and start is None:
            start = event
        elif event.hook == Hook.REJOIN and start is not None:
            intervals.append(Drained(node_id, start.at, event.at, start.job_id))
            start = None
    if start is not None:
        intervals.append(Drained(node_id, start.at, None, start.job_id))
    return intervals


def overlaps(intervals: Iterable[Drained], limit: int, now: float) -> list[Overlap]:
    """Every moment more than `limit` nodes were drained at once (one per distinct set)."""
    points: list[tuple[float, int, Drained]] = []
    for interval in intervals:
        points.append((interval.start, 1, interval))
        # Ends sort before starts at the same instant: touching intervals do not overlap.
        points.append((interval.until(now), 0, interval))
    points.sort(key=lambda p: (p[0], p[1]))
    open_now: list[Drained] = []
    found: dict[frozenset[tuple[str, float]], Overlap] = {}
    for at, starts, interval in points:
        if starts:
            open_now.append(interval)
            if len(open_now) > limit:
                overlap = Overlap(at, tuple(open_now))
                found.setdefault(overlap.key, overlap)
        elif interval in open_now:
            open_now.remove(interval)
    return list(found.values())


def parse_applies_log(text: str) -> Counter[str]:
    """Job id -> how many apply lines the agent wrote for it. A line is a JSON object with
    `job_id`, or words one of which is the job id (`job=12`, `job_id=12` or a bare number
    that is not a timestamp)."""
    counts: Counter[str] = Counter()
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        data = _json_line(line)
        if data is not None:
            job = data.get("job_id", data.get("job"))
            if job is not None:
                counts[str(job)] += 1
            continue
        for word in line.replace(",", " ").split():
            match = _JOB.match(word)
            if match and not _EPOCH.match(word):
                counts[match.group(1)] += 1
                break
    return counts
