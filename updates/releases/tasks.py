"""Coordinator tasks (queue `dashboard`). Thin: parse, call a service.

Signatures accept extra kwargs so agents and dashboard can be upgraded apart."""

from __future__ import annotations

from typing import Any

from celery import shared_task

from updates.releases import feeds, parts, storage
from updates.releases.deltas import release_deltas_generate
from updates.taskqueue import TaskName


@shared_task(name=TaskName.GENERATE_RELEASE_DELTAS, ignore_result=True)
def generate_release_deltas(release_id: int, **_extra: Any) -> list[str]:
    """Build and sign the delta bundles of a freshly published release."""

    files = release_deltas_generate(release_id=int(release_id))
    return [f.base_version for f in files]


@shared_task(name=TaskName.EXTRACT_RELEASE_PARTS, ignore_result=True)
def extract_release_parts(release_id: int, **_extra: Any) -> bool:
    """Store a release's parts (its manifest and one object per file) for delivery by parts."""
    return parts.release_parts_extract(release_id=int(release_id))


@shared_task(name=TaskName.CLEANUP_ARTIFACT_TOMBSTONES, ignore_result=True)
def cleanup_artifact_tombstones(**_extra: Any) -> int:
    cleared = storage.artifact_tombstones_cleanup()
    parts.release_parts_gc()  # the parts of deleted releases go with them
    return cleared


@shared_task(name=TaskName.POLL_RELEASE_FEEDS, ignore_result=True)
def poll_release_feeds(**_extra: Any) -> list[int]:
    """Beat: queue one poll per release feed that is due."""
    return feeds.feeds_enqueue_due()


@shared_task(name=TaskName.POLL_RELEASE_FEED, ignore_result=True)
def poll_release_feed(feed_id: int, **_extra: Any) -> str | None:
    result = feeds.feed_poll(int(feed_id))
    return result.status if result is not None else None
