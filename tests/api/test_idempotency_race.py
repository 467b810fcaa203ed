"""Two copies of one create racing (a client that retried before the first answer came): with
one Idempotency-Key, one rollout starts and both get the same answer."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import requests
from pytest_django.live_server_helper import LiveServer

from tests.api.conftest import MakeToken
from tests.conftest import Fleet
from tests.factories import make_release
from tests.fakes import NullTransport
from updates.jobs import services as jobs
from updates.models import Rollout, StageDecision

pytestmark = [pytest.mark.django_db(transaction=True)]


@pytest.fixture(autouse=True)
def _no_agents(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(jobs, "default_transport", NullTransport)


def test_racing_retries_start_one_rollout(
    live_server: LiveServer, make_token: MakeToken, fleet: Fleet
) -> None:
    release = make_release(version="1.1.0", sha256="ab" * 32, artifact="releases/x.tar")
    secret = make_token("operator").secret
    body = {"release": release.pk, "strategy": "rolling", "cluster": fleet.cluster_a.pk}
    headers = {"Authorization": f"Bearer {secret}", "Idempotency-Key": "deploy-1234"}

    def post(_: int) -> Any:
        return requests.post(
            f"{live_server.url}/api/v1/rollouts/", json=body, headers=headers, timeout=60
        )

    with ThreadPoolExecutor(max_workers=4) as pool:
        answers = list(pool.map(post, range(4)))
    assert {a.status_code for a in answers} == {201}, [a.text for a in answers]
    assert len({a.json()["id"] for a in answers}) == 1
    assert Rollout.objects.count() == 1
    assert StageDecision.objects.filter(decision="started").count() == 1
    assert sum(a.headers.get("Idempotent-Replayed") == "true" for a in answers) == 3
