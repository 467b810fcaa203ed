"""Heartbeats acknowledge traffic-role commands and keep the job in hand alive; the
blue/green switch reaches nodes only through the outbox."""

from __future__ import annotations

from datetime import datetime, timedelta

import pytest
from django.utils import timezone
from pytest_django import DjangoCaptureOnCommitCallbacks

from tests.conftest import Fleet
from tests.factories import make_node, make_release
from tests.jobs.test_outbox import RecordingTransport
from updates.fleet.services import Heartbeat, node_record_heartbeat
from updates.fleet.validation import ReportFieldInvalid
from updates.jobs import outbox
from updates.jobs import services as jobs
from updates.models import Event, Node, NodeCommand, UpdateJob
from updates.rollouts.bluegreen import default_switch

pytestmark = pytest.mark.django_db

C = NodeCommand
T0 = datetime(2030, 1, 1, 12, 0, tzinfo=timezone.get_fixed_timezone(0))


def _beat(node_id: str, **payload: object) -> Node | None:
    return node_record_heartbeat(
        heartbeat=Heartbeat.from_payload({"node_id": node_id, **payload}), now=T0
    )


def test_blue_green_switch_writes_role_commands_and_heartbeat_acks_them(
    fleet: Fleet,
    monkeypatch: pytest.MonkeyPatch,
    django_capture_on_commit_callbacks: DjangoCaptureOnCommitCallbacks,
) -> None:
    transport = RecordingTransport()
    monkeypatch.setattr(outbox, "default_transport", lambda: transport)
    Node.objects.filter(pk=fleet.node_a.pk).update(color="blue")
    make_node(node_id="a-2", tenant=fleet.tenant_a, cluster=fleet.cluster_a, color="green")
    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        default_switch(fleet.cluster_a, "green", None)
        assert transport.sent == []  # nothing leaves before the switch commits
    roles = dict(C.objects.filter(kind=C.Kind.TRAFFIC_ROLE).values_list("node__node_id", "args"))
    assert roles == {"a-1": {"role": "standby"}, "a-2": {"role": "active"}}
    for callback in callbacks:
        callback()
    assert sorted(transport.sent) == [
        ("traffic_role", "a-1", "", "standby"),
        ("traffic_role", "a-2", "", "active"),
    ]
    # a heartbeat showing another role acknowledges nothing; the asked-for role does
    _beat("a-2", traffic_role="standby")
    assert C.objects.get(node__node_id="a-2").state == C.State.SENT
    node = _beat("a-2", traffic_role="active")
    assert node is not None and node.traffic_role == "active"
    assert C.objects.get(node__node_id="a-2").state == C.State.ACKED
    assert C.objects.get(node__node_id="a-1").state == C.State.SENT
    # unacknowledged: re-sent after the ack timeout
    later = timezone.now() + timedelta(seconds=3600)
    assert outbox.relay_due(transport=transport, now=later).sent == 1
    assert transport.sent[-1] == ("traffic_role", "a-1", "", "standby")


def test_a_newer_role_supersedes_an_open_one(fleet: Fleet) -> None:
    first = outbox.command_traffic_role(fleet.node_a, "active")
    second = outbox.command_traffic_role(fleet.node_a, "standby")
    first.refresh_from_db()
    assert first.state == C.State.ABANDONED
    assert C.objects.get(pk=second.pk).state == C.State.PENDING


def test_role_command_out_of_sends_is_abandoned_and_logged(fleet: Fleet) -> None:
    transport = RecordingTransport()
    command = outbox.command_traffic_role(fleet.node_a, "active")
    C.objects.filter(pk=command.pk).update(attempts=100, next_attempt_at=T0)
    assert outbox.relay_command(command.pk, transport=transport, now=T0) == (
        outbox.RelayOutcome.ABANDONED
    )
    command.refresh_from_db()
    assert command.state == C.State.ABANDONED and transport.sent == []
    assert Event.objects.filter(verb="command.abandoned").count() == 1


@pytest.mark.parametrize(
    "bad",
    [{"traffic_role": "everything"}, {"active_job_id": "1; drop"}, {"active_job_id": True}],
)
def test_heartbeat_with_a_bad_traffic_role_or_job_id_is_refused(
    fleet: Fleet, bad: dict[str, object]
) -> None:
    with pytest.raises(ReportFieldInvalid):
        Heartbeat.from_payload({"node_id": "a-1", **bad})


def test_heartbeat_reads_traffic_role_and_job_id(fleet: Fleet) -> None:
    hb = Heartbeat.from_payload({"node_id": "a-1", "traffic_role": "standby", "active_job_id": 7})
    assert (hb.traffic_role, hb.active_job_id) == ("standby", 7)
    assert Heartbeat.from_payload({"node_id": "a-1", "active_job_id": "7"}).active_job_id == 7


def test_heartbeat_naming_a_job_refreshes_only_that_nodes_active_job(fleet: Fleet) -> None:
    release = make_release(version="1.7.0", sha256="ab" * 32, artifact="releases/x.tar")
    transport = RecordingTransport()
    job = jobs.job_start_update(node=fleet.node_a, release=release, user=None, transport=transport)
    _beat("b-1", active_job_id=str(job.pk))  # another node cannot keep it alive
    assert UpdateJob.objects.get(pk=job.pk).last_report_at is None
    _beat("a-1", active_job_id=str(job.pk))
    job.refresh_from_db()
    assert job.last_report_at == T0
    # liveness only: the heartbeat does not acknowledge the command
    assert job.acked_at is None
    assert C.objects.get(job=job).state == C.State.PENDING
