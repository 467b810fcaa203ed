"""Beat task of the audit log's retention (queue `dashboard`). Thin: settings in, service out."""

from __future__ import annotations

import logging
from typing import Any

from celery import shared_task
from django.conf import settings

from updates.events import partitions, services
from updates.taskqueue import TaskName

log = logging.getLogger(__name__)


@shared_task(name=TaskName.ARCHIVE_EVENTS, ignore_result=True)
def archive_events(**_extra: Any) -> int:
    """Create the coming months' event partitions (PostgreSQL), then archive and delete the
    events past retention; the number archived."""
    partitions.ensure_event_partitions()
    try:
        result = services.events_archive(
            keep_days=settings.THEMIS_EVENTS_KEEP_DAYS,
            directory=settings.THEMIS_EVENTS_ARCHIVE_DIR,
        )
    except services.ArchiveBusy as busy:
        # A manual run or the previous beat is still at it; the next beat carries on.
        log.info("%s", busy)
        return 0
    return result.archived
