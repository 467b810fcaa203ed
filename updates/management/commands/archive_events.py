from pathlib import Path
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser

from updates.events.services import BATCH_SIZE, ArchiveBusy, events_archive


class Command(BaseCommand):
    help = (
        "Write the events older than THEMIS_EVENTS_KEEP_DAYS to gzip'd JSON-lines files in"
        " THEMIS_EVENTS_ARCHIVE_DIR, then delete them from the table. Safe to re-run after an"
        " interruption: it finishes what the last run left before starting anything new."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--keep-days", type=int, default=settings.THEMIS_EVENTS_KEEP_DAYS)
        parser.add_argument(
            "--directory", type=Path, default=Path(settings.THEMIS_EVENTS_ARCHIVE_DIR)
        )
        parser.add_argument("--batch-size", type=int, default=BATCH_SIZE)

    def handle(
        self, *args: Any, keep_days: int, directory: Path, batch_size: int, **options: Any
    ) -> None:
        if keep_days < 0 or batch_size < 1:
            raise CommandError("--keep-days must be 0 or more, --batch-size 1 or more")
        try:
            result = events_archive(keep_days=keep_days, directory=directory, batch_size=batch_size)
        except ArchiveBusy as busy:
            raise CommandError(str(busy)) from None
        if result.cutoff is None:
            self.stdout.write("THEMIS_EVENTS_KEEP_DAYS is 0: every event is kept")
            return
        self.stdout.write(
            f"archived {result.archived} events older than {result.cutoff:%Y-%m-%d %H:%M} UTC"
            f" into {len(result.files)} files in {directory}"
            + (f" ({result.resumed} left by an interrupted run)" if result.resumed else "")
        )
