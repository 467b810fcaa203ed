"""Delivery attempts: retries with backoff and jitter, Retry-After, give-up with
the reason in the log, duplicate nudges, and the sweep for lost nudges."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from celery import current_app
from django.test import Client
from django.urls import reverse
from django.utils import timezone
from kombu.exceptions import OperationalError
from pytest_django import DjangoCaptureOnCommitCallbacks, Settings

from tests.conftest import Fleet
from tests.notifications.conftest import MakeChannel, Nudges, Receiver
from updates.audit import event_log
from updates.notifications import dispatch, services, tasks
from updates.notifications.models import Delivery

pytestmark = pytest.mark.django_db

T0 = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)


def _failed_rollout(
    django_capture_on_commit_callbacks: DjangoCaptureOnCommitCallbacks, stage: int = 1
) -> Delivery:
    with django_capture_on_commit_callbacks(execute=True):
        event_log(
            verb="rollout.failed",
            details={"rollout_id": 3, "stage": stage, "release_version": "1.7.0"},
        )
    return Delivery.objects.latest("pk")


def test_retries_on_500_with_growing_backoff_then_sends(
    make_channel: MakeChannel,
    receiver: Receiver,
    nudges: Nudges,
    django_capture_on_commit_callbacks: DjangoCaptureOnCommitCallbacks,
) -> None:
    make_channel("slack", receiver.url)
    receiver.answer((500, {}, b"oops"), (502, {}, b""))
    delivery = _failed_rollout(django_capture_on_commit_callbacks)
    nudges.run()

    delivery.refresh_from_db()
    assert (delivery.status, delivery.attempts) == ("sent", 3)
    assert delivery.sent_at is not None and delivery.last_error == ""
    assert len(receiver.requests) == 3
    bodies = {r.body for r in receiver.requests}
    assert len(bodies) == 1  # every retry sends the same message


def test_gives_up_after_the_configured_attempts_and_the_log_says_why(
    make_channel: MakeChannel,
    receiver: Receiver,
    nudges: Nudges,
    personas: dict[str, Client],
    django_capture_on_commit_callbacks: DjangoCaptureOnCommitCallbacks,
) -> None:
    make_channel("webhook", receiver.url)
    receiver.default = (500, {}, b"receiver broken")
    delivery = _failed_rollout(django_capture_on_commit_callbacks)
    nudges.run()

    delivery.refresh_from_db()
    assert (delivery.status, delivery.attempts) == ("gave_up", 3)
    assert len(receiver.requests) == 3
    assert "Webhook: HTTP 500 Internal Server Error" in delivery.last_error
    # Only the status is kept: a receiver's body may echo anything (secrets, internal pages).
    assert "receiver broken" not in delivery.last_error
    assert "gave up after 3 attempt(s)" in delivery.last_error
    page = personas["operator"].get(reverse("notifications:delivery_list"))
    assert page.status_code == 200
    assert b"gave up after 3 attempt(s)" in page.content
    assert b"Gave up" in page.content


def test_permanent_refusal_is_not_retried(
    make_channel: MakeChannel,
    receiver: Receiver,
    nudges: Nudges,
    django_capture_on_commit_callbacks: DjangoCaptureOnCommitCallbacks,
) -> None:
    make_channel("slack", receiver.url)
    receiver.answer((404, {}, b"no_service"))
    delivery = _failed_rollout(django_capture_on_commit_callbacks)
    nudges.run()
    delivery.refresh_from_db()
    assert (delivery.status, delivery.attempts, delivery.last_status_code) == ("gave_up", 1, 404)
    assert "no_service (not retried)" in delivery.last_error


# The clock stands still: the next attempt is compared with the instant of the failure.
@pytest.mark.time_machine(T0, tick=False)
def test_slack_429_retry_after_is_honoured(
    make_channel: MakeChannel,
    receiver: Receiver,
    nudges: Nudges,
    django_capture_on_commit_callbacks: DjangoCaptureOnCommitCallbacks,
) -> None:
    make_channel("slack", receiver.url)
    receiver.answer((429, {"Retry-After": "30"}, b"rate_limited"))
    delivery = _failed_rollout(django_capture_on_commit_callbacks)
    task, pk, _ = nudges.sent.pop(0)
    services.delivery_run(delivery_id=pk)

    delivery.refresh_from_db()
    assert delivery.status == "retrying"
    assert nudges.sent[-1][2] >= 30  # the next nudge waits at least Retry-After
    assert delivery.next_attempt_at >= T0 + timedelta(seconds=30)
    assert "Retry-After 30s" in delivery.last_error
    # A nudge that comes early (a duplicate, or the sweep) sends nothing.
    assert services.delivery_attempt(delivery_id=pk) is None
    assert len(receiver.requests) == 1
    nudges.run()  # time passes (the fixture moves the due time)
    delivery.refresh_from_db()
    assert (delivery.status, delivery.attempts, len(receiver.requests)) == ("sent", 2, 2)


def test_a_duplicated_nudge_never_sends_twice(
    make_channel: MakeChannel,
    receiver: Receiver,
    nudges: Nudges,
    django_capture_on_commit_callbacks: DjangoCaptureOnCommitCallbacks,
) -> None:
    make_channel("slack", receiver.url)
    delivery = _failed_rollout(django_capture_on_commit_callbacks)
    services.delivery_run(delivery_id=delivery.pk)
    services.delivery_run(delivery_id=delivery.pk)
    assert len(receiver.requests) == 1


@pytest.mark.parametrize("attempt", [1, 2, 3, 4, 10])
def test_backoff_is_exponential_with_jitter_and_capped(
    notify_settings: Settings, attempt: int
) -> None:
    ceiling = min(0.2, 0.02 * 2 ** (attempt - 1))
    delays = {services.backoff_seconds(attempt) for _ in range(50)}
    assert all(ceiling / 2 <= d <= ceiling for d in delays)
    assert len(delays) > 1  # jittered
    assert services.backoff_seconds(attempt, retry_after=5) == 5


def test_unreadable_secrets_give_up_with_a_clear_reason(
    make_channel: MakeChannel,
    receiver: Receiver,
    nudges: Nudges,
    settings: Settings,
    django_capture_on_commit_callbacks: DjangoCaptureOnCommitCallbacks,
) -> None:
    make_channel("slack", receiver.url)
    delivery = _failed_rollout(django_capture_on_commit_callbacks)
    settings.SECRET_KEY = "rotated-without-a-fallback-" + "x" * 30
    nudges.run()
    delivery.refresh_from_db()
    assert delivery.status == "gave_up"
    assert "cannot be decrypted" in delivery.last_error
    assert receiver.requests == []


def test_old_key_in_fallbacks_still_decrypts(
    make_channel: MakeChannel,
    receiver: Receiver,
    nudges: Nudges,
    settings: Settings,
    django_capture_on_commit_callbacks: DjangoCaptureOnCommitCallbacks,
) -> None:
    make_channel("slack", receiver.url)
    delivery = _failed_rollout(django_capture_on_commit_callbacks)
    settings.SECRET_KEY_FALLBACKS = [settings.SECRET_KEY]
    settings.SECRET_KEY = "rotated-properly-" + "y" * 40
    nudges.run()
    delivery.refresh_from_db()
    assert delivery.status == "sent"


def test_disabled_channel_gives_up_queued_deliveries(
    make_channel: MakeChannel,
    receiver: Receiver,
    nudges: Nudges,
    django_capture_on_commit_callbacks: DjangoCaptureOnCommitCallbacks,
) -> None:
    channel = make_channel("slack", receiver.url)
    delivery = _failed_rollout(django_capture_on_commit_callbacks)
    channel.enabled = False
    channel.save()
    nudges.run()
    delivery.refresh_from_db()
    assert delivery.status == "gave_up" and "disabled" in delivery.last_error


def test_sweep_revives_lost_nudges_and_stuck_sends(
    make_channel: MakeChannel,
    receiver: Receiver,
    nudges: Nudges,
    django_capture_on_commit_callbacks: DjangoCaptureOnCommitCallbacks,
) -> None:
    make_channel("slack", receiver.url)
    lost = _failed_rollout(django_capture_on_commit_callbacks, stage=1)
    stuck = _failed_rollout(django_capture_on_commit_callbacks, stage=2)
    nudges.sent.clear()  # the broker lost both nudges
    long_ago = timezone.now() - timedelta(minutes=10)
    Delivery.objects.filter(pk=lost.pk).update(next_attempt_at=long_ago)
    Delivery.objects.filter(pk=stuck.pk).update(status="sending", claimed_at=long_ago)
    old = _failed_rollout(django_capture_on_commit_callbacks, stage=3)
    Delivery.objects.filter(pk=old.pk).update(
        status="sent", created_at=timezone.now() - timedelta(days=90)
    )
    nudges.sent.clear()

    result = services.deliveries_sweep()
    assert result["revived"] == 1 and result["deleted"] == 1
    assert {pk for _, pk, _ in nudges.sent} == {lost.pk}
    nudges.run()
    # The revived one is due now and is picked up by the next sweep's nudge.
    Delivery.objects.filter(pk=stuck.pk).update(next_attempt_at=long_ago)
    services.deliveries_sweep()
    nudges.run()
    assert set(Delivery.objects.values_list("status", flat=True)) == {"sent"}
    assert len(receiver.requests) == 2


def test_sweep_flushes_an_aggregate_whose_nudge_was_lost(
    make_channel: MakeChannel,
    receiver: Receiver,
    fleet: Fleet,
    nudges: Nudges,
    django_capture_on_commit_callbacks: DjangoCaptureOnCommitCallbacks,
) -> None:
    make_channel("slack", receiver.url)
    with django_capture_on_commit_callbacks(execute=True):
        event_log(
            verb="job.failed",
            tenant=fleet.tenant_a,
            details={"node_id": "a-1", "rollout_id": 9, "error_code": "APPLY_FAILED"},
        )
    assert [t for t, _, _ in nudges.sent] == [dispatch.FLUSH_TASK]
    nudges.sent.clear()
    Delivery.objects.update(next_attempt_at=timezone.now() - timedelta(minutes=5))
    services.deliveries_sweep()
    nudges.run()
    assert len(receiver.requests) == 1
    assert receiver.requests[0].json()["text"].startswith("Rollout #9: 1 node event")


def test_enqueue_never_raises_when_the_broker_is_down(
    settings: Settings, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The broker refuses the connection. (Relying on nobody listening on the test Redis port
    # failed whenever a test earlier in the random order had started the suite's Redis.)
    def refused(*_args: object, **_kwargs: object) -> None:
        raise OperationalError("Error 111 connecting to 127.0.0.1: Connection refused.")

    monkeypatch.setattr(current_app, "send_task", refused)
    dispatch.enqueue(dispatch.DELIVER_TASK, 1)
    assert "could not enqueue" in caplog.text


def test_the_beats_sweep_task_nudges_a_delivery_whose_nudge_was_lost(
    make_channel: MakeChannel,
    receiver: Receiver,
    nudges: Nudges,
    django_capture_on_commit_callbacks: DjangoCaptureOnCommitCallbacks,
) -> None:
    make_channel("slack", receiver.url)
    lost = _failed_rollout(django_capture_on_commit_callbacks)
    nudges.sent.clear()  # the broker lost it
    Delivery.objects.filter(pk=lost.pk).update(
        next_attempt_at=timezone.now() - timedelta(minutes=10)
    )
    result = tasks.sweep()
    assert result == {"revived": 0, "flushed": 0, "renudged": 1, "deleted": 0}
    assert [pk for _, pk, _ in nudges.sent] == [lost.pk]
    nudges.run()
    assert Delivery.objects.get(pk=lost.pk).status == "sent" and len(receiver.requests) == 1


def test_a_duplicated_flush_nudge_sends_the_summary_once(
    make_channel: MakeChannel,
    receiver: Receiver,
    fleet: Fleet,
    nudges: Nudges,
    django_capture_on_commit_callbacks: DjangoCaptureOnCommitCallbacks,
) -> None:
    make_channel("slack", receiver.url)
    with django_capture_on_commit_callbacks(execute=True):
        event_log(
            verb="job.failed",
            tenant=fleet.tenant_a,
            details={"node_id": "a-1", "rollout_id": 9, "error_code": "APPLY_FAILED"},
        )
    ((task, batch, _countdown),) = nudges.sent
    assert task == dispatch.FLUSH_TASK
    nudges.record(task, batch)  # the broker delivered the flush twice
    nudges.run()
    # the second flush finds the batch closed already: no second summary, no second send
    assert len(receiver.requests) == 1
    assert Delivery.objects.get(pk=batch).status == "sent"
