"""Coordinator task names, and the one way services enqueue them: by name, after commit.

Services never import a tasks module (tasks sit above services); they name the task here.
The names are a contract with agents, beat and queued messages: they do not change."""

from __future__ import annotations

import logging
from enum import StrEnum
from typing import Any

import redis
from celery import current_app
from django.conf import settings
from django.db import transaction

log = logging.getLogger(__name__)


class TaskName(StrEnum):
    RECORD_HEARTBEAT = "workers.tasks.record_heartbeat"
    MARK_OFFLINE_NODES = "workers.tasks.mark_offline_nodes"
    JOB_PROGRESS = "workers.tasks.job_progress"
    JOB_FINISHED = "workers.tasks.job_finished"
    GENERATE_RELEASE_DELTAS = "workers.tasks.generate_release_deltas"
    EXTRACT_RELEASE_PARTS = "workers.tasks.extract_release_parts"
    CLEANUP_ARTIFACT_TOMBSTONES = "workers.tasks.cleanup_artifact_tombstones"
    RELEASE_WAITING_JOBS = "workers.tasks.release_waiting_jobs"
    REMIND_WINDOWS_OPENING = "tenants.tasks.remind_windows_opening"
    DRIVE_ROLLOUT = "workers.tasks.drive_rollout"
    DRIVE_ACTIVE_ROLLOUTS = "workers.tasks.drive_active_rollouts"
    RELAY_NODE_COMMANDS = "workers.tasks.relay_node_commands"
    REAP_LOST_JOBS = "workers.tasks.reap_lost_jobs"
    POLL_RELEASE_FEEDS = "workers.tasks.poll_release_feeds"
    POLL_RELEASE_FEED = "workers.tasks.poll_release_feed"
    ARCHIVE_EVENTS = "workers.tasks.archive_events"


def send_task(name: TaskName, *args: Any, countdown: float | None = None) -> None:
    """Send now (the caller has committed, or runs outside a transaction)."""
    current_app.send_task(str(name), args=args, countdown=countdown)


def enqueue_on_commit(name: TaskName, *args: Any, countdown: float | None = None) -> None:
    """Send once the surrounding transaction commits; a broker error is logged, never raised
    into the request or task that committed (the beat reapers are the backstop)."""

    def send() -> None:
        try:
            send_task(name, *args, countdown=countdown)
        except Exception:
            log.exception("could not enqueue %s%r", name, args)

    transaction.on_commit(send)


DEBOUNCE_MS = 300


def enqueue_debounced_on_commit(name: TaskName, *args: Any, key: str) -> None:
    """Once committed, send one `name(*args)` in `DEBOUNCE_MS`, however many callers ask
    meanwhile: the first asks, the others ride along (the task reads everything committed
    before it runs). Without Redis there is no debounce: one task too many is harmless."""

    def send() -> None:
        try:
            client = redis.Redis.from_url(settings.REDIS_URL)
            first = client.set(f"themis:debounce:{key}", 1, nx=True, px=DEBOUNCE_MS)
        except redis.RedisError:
            first = True
        if first:
            try:
                send_task(name, *args, countdown=DEBOUNCE_MS / 1000)
            except Exception:
                log.exception("could not enqueue %s%r", name, args)

    transaction.on_commit(send)
