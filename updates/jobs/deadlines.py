"""Job deadlines: how long a job may go unacknowledged or silent, and ending it LOST.

A job the agent never acknowledges, one that stops reporting, or one whose node stays
offline ends LOST with the reason: its node is free again (the one-active-job rule holds
only active jobs), its open commands are abandoned and its rollout wakes to apply its
failure policy. Every end is a conditional UPDATE, so two reapers (or a reaper and an
operator, or a late report) never end a job twice.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.db import transaction
from django.db.models import Q
from django.utils import timezone

from updates.audit import SYSTEM, event_log
from updates.models import Node, NodeCommand, UpdateJob
from updates.taskqueue import TaskName, enqueue_debounced_on_commit, enqueue_on_commit

log = logging.getLogger(__name__)

S = UpdateJob.State
LOST_CODE = "LOST"
# Sent to the agent and not finished: what a deadline may end.
RUNNING_STATES: tuple[str, ...] = tuple(
    s for s in UpdateJob.ACTIVE_STATES if s not in UpdateJob.WAITING_STATES
)


@dataclass(frozen=True)
class JobDeadlines:
    """The deadlines one job runs under (its rollout's options, or the settings)."""

    ack_timeout: int
    max_sends: int
    progress_timeout: int
    offline_grace: int

    @classmethod
    def from_settings(cls) -> JobDeadlines:
        return cls(
            ack_timeout=settings.THEMIS_JOB_ACK_TIMEOUT,
            max_sends=settings.THEMIS_JOB_MAX_SENDS,
            progress_timeout=settings.THEMIS_JOB_PROGRESS_TIMEOUT,
            offline_grace=settings.THEMIS_JOB_OFFLINE_GRACE,
        )


def deadlines_for(job: UpdateJob | None) -> JobDeadlines:
    if job is None or job.rollout_id is None or job.rollout is None:
        return JobDeadlines.from_settings()
    opts = job.rollout.opts
    return JobDeadlines(
        ack_timeout=opts.ack_timeout,
        max_sends=opts.max_sends,
        progress_timeout=opts.progress_timeout,
        offline_grace=opts.offline_grace,
    )


def wake_rollout_after_commit(rollout_id: int, *, debounce: bool) -> None:
    """Once committed, let the coordinator take the rollout's next step.
    Finished jobs debounce (many finish at once); a person's decision drives now."""
    if debounce:
        enqueue_debounced_on_commit(
            TaskName.DRIVE_ROLLOUT, rollout_id, key=f"rollout-wake:{rollout_id}"
        )
    else:
        enqueue_on_commit(TaskName.DRIVE_ROLLOUT, rollout_id)


def job_end_lost(
    *,
    job_id: int,
    reason: str,
    user: Any = None,
    states: tuple[str, ...] = RUNNING_STATES,
    condition: Q | None = None,
    now: datetime | None = None,
) -> bool:
    """End an active job LOST with `reason`, if it is still in one of `states` and meets
    `condition` (what the caller saw when it decided). Returns whether this call ended it."""
    now = now or timezone.now()
    jobs = UpdateJob.objects.filter(pk=job_id, state__in=states)
    if condition is not None:
        jobs = jobs.filter(condition)
    with transaction.atomic():
        ended = jobs.update(
            state=S.LOST,
            finished_at=now,
            error_code=LOST_CODE,
            error_message=reason[:4000],
        )
        if not ended:
            return False
        job = UpdateJob.objects.select_related("node").get(pk=job_id)
        NodeCommand.objects.filter(job_id=job_id, state__in=NodeCommand.OPEN_STATES).update(
            state=NodeCommand.State.ABANDONED, last_error=reason[:255]
        )
        # Nobody knows what the node is doing now; its next heartbeat says.
        Node.objects.filter(pk=job.node_id, status=Node.Status.UPDATING).update(
            status=Node.Status.UNKNOWN
        )
        details = {
            "node_id": job.node.node_id,
            "kind": job.kind,
            "reason": reason[:500],
            "rollout_id": job.rollout_id,
        }
        if user is not None:
            event_log(
                verb="job.lost", actor=user, tenant=job.node.tenant_id, obj=job, details=details
            )
        else:
            event_log(
                verb="job.lost",
                actor_label=SYSTEM,
                tenant=job.node.tenant_id,
                obj=job,
                details=details,
            )
        if job.rollout_id:
            wake_rollout_after_commit(job.rollout_id, debounce=True)
    log.warning("job %s on %s ended LOST: %s", job_id, job.node.node_id, reason)
    return True


@dataclass(frozen=True)
class ReapResult:
    """The jobs one reaper pass ended, by deadline."""

    not_acknowledged: tuple[int, ...] = ()
    no_progress: tuple[int, ...] = ()
    node_offline: tuple[int, ...] = ()


def jobs_reap(*, now: datetime | None = None) -> ReapResult:
    """End every running job past one of its deadlines. Idempotent: each end is
    conditional on what this pass read, so a report that arrives meanwhile wins."""
    now = now or timezone.now()
    unacked: list[int] = []
    silent: list[int] = []
    offline: list[int] = []
    running = UpdateJob.objects.filter(state__in=RUNNING_STATES).select_related("node", "rollout")
    for job in running:
        deadlines = deadlines_for(job)
        node = job.node
        if (
            node.status == Node.Status.OFFLINE
            and _offline_since(node, job) + timedelta(seconds=deadlines.offline_grace) < now
        ):
            if job_end_lost(
                job_id=job.pk,
                reason=f"node offline for more than {deadlines.offline_grace} s",
                condition=Q(node__status=Node.Status.OFFLINE),
                now=now,
            ):
                offline.append(job.pk)
            continue
        if job.acked_at is None:
            if _out_of_sends(job, deadlines, now) and job_end_lost(
                job_id=job.pk,
                reason=f"not acknowledged after {deadlines.max_sends} sends",
                condition=Q(acked_at__isnull=True),
                now=now,
            ):
                unacked.append(job.pk)
            continue
        last = job.last_report_at or job.acked_at
        if last + timedelta(seconds=deadlines.progress_timeout) < now and job_end_lost(
            job_id=job.pk,
            reason=f"no progress for {deadlines.progress_timeout} s",
            condition=Q(last_report_at=job.last_report_at),
            now=now,
        ):
            silent.append(job.pk)
    return ReapResult(tuple(unacked), tuple(silent), tuple(offline))


def _offline_since(node: Node, job: UpdateJob) -> datetime:
    """When the node was marked offline: its last heartbeat plus the silence that takes."""
    seen = node.last_heartbeat or job.created_at
    return seen + timedelta(seconds=settings.THEMIS_NODE_OFFLINE_AFTER)


def _out_of_sends(job: UpdateJob, deadlines: JobDeadlines, now: datetime) -> bool:
    """No command of the job is still being (re-)sent, and the last send went unanswered
    for `ack_timeout`: the relay gave up (it normally ends the job itself; this is the
    backstop for a job whose commands were abandoned without ending it)."""
    commands = list(NodeCommand.objects.filter(job_id=job.pk))
    if not commands or any(c.state in NodeCommand.OPEN_STATES for c in commands):
        return False
    last_sent = max((c.last_sent_at or c.created_at) for c in commands)
    return last_sent + timedelta(seconds=deadlines.ack_timeout) < now
