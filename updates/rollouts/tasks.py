"""Coordinator tasks (queue `dashboard`). Thin: parse, call a service.

Signatures accept extra kwargs so agents and dashboard can be upgraded apart."""

from __future__ import annotations

from typing import Any

from celery import shared_task

from updates.rollouts.coordinator import DriveOutcome, rollout_drive
from updates.rollouts.selectors import active_rollout_ids
from updates.rollouts.services import rollouts_start_due
from updates.taskqueue import TaskName


@shared_task(name=TaskName.DRIVE_ROLLOUT, ignore_result=True)
def drive_rollout(rollout_id: int, **_extra: Any) -> str:

    outcome = rollout_drive(int(rollout_id))
    if outcome == DriveOutcome.BUSY:
        # Another drive holds the lease right now; look again shortly so the
        # event that woke us is not lost.
        drive_rollout.apply_async((rollout_id,), countdown=1)
    return outcome.value


@shared_task(name=TaskName.DRIVE_ACTIVE_ROLLOUTS, ignore_result=True)
def drive_active_rollouts(**_extra: Any) -> int:
    """The reaper: planned rollouts whose start time has come are started, then every
    active rollout gets driven, so a rollout whose coordinator died goes on from its
    persisted state."""
    rollouts_start_due()
    ids = active_rollout_ids()
    for rollout_id in ids:
        rollout_drive(rollout_id)
    return len(ids)
