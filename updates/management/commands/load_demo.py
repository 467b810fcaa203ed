from pathlib import Path
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand

from themis_dashboard.demo.fleet import (
    demo_bundles_prepare,
    demo_fleet_load,
    demo_nodes_install_base,
)


class Command(BaseCommand):
    help = "Load the demo fleet (idempotent) and print the demo logins."

    def handle(self, *args: Any, **options: Any) -> None:
        var_dir = Path(settings.VAR_DIR)
        result = demo_fleet_load(var_dir=var_dir)
        bundles = demo_bundles_prepare(var_dir=var_dir)
        installed = demo_nodes_install_base(var_dir=var_dir, bundle=bundles["1.0.0"])
        self.stdout.write(
            f"demo fleet: {len(result['nodes'])} nodes"
            f" ({len(installed)} newly installed with 1.0.0);"
            f" demo bundles in {bundles['1.1.0'].parent}"
        )
