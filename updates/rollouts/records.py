"""What a rollout leaves behind: its stage decisions and its audit events.

Owns the Decision choices, `record_decision` and `rollout_event` (the summary
every rollout event carries). Calls only the models and the audit log.
"""

from __future__ import annotations

from typing import Any

from django.contrib.auth.models import User
from django.db import models

from updates.audit import event_log
from updates.models import Rollout, StageDecision


class Decision(models.TextChoices):
    """`StageDecision.decision`: who or what moved the rollout, and how."""

    STARTED = "started"
    APPROVED = "approved"
    # An approval the gate refused: the canary's metrics breach now.
    APPROVAL_REFUSED = "approval_refused"
    PAUSED = "paused"
    RESUMED = "resumed"
    CANCELLED = "cancelled"
    ABORTED = "aborted"
    RETRY = "retry"
    STAGE_COMPLETED = "stage_completed"
    GATE_PASSED = "gate_passed"
    GATE_FAILED = "gate_failed"
    AUTO_PROMOTED = "auto_promoted"
    # A node's turn came and no update plan took it to the release (it failed its turn).
    NODE_PLAN_REFUSED = "node_plan_refused"


def summary(rollout: Rollout, **extra: Any) -> dict[str, Any]:
    return {
        "rollout_id": rollout.pk,
        "strategy": rollout.strategy,
        "release_version": rollout.release.version,
        "stage": rollout.current_stage,
        **extra,
    }


def record_decision(
    rollout: Rollout, decision: Decision, user: User | None, label: str = "", **details: Any
) -> None:
    StageDecision.objects.create(
        rollout=rollout,
        stage=rollout.current_stage,
        decision=decision,
        decided_by=user,
        decided_by_label=label or (user.get_username() if user else "system"),
        details=details,
    )


def rollout_event(
    rollout: Rollout, verb: str, *, actor: User | None = None, **details: Any
) -> None:
    """One audit Event about `rollout`: its summary, as the object stands in
    memory, plus `details`."""
    event_log(
        verb=verb,
        actor=actor,
        tenant=rollout.tenant_id,
        obj=rollout,
        details=summary(rollout, **details),
    )
