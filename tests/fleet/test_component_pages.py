"""Multi-component nodes on the pages: the node lists its components (and what clashes
among them), the update page shows the plan (or why there is none) before the operator
confirms, a job shows which step failed, and the rollout preview groups identical plans."""

from __future__ import annotations

from typing import Any

import pytest
from django.test import Client
from django.urls import reverse
from django.utils import timezone

from tests.conftest import Fleet
from tests.factories import make_cluster, make_node, make_release
from tests.fakes import NullTransport
from updates.jobs import services as jobs
from updates.models import Node, NodeComponent, Release, Rollout, UpdateJob

pytestmark = pytest.mark.django_db

Personas = dict[str, Client]

STEPS = ["themis-query (new) 1.4.5", "themis-storage 1.3.0 → 1.4.2", "themisdb 1.4.0 → 1.5.0"]


@pytest.fixture(autouse=True)
def _no_agents(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(jobs, "default_transport", NullTransport)


def _release(product: str, version: str, *deps: dict[str, Any]) -> Release:
    manifest = {"dependencies": list(deps)} if deps else {}
    return make_release(
        product=product, version=version, sha256="ab" * 32, artifact="x.tar", manifest=manifest
    )


def _components(node: Node, **versions: str) -> None:
    installed = {product.replace("_", "-"): v for product, v in versions.items()}
    Node.objects.filter(pk=node.pk).update(installed_version=installed["themisdb"])
    NodeComponent.objects.record(
        node_id=node.pk, versions=installed, now=timezone.now(), replace=True
    )


@pytest.fixture
def server(fleet: Fleet) -> Release:
    """themisdb 1.5.0 needs storage >=1.4 and query >=1.4; a-1 runs 1.4.0 with storage 1.3.0."""
    _release("themis-storage", "1.3.0")
    _release("themis-storage", "1.4.2")
    _release("themis-query", "1.4.5")
    _components(fleet.node_a, themisdb="1.4.0", themis_storage="1.3.0")
    return _release(
        "themisdb",
        "1.5.0",
        {"product": "themis-storage", "constraint": ">=1.4,<2"},
        {"product": "themis-query", "constraint": ">=1.4"},
    )


def _text(response: Any) -> str:
    return str(response.content.decode())


# ------------------------------------------------------------------ the node page


def test_the_node_page_lists_its_components(personas: Personas, server: Release) -> None:
    body = _text(personas["operator"].get(reverse("node_detail", args=["a-1"])))
    assert '<li data-product="themisdb">themisdb 1.4.0' in body
    assert '<li data-product="themis-storage">themis-storage 1.3.0</li>' in body
    assert 'id="component-problems"' not in body


def test_a_node_without_components_shows_its_server_version(personas: Personas) -> None:
    body = _text(personas["admin_b"].get(reverse("node_detail", args=["b-1"])))
    assert '<li data-product="themisdb">themisdb 1.0.0' in body


def test_the_node_page_names_what_clashes_among_its_components(
    personas: Personas, fleet: Fleet
) -> None:
    _release("themis-storage", "1.3.0", {"product": "themisdb", "constraint": ">=1.5"})
    _components(fleet.node_a, themisdb="1.4.0", themis_storage="1.3.0")
    body = _text(personas["admin_a"].get(reverse("node_detail", args=["a-1"])))
    assert 'id="component-problems"' in body
    assert "themis-storage 1.3.0 needs themisdb &gt;=1.5, but themisdb 1.4.0 is installed" in body


# ------------------------------------------------------------------ the update page


def test_the_update_page_shows_the_plan_in_order_before_confirming(
    personas: Personas, server: Release
) -> None:
    response = personas["operator"].get(
        reverse("node_update", args=["a-1"]), {"release": server.pk}
    )
    assert response.status_code == 200
    body = _text(response)
    positions = [body.index(f">{step}</li>") for step in STEPS]
    assert positions == sorted(positions)
    assert 'id="confirm-update"' in body
    assert not UpdateJob.objects.exists()  # looking starts nothing


def test_confirming_starts_the_job_with_its_plan(personas: Personas, server: Release) -> None:
    response = personas["operator"].post(
        reverse("node_update", args=["a-1"]), {"release": server.pk}
    )
    assert response.status_code == 302
    job = UpdateJob.objects.get()
    assert [step.label for step in job.plan_steps] == STEPS
    assert job.release == server


def test_the_update_page_explains_a_plan_that_cannot_be_made(
    personas: Personas, server: Release
) -> None:
    Release.objects.filter(product="themis-query").update(state=Release.State.DEPRECATED)
    body = _text(
        personas["operator"].get(reverse("node_update", args=["a-1"]), {"release": server.pk})
    )
    assert 'id="plan-failure"' in body and "themis-query" in body
    assert 'id="confirm-update"' not in body


def test_a_refused_plan_on_confirm_is_a_409_with_the_reason_and_no_job(
    personas: Personas, server: Release
) -> None:
    Release.objects.filter(product="themis-query").update(state=Release.State.DEPRECATED)
    response = personas["operator"].post(
        reverse("node_update", args=["a-1"]), {"release": server.pk}
    )
    assert response.status_code == 409
    body = _text(response)
    assert "no update plan takes a-1 to themisdb 1.5.0" in body and "themis-query" in body
    assert not UpdateJob.objects.exists()


@pytest.mark.parametrize(
    ("persona", "status"), [("responder", 403), ("admin_a", 403), ("anonymous", 302)]
)
def test_only_operators_see_the_update_page(
    personas: Personas, server: Release, persona: str, status: int
) -> None:
    response = personas[persona].get(reverse("node_update", args=["a-1"]), {"release": server.pk})
    assert response.status_code == status
    assert "themis-query" not in _text(response)


@pytest.mark.parametrize("release", ["", "x", "99999", "1e3", "-1"])
def test_a_bad_release_on_the_update_page_is_a_404(personas: Personas, release: str) -> None:
    response = personas["operator"].get(reverse("node_update", args=["a-1"]), {"release": release})
    assert response.status_code == 404


# ------------------------------------------------------------------ a job's steps


def test_the_node_page_shows_which_step_of_a_job_failed(
    personas: Personas, server: Release
) -> None:
    job = jobs.job_start_update(node=Node.objects.get(node_id="a-1"), release=server, user=None)
    jobs.job_finish(
        job_id=job.pk,
        node_id="a-1",
        ok=False,
        error_code="APPLY_FAILED_ROLLED_BACK",
        error_message="step 2 of 3 (themis-storage 1.4.2): disk full",
        result={
            "plan": [
                {"product": "themis-query", "version": "1.4.5", "state": "rolled_back"},
                {"product": "themis-storage", "version": "1.4.2", "state": "failed"},
                {"product": "themisdb", "version": "1.5.0", "state": "not_started"},
            ],
            "failed_step": 2,
        },
    )
    body = _text(personas["operator"].get(reverse("node_detail", args=["a-1"])))
    assert "step 2 of 3 (themis-storage 1.4.2): disk full" in body
    assert (
        '<li data-step="2" data-state="failed" class="step-failed">themis-storage 1.3.0 → 1.4.2'
        in body
    )
    assert "failed: step 2 of 3" in body
    assert '<li data-step="1" data-state="rolled_back">themis-query (new) 1.4.5' in body
    assert body.count("failed: step") == 1


def test_a_report_naming_other_steps_marks_none(personas: Personas, server: Release) -> None:
    job = jobs.job_start_update(node=Node.objects.get(node_id="a-1"), release=server, user=None)
    hostile = {"plan": [{"product": "<script>", "state": "<b>x</b>"}, "junk"], "failed_step": 9}
    jobs.job_finish(job_id=job.pk, node_id="a-1", ok=False, error_code="X", result=hostile)
    response = personas["operator"].get(reverse("node_detail", args=["a-1"]))
    body = _text(response)
    assert response.status_code == 200
    assert "<script>" not in body and "failed: step" not in body
    assert body.count('data-state=""') == 3


# ------------------------------------------------------------------ the rollout preview


@pytest.fixture
def mixed_cluster(fleet: Fleet, server: Release) -> list[Node]:
    """Five nodes: three like a-1 (need all three steps), one already on storage 1.4.2 and
    query 1.4.5 (needs themisdb only), one whose storage no release can replace."""
    cluster = make_cluster(tenant=fleet.tenant_b, name="mixed")
    nodes = [make_node(node_id=f"mx-{i}", tenant=fleet.tenant_b, cluster=cluster) for i in range(5)]
    for node in nodes[:3]:
        _components(node, themisdb="1.4.0", themis_storage="1.3.0")
    _components(nodes[3], themisdb="1.4.0", themis_storage="1.4.2", themis_query="1.4.5")
    _components(nodes[4], themisdb="1.4.0", themis_storage="2.0.0")
    return nodes


def _rollout_form(release: Release, cluster: int, **extra: str) -> dict[str, Any]:
    return {
        "release": release.pk,
        "strategy": "rolling",
        "cluster": cluster,
        "stages": "100",
        "max_error_rate": "5",
        "max_p99_ms": "500",
        "max_unavailable": "1",
        "health_timeout": "30",
        **extra,
    }


def test_the_rollout_preview_groups_identical_plans(
    personas: Personas, server: Release, mixed_cluster: list[Node]
) -> None:
    cluster = mixed_cluster[0].cluster_id
    assert cluster is not None
    response = personas["operator"].post(
        reverse("rollout_new"), _rollout_form(server, cluster, preview="1")
    )
    assert response.status_code == 200
    body = _text(response)
    table = body[body.index('id="component-plans"') :]
    assert "3 nodes: mx-0, mx-1, mx-2" in table
    assert "1 node: mx-3" in table and "<li>themisdb 1.4.0 → 1.5.0</li>" in table
    assert "1 node: mx-4" in table and "No update plan: " in table
    assert table.count('data-plan-group="') == 3
    for step in STEPS:
        assert f"<li>{step}</li>" in table


def test_a_rollout_with_a_node_that_has_no_plan_is_refused(
    personas: Personas, server: Release, mixed_cluster: list[Node]
) -> None:
    cluster = mixed_cluster[0].cluster_id
    assert cluster is not None
    response = personas["operator"].post(
        reverse("rollout_new"), _rollout_form(server, cluster, start="1")
    )
    assert response.status_code == 400
    assert "no update plan to themisdb 1.5.0 for mx-4: " in _text(response)
    assert not Rollout.objects.exists()
    assert not UpdateJob.objects.exists()


# ------------------------------------------------------------------ the releases page


def test_the_releases_page_says_what_a_release_needs(personas: Personas, server: Release) -> None:
    broken = _release("themis-query", "9.0.0")
    Release.objects.filter(pk=broken.pk).update(manifest={"dependencies": 7})
    body = _text(personas["responder"].get(reverse("release_list")))
    assert (
        f'data-release-dependencies="{server.pk}">needs themis-storage &gt;=1.4,&lt;2,'
        " themis-query &gt;=1.4</small>"
    ) in body
    assert f'data-release-dependencies="{broken.pk}">needs (its dependencies cannot be read' in body
