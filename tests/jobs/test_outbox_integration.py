"""The outbox end to end: real Redis, a real coordinator with beat, a real node agent.
The first send of a job is lost (the node's queue is purged before any agent runs);
the relay's re-send reaches the agent, which then completes the job."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis
from django.db import connection
from pytest_django import Settings
from pytest_django.live_server_helper import LiveServer

from tests import procs
from tests.conftest import Fleet
from tests.helpers import MakeBundle, publish_bundle
from updates.engine.devpki import Pki
from updates.jobs import services as jobs
from updates.jobs.transport import CeleryNodeTransport
from updates.models import Node, NodeCommand, UpdateJob

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]

ACK_TIMEOUT = 3


def test_lost_first_send_is_resent_by_the_relay_and_the_agent_completes_the_job(
    tmp_path: Path,
    fleet: Fleet,
    trusted: Pki,
    redis_url: str,
    live_server: LiveServer,
    settings: Settings,
    make_bundle: MakeBundle,
) -> None:
    settings.THEMIS_PUBLIC_URL = live_server.url
    settings.THEMIS_JOB_ACK_TIMEOUT = ACK_TIMEOUT
    settings.THEMIS_JOB_MAX_SENDS = 20
    broker = redis.Redis.from_url(redis_url)
    release = publish_bundle(make_bundle("1.7.0", files={"bin/themisd": b"v1.7"}), "1.7.0")

    job = jobs.job_start_update(
        node=Node.objects.get(node_id="a-1"),
        release=release,
        user=None,
        transport=CeleryNodeTransport(),
    )
    # The first send went out on commit; the broker loses it before any agent reads it.
    assert broker.llen("node.a-1") == 1
    assert broker.delete("node.a-1") == 1
    command = NodeCommand.objects.get(job=job)
    assert (command.state, command.attempts) == (NodeCommand.State.SENT, 1)

    env = procs.dashboard_env(
        redis_url,
        connection.settings_dict["NAME"],
        THEMIS_VAR_DIR=str(tmp_path),
        THEMIS_PUBLIC_URL=live_server.url,
        THEMIS_JOB_ACK_TIMEOUT=str(ACK_TIMEOUT),
        THEMIS_JOB_MAX_SENDS="20",
        THEMIS_COMMAND_RELAY_SECONDS="1",
    )
    coordinator = procs.coordinator(env, tmp_path, beat=True)
    node_dir = tmp_path / "a-1"
    agent = procs.agent(
        "a-1",
        procs.agent_env(
            redis_url,
            "a-1",
            node_dir,
            THEMIS_HEARTBEAT_SECONDS="0.5",
            THEMIS_TRUST_ANCHOR=str(trusted.root),
        ),
        tmp_path,
    )
    try:
        done = procs.wait_until(
            lambda: UpdateJob.objects.get(pk=job.pk).state in UpdateJob.FINAL_STATES, 90
        )
        job.refresh_from_db()
        logs = coordinator.output()[-3000:] + agent.output()[-3000:]
        assert done, f"job stuck in {job.state}\n{logs}"
        assert job.state == UpdateJob.State.DONE, (job.error_code, job.error_message, logs)
    finally:
        procs.stop_all([agent, coordinator])
    assert (node_dir / "install" / "bin/themisd").read_bytes() == b"v1.7"
    assert Node.objects.get(node_id="a-1").installed_version == "1.7.0"
    command.refresh_from_db()
    # re-sent by the beat relay, then acknowledged by the agent's reports
    assert command.attempts >= 2, command.attempts
    assert command.state == NodeCommand.State.ACKED and command.acked_at is not None
    assert job.acked_at is not None and job.last_report_at is not None
