"""A tenant hears of its next maintenance window its policy's lead time ahead, once."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from django.utils import timezone

from tenants.models import MaintenanceWindow, UpdatePolicy
from tenants.services import WINDOW_OPENING, window_reminders_send
from tenants.tasks import remind_windows_opening
from tests.conftest import Fleet
from updates.models import Event
from updates.notifications.kinds import Kind
from updates.notifications.messages import describe


def utc(
    year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0
) -> datetime:
    return datetime(year, month, day, hour, minute, second, tzinfo=UTC)


def test_reminder_logged_once_inside_the_lead_time(
    fleet: Fleet, night_window: MaintenanceWindow
) -> None:
    UpdatePolicy.objects.create(tenant=fleet.tenant_a, notify_lead_minutes=30)
    # The window opens 02:00 New York = 07:00 UTC on 2027-01-05.
    assert window_reminders_send(at=utc(2027, 1, 5, 6, 20)) == []  # 40 min before: too early
    assert not Event.objects.filter(verb=WINDOW_OPENING).exists()

    assert window_reminders_send(at=utc(2027, 1, 5, 6, 40)) == [fleet.tenant_a.slug]
    assert window_reminders_send(at=utc(2027, 1, 5, 6, 50)) == []  # the same opening: once
    [event] = Event.objects.filter(verb=WINDOW_OPENING)
    assert event.tenant_id == fleet.tenant_a.pk
    assert event.details["opening_start"] == "2027-01-05T07:00:00+00:00"
    assert event.details["lead_minutes"] == 30


def test_the_next_day_brings_a_new_reminder(fleet: Fleet, night_window: MaintenanceWindow) -> None:
    UpdatePolicy.objects.create(tenant=fleet.tenant_a, notify_lead_minutes=30)
    window_reminders_send(at=utc(2027, 1, 5, 6, 40))
    window_reminders_send(at=utc(2027, 1, 6, 6, 40))
    starts = sorted(
        Event.objects.filter(verb=WINDOW_OPENING).values_list("details__opening_start", flat=True)
    )
    assert starts == ["2027-01-05T07:00:00+00:00", "2027-01-06T07:00:00+00:00"]


def test_a_zero_lead_time_sends_nothing(fleet: Fleet, night_window: MaintenanceWindow) -> None:
    UpdatePolicy.objects.create(tenant=fleet.tenant_a, notify_lead_minutes=0)
    assert window_reminders_send(at=utc(2027, 1, 5, 6, 59)) == []
    assert not Event.objects.filter(verb=WINDOW_OPENING).exists()


def test_the_reminder_is_a_notification_kind(fleet: Fleet, night_window: MaintenanceWindow) -> None:
    UpdatePolicy.objects.create(tenant=fleet.tenant_a, notify_lead_minutes=30)
    window_reminders_send(at=utc(2027, 1, 5, 6, 40))
    occurrence = describe(Event.objects.get(verb=WINDOW_OPENING))
    assert occurrence is not None
    assert occurrence.notification["kind"] == Kind.WINDOW_OPENING
    assert occurrence.notification["tenant"] == fleet.tenant_a.name


def test_beat_task_runs_the_service(
    fleet: Fleet, night_window: MaintenanceWindow, monkeypatch: pytest.MonkeyPatch
) -> None:
    UpdatePolicy.objects.create(tenant=fleet.tenant_a, notify_lead_minutes=30)
    # tenants.services reads the clock through django.utils.timezone
    monkeypatch.setattr(timezone, "now", lambda: utc(2027, 1, 5, 6, 40))
    assert remind_windows_opening.run() == [fleet.tenant_a.slug]
    assert Event.objects.filter(verb=WINDOW_OPENING, tenant_id=fleet.tenant_a.pk).count() == 1
