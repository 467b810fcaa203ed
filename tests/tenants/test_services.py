"""The gate, consent, schedule edits and the beat that releases waiting jobs."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import time, timedelta
from typing import TypedDict

import pytest
from django.contrib.auth.models import User
from django.core.exceptions import PermissionDenied, ValidationError
from pytest_django.fixtures import DjangoCaptureOnCommitCallbacks

from tenants import services
from tenants.models import Blackout, Consent, MaintenanceWindow, UpdatePolicy
from tests.conftest import Fleet
from tests.factories import make_release
from tests.tenants.conftest import utc, waiting_job
from updates.models import Event, Release, UpdateJob
from updates.rollouts.rollback_plan import tenant_rollback_plan

pytestmark = pytest.mark.django_db

S = UpdateJob.State
# Tenant A's night window is 02:00-04:00 New York = 07:00-09:00 UTC in winter.
INSIDE, OUTSIDE = utc(2027, 1, 5, 7, 30), utc(2027, 1, 5, 12)


# --- update_gate ----------------------------------------------------------------


def test_gate_allows_a_tenant_without_schedule(fleet: Fleet, release: Release) -> None:
    decision = services.update_gate(node=fleet.node_b, release=release, at=OUTSIDE)
    assert decision.allowed and decision.wait_state is None


def test_gate_holds_outside_the_window_with_the_next_start(
    fleet: Fleet, release: Release, night_window: MaintenanceWindow
) -> None:
    decision = services.update_gate(node=fleet.node_a, release=release, at=utc(2027, 1, 8, 3, 48))
    assert not decision.allowed
    assert decision.wait_state == "WAITING_FOR_WINDOW"
    assert decision.reason == "outside maintenance windows; next window Fri 02:00 America/New_York"
    assert decision.next_window_utc == utc(2027, 1, 8, 7)
    assert decision.next_window_label == "Fri 02:00 America/New_York (in 3 h 12 m)"
    assert services.update_gate(node=fleet.node_a, release=release, at=INSIDE).allowed
    # Other tenants are not affected.
    assert services.update_gate(node=fleet.node_b, release=release, at=OUTSIDE).allowed


def test_gate_never_holds_a_rollback(fleet: Fleet, night_window: MaintenanceWindow) -> None:
    assert services.update_gate(node=fleet.node_a, release=None, at=OUTSIDE).allowed


def test_fleet_wide_blackout_holds_every_tenant_and_beats_windows(
    fleet: Fleet, release: Release, night_window: MaintenanceWindow
) -> None:
    Blackout.objects.create(
        name="Q4 freeze", starts_at=utc(2027, 1, 1), ends_at=utc(2027, 1, 10), timezone="UTC"
    )
    for node in (fleet.node_a, fleet.node_b):
        decision = services.update_gate(node=node, release=release, at=INSIDE)
        assert not decision.allowed
        assert decision.reason == "blackout 'Q4 freeze' until 2027-01-10 00:00 UTC"


def test_critical_release_skips_the_window_when_the_policy_says_so(
    fleet: Fleet, night_window: MaintenanceWindow
) -> None:
    critical = make_release(version="1.7.1", priority="critical")
    assert services.update_gate(node=fleet.node_a, release=critical, at=OUTSIDE).allowed


def test_consent_flow_through_the_gate(
    fleet: Fleet,
    release: Release,
    users: dict[str, User],
    consent_required: UpdatePolicy,
    night_window: MaintenanceWindow,
) -> None:
    held = services.update_gate(node=fleet.node_a, release=release, at=INSIDE)
    assert held.wait_state == "WAITING_FOR_CONSENT"
    assert held.reason == "waiting for consent from Tenant A's admins for 1.7.0"
    services.consent_grant(
        tenant=fleet.tenant_a, release=release, user=users["admin_a"], valid_days=2, at=INSIDE
    )
    assert services.update_gate(node=fleet.node_a, release=release, at=INSIDE).allowed
    assert (
        services.update_gate(node=fleet.node_a, release=release, at=OUTSIDE).wait_state
        == "WAITING_FOR_WINDOW"
    )
    later = INSIDE + timedelta(days=3)
    expired = services.update_gate(node=fleet.node_a, release=release, at=later)
    assert expired.wait_state == "WAITING_FOR_CONSENT" and "expired" in expired.reason


# --- consent --------------------------------------------------------------------


def test_consent_grant_is_recorded_and_logged(
    fleet: Fleet, release: Release, users: dict[str, User]
) -> None:
    consent = services.consent_grant(
        tenant=fleet.tenant_a, release=release, user=users["admin_a"], at=INSIDE
    )
    assert consent.decision == Consent.Decision.GRANTED
    assert consent.expires_at == INSIDE + timedelta(days=14)  # the policy default
    event = Event.objects.get(verb="consent.granted")
    assert (event.actor, event.tenant_id, event.details["version"]) == (
        users["admin_a"],
        fleet.tenant_a.pk,
        "1.7.0",
    )


@pytest.mark.parametrize("who", ["admin_b", "responder"])
def test_only_the_tenants_admins_and_operators_decide(
    fleet: Fleet, release: Release, users: dict[str, User], who: str
) -> None:
    with pytest.raises(PermissionDenied):
        services.consent_grant(tenant=fleet.tenant_a, release=release, user=users[who])
    assert not Consent.objects.exists() and not Event.objects.filter(verb__startswith="consent")
    services.consent_grant(tenant=fleet.tenant_a, release=release, user=users["operator"])
    assert Consent.objects.get().decided_by == users["operator"]


def test_decline_needs_a_reason_and_cancels_the_waiting_jobs(
    fleet: Fleet, release: Release, users: dict[str, User]
) -> None:
    job = waiting_job(fleet.node_a, release, S.WAITING_FOR_CONSENT)
    other_tenant = waiting_job(fleet.node_b, release, S.WAITING_FOR_CONSENT)
    with pytest.raises(ValidationError):
        services.consent_decline(
            tenant=fleet.tenant_a, release=release, user=users["admin_a"], reason="  "
        )
    assert not Consent.objects.exists()
    services.consent_decline(
        tenant=fleet.tenant_a, release=release, user=users["admin_a"], reason="peak season"
    )
    job.refresh_from_db()
    other_tenant.refresh_from_db()
    assert job.state == S.CANCELLED and job.wait_reason == "consent declined: peak season"
    assert other_tenant.state == S.WAITING_FOR_CONSENT
    assert Event.objects.filter(verb="consent.declined", details__reason="peak season").exists()
    assert Event.objects.filter(verb="job.cancelled", object_id=str(job.pk)).exists()
    # Changing one's mind later replaces the answer (history stays in the events).
    services.consent_grant(tenant=fleet.tenant_a, release=release, user=users["admin_a"])
    assert Consent.objects.get().decision == Consent.Decision.GRANTED
    assert Event.objects.filter(verb__startswith="consent.").count() == 2


# --- windows and blackouts ------------------------------------------------------


def window_input(
    start: str = "02:00",
    end: str = "04:00",
    tz: str = "America/New_York",
    days: Iterable[int] = range(7),
) -> services.WindowInput:
    return services.WindowInput(
        days=frozenset(days),
        start_time=time.fromisoformat(start),
        end_time=time.fromisoformat(end),
        timezone=tz,
    )


def test_window_create_update_delete_are_logged(fleet: Fleet, users: dict[str, User]) -> None:
    window = services.maintenance_window_create(
        tenant=fleet.tenant_a, user=users["admin_a"], data=window_input()
    )
    assert window.days == "0123456" and window.describe() == "daily 02:00-04:00 America/New_York"
    services.maintenance_window_update(
        window=window, user=users["admin_a"], data=window_input("03:00", "05:00", days=[5, 6])
    )
    window.refresh_from_db()
    assert window.describe() == "Sat,Sun 03:00-05:00 America/New_York"
    services.maintenance_window_delete(window=window, user=users["admin_a"])
    assert not MaintenanceWindow.objects.exists()
    verbs = list(Event.objects.order_by("id").values_list("verb", flat=True))
    assert verbs == ["window.created", "window.updated", "window.deleted"]


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (window_input("03:00", "05:00"), "Overlaps the window daily 02:00-04:00"),
        (window_input("23:00", "02:30"), "Overlaps"),
        (window_input(tz="Mars/Olympus"), "unknown timezone"),
    ],
)
def test_bad_windows_save_nothing(
    fleet: Fleet,
    users: dict[str, User],
    night_window: MaintenanceWindow,
    data: services.WindowInput,
    message: str,
) -> None:
    with pytest.raises(ValidationError, match=message):
        services.maintenance_window_create(tenant=fleet.tenant_a, user=users["admin_a"], data=data)
    assert MaintenanceWindow.objects.count() == 1
    assert not Event.objects.exists()


def test_editing_a_window_does_not_overlap_itself(
    fleet: Fleet, users: dict[str, User], night_window: MaintenanceWindow
) -> None:
    services.maintenance_window_update(
        window=night_window, user=users["admin_a"], data=window_input("02:30", "04:30")
    )
    night_window.refresh_from_db()
    assert night_window.start_time == time(2, 30)


def blackout_input(
    start: tuple[int, int, int] = (2027, 12, 20),
    end: tuple[int, int, int] = (2028, 1, 3),
    tz: str = "Europe/London",
    yearly: bool = False,
) -> services.BlackoutInput:
    from datetime import datetime

    return services.BlackoutInput(
        name="Q4 freeze",
        starts_local=datetime(*start),
        ends_local=datetime(*end),
        timezone=tz,
        yearly=yearly,
    )


def test_blackout_is_stored_in_utc_from_its_local_times(
    fleet: Fleet, users: dict[str, User]
) -> None:
    blackout = services.blackout_create(
        tenant=fleet.tenant_a,
        user=users["admin_a"],
        data=blackout_input(start=(2027, 7, 1), end=(2027, 7, 2)),
        at=INSIDE,
    )
    assert blackout.starts_at == utc(2027, 6, 30, 23)  # 00:00 BST
    assert Event.objects.get(verb="blackout.created").details["fleet_wide"] is False


@pytest.mark.parametrize(
    ("data", "field"),
    [
        (blackout_input(end=(2027, 12, 19)), "ends_local"),
        (blackout_input(start=(2026, 1, 1), end=(2026, 1, 2)), "ends_local"),  # in the past
        (blackout_input(tz="Europe/Londn"), "timezone"),
        (blackout_input(end=(2028, 12, 21), yearly=True), "yearly"),
    ],
)
def test_bad_blackouts_save_nothing(
    fleet: Fleet, users: dict[str, User], data: services.BlackoutInput, field: str
) -> None:
    with pytest.raises(ValidationError) as caught:
        services.blackout_create(tenant=fleet.tenant_a, user=users["admin_a"], data=data, at=INSIDE)
    assert field in caught.value.error_dict
    assert not Blackout.objects.exists() and not Event.objects.exists()


def test_fleet_wide_blackouts_are_for_operators(fleet: Fleet, users: dict[str, User]) -> None:
    with pytest.raises(PermissionDenied):
        services.blackout_create(tenant=None, user=users["admin_a"], data=blackout_input())
    blackout = services.blackout_create(tenant=None, user=users["operator"], data=blackout_input())
    assert blackout.fleet_wide
    with pytest.raises(PermissionDenied):
        services.blackout_delete(blackout=blackout, user=users["admin_a"])
    assert Blackout.objects.count() == 1


class PolicyFields(TypedDict):
    auto_update: bool
    auto_apply_critical: bool
    requires_consent: bool
    notify_lead_minutes: int
    consent_valid_days: int


def test_policy_set_validates_and_logs(fleet: Fleet, users: dict[str, User]) -> None:
    kwargs = PolicyFields(
        auto_update=False,
        auto_apply_critical=False,
        requires_consent=True,
        notify_lead_minutes=30,
        consent_valid_days=3,
    )
    invalid: PolicyFields = {**kwargs, "consent_valid_days": 0}
    with pytest.raises(ValidationError):
        services.update_policy_set(tenant=fleet.tenant_a, user=users["admin_a"], **invalid)
    policy = services.update_policy_set(tenant=fleet.tenant_a, user=users["admin_a"], **kwargs)
    assert (policy.auto_update, policy.requires_consent, policy.notify_lead_minutes) == (
        False,
        True,
        30,
    )
    assert Event.objects.filter(verb="policy.updated").count() == 1


# --- waiting_jobs_release -------------------------------------------------------


def test_waiting_jobs_are_released_when_the_window_opens(
    fleet: Fleet,
    release: Release,
    night_window: MaintenanceWindow,
    django_capture_on_commit_callbacks: DjangoCaptureOnCommitCallbacks,
) -> None:
    job = waiting_job(fleet.node_a, release, reason="old")
    started: list[UpdateJob] = []
    with django_capture_on_commit_callbacks(execute=True):
        assert services.waiting_jobs_release(at=OUTSIDE, start_job=started.append) == []
    job.refresh_from_db()
    assert job.state == S.WAITING_FOR_WINDOW
    assert job.wait_reason.startswith("outside maintenance windows; next window")
    with django_capture_on_commit_callbacks(execute=True):
        assert services.waiting_jobs_release(at=INSIDE, start_job=started.append) == [job.pk]
    job.refresh_from_db()
    assert job.state == S.QUEUED and job.wait_reason == ""
    assert [j.pk for j in started] == [job.pk]
    assert Event.objects.filter(verb="job.released", object_id=str(job.pk)).count() == 1
    # A second beat finds nothing to do.
    assert services.waiting_jobs_release(at=INSIDE, start_job=started.append) == []


def test_a_granted_consent_moves_the_job_on_to_wait_for_the_window(
    fleet: Fleet,
    release: Release,
    users: dict[str, User],
    consent_required: UpdatePolicy,
    night_window: MaintenanceWindow,
) -> None:
    job = waiting_job(fleet.node_a, release, S.WAITING_FOR_CONSENT)
    services.consent_grant(
        tenant=fleet.tenant_a, release=release, user=users["admin_a"], at=OUTSIDE
    )
    services.waiting_jobs_release(at=OUTSIDE, start_job=lambda j: None)
    job.refresh_from_db()
    assert job.state == S.WAITING_FOR_WINDOW
    assert Event.objects.filter(verb="job.waiting_for_window", object_id=str(job.pk)).exists()


def test_critical_jobs_are_released_first(
    fleet: Fleet,
    release: Release,
    django_capture_on_commit_callbacks: DjangoCaptureOnCommitCallbacks,
) -> None:
    critical = make_release(version="1.7.1", priority="critical")
    low = make_release(version="1.7.2", priority="low")
    jobs = [
        waiting_job(fleet.node_a, low),
        waiting_job(fleet.node_a_standalone, release),
        waiting_job(fleet.node_b, critical),
    ]
    started: list[UpdateJob] = []
    with django_capture_on_commit_callbacks(execute=True):
        services.waiting_jobs_release(at=OUTSIDE, start_job=started.append)
    assert [j.pk for j in started] == [jobs[2].pk, jobs[1].pk, jobs[0].pk]


# --- rollback plan --------------------------------------------------------------


def test_rollback_plan_picks_the_newest_earlier_version_leader_last(fleet: Fleet) -> None:
    fleet.node_a.installed_version = "1.7.0"
    fleet.node_a.restore_points = [
        {"id": "p1", "version": "1.5.0", "created": "2027-01-01T00:00:00Z"},
        {"id": "p2", "version": "1.6.0", "created": "2027-01-02T00:00:00Z"},
        {"id": "p3", "version": "1.7.0", "created": "2027-01-03T00:00:00Z"},
    ]
    fleet.node_a.save()
    follower = fleet.node_a_standalone
    follower.cluster = fleet.cluster_a
    follower.raft_role = "follower"
    follower.save()
    plan = tenant_rollback_plan(fleet.tenant_a)
    assert [step.node.node_id for step in plan] == ["a-solo", "a-1"]
    assert (plan[1].restore_point, plan[1].target_version) == ("p2", "1.6.0")
    assert plan[0].restore_point is None and "no earlier version" in plan[0].note


def test_a_schedule_that_cannot_be_read_holds_the_node(
    fleet: Fleet, release: Release, night_window: MaintenanceWindow
) -> None:
    MaintenanceWindow.objects.filter(pk=night_window.pk).update(timezone="Gone/Zone")
    decision = services.update_gate(node=fleet.node_a, release=release, at=INSIDE)
    assert not decision.allowed and decision.wait_state == "WAITING_FOR_WINDOW"
    assert "tenant schedule is invalid" in decision.reason
    job = waiting_job(fleet.node_a, release)
    assert services.waiting_jobs_release(at=INSIDE, start_job=lambda j: None) == []
    job.refresh_from_db()
    assert job.state == S.WAITING_FOR_WINDOW and "invalid" in job.wait_reason


def test_model_clean_guards_admin_input(fleet: Fleet) -> None:
    window = MaintenanceWindow(
        tenant=fleet.tenant_a, days="78", start_time=time(1), end_time=time(2), timezone="X/Y"
    )
    with pytest.raises(ValidationError) as caught:
        window.full_clean()
    assert {"days", "timezone"} <= set(caught.value.error_dict)
    blackout = Blackout(name="b", starts_at=INSIDE, ends_at=INSIDE, timezone="UTC")
    with pytest.raises(ValidationError, match="end after it starts"):
        blackout.full_clean()


def test_windows_opening_soon_respects_each_tenants_lead_time(
    fleet: Fleet, night_window: MaintenanceWindow
) -> None:
    from tenants.models import UpdatePolicy
    from tenants.selectors import windows_opening_soon

    UpdatePolicy.objects.create(tenant=fleet.tenant_a, notify_lead_minutes=30)
    assert windows_opening_soon(at=utc(2027, 1, 5, 6, 20)) == []  # 40 min before
    [(tenant, opening)] = windows_opening_soon(at=utc(2027, 1, 5, 6, 40))
    assert tenant == fleet.tenant_a and opening.start == utc(2027, 1, 5, 7)
    assert windows_opening_soon(at=INSIDE) == []  # already open
