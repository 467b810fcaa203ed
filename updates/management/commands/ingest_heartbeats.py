import signal
import threading
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser

from updates.fleet.ingest import IngestOptions, ingest_until


class Command(BaseCommand):
    help = (
        "Take heartbeats off their queue in batches and store them until stopped (SIGTERM or"
        " Ctrl-C). Run as many as the fleet needs: they share the queue, none takes a"
        " heartbeat another took. Coordinator workers run one each unless"
        " THEMIS_HEARTBEAT_INGESTER=0."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--batch-size", type=int, default=settings.THEMIS_HEARTBEAT_BATCH)
        parser.add_argument(
            "--until-empty",
            action="store_true",
            help="stop once the queue is empty (for benchmarks and one-off catch-up)",
        )

    def handle(self, *args: Any, batch_size: int, until_empty: bool, **options: Any) -> None:
        if batch_size < 1:
            raise CommandError("--batch-size must be 1 or more")
        stop = threading.Event()
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: stop.set())
        total = ingest_until(
            stop, options=IngestOptions(batch_size=batch_size), until_empty=until_empty
        )
        self.stdout.write(
            f"{total.received} heartbeats: {total.stored} stored in batches,"
            f" {total.one_by_one} one by one, {total.refused} refused"
        )
