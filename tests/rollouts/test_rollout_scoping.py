"""A rollout spanning several tenants: a tenant admin sees their own tenants' nodes, and the
others only as a count per state (page and HTMX partial alike)."""

from __future__ import annotations

import pytest
from django.test import Client
from django.urls import reverse

from tests.conftest import Fleet
from tests.factories import make_release
from updates.models import Node, Rollout, RolloutNode, StageDecision, UpdateJob

SECRET_REASON = "waiting for the window of tenant B"


@pytest.fixture
def shared(fleet: Fleet) -> Rollout:
    release = make_release(version="1.7.0")
    rollout = Rollout.objects.create(
        release=release, strategy=Rollout.Strategy.CANARY, state=Rollout.State.RUNNING
    )
    Node.objects.filter(pk=fleet.node_b.pk).update(error_rate=0.42, p99_latency_ms=4242.0)
    job_b = UpdateJob.objects.create(
        node=fleet.node_b,
        release=release,
        rollout=rollout,
        state=UpdateJob.State.WAITING_FOR_WINDOW,
        wait_reason=SECRET_REASON,
    )
    RolloutNode.objects.create(
        rollout=rollout, node=fleet.node_a, position=0, state=RolloutNode.State.DONE
    )
    RolloutNode.objects.create(
        rollout=rollout,
        node=fleet.node_b,
        position=1,
        state=RolloutNode.State.WAITING,
        job=job_b,
        version_before="1.6.9-b-only",
    )
    StageDecision.objects.create(
        rollout=rollout, stage=0, decision="gate_failed", details={"nodes": ["b-1"]}
    )
    return rollout


@pytest.mark.parametrize("partial", [False, True])
def test_tenant_admin_sees_own_nodes_and_an_aggregate_for_the_rest(
    personas: dict[str, Client], shared: Rollout, partial: bool
) -> None:
    url = reverse("rollout_detail", args=[shared.pk])
    headers = {"HX-Request": "true"} if partial else {}
    page = personas["admin_a"].get(url, headers=headers)
    assert page.status_code == 200
    html = page.content.decode()
    assert 'data-node="a-1"' in html
    for leaked in ("b-1", SECRET_REASON, "1.6.9-b-only", "4242", "0.42"):
        assert leaked not in html, leaked
    assert "1 node of other tenants" in html and "1 waiting" in html


def test_operator_sees_every_node_and_decision_details(
    personas: dict[str, Client], shared: Rollout
) -> None:
    html = personas["operator"].get(reverse("rollout_detail", args=[shared.pk])).content.decode()
    assert 'data-node="a-1"' in html and 'data-node="b-1"' in html
    assert SECRET_REASON in html
    assert "other tenants" not in html
