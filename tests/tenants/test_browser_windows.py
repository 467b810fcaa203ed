"""A tenant admin edits their maintenance windows in a real browser.

Every page here is rendered at a chosen instant: the live server is a thread of this
process, so `time_machine.travel` moves its clock too. The clock still ticks (the
browser waits on real events), so each expected label holds for minutes, not seconds."""

from __future__ import annotations

from datetime import datetime, time, timedelta
from zoneinfo import ZoneInfo

import pytest
import time_machine
from django.contrib.auth.models import Group
from playwright.sync_api import Page
from pytest_django.live_server_helper import LiveServer

from tenants.models import Blackout, MaintenanceWindow
from tenants.roles import OPERATOR, TENANT_ADMIN
from tests.browser_fixtures import screenshot
from tests.conftest import Fleet
from tests.factories import make_user

pytestmark = [pytest.mark.browser, pytest.mark.slow, pytest.mark.django_db(transaction=True)]

PASSWORD = "correct horse battery staple"
NEW_YORK = ZoneInfo("America/New_York")


# The label for a Saturday 02:00-04:00 New York window, seen at instants around the week:
# a date appears once the opening is six days or more away (from Saturday 04:00 to
# Sunday 02:00), and the distance is real time, so a DST change shortens it by an hour.
@pytest.mark.parametrize(
    ("now", "label"),
    [
        pytest.param(
            datetime(2025, 1, 15, 11, 30, tzinfo=NEW_YORK),
            "Sat 02:00 America/New_York (in 2 d 14 h)",
            id="wednesday",
        ),
        pytest.param(
            datetime(2025, 1, 18, 3, 0, tzinfo=NEW_YORK),
            "open now until 2025-01-18 04:00 America/New_York",
            id="saturday-inside-the-window",
        ),
        pytest.param(
            datetime(2025, 1, 18, 10, 30, tzinfo=NEW_YORK),
            "Sat 2025-01-25 02:00 America/New_York (in 6 d 15 h)",
            id="saturday-after-the-window",
        ),
        pytest.param(
            datetime(2025, 1, 19, 1, 30, tzinfo=NEW_YORK),
            "Sat 2025-01-25 02:00 America/New_York (in 6 d 0 h)",
            id="sunday-before-02:00",
        ),
        pytest.param(
            datetime(2025, 3, 9, 1, 30, tzinfo=NEW_YORK),
            "Sat 02:00 America/New_York (in 5 d 23 h)",
            id="sunday-before-spring-forward",
        ),
    ],
)
def test_tenant_admin_adds_and_edits_a_window(  # noqa: F811
    page: Page, live_server: LiveServer, roles: None, fleet: Fleet, now: datetime, label: str
) -> None:
    with time_machine.travel(now, tick=True):
        _add_and_edit_a_window(page, live_server, fleet, label)


def _add_and_edit_a_window(page: Page, live_server: LiveServer, fleet: Fleet, label: str) -> None:
    user = make_user(username="alice")
    user.groups.add(Group.objects.get(name=TENANT_ADMIN))
    fleet.tenant_a.admins.add(user)
    page.goto(f"{live_server.url}/tenants/tenant-a/")
    page.fill("input[name=username]", "alice")
    page.fill("input[name=password]", PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_url(f"{live_server.url}/tenants/tenant-a/")

    form = page.locator("#window-form")
    form.locator("input[name=days][value='5']").check()
    form.locator("input[name=start_time]").fill("02:00")
    form.locator("input[name=end_time]").fill("04:00")
    form.locator("input[name=timezone]").fill("America/New_Yrok")
    form.locator("button[type=submit]").click()
    page.wait_for_selector("text=Unknown timezone")
    assert not MaintenanceWindow.objects.exists()

    form = page.locator("#window-form")
    form.locator("input[name=days][value='5']").check()
    form.locator("input[name=timezone]").fill("America/New_York")
    form.locator("button[type=submit]").click()
    page.wait_for_selector("text=Sat 02:00-04:00 America/New_York")
    assert page.inner_text("#next-window") == label
    screenshot(page, "tenant-windows-admin")

    page.click("#windows >> text=Edit")
    page.locator("input[name=end_time]").fill("05:30")
    page.click("#window-form button[type=submit]")
    page.wait_for_selector("text=Sat 02:00-05:30 America/New_York")
    window = MaintenanceWindow.objects.get()
    assert (window.days, window.end_time.strftime("%H:%M")) == ("5", "05:30")

    # Another tenant's page does not exist for her.
    response = page.goto(f"{live_server.url}/tenants/tenant-b/")
    assert response is not None
    assert response.status == 404


# Mid-week, and late on a Sunday (UTC) so that the blackout runs past the week shown.
@pytest.mark.parametrize(
    "now",
    [
        pytest.param(datetime(2025, 1, 15, 12, 0, tzinfo=ZoneInfo("UTC")), id="wednesday"),
        pytest.param(datetime(2025, 1, 19, 23, 0, tzinfo=ZoneInfo("UTC")), id="sunday-night"),
    ],
)
def test_operator_sees_the_week_calendar(  # noqa: F811
    page: Page, live_server: LiveServer, roles: None, fleet: Fleet, now: datetime
) -> None:
    with time_machine.travel(now, tick=True):
        _see_the_week_calendar(page, live_server, fleet, now)


def _see_the_week_calendar(
    page: Page, live_server: LiveServer, fleet: Fleet, now: datetime
) -> None:
    user = make_user(username="olivia")
    user.groups.add(Group.objects.get(name=OPERATOR))
    # Tenant A: every day 02:00-04:00 New York (07:00-09:00 UTC in January), seven a week.
    MaintenanceWindow.objects.create(
        tenant=fleet.tenant_a,
        days="0123456",
        start_time=time(2),
        end_time=time(4),
        timezone="America/New_York",
    )
    # Tenant B: Saturday 22:00 to Sunday 06:00 Berlin, inside the UTC week.
    MaintenanceWindow.objects.create(
        tenant=fleet.tenant_b,
        days="5",
        start_time=time(22),
        end_time=time(6),
        timezone="Europe/Berlin",
    )
    Blackout.objects.create(
        name="release freeze", starts_at=now, ends_at=now + timedelta(days=2), timezone="UTC"
    )
    page.goto(f"{live_server.url}/tenants/calendar/")
    page.fill("input[name=username]", "olivia")
    page.fill("input[name=password]", PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_selector("#calendar")
    assert page.locator("#calendar rect[data-kind=window]").count() == 8
    assert page.locator("#calendar rect[data-kind=blackout]").count() == 1
    screenshot(page, "tenant-calendar-operator")
