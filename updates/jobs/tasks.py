"""Job beat tasks (queue `dashboard`): the outbox relay and the deadline reaper. Thin.

Signatures accept extra kwargs so agents and dashboard can be upgraded apart."""

from __future__ import annotations

from typing import Any

from celery import shared_task

from updates.jobs import deadlines, outbox
from updates.taskqueue import TaskName


@shared_task(name=TaskName.RELAY_NODE_COMMANDS, ignore_result=True)
def relay_node_commands(**_extra: Any) -> int:
    """Beat: send (and re-send) every due outbox command; returns how many went out."""
    return outbox.relay_due().sent


@shared_task(name=TaskName.REAP_LOST_JOBS, ignore_result=True)
def reap_lost_jobs(**_extra: Any) -> list[int]:
    """Beat: end jobs past a deadline LOST; returns their ids."""
    result = deadlines.jobs_reap()
    return [*result.not_acknowledged, *result.no_progress, *result.node_offline]
