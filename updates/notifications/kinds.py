"""What we notify about: the one table from audit Event verb to notification kind.

Every decision that depends on the kind (severity, PagerDuty action, whether
node-level items are aggregated per rollout) is read from `VERBS`, so adding a
kind is one line here and a label in `Kind`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from django.db import models


class Kind(models.TextChoices):
    ROLLOUT_STARTED = "rollout_started", "Rollout started"
    STAGE_COMPLETED = "stage_completed", "Stage completed"
    AWAITING_APPROVAL = "awaiting_approval", "Awaiting approval"
    PROMOTED = "promoted", "Promoted"
    PAUSED = "paused", "Paused"
    ABORTED = "aborted", "Aborted"
    ROLLOUT_FAILED = "rollout_failed", "Rollout failed"
    ROLLED_BACK = "rolled_back", "Rollout rolled back"
    COMPLETED = "completed", "Rollout completed"
    NODE_FAILED = "node_failed", "Node update failed"
    NODE_ROLLED_BACK = "node_rolled_back", "Node rolled back"
    SECURITY_REJECTED = "security_rejected", "Bundle rejected (security)"
    NODE_OFFLINE = "node_offline", "Node offline during an update"
    WINDOW_OPENING = "window_opening", "Maintenance window opening soon"


# PagerDuty's four severities, used for every channel.
CRITICAL, ERROR, WARNING, INFO = "critical", "error", "warning", "info"
SEVERITY_RANK = {INFO: 0, WARNING: 1, ERROR: 2, CRITICAL: 3}
TRIGGER, RESOLVE = "trigger", "resolve"

# Release rejections that are security findings; a duplicate version or an
# oversized upload is a user error, not something to page about.
SECURITY_CODES = frozenset({"SIGNATURE_INVALID", "UNSAFE_PATH"})


@dataclass(frozen=True)
class KindSpec:
    kind: Kind
    severity: str
    pagerduty: str = ""  # trigger, resolve, or "" (PagerDuty ignores the kind)
    node_level: bool = False  # aggregated per (rollout, channel) when part of a rollout
    emoji: str = ":information_source:"
    only_codes: frozenset[str] | None = None  # details["code"] must be one of these


VERBS: dict[str, KindSpec] = {
    "rollout.started": KindSpec(Kind.ROLLOUT_STARTED, INFO, emoji=":rocket:"),
    "rollout.stage_completed": KindSpec(Kind.STAGE_COMPLETED, INFO, emoji=":white_check_mark:"),
    "rollout.awaiting_approval": KindSpec(Kind.AWAITING_APPROVAL, WARNING, emoji=":raised_hand:"),
    "rollout.promoted": KindSpec(Kind.PROMOTED, INFO, RESOLVE, emoji=":arrow_forward:"),
    "rollout.paused": KindSpec(Kind.PAUSED, WARNING, emoji=":double_vertical_bar:"),
    "rollout.aborted": KindSpec(Kind.ABORTED, WARNING, emoji=":octagonal_sign:"),
    "rollout.failed": KindSpec(Kind.ROLLOUT_FAILED, CRITICAL, TRIGGER, emoji=":x:"),
    "rollout.rolled_back": KindSpec(Kind.ROLLED_BACK, ERROR, TRIGGER, emoji=":rewind:"),
    "rollout.completed": KindSpec(Kind.COMPLETED, INFO, RESOLVE, emoji=":tada:"),
    "job.failed": KindSpec(Kind.NODE_FAILED, ERROR, TRIGGER, node_level=True, emoji=":x:"),
    "job.rolled_back": KindSpec(
        Kind.NODE_ROLLED_BACK, WARNING, TRIGGER, node_level=True, emoji=":rewind:"
    ),
    "release.rejected": KindSpec(
        Kind.SECURITY_REJECTED,
        CRITICAL,
        TRIGGER,
        emoji=":rotating_light:",
        only_codes=SECURITY_CODES,
    ),
    "tenant.window_opening": KindSpec(Kind.WINDOW_OPENING, INFO, emoji=":alarm_clock:"),
    "node.offline": KindSpec(
        Kind.NODE_OFFLINE, WARNING, TRIGGER, node_level=True, emoji=":electric_plug:"
    ),
}

SPEC_BY_KIND: dict[str, KindSpec] = {spec.kind.value: spec for spec in VERBS.values()}
# What a PagerDuty channel can act on; the rest would only be noise in an incident.
PAGERDUTY_KINDS = frozenset(k for k, spec in SPEC_BY_KIND.items() if spec.pagerduty)


def spec_for(verb: str, details: dict[str, Any]) -> KindSpec | None:
    """The spec for an Event, or None when we do not notify about it."""
    spec = VERBS.get(verb)
    if spec is None:
        return None
    if spec.only_codes is not None and details.get("code") not in spec.only_codes:
        return None
    return spec


def worst(severities: list[str]) -> str:
    return max(severities, key=lambda s: SEVERITY_RANK.get(s, 0), default=INFO)
