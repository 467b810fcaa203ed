"""The API shows a job's live transfer figures and what a node's restore points hold on disk,
read-only, as the schema describes them."""

from __future__ import annotations

from typing import Any

import pytest
from rest_framework.test import APIClient

from tests.conftest import Fleet
from tests.factories import make_release
from updates.models import Node, UpdateJob

pytestmark = pytest.mark.django_db

Api = dict[str, APIClient]

JOB_FIGURES = ["bytes_done", "bytes_total", "bytes_per_second", "eta_seconds"]


def _downloading(node: Node) -> UpdateJob:
    release = make_release(version="1.7.0", sha256="ab" * 32, artifact="releases/x.tar")
    return UpdateJob.objects.create(
        node=node,
        release=release,
        state=UpdateJob.State.DOWNLOADING,
        step="download",
        bytes_done=3_000_000_000,
        bytes_total=8_000_000_000,
        bytes_per_second=52_428_800,
        eta_seconds=95,
    )


def _ok(response: Any) -> dict[str, Any]:
    assert response.status_code == 200, response.content
    body: dict[str, Any] = response.json()
    return body


def test_a_nodes_jobs_show_their_transfer_figures(api: Api, fleet: Fleet) -> None:
    job = _downloading(fleet.node_a)
    idle = UpdateJob.objects.create(node=fleet.node_a, state=UpdateJob.State.FAILED)

    body = _ok(api["operator"].get("/api/v1/nodes/a-1/"))

    jobs = {item["id"]: item for item in body["jobs"]}
    assert {name: jobs[job.pk][name] for name in JOB_FIGURES} == {
        "bytes_done": 3_000_000_000,
        "bytes_total": 8_000_000_000,
        "bytes_per_second": 52_428_800,
        "eta_seconds": 95,
    }
    # Not reported yet: null, not 0 (nothing is known).
    assert {name: jobs[idle.pk][name] for name in JOB_FIGURES} == dict.fromkeys(JOB_FIGURES)


def test_a_nodes_restore_points_bytes_in_the_list_and_the_detail(api: Api, fleet: Fleet) -> None:
    Node.objects.filter(pk=fleet.node_a.pk).update(restore_points_bytes=7 << 30)

    listed = _ok(api["operator"].get("/api/v1/nodes/"))["results"]
    by_id = {node["node_id"]: node for node in listed}
    assert by_id["a-1"]["restore_points_bytes"] == 7 << 30
    assert by_id["b-1"]["restore_points_bytes"] is None  # never reported
    detail = _ok(api["admin_a"].get("/api/v1/nodes/a-1/"))
    assert detail["restore_points_bytes"] == 7 << 30


def test_the_figures_cannot_be_written_through_the_api(api: Api, fleet: Fleet) -> None:
    job = _downloading(fleet.node_a)
    for method in ("put", "patch"):
        response = getattr(api["operator"], method)(
            "/api/v1/nodes/a-1/",
            {"restore_points_bytes": 1, "jobs": [{"id": job.pk, "eta_seconds": 1}]},
            format="json",
        )
        assert response.status_code == 405, response.content
    job.refresh_from_db()
    fleet.node_a.refresh_from_db()
    assert (job.eta_seconds, fleet.node_a.restore_points_bytes) == (95, None)


def test_the_schema_describes_them_as_read_only_nullable_integers(api: Api) -> None:
    openapi = "application/vnd.oai.openapi+json"
    response = api["anonymous"].get("/api/v1/schema/", HTTP_ACCEPT=openapi)
    assert response.status_code == 200
    components = response.json()["components"]["schemas"]
    expected = {"Job": JOB_FIGURES, "Node": ["restore_points_bytes"]}
    expected["NodeDetail"] = expected["Node"]
    for component, names in expected.items():
        properties = components[component]["properties"]
        for name in names:
            field = properties[name]
            assert field["type"] == "integer", (component, name, field)
            assert field.get("readOnly") is True, (component, name, field)
            assert field.get("nullable") is True, (component, name, field)


def test_a_nodes_inventory_in_the_list_and_the_detail(api: Api, fleet: Fleet) -> None:
    host = {"os": "Debian GNU/Linux 12 (bookworm)", "arch": "x86_64", "cpus": 4}
    Node.objects.filter(pk=fleet.node_a.pk).update(inventory=host)
    listed = _ok(api["operator"].get("/api/v1/nodes/"))["results"]
    by_id = {node["node_id"]: node for node in listed}
    assert by_id["a-1"]["inventory"] == host
    assert by_id["b-1"]["inventory"] == {}  # never reported
    assert _ok(api["admin_a"].get("/api/v1/nodes/a-1/"))["inventory"] == host
