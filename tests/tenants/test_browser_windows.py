"""A tenant admin edits their maintenance windows in a real browser."""

from __future__ import annotations

import pytest
from django.contrib.auth.models import Group
from playwright.sync_api import Page
from pytest_django.live_server_helper import LiveServer

from tenants.models import MaintenanceWindow
from tenants.roles import TENANT_ADMIN
from tests.browser_fixtures import screenshot
from tests.conftest import Fleet
from tests.factories import make_user

pytestmark = [pytest.mark.browser, pytest.mark.slow, pytest.mark.django_db(transaction=True)]

PASSWORD = "correct horse battery staple"


def test_tenant_admin_adds_and_edits_a_window(  # noqa: F811
    page: Page, live_server: LiveServer, roles: None, fleet: Fleet
) -> None:
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
    assert "Next window: Sat 02:00 America/New_York (in" in page.inner_text("#tenant-waiting")
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


def test_operator_sees_the_week_calendar(  # noqa: F811
    page: Page, live_server: LiveServer, roles: None, fleet: Fleet
) -> None:
    from datetime import UTC, datetime, time, timedelta

    from tenants.models import Blackout
    from tenants.roles import OPERATOR

    user = make_user(username="olivia")
    user.groups.add(Group.objects.get(name=OPERATOR))
    MaintenanceWindow.objects.create(
        tenant=fleet.tenant_a,
        days="0123456",
        start_time=time(2),
        end_time=time(4),
        timezone="America/New_York",
    )
    MaintenanceWindow.objects.create(
        tenant=fleet.tenant_b,
        days="5",
        start_time=time(22),
        end_time=time(6),
        timezone="Europe/Berlin",
    )
    now = datetime.now(UTC)
    Blackout.objects.create(
        name="release freeze", starts_at=now, ends_at=now + timedelta(days=2), timezone="UTC"
    )
    page.goto(f"{live_server.url}/tenants/calendar/")
    page.fill("input[name=username]", "olivia")
    page.fill("input[name=password]", PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_selector("#calendar")
    assert page.locator("#calendar rect[data-kind=window]").count() >= 7
    assert page.locator("#calendar rect[data-kind=blackout]").count() == 1
    screenshot(page, "tenant-calendar-operator")
