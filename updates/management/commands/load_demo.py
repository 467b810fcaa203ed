from pathlib import Path
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand

from updates.demo import demo_fleet_load


class Command(BaseCommand):
    help = "Load the demo fleet (idempotent) and print the demo logins."

    def handle(self, *args: Any, **options: Any) -> None:
        result = demo_fleet_load(var_dir=Path(settings.VAR_DIR))
        self.stdout.write(f"demo fleet: {len(result['nodes'])} nodes")
