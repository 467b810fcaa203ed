"""The blue/green traffic switch with its default hook: every node of the cluster is told
its role through the jobs outbox (one command per node, written with the switch and sent
once it commits), and the cluster's active colour is set."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import pytest

from tests.factories import make_cluster, make_node, make_tenant, make_user
from updates.jobs import outbox
from updates.models import Cluster, Event, Node, NodeCommand
from updates.rollouts import bluegreen

pytestmark = pytest.mark.django_db

C = NodeCommand
CaptureOnCommit = Callable[..., AbstractContextManager[list[Callable[[], Any]]]]


class RoleRecorder:
    """A node transport that records the traffic roles it is asked to send."""

    def __init__(self, *, fail: bool = False) -> None:
        self.sent: list[tuple[str, str]] = []
        self.fail = fail

    def set_traffic_role(self, node_id: str, role: str) -> None:
        if self.fail:
            raise ConnectionError("broker unreachable")
        self.sent.append((node_id, role))


def _cluster() -> tuple[Cluster, dict[str, Node]]:
    cluster = make_cluster(tenant=make_tenant(), active_color="blue")
    nodes = {
        node_id: make_node(node_id=node_id, tenant=cluster.tenant, cluster=cluster, color=color)
        for node_id, color in (("b1", "blue"), ("b2", "blue"), ("g1", "green"))
    }
    return cluster, nodes


def test_the_default_switch_tells_every_node_its_role_after_the_switch_commits(
    monkeypatch: pytest.MonkeyPatch, django_capture_on_commit_callbacks: CaptureOnCommit
) -> None:
    cluster, nodes = _cluster()
    # An older role command for g1 still open: re-sending it later would undo this switch.
    stale = outbox.command_traffic_role(nodes["g1"], "standby")
    recorder = RoleRecorder()
    monkeypatch.setattr(outbox, "default_transport", lambda: recorder)
    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        new = bluegreen.blue_green_switch(
            rollout=None, switch=None, user=make_user(username="olivia"), cluster=cluster
        )
        assert recorder.sent == []  # nothing is sent before the switch commits
    for callback in callbacks:
        callback()
    assert new == "green"
    assert sorted(recorder.sent) == [("b1", "standby"), ("b2", "standby"), ("g1", "active")]
    commands = C.objects.filter(kind=C.Kind.TRAFFIC_ROLE).exclude(pk=stale.pk)
    assert sorted((c.node.node_id, c.args["role"], c.state) for c in commands) == [
        ("b1", "standby", C.State.SENT),
        ("b2", "standby", C.State.SENT),
        ("g1", "active", C.State.SENT),
    ]
    stale.refresh_from_db()
    assert stale.state == C.State.ABANDONED
    assert stale.last_error == "superseded by a newer traffic role"
    assert Cluster.objects.get(pk=cluster.pk).active_color == "green"
    event = Event.objects.get(verb="bluegreen.switched")
    assert event.details == {"from": "blue", "to": "green", "rollout_id": None}


def test_a_role_command_the_broker_refuses_stays_open_for_the_relay(
    monkeypatch: pytest.MonkeyPatch, django_capture_on_commit_callbacks: CaptureOnCommit
) -> None:
    cluster, _ = _cluster()
    monkeypatch.setattr(outbox, "default_transport", lambda: RoleRecorder(fail=True))
    with django_capture_on_commit_callbacks(execute=True):
        new = bluegreen.blue_green_switch(rollout=None, switch=None, user=None, cluster=cluster)
    # The switch stands; the beat relay sends the roles once the broker is back.
    assert new == "green" and Cluster.objects.get(pk=cluster.pk).active_color == "green"
    commands = C.objects.filter(kind=C.Kind.TRAFFIC_ROLE)
    assert commands.count() == 3
    assert all(c.state in C.OPEN_STATES and c.attempts == 0 for c in commands)
    assert all("broker unreachable" in c.last_error for c in commands)


def test_switching_to_the_active_colour_resends_the_roles_and_logs_no_switch(
    monkeypatch: pytest.MonkeyPatch, django_capture_on_commit_callbacks: CaptureOnCommit
) -> None:
    cluster, _ = _cluster()
    recorder = RoleRecorder()
    monkeypatch.setattr(outbox, "default_transport", lambda: recorder)
    with django_capture_on_commit_callbacks(execute=True):
        new = bluegreen.blue_green_switch(
            rollout=None, switch=None, user=None, cluster=cluster, to_color="blue"
        )
    assert new == "blue"
    assert sorted(recorder.sent) == [("b1", "active"), ("b2", "active"), ("g1", "standby")]
    assert not Event.objects.filter(verb="bluegreen.switched").exists()
