"""Per-tenant rollback: every node of one tenant back to its previous release,
one node per cluster at a time, leaders last."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import pytest
from django.test import Client
from django.urls import reverse

from tests.conftest import Fleet
from tests.factories import make_cluster, make_node, make_release
from tests.fakes import NullTransport, answer_queued_jobs
from updates.jobs import services as jobs
from updates.models import Node, Rollout, RolloutNode, UpdateJob
from updates.rollouts import coordinator
from updates.rollouts import services as rollouts
from updates.rollouts.coordinator import DriveContext, DriveStep

pytestmark = pytest.mark.django_db

CaptureOnCommit = Callable[..., AbstractContextManager[list[Callable[[], Any]]]]


def _points(version_before: str) -> list[dict[str, str | None]]:
    return [
        {"id": "p-empty", "version": None, "created": "2026-11-01T00:00:00Z"},
        {"id": f"p-{version_before}", "version": version_before, "created": "2026-11-20T00:00:00Z"},
    ]


@pytest.fixture
def tenant_on_17(fleet: Fleet) -> list[Node]:
    make_release(version="1.7.0")
    cluster = make_cluster(tenant=fleet.tenant_a, name="a-db")
    nodes = [
        make_node(
            node_id=f"adb-{i}",
            tenant=fleet.tenant_a,
            cluster=cluster,
            installed_version="1.7.0",
            raft_role="leader" if i == 0 else "follower",
            restore_points=_points("1.6.0"),
        )
        for i in range(3)
    ]
    Node.objects.filter(tenant=fleet.tenant_a, cluster__isnull=True).update(
        installed_version="1.7.0", restore_points=_points("1.6.0")
    )
    return nodes


def test_tenant_rollback_goes_back_leader_last(
    fleet: Fleet, tenant_on_17: list[Node], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(jobs, "default_transport", lambda: NullTransport())
    rollout = rollouts.tenant_rollback_start(tenant=fleet.tenant_a, user=None)
    order: list[str] = []
    for _ in range(20):
        coordinator.rollout_drive(rollout.pk)
        active = UpdateJob.objects.filter(state="QUEUED", node__cluster__name="a-db")
        assert active.count() <= 1  # one node of the cluster at a time
        order += list(active.values_list("node__node_id", flat=True))
        answer_queued_jobs()
    rollout.refresh_from_db()
    assert rollout.state == Rollout.State.COMPLETED
    assert order[-1] == "adb-0"  # the leader last
    tenant_a = Node.objects.filter(tenant=fleet.tenant_a).exclude(node_id="a-1")
    assert set(tenant_a.values_list("installed_version", flat=True)) == {"1.6.0"}
    # a-1 reports no earlier version: left as it is, not in the plan
    assert Node.objects.get(node_id="a-1").installed_version == "1.0.0"
    assert not rollout.plan.filter(node__node_id="a-1").exists()
    assert Node.objects.get(node_id="b-1").installed_version == "1.0.0"  # other tenant untouched
    assert set(UpdateJob.objects.values_list("kind", flat=True)) == {"rollback"}


def test_an_aborted_tenant_rollback_keeps_what_it_restored_and_ends_aborted(
    fleet: Fleet, tenant_on_17: list[Node], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(jobs, "default_transport", lambda: NullTransport())
    rollout = rollouts.tenant_rollback_start(tenant=fleet.tenant_a, user=None)
    coordinator.rollout_drive(rollout.pk)
    answer_queued_jobs()  # the first two nodes are back on 1.6.0
    rollouts.rollout_abort(rollout=rollout, user=None)
    for _ in range(5):
        coordinator.rollout_drive(rollout.pk)
        answer_queued_jobs()
    rollout.refresh_from_db()
    assert rollout.state == Rollout.State.ABORTED
    # Nothing is undone: a rollback rollout that stops keeps the versions it restored.
    assert set(UpdateJob.objects.values_list("kind", flat=True)) == {"rollback"}
    assert Node.objects.get(node_id="a-solo").installed_version == "1.6.0"
    assert Node.objects.get(node_id="adb-0").installed_version == "1.7.0"


def _rows(rollout: Rollout) -> dict[str, str]:
    return dict(rollout.plan.values_list("node__node_id", "state"))


class RecordingTransport(NullTransport):
    """Sends nothing; records the rollback commands it is given."""

    def __init__(self) -> None:
        self.rollbacks: list[tuple[str, str | None]] = []

    def rollback_node(self, node_id: str, job_id: str, point_id: str | None = None) -> None:
        self.rollbacks.append((node_id, point_id))


def test_tenant_rollback_jobs_belong_to_it_and_are_sent_through_the_drives_transport(
    fleet: Fleet,
    tenant_on_17: list[Node],
    monkeypatch: pytest.MonkeyPatch,
    django_capture_on_commit_callbacks: CaptureOnCommit,
) -> None:
    monkeypatch.setattr(jobs, "default_transport", lambda: NullTransport())
    rollout = rollouts.tenant_rollback_start(tenant=fleet.tenant_a, user=None)
    transport = RecordingTransport()
    with django_capture_on_commit_callbacks(execute=True):
        coordinator.rollout_drive(rollout.pk, ctx=DriveContext(transport=transport))
    # The standalone node and the cluster's first follower go first, each to its point.
    started = [("a-solo", "p-1.6.0"), ("adb-1", "p-1.6.0")]
    assert transport.rollbacks == started
    assert (
        list(
            UpdateJob.objects.filter(rollout=rollout)
            .order_by("pk")
            .values_list("node__node_id", "restore_point")
        )
        == started
    )
    assert set(UpdateJob.objects.values_list("kind", flat=True)) == {"rollback"}


def test_a_node_with_nothing_left_to_restore_does_not_hold_up_its_cluster(
    fleet: Fleet, tenant_on_17: list[Node], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(jobs, "default_transport", lambda: NullTransport())
    rollout = rollouts.tenant_rollback_start(tenant=fleet.tenant_a, user=None)
    # adb-1's agent pruned its points after the plan was made.
    Node.objects.filter(node_id="adb-1").update(restore_points=[])
    coordinator.rollout_drive(rollout.pk)
    # Passed over at once: the cluster's next follower starts in the same drive.
    assert _rows(rollout) == {
        "a-solo": "RUNNING",
        "adb-1": "SKIPPED",
        "adb-2": "RUNNING",
        "adb-0": "PENDING",
    }
    assert not UpdateJob.objects.filter(node__node_id="adb-1").exists()


def test_a_tenant_rollback_row_no_longer_pending_at_its_turn_is_left_as_it_is(
    fleet: Fleet, tenant_on_17: list[Node], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(jobs, "default_transport", lambda: NullTransport())
    rollout = rollouts.tenant_rollback_start(tenant=fleet.tenant_a, user=None)
    Node.objects.filter(node_id__in=["adb-1", "adb-2"]).update(restore_points=[])
    adb_2 = rollout.plan.get(node__node_id="adb-2")
    steps: list[str] = []

    def another_process_ends_adb_2(step: DriveStep) -> None:
        steps.append(step)
        if steps == [DriveStep.SYNC, DriveStep.START_NODE]:  # a-solo's start committed
            RolloutNode.objects.filter(pk=adb_2.pk).update(state=RolloutNode.State.DONE)

    coordinator.rollout_drive(rollout.pk, ctx=DriveContext(after_commit=another_process_ends_adb_2))
    assert _rows(rollout) == {
        "a-solo": "RUNNING",
        "adb-1": "SKIPPED",
        "adb-2": "DONE",  # not marked skipped over what the other process wrote
        "adb-0": "RUNNING",
    }


@pytest.mark.parametrize(
    ("persona", "status", "started"),
    [("operator", 302, True), ("responder", 403, False), ("admin_a", 403, False)],
)
def test_only_operators_start_a_tenant_rollback(
    personas: dict[str, Client],
    fleet: Fleet,
    tenant_on_17: list[Node],
    monkeypatch: pytest.MonkeyPatch,
    persona: str,
    status: int,
    started: bool,
) -> None:
    monkeypatch.setattr(jobs, "default_transport", lambda: NullTransport())
    response = personas[persona].post(reverse("tenant_rollback", args=[fleet.tenant_a.slug]))
    assert response.status_code == status
    assert Rollout.objects.filter(strategy="rollback").exists() is started


def test_operator_of_another_tenant_scope_gets_404(
    personas: dict[str, Client], fleet: Fleet
) -> None:
    # tenant admins are refused before the lookup; an unknown slug is a 404
    response = personas["operator"].post(reverse("tenant_rollback", args=["no-such-tenant"]))
    assert response.status_code == 404


def test_nothing_to_roll_back_is_explained(
    personas: dict[str, Client], fleet: Fleet, monkeypatch: pytest.MonkeyPatch
) -> None:
    response = personas["operator"].post(
        reverse("tenant_rollback", args=[fleet.tenant_b.slug]), follow=True
    )
    assert "no node of Tenant B has an earlier release" in response.content.decode()
    assert not Rollout.objects.exists()
