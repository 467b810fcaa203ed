"""From audit Events to deliveries: filters, tenant scoping, dedup, PagerDuty
incident logic, after-commit scheduling, and the storm brake."""

from __future__ import annotations

import logging
from typing import Any

import pytest
from django.db import transaction
from pytest_django import DjangoCaptureOnCommitCallbacks

from tenants.models import Tenant
from tests.conftest import Fleet
from tests.factories import make_release
from tests.notifications.conftest import MakeChannel, Nudges, Receiver, StartReceiver
from updates.audit import event_log
from updates.models import Event, Rollout, RolloutNode, UpdateJob
from updates.notifications import dispatch
from updates.notifications.models import Channel, Delivery

pytestmark = pytest.mark.django_db


def _rollout_event(
    verb: str,
    rollout_id: int = 12,
    stage: int = 1,
    tenant: Tenant | None = None,
    **details: Any,
) -> Event:
    return event_log(
        verb=verb,
        tenant=tenant,
        details={"rollout_id": rollout_id, "stage": stage, "release_version": "1.7.0", **details},
    )


def _job_failed(
    node_id: str, tenant: Tenant, rollout_id: int | None = 12, verb: str = "job.failed"
) -> Event:
    return event_log(
        verb=verb,
        actor_label=f"node:{node_id}",
        tenant=tenant,
        details={
            "node_id": node_id,
            "rollout_id": rollout_id,
            "error_code": "HEALTH_CHECK_FAILED_ROLLED_BACK",
            "error": "health command exited 1",
        },
    )


def test_nothing_is_routed_before_commit_and_nothing_on_rollback(
    make_channel: MakeChannel,
    receiver: Receiver,
    nudges: Nudges,
    django_capture_on_commit_callbacks: DjangoCaptureOnCommitCallbacks,
) -> None:
    make_channel("slack", receiver.url)
    with django_capture_on_commit_callbacks() as callbacks:
        _rollout_event("rollout.failed")
        assert Delivery.objects.count() == 0  # still inside the transaction

    def update_that_fails() -> None:
        with transaction.atomic():
            _rollout_event("rollout.completed")
            raise RuntimeError("the update's transaction rolls back")

    with pytest.raises(RuntimeError):
        update_that_fails()
    for callback in callbacks:
        callback()
    assert list(Delivery.objects.values_list("kind", flat=True)) == ["rollout_failed"]


def test_a_routing_failure_never_reaches_the_caller(
    make_channel: MakeChannel,
    receiver: Receiver,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    django_capture_on_commit_callbacks: DjangoCaptureOnCommitCallbacks,
) -> None:
    make_channel("slack", receiver.url)

    def broken(**kwargs: Any) -> None:
        raise RuntimeError("database on fire")

    monkeypatch.setattr(dispatch, "route_event", broken)
    with caplog.at_level(logging.ERROR), django_capture_on_commit_callbacks(execute=True):
        event = _rollout_event("rollout.failed")
    assert event.pk  # the audit Event is written; the caller saw no exception
    assert "routing event" in caplog.text
    assert Delivery.objects.count() == 0


def test_scheduling_failure_is_swallowed(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, db: None
) -> None:
    def broken(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("no connection")

    monkeypatch.setattr(transaction, "on_commit", broken)
    with caplog.at_level(logging.ERROR):
        event = _rollout_event("rollout.failed")
    assert event.pk
    assert "could not schedule" in caplog.text


def test_filters_and_tenant_scoping(
    make_channel: MakeChannel,
    receiver: Receiver,
    fleet: Fleet,
    nudges: Nudges,
    django_capture_on_commit_callbacks: DjangoCaptureOnCommitCallbacks,
) -> None:
    everything = make_channel("webhook", receiver.url, name="fleet")
    only_failures = make_channel("slack", receiver.url, kinds=["rollout_failed"], name="failures")
    tenant_a = make_channel("slack", receiver.url, tenant=fleet.tenant_a, name="tenant a")
    disabled = make_channel("slack", receiver.url, name="off")
    Channel.objects.filter(pk=disabled.pk).update(enabled=False)

    with django_capture_on_commit_callbacks(execute=True):
        _rollout_event("rollout.started", tenant=fleet.tenant_b)
        _rollout_event("rollout.failed", tenant=fleet.tenant_a, rollout_id=13)

    routed = {(d.channel.name, d.kind) for d in Delivery.objects.select_related("channel").all()}
    assert routed == {
        ("fleet", "rollout_started"),
        ("fleet", "rollout_failed"),
        ("failures", "rollout_failed"),
        ("tenant a", "rollout_failed"),  # not tenant B's rollout.started
    }
    assert not Delivery.objects.filter(channel__in=[disabled]).exists()
    assert everything.pk and only_failures.pk and tenant_a.pk


def test_one_message_per_rollout_stage_and_kind_per_channel(
    make_channel: MakeChannel,
    receiver: Receiver,
    nudges: Nudges,
    django_capture_on_commit_callbacks: DjangoCaptureOnCommitCallbacks,
) -> None:
    make_channel("slack", receiver.url)
    with django_capture_on_commit_callbacks(execute=True):
        _rollout_event("rollout.paused", stage=1)
        _rollout_event("rollout.paused", stage=1)  # flapping: pause, resume, pause
        _rollout_event("rollout.paused", stage=2)
    nudges.run()
    assert Delivery.objects.count() == 2
    assert len(receiver.requests) == 2


def test_pagerduty_triggers_then_resolves_one_incident_per_rollout(
    make_channel: MakeChannel,
    receivers: StartReceiver,
    nudges: Nudges,
    django_capture_on_commit_callbacks: DjangoCaptureOnCommitCallbacks,
) -> None:
    pd = receivers()
    make_channel("pagerduty", pd.url)
    with django_capture_on_commit_callbacks(execute=True):
        _rollout_event("rollout.completed", rollout_id=7)  # no incident open: no resolve
        _rollout_event("rollout.stage_completed")  # PagerDuty does not care
        _rollout_event("rollout.failed", stage=2)
        _rollout_event("rollout.rolled_back", stage=2)
    with django_capture_on_commit_callbacks(execute=True):
        _rollout_event("rollout.completed", stage=3)
    nudges.run()
    bodies = [r.json() for r in pd.requests]
    assert [(b["event_action"], b["dedup_key"]) for b in bodies] == [
        ("trigger", "themis-rollout-12"),
        ("trigger", "themis-rollout-12"),
        ("resolve", "themis-rollout-12"),
    ]
    assert [b["payload"]["severity"] for b in bodies[:2]] == ["critical", "error"]


@pytest.mark.parametrize(
    ("code", "notified"),
    [("SIGNATURE_INVALID", True), ("UNSAFE_PATH", True), ("ALREADY_PUBLISHED", False)],
)
def test_security_rejections_are_notified_other_rejections_are_not(
    make_channel: MakeChannel,
    receiver: Receiver,
    nudges: Nudges,
    django_capture_on_commit_callbacks: DjangoCaptureOnCommitCallbacks,
    code: str,
    notified: bool,
) -> None:
    make_channel("pagerduty", receiver.url)
    with django_capture_on_commit_callbacks(execute=True):
        event_log(
            verb="release.rejected",
            details={"file": "evil.tar", "code": code, "reason": "payload/../../etc/passwd"},
        )
    nudges.run()
    assert len(receiver.requests) == int(notified)
    if notified:
        body = receiver.requests[0].json()
        assert body["payload"]["severity"] == "critical"
        assert body["payload"]["summary"].startswith("Bundle rejected by")
        assert code in body["payload"]["summary"]


def test_node_offline_only_counts_during_an_update(
    make_channel: MakeChannel,
    receiver: Receiver,
    fleet: Fleet,
    nudges: Nudges,
    django_capture_on_commit_callbacks: DjangoCaptureOnCommitCallbacks,
) -> None:
    make_channel("slack", receiver.url)

    def offline() -> None:
        event_log(
            verb="node.offline",
            tenant=fleet.tenant_a,
            obj=fleet.node_a,
            details={"node_id": "a-1", "last_heartbeat": "2026-11-30T10:00:00Z"},
        )

    with django_capture_on_commit_callbacks(execute=True):
        offline()
    assert Delivery.objects.count() == 0
    UpdateJob.objects.create(node=fleet.node_a, state=UpdateJob.State.APPLYING)
    with django_capture_on_commit_callbacks(execute=True):
        offline()
    nudges.run()
    assert receiver.requests[0].json()["text"].startswith("a-1 went offline during an update")


def test_single_node_failure_outside_a_rollout_is_sent_on_its_own(
    make_channel: MakeChannel,
    receiver: Receiver,
    fleet: Fleet,
    nudges: Nudges,
    django_capture_on_commit_callbacks: DjangoCaptureOnCommitCallbacks,
) -> None:
    make_channel("webhook", receiver.url)
    with django_capture_on_commit_callbacks(execute=True):
        _job_failed("a-1", fleet.tenant_a, rollout_id=None, verb="job.rolled_back")
    nudges.run()
    body = receiver.requests[0].json()
    assert body["kind"] == "node_rolled_back"
    assert body["url"] == "https://themis.example.test/nodes/a-1/"
    assert body["incident_key"].startswith("themis-event-")


def test_storm_1000_node_failures_make_a_handful_of_messages(
    make_channel: MakeChannel,
    receivers: StartReceiver,
    fleet: Fleet,
    nudges: Nudges,
    django_capture_on_commit_callbacks: DjangoCaptureOnCommitCallbacks,
) -> None:
    slack, pagerduty, webhook, tenant_slack = receivers(), receivers(), receivers(), receivers()
    make_channel("slack", slack.url)
    make_channel("pagerduty", pagerduty.url)
    make_channel("webhook", webhook.url)
    make_channel("slack", tenant_slack.url, tenant=fleet.tenant_a)
    rollout = Rollout.objects.create(
        release=make_release(version="1.7.0"), strategy="canary", state="RUNNING", name="big one"
    )

    with django_capture_on_commit_callbacks(execute=True):
        _rollout_event("rollout.failed", rollout_id=rollout.pk, stage=2, nodes_failed=1000)
        for i in range(1000):
            tenant = fleet.tenant_a if i % 2 else fleet.tenant_b
            _job_failed(f"n-{i:04d}", tenant, rollout_id=rollout.pk)
        _rollout_event("rollout.rolled_back", rollout_id=rollout.pk, stage=2)
    nudges.run()

    counts = [len(r.requests) for r in (slack, pagerduty, webhook, tenant_slack)]
    print(f"storm: 1000 node failures -> messages per channel {counts}")
    assert counts == [3, 3, 3, 1]  # failed + rolled back + one summary; tenant: its summary
    summary = next(r.json() for r in webhook.requests if r.json().get("aggregated"))
    assert summary["items_total"] == 1000
    assert summary["title"] == f"Rollout #{rollout.pk}: 1000 node events"
    assert summary["rollout"] == {"id": rollout.pk, "name": "big one"}
    tenant_summary = tenant_slack.requests[0].json()
    assert "500 node events" in tenant_summary["text"]
    assert {r.json()["dedup_key"] for r in pagerduty.requests} == {f"themis-rollout-{rollout.pk}"}
    assert Delivery.objects.filter(status="sent").count() == 10


def test_awaiting_approval_says_what_action_is_needed(
    make_channel: MakeChannel,
    receiver: Receiver,
    nudges: Nudges,
    django_capture_on_commit_callbacks: DjangoCaptureOnCommitCallbacks,
) -> None:
    make_channel("slack", receiver.url)
    with django_capture_on_commit_callbacks(execute=True):
        _rollout_event(
            "rollout.awaiting_approval",
            strategy="canary",
            next_stage=2,
            final=False,
            nodes_done=10,
            nodes_total=1000,
        )
    nudges.run()
    body = receiver.requests[0].json()
    assert body["text"].startswith("Rollout #12 is awaiting approval")
    texts = [b.get("text", {}).get("text", "") for b in body["blocks"]]
    assert any(t.startswith("*Action needed:* Approve the promotion to stage 2") for t in texts)
    fields = next(b["fields"] for b in body["blocks"] if "fields" in b)
    assert {"type": "mrkdwn", "text": "*Nodes*\n10 done · 1000 total"} in fields


def test_node_failure_finds_its_rollout_through_the_plan(
    make_channel: MakeChannel,
    receiver: Receiver,
    fleet: Fleet,
    nudges: Nudges,
    django_capture_on_commit_callbacks: DjangoCaptureOnCommitCallbacks,
) -> None:
    make_channel("webhook", receiver.url)
    release = make_release(version="1.7.0")
    rollout = Rollout.objects.create(release=release, strategy="rolling", state="RUNNING")
    job = UpdateJob.objects.create(node=fleet.node_a, release=release, state="FAILED")
    RolloutNode.objects.create(rollout=rollout, node=fleet.node_a, position=0, stage=0, job=job)
    with django_capture_on_commit_callbacks(execute=True):
        event_log(  # as jobs.job_finish logs it: no rollout_id in the details
            verb="job.failed",
            tenant=fleet.tenant_a,
            obj=job,
            details={"node_id": "a-1", "error_code": "PREFLIGHT_FAILED", "error": "disk"},
        )
    assert Delivery.objects.get().status == "collecting"
    nudges.run()
    body = receiver.requests[0].json()
    assert body["aggregated"] is True and body["rollout"]["id"] == rollout.pk
    assert body["items"][0]["node"] == "a-1"
    assert body["incident_key"] == f"themis-rollout-{rollout.pk}"
