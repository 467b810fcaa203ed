"""schemathesis against the live API, as each persona: every operation of the OpenAPI schema
with generated requests, through the Django WSGI application and the test database. No answer
may be a 500, and every answer must match the schema (status, content type, headers, body).

The operations are driven here with schemathesis's strategies and Hypothesis rather than its
pytest plugin, which reaches into pytest internals that pytest 9 no longer has."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from django.core import signals
from django.core.wsgi import get_wsgi_application
from django.db import close_old_connections
from hypothesis import HealthCheck, given, settings
from schemathesis.generation import GenerationMode
from schemathesis.specs.openapi.checks import (
    negative_data_rejection,
    positive_data_acceptance,
)

from tests.api.conftest import USERNAMES, MakeToken
from tests.conftest import Fleet
from tests.fakes import NullTransport
from updates.jobs import services as jobs

pytestmark = [pytest.mark.django_db, pytest.mark.slow]

# "Schema-valid data is accepted" does not hold here and cannot: whether a node id, a release
# or a set of canary stages is acceptable depends on the database and on rules a schema does
# not express, and such a request is a 400 naming the field. Every other check runs.

# Invalid requests (negative mode) must still get no 500 and an answer within the schema, but
# need not all be refused: like Django, a repeated query parameter counts once and an empty
# `page` is the first page.
LENIENT = [positive_data_acceptance, negative_data_rejection]

# Examples per operation and persona: enough to reach the statuses an operation answers
# with, few enough for `make test` on a small machine.
EXAMPLES = 10


@pytest.fixture
def api_schema(
    db: None, fleet: Fleet, monkeypatch: pytest.MonkeyPatch, settings: Any
) -> Iterator[Any]:
    monkeypatch.setattr(jobs, "default_transport", NullTransport)
    # Generated requests come fast: the rate limit is tested on its own.
    settings.THEMIS_API_RATE = "1000000/min"
    # The WSGI handler closes the database connection after each request, as a server
    # should; here that connection holds the test's transaction (Django's test client
    # disconnects the same handlers).
    signals.request_started.disconnect(close_old_connections)
    signals.request_finished.disconnect(close_old_connections)
    try:
        yield schemathesis.openapi.from_wsgi("/api/v1/schema/?format=json", get_wsgi_application())
    finally:
        signals.request_started.connect(close_old_connections)
        signals.request_finished.connect(close_old_connections)


def _fuzz(operation: Any, headers: dict[str, str], mode: GenerationMode) -> None:
    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    def run(case: Any) -> None:
        case.call_and_validate(headers=headers, excluded_checks=LENIENT)

    run()


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
@pytest.mark.parametrize("persona", [*USERNAMES, "anonymous"])
def test_every_operation_answers_within_the_schema(
    api_schema: Any, make_token: MakeToken, persona: str, mode: GenerationMode
) -> None:
    # Schemathesis asks for gzip like a browser, but its WSGI transport hands the checks the
    # body as sent; compression has tests of its own (tests/fleet/test_fleet_page.py).
    headers = {"Accept-Encoding": "identity"}
    if persona != "anonymous":
        headers["Authorization"] = f"Bearer {make_token(persona).secret}"
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert len(operations) >= 20
    failures: list[str] = []
    for operation in operations:
        try:
            _fuzz(operation, headers, mode)
        except Exception as failure:  # every operation is tried; all failures are reported
            failures.append(f"{operation.method.upper()} {operation.path}: {failure}")
    assert not failures, "\n\n".join(failures)
