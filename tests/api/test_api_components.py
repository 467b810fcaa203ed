"""The API shows a node's components and a job's plan (which step failed), read-only, as
the schema describes them; a refused plan is a 409 with the explanation."""

from __future__ import annotations

from typing import Any

import pytest
from django.utils import timezone
from rest_framework.test import APIClient

from tests.conftest import Fleet
from tests.factories import make_release
from updates.models import Node, NodeComponent, Release, UpdateJob

pytestmark = pytest.mark.django_db

Api = dict[str, APIClient]


def _ok(response: Any) -> Any:
    assert response.status_code == 200, response.content
    return response.json()


@pytest.fixture
def two_components(fleet: Fleet) -> Node:
    NodeComponent.objects.record(
        node_id=fleet.node_a.pk,
        versions={"themisdb": "1.0.0", "themis-storage": "1.3.0"},
        now=timezone.now(),
        replace=True,
    )
    return fleet.node_a


def test_a_node_lists_its_components_in_the_list_and_the_detail(
    api: Api, two_components: Node
) -> None:
    expected = [
        {"product": "themisdb", "version": "1.0.0"},
        {"product": "themis-storage", "version": "1.3.0"},
    ]
    listed = {n["node_id"]: n for n in _ok(api["operator"].get("/api/v1/nodes/"))["results"]}
    assert listed["a-1"]["components"] == expected
    # A node that never reported components runs its server alone.
    assert listed["b-1"]["components"] == [{"product": "themisdb", "version": "1.0.0"}]
    assert _ok(api["admin_a"].get("/api/v1/nodes/a-1/"))["components"] == expected


def test_a_job_shows_its_plan_and_failed_step(api: Api, two_components: Node) -> None:
    storage = make_release(product="themis-storage", version="1.4.2", sha256="ab" * 32)
    server = make_release(
        product="themisdb",
        version="1.5.0",
        sha256="cd" * 32,
        manifest={"dependencies": [{"product": "themis-storage", "constraint": ">=1.4"}]},
    )
    created = api["operator"].post(
        "/api/v1/nodes/a-1/update/", {"release": server.pk}, format="json"
    )
    assert created.status_code == 201, created.content
    assert created.json()["plan"] == [
        {"product": "themis-storage", "version": "1.4.2", "from_version": "1.3.0",
         "release_id": storage.pk},
        {"product": "themisdb", "version": "1.5.0", "from_version": "1.0.0",
         "release_id": server.pk},
    ]  # fmt: skip
    UpdateJob.objects.update(state=UpdateJob.State.FAILED, result={"plan": [], "failed_step": 2})
    jobs = _ok(api["admin_a"].get("/api/v1/nodes/a-1/"))["jobs"]
    assert (len(jobs[0]["plan"]), jobs[0]["failed_step"]) == (2, 2)


def test_an_unresolvable_update_is_a_409_with_the_explanation(
    api: Api, two_components: Node
) -> None:
    server = make_release(
        product="themisdb",
        version="1.5.0",
        manifest={"dependencies": [{"product": "themis-query", "constraint": ">=9"}]},
    )
    response = api["operator"].post(
        "/api/v1/nodes/a-1/update/", {"release": server.pk}, format="json"
    )
    assert response.status_code == 409, response.content
    assert "themis-query" in response.json()["message"]
    assert not UpdateJob.objects.exists()


def test_the_schema_describes_components_and_plans_read_only(api: Api) -> None:
    response = api["anonymous"].get(
        "/api/v1/schema/", HTTP_ACCEPT="application/vnd.oai.openapi+json"
    )
    assert response.status_code == 200
    schemas = response.json()["components"]["schemas"]
    for name in ("Node", "NodeDetail"):
        field = schemas[name]["properties"]["components"]
        assert field["readOnly"] is True and field["type"] == "array", field
        assert field["items"]["$ref"].endswith("/Component")
    plan = schemas["Job"]["properties"]["plan"]
    assert plan["readOnly"] is True and plan["items"]["$ref"].endswith("/PlanStep")
    assert set(schemas["PlanStep"]["properties"]) == {
        "product",
        "version",
        "from_version",
        "release_id",
    }
    failed = schemas["Job"]["properties"]["failed_step"]
    assert (failed["type"], failed["nullable"], failed["readOnly"]) == ("integer", True, True)


def test_nothing_about_components_can_be_written(api: Api, two_components: Node) -> None:
    response = api["operator"].patch(
        "/api/v1/nodes/a-1/", {"components": [{"product": "x", "version": "9"}]}, format="json"
    )
    assert response.status_code == 405
    assert not NodeComponent.objects.filter(product="x").exists()
    assert Release.objects.count() == 0
