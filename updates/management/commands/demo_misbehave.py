from pathlib import Path
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser


class Command(BaseCommand):
    help = (
        "Make a demo node's service answer errors and slowly, its health check still passing"
        " (the canary gate fails on the metrics), or with --mode down failing it too (the"
        " agent rolls the update back); --off undoes either."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("node_id")
        parser.add_argument("--off", action="store_true")
        parser.add_argument("--mode", choices=["slow", "down"], default="slow")

    def handle(self, *args: Any, node_id: str, off: bool, mode: str, **options: Any) -> None:
        state = Path(settings.VAR_DIR) / "nodes" / node_id / "state"
        if not state.is_dir():
            raise CommandError(f"no demo node {node_id!r} under {state.parent.parent}")
        flag = state / "misbehave"
        if off:
            flag.unlink(missing_ok=True)
        else:
            flag.write_text(mode)
        self.stdout.write(f"{node_id}: {'behaving' if off else f'misbehaving ({mode})'}")
