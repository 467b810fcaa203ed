"""Every tenant page and action, for every persona: the status code and what
the database holds afterwards."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import time

import pytest
from django.http import HttpResponseBase
from django.test import Client
from django.urls import reverse

from tenants.models import Blackout, Consent, MaintenanceWindow, UpdatePolicy
from tests.conftest import Fleet
from tests.tenants.conftest import utc, waiting_job
from updates.models import Event, Release, UpdateJob

pytestmark = pytest.mark.django_db

EDITORS = {"operator": 302, "admin_a": 302, "admin_b": 404, "responder": 403}
READERS = {"operator": 200, "admin_a": 200, "admin_b": 404, "responder": 200}
WINDOW_POST = {
    "days": ["5", "6"],
    "start_time": "02:00",
    "end_time": "04:00",
    "timezone": "America/New_York",
    "label": "weekend",
}
BLACKOUT_POST = {
    "name": "Q4 freeze",
    "starts_local": "2030-12-20T00:00",
    "ends_local": "2031-01-03T00:00",
    "timezone": "Europe/London",
}


def assert_login_redirect(response: HttpResponseBase) -> None:
    assert response.status_code == 302
    assert response["Location"].startswith(reverse("login"))


# rows as values() returns them: column name -> value
Rows = list[Mapping[str, object]]


def snapshot() -> tuple[Rows, Rows, Rows, Rows, Rows, int]:
    """Everything a tenant page can change."""
    return (
        list(MaintenanceWindow.objects.order_by("pk").values()),
        list(Blackout.objects.order_by("pk").values()),
        list(UpdatePolicy.objects.order_by("pk").values()),
        list(Consent.objects.order_by("pk").values()),
        list(UpdateJob.objects.order_by("pk").values("pk", "state")),
        Event.objects.count(),
    )


# --- pages ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        reverse("tenant_list"),
        reverse("tenant_detail", args=["tenant-a"]),
        reverse("tenant_calendar"),
        reverse("tenant_rollback_plan", args=["tenant-a"]),
    ],
)
def test_anonymous_is_sent_to_login(personas: dict[str, Client], url: str) -> None:
    assert_login_redirect(personas["anonymous"].get(url))


@pytest.mark.parametrize(
    ("persona", "visible", "hidden"),
    [
        ("operator", ["tenant-a", "tenant-b"], []),
        ("responder", ["tenant-a", "tenant-b"], []),
        ("admin_a", ["tenant-a"], ["tenant-b"]),
        ("admin_b", ["tenant-b"], ["tenant-a"]),
    ],
)
def test_tenant_list_is_scoped(
    personas: dict[str, Client], persona: str, visible: list[str], hidden: list[str]
) -> None:
    body = personas[persona].get(reverse("tenant_list")).content.decode()
    for slug in visible:
        assert f'data-tenant="{slug}"' in body
    for slug in hidden:
        assert f'data-tenant="{slug}"' not in body
    assert ('action="/tenants/blackouts/new/"' in body) is (persona == "operator")


@pytest.mark.parametrize(("persona", "status"), READERS.items())
def test_tenant_detail_scoped_and_read_only_for_responders(
    personas: dict[str, Client], persona: str, status: int
) -> None:
    before = snapshot()
    response = personas[persona].get(reverse("tenant_detail", args=["tenant-a"]))
    assert response.status_code == status
    assert snapshot() == before
    if status == 200:
        body = response.content.decode()
        can_edit = persona in ("operator", "admin_a")
        assert ('id="window-form"' in body) is can_edit
        assert ('id="policy-form"' in body) is can_edit
        assert ("Read-only" in body) is (not can_edit)


# The page is rendered at a frozen instant (the logins too, so their sessions are valid then):
# before the night window, and inside it.
@pytest.mark.parametrize(
    "label",
    [
        pytest.param(
            "Fri 02:00 America/New_York (in 3 h 12 m)",
            marks=pytest.mark.time_machine(utc(2027, 1, 8, 3, 48), tick=False),
            id="before",
        ),
        pytest.param(
            "open now until 2027-01-08 04:00 America/New_York",
            marks=pytest.mark.time_machine(utc(2027, 1, 8, 8, 0), tick=False),
            id="inside",
        ),
    ],
)
def test_tenant_page_shows_waiting_nodes_with_the_next_window(
    personas: dict[str, Client],
    fleet: Fleet,
    release: Release,
    night_window: MaintenanceWindow,
    label: str,
) -> None:
    waiting_job(fleet.node_a, release, reason="outside maintenance windows; next window ...")
    body = personas["admin_a"].get(reverse("tenant_detail", args=["tenant-a"])).content.decode()
    assert 'data-state="WAITING_FOR_WINDOW"' in body
    assert f'<strong id="next-window">{label}</strong>' in body
    assert body.count(f"<td>{label}</td>") == 1  # the waiting job's row


def test_tenant_page_htmx_poll_returns_only_the_waiting_partial(
    personas: dict[str, Client],
) -> None:
    response = personas["admin_a"].get(
        reverse("tenant_detail", args=["tenant-a"]), headers={"HX-Request": "true"}
    )
    body = response.content.decode()
    assert body.lstrip().startswith('<section id="tenant-waiting"')
    assert "<html" not in body


@pytest.mark.parametrize(("persona", "status"), READERS.items())
def test_rollback_plan_scoped(personas: dict[str, Client], persona: str, status: int) -> None:
    response = personas[persona].get(reverse("tenant_rollback_plan", args=["tenant-a"]))
    assert response.status_code == status
    if status == 200:
        assert b'data-node="a-1"' in response.content


@pytest.mark.parametrize(
    ("persona", "status"),
    [("operator", 200), ("responder", 200), ("admin_a", 403), ("admin_b", 403)],
)
def test_calendar_is_for_operators_and_responders(
    personas: dict[str, Client], persona: str, status: int
) -> None:
    response = personas[persona].get(reverse("tenant_calendar"))
    assert response.status_code == status


def test_calendar_draws_windows_and_blackouts_in_the_chosen_zone(
    personas: dict[str, Client], fleet: Fleet, night_window: MaintenanceWindow
) -> None:
    Blackout.objects.create(
        name="Q4 freeze",
        starts_at="2027-01-06T00:00:00Z",
        ends_at="2027-01-08T00:00:00Z",
        timezone="UTC",
    )
    url = reverse("tenant_calendar") + "?week=2027-01-05&tz=America/New_York"
    body = personas["operator"].get(url).content.decode()
    assert body.count('data-kind="window"') == 7  # daily, Mon 4 Jan - Sun 10 Jan
    assert body.count('data-kind="blackout"') == 1
    assert "Mon 4 Jan" in body and "Tenant A" in body and "Fleet-wide" in body
    assert "daily 02:00-04:00 America/New_York: 2027-01-04 02:00 America/New_York" in body
    bad = personas["operator"].get(reverse("tenant_calendar") + "?tz=Nowhere/Land")
    assert bad.status_code == 200 and b"Unknown timezone" in bad.content


# --- windows --------------------------------------------------------------------


@pytest.mark.parametrize(("persona", "status"), EDITORS.items())
def test_window_create_by_persona(personas: dict[str, Client], persona: str, status: int) -> None:
    response = personas[persona].post(reverse("window_create", args=["tenant-a"]), WINDOW_POST)
    assert response.status_code == status
    created = MaintenanceWindow.objects.filter(tenant__slug="tenant-a")
    if status == 302:
        window = created.get()
        assert window.describe() == "Sat,Sun 02:00-04:00 America/New_York"
        assert Event.objects.filter(verb="window.created", tenant=window.tenant).count() == 1
    else:
        assert not created.exists() and not Event.objects.exists()


def test_window_create_anonymous(personas: dict[str, Client]) -> None:
    assert_login_redirect(
        personas["anonymous"].post(reverse("window_create", args=["tenant-a"]), WINDOW_POST)
    )
    assert not MaintenanceWindow.objects.exists()


@pytest.mark.parametrize(
    ("change", "error"),
    [
        ({"timezone": "Mars/Olympus"}, "Unknown timezone"),
        ({"days": []}, "This field is required"),
        ({"start_time": "25:00"}, "Enter a valid time"),
        ({"start_time": "03:00", "end_time": "05:00"}, "Overlaps the window Sat,Sun 02:00-04:00"),
    ],
)
def test_window_bad_input_shows_errors_and_saves_nothing(
    personas: dict[str, Client], change: dict[str, str | list[str]], error: str
) -> None:
    client = personas["admin_a"]
    client.post(reverse("window_create", args=["tenant-a"]), WINDOW_POST)
    before = snapshot()
    response = client.post(reverse("window_create", args=["tenant-a"]), {**WINDOW_POST, **change})
    assert response.status_code == 400
    assert error in response.content.decode()
    assert snapshot() == before


@pytest.fixture
def window_a(fleet: Fleet) -> MaintenanceWindow:
    return MaintenanceWindow.objects.create(
        tenant=fleet.tenant_a, days="56", start_time=time(2), end_time=time(4), timezone="UTC"
    )


@pytest.mark.parametrize(("persona", "status"), EDITORS.items())
def test_window_edit_by_persona(
    personas: dict[str, Client], window_a: MaintenanceWindow, persona: str, status: int
) -> None:
    url = reverse("window_edit", args=["tenant-a", window_a.pk])
    get_status = 200 if status == 302 else status
    assert personas[persona].get(url).status_code == get_status
    response = personas[persona].post(url, {**WINDOW_POST, "start_time": "01:00"})
    assert response.status_code == status
    window_a.refresh_from_db()
    assert window_a.start_time == (time(1) if status == 302 else time(2))


def test_window_edit_bad_input(personas: dict[str, Client], window_a: MaintenanceWindow) -> None:
    url = reverse("window_edit", args=["tenant-a", window_a.pk])
    response = personas["admin_a"].post(url, {**WINDOW_POST, "timezone": "Europe/Nowhere"})
    assert response.status_code == 400 and b"Unknown timezone" in response.content
    window_a.refresh_from_db()
    assert window_a.timezone == "UTC"


def test_window_of_another_tenant_is_not_reachable_through_my_tenant(
    personas: dict[str, Client], fleet: Fleet
) -> None:
    other = MaintenanceWindow.objects.create(
        tenant=fleet.tenant_b, days="0", start_time=time(1), end_time=time(2), timezone="UTC"
    )
    url = reverse("window_delete", args=["tenant-a", other.pk])
    assert personas["admin_a"].post(url).status_code == 404
    assert MaintenanceWindow.objects.filter(pk=other.pk).exists()


@pytest.mark.parametrize(("persona", "status"), EDITORS.items())
def test_window_delete_by_persona(
    personas: dict[str, Client], window_a: MaintenanceWindow, persona: str, status: int
) -> None:
    response = personas[persona].post(reverse("window_delete", args=["tenant-a", window_a.pk]))
    assert response.status_code == status
    assert MaintenanceWindow.objects.filter(pk=window_a.pk).exists() is (status != 302)


def test_window_delete_needs_post(personas: dict[str, Client], window_a: MaintenanceWindow) -> None:
    response = personas["admin_a"].get(reverse("window_delete", args=["tenant-a", window_a.pk]))
    assert response.status_code == 405
    assert MaintenanceWindow.objects.filter(pk=window_a.pk).exists()


# --- blackouts ------------------------------------------------------------------


@pytest.mark.parametrize(("persona", "status"), EDITORS.items())
def test_tenant_blackout_create_by_persona(
    personas: dict[str, Client], persona: str, status: int
) -> None:
    response = personas[persona].post(reverse("blackout_create", args=["tenant-a"]), BLACKOUT_POST)
    assert response.status_code == status
    assert Blackout.objects.filter(tenant__slug="tenant-a").exists() is (status == 302)


@pytest.mark.parametrize(
    ("change", "error"),
    [
        ({"ends_local": "2030-12-19T00:00"}, "must end after it starts"),
        (
            {"starts_local": "2020-01-01T00:00", "ends_local": "2020-01-02T00:00"},
            "already over",
        ),
        ({"timezone": "Europe/Londn"}, "Unknown timezone"),
        ({"starts_local": "soon"}, "Enter a valid date/time"),
    ],
)
def test_blackout_bad_input_shows_errors_and_saves_nothing(
    personas: dict[str, Client], change: dict[str, str], error: str
) -> None:
    before = snapshot()
    response = personas["admin_a"].post(
        reverse("blackout_create", args=["tenant-a"]), {**BLACKOUT_POST, **change}
    )
    assert response.status_code == 400
    assert error in response.content.decode()
    assert snapshot() == before


@pytest.mark.parametrize(
    ("persona", "created"),
    [("operator", True), ("admin_a", False), ("admin_b", False), ("responder", False)],
)
def test_fleet_blackout_create_is_for_operators(
    personas: dict[str, Client], persona: str, created: bool
) -> None:
    response = personas[persona].post(reverse("fleet_blackout_create"), BLACKOUT_POST)
    assert response.status_code == (302 if created else 403)
    assert Blackout.objects.filter(tenant__isnull=True).exists() is created


def test_fleet_blackout_bad_input_is_reported(personas: dict[str, Client]) -> None:
    response = personas["operator"].post(
        reverse("fleet_blackout_create"), {**BLACKOUT_POST, "timezone": "x"}, follow=True
    )
    assert b"The blackout was not saved" in response.content
    assert not Blackout.objects.exists()


@pytest.fixture
def blackouts(fleet: Fleet) -> dict[str, Blackout]:
    common = {"starts_at": "2030-01-01T00:00Z", "ends_at": "2030-01-02T00:00Z"}
    return {
        "a": Blackout.objects.create(tenant=fleet.tenant_a, name="a", **common),
        "fleet": Blackout.objects.create(tenant=None, name="fleet", **common),
    }


@pytest.mark.parametrize(
    ("persona", "which", "status"),
    [
        ("operator", "a", 302),
        ("admin_a", "a", 302),
        ("admin_b", "a", 404),
        ("responder", "a", 403),
        ("operator", "fleet", 302),
        ("admin_a", "fleet", 403),
        ("responder", "fleet", 403),
    ],
)
def test_blackout_delete_by_persona(
    personas: dict[str, Client],
    blackouts: dict[str, Blackout],
    persona: str,
    which: str,
    status: int,
) -> None:
    pk = blackouts[which].pk
    response = personas[persona].post(reverse("blackout_delete", args=[pk]))
    assert response.status_code == status
    assert Blackout.objects.filter(pk=pk).exists() is (status != 302)


# --- policy ---------------------------------------------------------------------

POLICY_POST = {
    "requires_consent": "on",
    "auto_apply_critical": "on",
    "notify_lead_minutes": "45",
    "consent_valid_days": "7",
}


@pytest.mark.parametrize(("persona", "status"), EDITORS.items())
def test_policy_update_by_persona(personas: dict[str, Client], persona: str, status: int) -> None:
    response = personas[persona].post(reverse("policy_update", args=["tenant-a"]), POLICY_POST)
    assert response.status_code == status
    policy = UpdatePolicy.objects.filter(tenant__slug="tenant-a").first()
    if status == 302:
        assert policy is not None
        assert (policy.auto_update, policy.requires_consent, policy.notify_lead_minutes) == (
            False,
            True,
            45,
        )
    else:
        assert policy is None


def test_policy_bad_input(personas: dict[str, Client]) -> None:
    response = personas["admin_a"].post(
        reverse("policy_update", args=["tenant-a"]), {**POLICY_POST, "consent_valid_days": "0"}
    )
    assert response.status_code == 400
    assert not UpdatePolicy.objects.exists()


# --- consent --------------------------------------------------------------------


@pytest.mark.parametrize(("persona", "status"), EDITORS.items())
def test_consent_grant_by_persona(
    personas: dict[str, Client], fleet: Fleet, release: Release, persona: str, status: int
) -> None:
    job = waiting_job(fleet.node_a, release, UpdateJob.State.WAITING_FOR_CONSENT)
    page = personas[persona].get(reverse("tenant_detail", args=["tenant-a"]))
    if page.status_code == 200:
        assert (b'data-release="1.7.0"' in page.content) and (
            (b'value="grant"' in page.content) is (status == 302)
        )
    response = personas[persona].post(
        reverse("consent_decide", args=["tenant-a"]),
        {"release": release.pk, "decision": "grant", "valid_days": "3"},
    )
    assert response.status_code == status
    consent = Consent.objects.filter(tenant=fleet.tenant_a, release=release).first()
    if status == 302:
        assert consent is not None
        assert consent.decision == "granted"
        assert consent.expires_at is not None
        assert (consent.expires_at - consent.decided_at).days == 3
        assert Event.objects.filter(verb="consent.granted").count() == 1
    else:
        assert consent is None and not Event.objects.filter(verb__startswith="consent").exists()
    job.refresh_from_db()
    assert job.state == UpdateJob.State.WAITING_FOR_CONSENT  # the beat starts it


def test_consent_decline_needs_a_reason_then_cancels(
    personas: dict[str, Client], fleet: Fleet, release: Release
) -> None:
    job = waiting_job(fleet.node_a, release, UpdateJob.State.WAITING_FOR_CONSENT)
    url = reverse("consent_decide", args=["tenant-a"])
    response = personas["admin_a"].post(url, {"release": release.pk, "decision": "decline"})
    assert response.status_code == 400 and b"Say why" in response.content
    assert not Consent.objects.exists()
    response = personas["admin_a"].post(
        url, {"release": release.pk, "decision": "decline", "reason": "quarter close"}
    )
    assert response.status_code == 302
    assert Consent.objects.get().reason == "quarter close"
    job.refresh_from_db()
    assert job.state == UpdateJob.State.CANCELLED
    event = Event.objects.get(verb="consent.declined")
    assert event.actor_label == "alice" and event.details["reason"] == "quarter close"


def test_consent_for_an_unknown_release_is_a_form_error(personas: dict[str, Client]) -> None:
    response = personas["admin_a"].post(
        reverse("consent_decide", args=["tenant-a"]), {"release": 999, "decision": "grant"}
    )
    assert response.status_code == 400
    assert not Consent.objects.exists()


def test_anonymous_cannot_decide(personas: dict[str, Client], release: Release) -> None:
    response = personas["anonymous"].post(
        reverse("consent_decide", args=["tenant-a"]), {"release": release.pk, "decision": "grant"}
    )
    assert_login_redirect(response)
    assert not Consent.objects.exists()


def test_next_window_template_tag(fleet: Fleet, night_window: MaintenanceWindow) -> None:
    from django.template import Context, Template

    rendered = Template("{% load tenant_schedule %}{% next_window_label tenant at %}").render(
        Context({"tenant": fleet.tenant_a, "at": utc(2027, 1, 8, 3, 48)})
    )
    assert rendered == "Fri 02:00 America/New_York (in 3 h 12 m)"


def test_pages_survive_a_schedule_that_cannot_be_read(
    personas: dict[str, Client], fleet: Fleet, night_window: MaintenanceWindow
) -> None:
    MaintenanceWindow.objects.filter(pk=night_window.pk).update(timezone="Gone/Zone")
    detail = personas["operator"].get(reverse("tenant_detail", args=["tenant-a"]))
    assert detail.status_code == 200 and b"the schedule is invalid" in detail.content
    assert personas["operator"].get(reverse("tenant_calendar")).status_code == 200
    assert personas["operator"].get(reverse("tenant_list")).status_code == 200
