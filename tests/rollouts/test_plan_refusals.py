"""Rollouts of multi-component releases: a node whose update plan can no longer be made (a
release it needs was deprecated after the rollout started) fails its turn with the reason
in the audit log, no job is left half made, and the rollout's failure policy applies; a
release of another component is planned against that component's versions."""

from __future__ import annotations

import pytest
from django.utils import timezone

from tests.factories import make_cluster, make_node, make_release, make_tenant
from tests.fakes import NullTransport
from updates.jobs import services as jobs
from updates.models import (
    Event,
    NodeComponent,
    Release,
    Rollout,
    RolloutNode,
    StageDecision,
    UpdateJob,
)
from updates.rollouts import coordinator
from updates.rollouts import services as rollouts

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def _no_agents(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(jobs, "default_transport", NullTransport)


def _rollout(rollback_on_failure: bool) -> tuple[Rollout, Release]:
    storage = make_release(product="themis-storage", version="1.4.2", sha256="ab" * 32)
    server = make_release(
        product="themisdb",
        version="1.7.0",
        sha256="cd" * 32,
        manifest={"dependencies": [{"product": "themis-storage", "constraint": ">=1.4"}]},
    )
    tenant = make_tenant()
    cluster = make_cluster(tenant=tenant)
    nodes = [
        make_node(node_id=f"n{i}", tenant=tenant, cluster=cluster, installed_version="1.6.0")
        for i in range(2)
    ]
    rollout = rollouts.rollout_create(
        release=server,
        strategy="rolling",
        nodes=nodes,
        user=None,
        options={"rollback_on_failure": rollback_on_failure},
    )
    rollouts.rollout_start(rollout=rollout, user=None)
    # Between the start and the node's turn, the storage release it needs is withdrawn.
    Release.objects.filter(pk=storage.pk).update(state=Release.State.DEPRECATED)
    return rollout, server


def test_a_node_without_a_plan_fails_its_turn_with_the_reason() -> None:
    rollout, _ = _rollout(rollback_on_failure=False)
    coordinator.rollout_drive(rollout.pk)
    rows = list(RolloutNode.objects.filter(rollout=rollout).order_by("position"))
    assert [row.state for row in rows] == [RolloutNode.State.FAILED] * 2
    assert not UpdateJob.objects.exists()
    refused = Event.objects.filter(verb="rollout.node_plan_refused").order_by("pk")
    assert [e.details["node_id"] for e in refused] == ["n0", "n1"]
    assert "themis-storage" in refused[0].details["reason"]
    decisions = StageDecision.objects.filter(rollout=rollout, decision="node_plan_refused")
    assert [d.details["node_id"] for d in decisions.order_by("pk")] == ["n0", "n1"]
    assert decisions[0].details["reason"] == refused[0].details["reason"]
    assert {d.decided_by_label for d in decisions} == {"coordinator"}


def test_with_rollback_on_failure_the_rollout_stops_at_the_first_such_node() -> None:
    rollout, _ = _rollout(rollback_on_failure=True)
    coordinator.rollout_drive(rollout.pk)
    rollout.refresh_from_db()
    assert rollout.state == Rollout.State.FAILED
    assert rollout.error_message.startswith("node n0 has no update plan: ")
    assert "themis-storage" in rollout.error_message
    states = list(RolloutNode.objects.filter(rollout=rollout).values_list("state", flat=True))
    assert states == [RolloutNode.State.FAILED, RolloutNode.State.SKIPPED]
    assert not UpdateJob.objects.exists()


def test_a_rollout_of_another_component_plans_against_its_versions() -> None:
    storage = make_release(product="themis-storage", version="1.4.2", sha256="ab" * 32)
    tenant = make_tenant()
    cluster = make_cluster(tenant=tenant)
    # The server is 1.0.0 everywhere: against it, 1.4.2 would look like a version skew.
    nodes = [
        make_node(node_id=f"s{i}", tenant=tenant, cluster=cluster, installed_version="1.0.0")
        for i in range(3)
    ]
    for node, version in zip(nodes, ["1.3.0", "1.4.0", "1.4.2"], strict=True):
        NodeComponent.objects.record(
            node_id=node.pk, versions={"themis-storage": version}, now=timezone.now(), replace=True
        )
    rollout = rollouts.rollout_create(release=storage, strategy="rolling", nodes=nodes, user=None)
    rows = RolloutNode.objects.filter(rollout=rollout).order_by("position")
    # s2 already runs 1.4.2: not part of the rollout.
    assert [(r.node.node_id, r.version_before) for r in rows] == [("s0", "1.3.0"), ("s1", "1.4.0")]
