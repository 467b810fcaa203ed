"""Coordinator tasks (queue `dashboard`). Thin: parse, call a service.

Signatures accept extra kwargs so agents and dashboard can be upgraded apart."""

from __future__ import annotations

from typing import Any

from celery import shared_task

from updates.releases import storage
from updates.releases.deltas import release_deltas_generate
from updates.taskqueue import TaskName


@shared_task(name=TaskName.GENERATE_RELEASE_DELTAS, ignore_result=True)
def generate_release_deltas(release_id: int, **_extra: Any) -> list[str]:
    """Build and sign the delta bundles of a freshly published release."""

    files = release_deltas_generate(release_id=int(release_id))
    return [f.base_version for f in files]


@shared_task(name=TaskName.CLEANUP_ARTIFACT_TOMBSTONES, ignore_result=True)
def cleanup_artifact_tombstones(**_extra: Any) -> int:
    return storage.artifact_tombstones_cleanup()
