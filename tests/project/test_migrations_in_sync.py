"""Every model change has its migration: a field added without one would work in the tests'
database only if it were built from the models, and fail on every installed database."""

from __future__ import annotations

from io import StringIO

import pytest
from django.core.management import call_command


@pytest.mark.django_db
def test_the_models_and_the_migrations_agree() -> None:
    out = StringIO()
    try:
        call_command("makemigrations", "--check", "--dry-run", stdout=out, stderr=out)
    except SystemExit as missing:
        pytest.fail(f"a model change has no migration (exit {missing.code}):\n{out.getvalue()}")
