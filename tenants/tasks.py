"""Tenant beat tasks (queue `dashboard`): release held jobs, remind of windows. Thin.

Signatures accept extra kwargs so agents and dashboard can be upgraded apart."""

from __future__ import annotations

from typing import Any

from celery import shared_task

from tenants.services import waiting_jobs_release, window_reminders_send
from updates.jobs import services as jobs
from updates.taskqueue import TaskName


@shared_task(name=TaskName.RELEASE_WAITING_JOBS, ignore_result=True)
def release_waiting_jobs(**_extra: Any) -> list[int]:
    """Beat: start jobs whose maintenance window opened or whose consent came."""
    # Each released job goes to its agent the same way a fresh one does.
    return waiting_jobs_release(start_job=jobs.job_enqueue)


@shared_task(name=TaskName.REMIND_WINDOWS_OPENING, ignore_result=True)
def remind_windows_opening(**_extra: Any) -> list[str]:
    """Beat: tenants whose next window opens within their policy's lead time hear of it."""
    return window_reminders_send()
