"""End to end with real processes: a private redis-server, a real Celery
coordinator on the `dashboard` queue, and real HTTP receivers on 127.0.0.1.

The node agent is played by the test: it sends the same `job_progress` /
`job_finished` tasks an agent sends, so the coordinator runs the real job
state machine, logs the real Events, and routes and delivers notifications
exactly as in production."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from django.db import connection
from pytest_django import Settings

from tests import procs
from tests.conftest import Fleet
from tests.factories import make_release
from tests.fakes import NullTransport
from tests.notifications.conftest import SIGNING_SECRET, MakeChannel, Receiver, StartReceiver
from updates.audit import event_log
from updates.engine.reports import ReportType, sign_report
from updates.fleet.node_keys import node_key
from updates.jobs import services as jobs
from updates.models import Node, Release, UpdateJob
from updates.notifications.channels import SIGNATURE_HEADER, TIMESTAMP_HEADER, verify
from updates.notifications.models import Delivery

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]

MAX_ATTEMPTS = 4
BACKOFF_BASE_MS = 400


@pytest.fixture
def pagerduty(receivers: StartReceiver, notify_settings: Settings) -> Receiver:
    """PagerDuty's stand-in, started before the coordinator so it knows the URL."""
    receiver = receivers()
    notify_settings.THEMIS_PAGERDUTY_EVENTS_URL = receiver.url + "/v2/enqueue"
    return receiver


@pytest.fixture
def coordinator(
    tmp_path: Path, redis_url: str, notify_settings: Settings, pagerduty: Receiver
) -> Iterator[procs.Proc]:
    env = procs.dashboard_env(
        redis_url,
        connection.settings_dict["NAME"],
        THEMIS_VAR_DIR=str(tmp_path),
        THEMIS_NOTIFY_MAX_ATTEMPTS=str(MAX_ATTEMPTS),
        THEMIS_NOTIFY_BACKOFF_BASE_MS=str(BACKOFF_BASE_MS),
        THEMIS_NOTIFY_BACKOFF_MAX_MS="5000",
        THEMIS_NOTIFY_TIMEOUT_SECONDS="2",
        THEMIS_NOTIFY_BATCH_WINDOW_MS="500",
        THEMIS_DASHBOARD_URL="https://themis.example.test",
        THEMIS_NOTIFY_ALLOW_HTTP="1",
        THEMIS_NOTIFY_EGRESS_ALLOW="127.0.0.1",
        THEMIS_PAGERDUTY_EVENTS_URL=notify_settings.THEMIS_PAGERDUTY_EVENTS_URL,
    )
    proc = procs.coordinator(env, tmp_path, beat=False)
    yield proc
    proc.kill()


def _final(delivery_pk: int, timeout: float = 40) -> Delivery:
    procs.wait_until(
        lambda: Delivery.objects.get(pk=delivery_pk).status in ("sent", "gave_up"), timeout
    )
    return Delivery.objects.get(pk=delivery_pk)


def test_worker_retries_with_backoff_honours_retry_after_and_gives_up(
    make_channel: MakeChannel, receivers: StartReceiver, coordinator: procs.Proc
) -> None:
    broken, limited, healthy = receivers(), receivers(), receivers()
    broken.default = (500, {}, b"down for maintenance")
    limited.answer((429, {"Retry-After": "2"}, b"rate_limited"))
    make_channel("slack", broken.url, name="broken")
    make_channel("slack", limited.url, name="limited")
    make_channel("webhook", healthy.url, name="healthy")

    event_log(
        verb="rollout.failed", details={"rollout_id": 5, "stage": 1, "release_version": "2.0"}
    )

    by_name = {d.channel.name: d for d in Delivery.objects.select_related("channel")}
    gave_up, sent_late, sent = (_final(by_name[n].pk) for n in ("broken", "limited", "healthy"))
    logs = coordinator.output()[-3000:]
    assert (gave_up.status, gave_up.attempts) == ("gave_up", MAX_ATTEMPTS), logs
    assert "Slack: HTTP 500 Internal Server Error" in gave_up.last_error
    assert "maintenance" not in gave_up.last_error  # the receiver's body is not echoed
    assert f"gave up after {MAX_ATTEMPTS} attempt(s)" in gave_up.last_error
    assert len(broken.requests) == MAX_ATTEMPTS
    gaps = [b.at - a.at for a, b in zip(broken.requests, broken.requests[1:], strict=False)]
    # Equal jitter: attempt n waits between half and all of base * 2**(n-1).
    for n, gap in enumerate(gaps, start=1):
        assert gap >= BACKOFF_BASE_MS / 1000 * 2 ** (n - 1) / 2 - 0.05, gaps

    assert (sent_late.status, sent_late.attempts) == ("sent", 2), logs
    assert limited.requests[1].at - limited.requests[0].at >= 1.95  # Retry-After: 2

    assert (sent.status, sent.attempts) == ("sent", 1)
    hook = healthy.requests[0]
    assert verify(
        SIGNING_SECRET, hook.headers[TIMESTAMP_HEADER], hook.body, hook.headers[SIGNATURE_HEADER]
    )


def test_update_completes_while_every_notification_endpoint_is_down(
    make_channel: MakeChannel,
    receivers: StartReceiver,
    fleet: Fleet,
    coordinator: procs.Proc,
    pagerduty: Receiver,
) -> None:
    from themis_dashboard.celery import app

    failing, unavailable = pagerduty, receivers()
    failing.default = (500, {}, b"")
    unavailable.default = (503, {}, b"")
    make_channel("slack", "http://127.0.0.1:9")  # nothing listens: connection refused
    make_channel("pagerduty", failing.url)
    make_channel("webhook", unavailable.url)
    node = Node.objects.get(node_id="a-1")

    def run_update(release: Release, *, ok: bool) -> UpdateJob:
        job = jobs.job_start_update(
            node=node, release=release, user=None, transport=NullTransport()
        )
        key = node_key("a-1")  # signed as the node's agent signs its reports
        assert key is not None
        for step in ("PREFLIGHT", "DOWNLOADING", "STAGED", "SWITCHING", "VERIFYING"):
            report = {"job_id": job.pk, "node_id": "a-1", "step": step, "percent": 50}
            app.send_task(
                "workers.tasks.job_progress",
                kwargs={"envelope": sign_report(key, ReportType.JOB_PROGRESS, report)},
            )
        final = {
            "job_id": job.pk,
            "node_id": "a-1",
            "ok": ok,
            "error_code": "" if ok else "HEALTH_CHECK_FAILED_ROLLED_BACK",
            "error_message": "" if ok else "health command exited 1",
            "result": {"version_from": "1.0.0", "version_to": release.version},
        }
        app.send_task(
            "workers.tasks.job_finished",
            kwargs={"envelope": sign_report(key, ReportType.JOB_FINISHED, final)},
        )
        # A deadline for a stuck job, not a measure of speed.
        assert procs.wait_until(
            lambda: UpdateJob.objects.get(pk=job.pk).state in UpdateJob.FINAL_STATES, 30
        ), coordinator.output()[-3000:]
        job.refresh_from_db()
        return job

    bad = run_update(make_release(version="1.8.0"), ok=False)
    assert bad.state == "ROLLED_BACK"
    # The rollback's notifications are failing now: both receivers have refused one.
    assert procs.wait_until(lambda: bool(failing.requests and unavailable.requests), 30), (
        coordinator.output()[-3000:]
    )
    # The next update goes on regardless, and ends DONE.
    good = run_update(make_release(version="1.7.0"), ok=True)
    assert good.state == "DONE", (good.error_code, good.error_message)
    assert Node.objects.get(node_id="a-1").installed_version == "1.7.0"

    deliveries = list(Delivery.objects.select_related("channel"))
    assert {d.channel.type for d in deliveries} == {"slack", "pagerduty", "webhook"}
    finals = [_final(d.pk) for d in deliveries]
    assert [(d.status, d.attempts) for d in finals] == [("gave_up", MAX_ATTEMPTS)] * 3
    errors = " | ".join(d.last_error for d in finals)
    assert "HTTP 500" in errors and "HTTP 503" in errors and "could not connect" in errors
    assert len(failing.requests) == MAX_ATTEMPTS and len(unavailable.requests) == MAX_ATTEMPTS
