"""Django for a benchmark script: the base settings on a database of its own, migrated."""

from __future__ import annotations

import os
from pathlib import Path


def start_django(database_url: str, var_dir: Path | str, **env: str) -> None:
    """Set the environment (`env` adds to it), set Django up and migrate the database."""
    os.environ.update(
        DJANGO_SETTINGS_MODULE="themis_dashboard.settings.base",
        DATABASE_URL=database_url,
        THEMIS_VAR_DIR=str(var_dir),
        **env,
    )
    import django
    from django.core.management import call_command

    django.setup()
    call_command("migrate", verbosity=0)
