"""The relay signs every command with its node's key at send time: a fresh envelope
(nonce, expiry) at each send, every argument inside the signature, nothing signed for a
node whose key is revoked. The real CeleryNodeTransport's envelope path is recorded."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from django.utils import timezone
from pytest_django import Settings

from tests.conftest import Fleet
from tests.factories import make_release
from tests.security.signing import key_of
from updates.engine.commands import CommandType, verify_command
from updates.jobs import outbox
from updates.jobs import services as jobs
from updates.jobs.transport import HEALTH_REQUEST_SECONDS, CeleryNodeTransport
from updates.models import Node, NodeCommand, UpdateJob

pytestmark = pytest.mark.django_db

C = NodeCommand
# Expiries are compared to the second: the clock stands still at a whole second.
T0 = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)


class SigningRecorder:
    """Records what the real transport would put on each node's queue."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, str, dict[str, Any]]] = []

    def send_command(self, node_id: str, task: str, envelope: dict[str, Any]) -> None:
        self.sent.append((node_id, task, envelope))

    def update_node(self, node_id: str, job_id: str, **options: Any) -> None:
        raise AssertionError("an unsigned apply was sent")

    def rollback_node(self, node_id: str, job_id: str, point_id: str | None = None) -> None:
        raise AssertionError("an unsigned rollback was sent")

    def set_traffic_role(self, node_id: str, role: str) -> None:
        raise AssertionError("an unsigned traffic role was sent")

    def health_check(self, node_id: str) -> dict[str, Any]:
        return {}


@pytest.fixture
def ack(settings: Settings) -> Settings:
    settings.THEMIS_JOB_ACK_TIMEOUT = 90
    settings.THEMIS_JOB_MAX_SENDS = 5
    return settings


def _job(fleet: Fleet) -> UpdateJob:
    release = make_release(version="1.7.0", sha256="ab" * 32, artifact="releases/x.tar")
    return jobs.job_start_update(node=fleet.node_a, release=release, user=None)


@pytest.mark.time_machine(T0, tick=False)
def test_every_send_is_a_fresh_signed_envelope_over_all_arguments(
    fleet: Fleet, ack: Settings
) -> None:
    job = _job(fleet)
    command = C.objects.get(job=job)
    recorder = SigningRecorder()
    now = timezone.now()
    assert outbox.relay_command(command.pk, transport=recorder, now=now) == "sent"
    later = now + timedelta(seconds=91)
    assert outbox.relay_command(command.pk, transport=recorder, now=later) == "sent"
    (node_a, task, first), (_, _, second) = recorder.sent
    assert (node_a, task) == ("a-1", "agent.apply")
    key = key_of("a-1")
    signed = verify_command(key, first, node_id="a-1", command=CommandType.APPLY)
    assert signed.job_id == str(job.pk)
    assert signed.args["sha256"] == "ab" * 32 and signed.args["version"] == "1.7.0"
    assert signed.args["download_token"] and "allow_downgrade" not in signed.args
    assert signed.expires == T0.timestamp() + 180  # twice the ack timeout
    assert first["nonce"] != second["nonce"]
    assert second["expires"] > first["expires"]
    with pytest.raises(Exception, match="signature"):
        verify_command(key_of("b-1"), first, node_id="a-1", command=CommandType.APPLY)


def test_an_operator_asked_downgrade_travels_inside_the_signature(fleet: Fleet) -> None:
    job = _job(fleet)
    C.objects.filter(job=job).update(args={"options": {"allow_downgrade": True}})
    recorder = SigningRecorder()
    outbox.relay_command(C.objects.get(job=job).pk, transport=recorder)
    envelope = recorder.sent[0][2]
    signed = verify_command(key_of("a-1"), envelope, node_id="a-1", command=CommandType.APPLY)
    assert signed.args["allow_downgrade"] is True


@pytest.mark.time_machine(T0, tick=False)
def test_rollback_and_traffic_role_are_signed_for_their_task(fleet: Fleet) -> None:
    command = outbox.command_traffic_role(fleet.node_a, "standby")
    recorder = SigningRecorder()
    outbox.relay_command(command.pk, transport=recorder)
    node_id, task, envelope = recorder.sent[0]
    assert task == "agent.set_traffic_role"
    signed = verify_command(
        key_of("a-1"), envelope, node_id="a-1", command=CommandType.TRAFFIC_ROLE
    )
    assert signed.args == {"role": "standby"} and signed.job_id is None
    # Twice the default ack timeout (30 s), which is also the shortest lifetime.
    assert envelope["expires"] == T0.timestamp() + outbox.MIN_COMMAND_LIFETIME_SECONDS


def test_nothing_is_signed_for_a_revoked_node(fleet: Fleet) -> None:
    job = _job(fleet)
    Node.objects.filter(pk=fleet.node_a.pk).update(agent_key_revoked=True)
    recorder = SigningRecorder()
    outcome = outbox.relay_command(C.objects.get(job=job).pk, transport=recorder)
    assert outcome == "abandoned" and recorder.sent == []
    assert C.objects.get(job=job).state == C.State.ABANDONED
    assert UpdateJob.objects.get(pk=job.pk).state == UpdateJob.State.LOST


@pytest.mark.time_machine(T0, tick=False)
def test_a_health_request_is_signed_for_its_node_and_never_for_a_revoked_one(
    fleet: Fleet, monkeypatch: pytest.MonkeyPatch
) -> None:
    sent: list[tuple[str, str, dict[str, Any]]] = []
    transport = CeleryNodeTransport()
    monkeypatch.setattr(
        transport, "send_command", lambda node, task, envelope: sent.append((node, task, envelope))
    )
    assert transport.health_check("a-1") == {"requested": True}
    ((node_id, task, envelope),) = sent
    assert (node_id, task) == ("a-1", "agent.heartbeat_now")
    command = verify_command(key_of("a-1"), envelope, node_id="a-1", command=CommandType.HEARTBEAT)
    assert command.args == {}
    assert command.expires == T0.timestamp() + HEALTH_REQUEST_SECONDS
    Node.objects.filter(node_id="a-1").update(agent_key_revoked=True)
    assert transport.health_check("a-1")["requested"] is False
    assert transport.health_check("no-such-node")["requested"] is False
    assert len(sent) == 1
