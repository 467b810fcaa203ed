"""The API takes a rollout's contract delay as the page does: checked by the page's form."""

from __future__ import annotations

import pytest
from rest_framework.test import APIClient

from tests.conftest import Fleet
from tests.factories import make_cluster, make_node, make_release
from tests.fakes import NullTransport
from updates.jobs import services as jobs
from updates.models import Cluster, Release, Rollout

pytestmark = pytest.mark.django_db

Api = dict[str, APIClient]


@pytest.fixture(autouse=True)
def _no_agents(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(jobs, "default_transport", NullTransport)


@pytest.fixture
def release(db: None) -> Release:
    return make_release(
        version="1.1.0",
        sha256="ab" * 32,
        artifact="releases/x.tar",
        manifest={"migrations": [{"version": "0002", "phase": "contract"}]},
    )


@pytest.fixture
def cluster(fleet: Fleet) -> Cluster:
    cluster = make_cluster(tenant=fleet.tenant_b, name="b-main")
    for i in range(2):
        make_node(
            node_id=f"bm-{i}", tenant=fleet.tenant_b, cluster=cluster, installed_version="1.0.0"
        )
    return cluster


def test_a_rollout_created_through_the_api_keeps_its_contract_delay(
    api: Api, release: Release, cluster: Cluster
) -> None:
    body = {"release": release.pk, "strategy": "rolling", "cluster": cluster.pk}
    response = api["operator"].post(
        "/api/v1/rollouts/", {**body, "contract_delay": 120}, format="json"
    )
    assert response.status_code == 201, response.content
    assert Rollout.objects.get().opts.contract_delay == 120


def test_a_contract_delay_out_of_range_is_refused_by_name(
    api: Api, release: Release, cluster: Cluster
) -> None:
    body = {"release": release.pk, "strategy": "rolling", "cluster": cluster.pk}
    response = api["operator"].post(
        "/api/v1/rollouts/", {**body, "contract_delay": -1}, format="json"
    )
    assert response.status_code == 400
    assert "contract_delay" in response.json()["fields"]
    assert not Rollout.objects.exists()
