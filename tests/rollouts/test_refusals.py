"""Rollout requests refused with their reason, before anything is written: blue/green
over more than one cluster or over a cluster without an active colour, a tenant
rollback to a version this dashboard does not publish, a retry with no failed node."""

from __future__ import annotations

import pytest

from tests.factories import make_cluster, make_node, make_release, make_tenant
from updates.models import Release, Rollout, RolloutNode
from updates.rollouts import services as rollouts
from updates.rollouts.plan import PlanError

pytestmark = pytest.mark.django_db


@pytest.fixture
def release(db: None) -> Release:
    return make_release(version="1.7.0", sha256="ab" * 32, artifact="releases/x.tar")


def test_blue_green_over_two_clusters_is_refused(release: Release) -> None:
    tenant = make_tenant()
    nodes = [
        make_node(
            tenant=tenant,
            cluster=make_cluster(tenant=tenant, active_color="blue"),
            installed_version="1.6.0",
            color="green",
        )
        for _ in range(2)
    ]
    with pytest.raises(PlanError, match=r"^blue/green targets exactly one cluster$"):
        rollouts.rollout_create(release=release, strategy="blue_green", nodes=nodes, user=None)
    assert not Rollout.objects.exists()


def test_blue_green_over_a_cluster_serving_no_colour_is_refused(release: Release) -> None:
    tenant = make_tenant()
    cluster = make_cluster(tenant=tenant, active_color="")
    nodes = [
        make_node(tenant=tenant, cluster=cluster, installed_version="1.6.0", color=color)
        for color in ("blue", "green")
    ]
    with pytest.raises(PlanError, match="the cluster has no active colour"):
        rollouts.rollout_preview(release=release, strategy="blue_green", nodes=nodes)
    assert not Rollout.objects.exists()


def test_a_tenant_rollback_from_a_version_not_published_here_is_refused(
    release: Release,
) -> None:
    tenant = make_tenant()
    points = [{"id": "p-1", "version": "1.5.0", "created": "2026-11-20T00:00:00Z"}]
    for _ in range(2):
        make_node(tenant=tenant, installed_version="1.6.3", restore_points=points)
    with pytest.raises(PlanError, match="the installed version is not a published release here"):
        rollouts.tenant_rollback_start(tenant=tenant, user=None)
    assert not Rollout.objects.exists()


def test_a_retry_without_failed_nodes_is_refused(release: Release) -> None:
    nodes = [make_node(installed_version="1.6.0") for _ in range(2)]
    rollout = rollouts.rollout_create(release=release, strategy="rolling", nodes=nodes, user=None)
    with pytest.raises(rollouts.RolloutError, match="no failed nodes to retry"):
        rollouts.rollout_retry_failed(rollout=rollout, user=None)
    rollout.refresh_from_db()
    assert rollout.state == Rollout.State.PLANNED
    assert set(RolloutNode.objects.values_list("state", flat=True)) == {"PENDING"}
