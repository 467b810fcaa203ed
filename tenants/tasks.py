"""Coordinator tasks (queue `dashboard`). Thin: parse, call a service.

Signatures accept extra kwargs so agents and dashboard can be upgraded apart."""

from __future__ import annotations

from typing import Any

from celery import shared_task

from tenants.services import waiting_jobs_release
from updates.jobs import services as jobs
from updates.taskqueue import TaskName


@shared_task(name=TaskName.RELEASE_WAITING_JOBS, ignore_result=True)
def release_waiting_jobs(**_extra: Any) -> list[int]:
    """Beat: start jobs whose maintenance window opened or whose consent came."""

    # Each released job goes to its agent the same way a fresh one does.
    return waiting_jobs_release(start_job=jobs.job_enqueue)
