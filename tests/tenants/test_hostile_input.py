"""Dates at the ends of the calendar get a clear answer, never a 500, and nothing is saved."""

from __future__ import annotations

import pytest
from django.test import Client
from django.urls import reverse

from tenants.models import Blackout
from tests.conftest import Fleet
from tests.tenants.conftest import utc


# "This week" is read from a frozen clock: Wednesday 6 January 2027, 12:00 UTC, which is
# still in the week of Monday 4 January both at UTC+14 and at UTC-11.
@pytest.mark.time_machine(utc(2027, 1, 6, 12), tick=False)
@pytest.mark.parametrize("week", ["9999-12-31", "0001-01-01", "2200-01-01", "1970-01-01", "x"])
@pytest.mark.parametrize("tz", ["UTC", "Pacific/Kiritimati", "Pacific/Pago_Pago"])
def test_calendar_at_the_ends_of_time_shows_this_week(
    personas: dict[str, Client], fleet: Fleet, week: str, tz: str
) -> None:
    response = personas["operator"].get(reverse("tenant_calendar"), {"week": week, "tz": tz})
    assert response.status_code == 200
    assert b"<svg" in response.content
    # Days and the week's date are the chosen zone's, so "Show" stays on this week.
    assert b"Mon 4 Jan" in response.content and b"Sun 10 Jan" in response.content
    assert b'name="week" value="2027-01-04"' in response.content


@pytest.mark.parametrize(
    ("starts", "ends", "tz"),
    [
        ("2027-01-01T00:00", "9999-12-31T23:00", "America/Los_Angeles"),
        ("2027-01-01T00:00", "9999-12-31T23:00", "UTC"),
        ("0001-01-01T00:00", "2027-01-02T00:00", "Asia/Tokyo"),
        ("2199-12-31T00:00", "2200-01-01T01:00", "UTC"),
    ],
)
def test_blackouts_outside_the_schedule_years_are_refused(
    personas: dict[str, Client], fleet: Fleet, starts: str, ends: str, tz: str
) -> None:
    url = reverse("blackout_create", args=[fleet.tenant_a.slug])
    data = {"name": "forever", "starts_local": starts, "ends_local": ends, "timezone": tz}
    response = personas["admin_a"].post(url, data)
    assert response.status_code == 400
    assert b"must lie between 1971 and 2199" in response.content
    assert not Blackout.objects.filter(name="forever").exists()
    # The calendar east and west of UTC still renders.
    for zone in ("Pacific/Kiritimati", "Pacific/Pago_Pago"):
        calendar = personas["operator"].get(reverse("tenant_calendar"), {"tz": zone})
        assert calendar.status_code == 200
