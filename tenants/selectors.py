"""Reads for tenant schedules, always scoped to the requesting user."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from django.contrib.auth.models import User
from django.core.exceptions import PermissionDenied
from django.db.models import Q
from django.shortcuts import get_object_or_404

from updates.models import Release, UpdateJob

from . import scheduler
from .models import Blackout, Consent, MaintenanceWindow, Tenant, UpdatePolicy


def get_tenant_for_user(user: Any, slug: str) -> Tenant:
    """The one way views fetch a tenant: 404 when the user may not see it."""
    return get_object_or_404(Tenant.objects.visible_to(user), slug=slug)


def get_tenant_for_editor(user: Any, slug: str) -> Tenant:
    """404 when the user may not see the tenant, 403 when they may only look."""
    tenant = get_tenant_for_user(user, slug)
    if not can_edit_tenant(user, tenant):
        raise PermissionDenied("read-only access to this tenant")
    return tenant


def can_edit_tenant(user: Any, tenant: Tenant) -> bool:
    return Tenant.objects.editable_by(user).filter(pk=tenant.pk).exists()


def can_manage_fleet(user: Any) -> bool:
    """Fleet-wide blackouts are the operators' alone."""
    return bool(user.has_perm("tenants.manage_all_tenants"))


def get_window_for_editor(user: Any, slug: str, pk: int) -> MaintenanceWindow:
    tenant = get_tenant_for_editor(user, slug)
    return get_object_or_404(
        MaintenanceWindow.objects.select_related("tenant"), tenant=tenant, pk=pk
    )


def get_blackout_for_editor(user: Any, pk: int) -> Blackout:
    """A tenant's blackout for that tenant's editors (404 for outsiders); a
    fleet-wide one, which every tenant page shows, for operators only (403)."""
    blackout = get_object_or_404(Blackout.objects.select_related("tenant"), pk=pk)
    if blackout.tenant is None:
        if not can_manage_fleet(user):
            raise PermissionDenied("fleet-wide blackouts are changed by operators")
        return blackout
    get_tenant_for_editor(user, blackout.tenant.slug)
    return blackout


def policy_for(tenant: Tenant) -> UpdatePolicy:
    """The tenant's policy, or the defaults (unsaved) when none was set."""
    try:
        return tenant.update_policy
    except UpdatePolicy.DoesNotExist:
        return UpdatePolicy(tenant=tenant)


def tenant_blackouts(tenant: Tenant | int) -> list[Blackout]:
    """The tenant's own blackouts and the fleet-wide ones."""
    tenant_id = tenant.pk if isinstance(tenant, Tenant) else tenant
    return list(Blackout.objects.filter(Q(tenant_id=tenant_id) | Q(tenant__isnull=True)))


def schedule_for_tenant(tenant: Tenant) -> scheduler.Schedule:
    """The tenant's windows, blackouts and policy as scheduler input."""
    return _schedule(tenant, tenant_blackouts(tenant))


def _schedule(tenant: Tenant, blackouts: list[Blackout]) -> scheduler.Schedule:
    policy = policy_for(tenant)
    return scheduler.Schedule(
        windows=tuple(to_window(w) for w in tenant.windows.all()),
        blackouts=tuple(to_blackout(b) for b in blackouts),
        policy=scheduler.Policy(
            auto_update=policy.auto_update,
            auto_apply_critical=policy.auto_apply_critical,
            requires_consent=policy.requires_consent,
        ),
        tenant_name=tenant.name,
    )


def to_window(window: MaintenanceWindow) -> scheduler.Window:
    return scheduler.Window(
        days=window.day_numbers,
        start=window.start_time,
        end=window.end_time,
        tz=window.timezone,
        label=window.label,
    )


def to_blackout(blackout: Blackout) -> scheduler.Blackout:
    return scheduler.Blackout(
        name=blackout.name,
        start=blackout.starts_at,
        end=blackout.ends_at,
        tz=blackout.timezone,
        yearly=blackout.yearly,
    )


def release_priority(release: Release | None) -> str:
    """Release.priority once the updates app has it; 'normal' until then."""
    return str(getattr(release, "priority", scheduler.NORMAL) or scheduler.NORMAL)


def consent_state(tenant_id: int, release: Release) -> scheduler.ConsentState | None:
    consent = (
        Consent.objects.filter(tenant_id=tenant_id, release=release)
        .select_related("decided_by")
        .first()
    )
    if consent is None:
        return None
    return scheduler.ConsentState(
        granted=consent.decision == Consent.Decision.GRANTED,
        decided_by=consent.decided_by.get_username() if consent.decided_by else "",
        reason=consent.reason,
        expires_at=consent.expires_at,
    )


@dataclass
class PendingConsent:
    release: Release
    jobs: list[UpdateJob] = field(default_factory=list)
    consent: Consent | None = None  # a decline or an expired grant, if any

    @property
    def since(self) -> datetime:
        return min(job.created_at for job in self.jobs)


def pending_consents(tenant: Tenant) -> list[PendingConsent]:
    """Releases that nodes of this tenant wait to be consented to."""
    waiting = (
        UpdateJob.objects.filter(node__tenant=tenant, state=UpdateJob.State.WAITING_FOR_CONSENT)
        .exclude(release__isnull=True)
        .select_related("node", "release")
        .order_by("created_at")
    )
    pending: dict[int, PendingConsent] = {}
    for job in waiting:
        assert job.release is not None
        pending.setdefault(job.release.pk, PendingConsent(release=job.release)).jobs.append(job)
    consents = Consent.objects.filter(tenant=tenant, release_id__in=pending).select_related(
        "decided_by"
    )
    for consent in consents:
        pending[consent.release_id].consent = consent
    return sorted(
        pending.values(),
        key=lambda p: (scheduler.priority_rank(release_priority(p.release)), p.since),
    )


def waiting_jobs(tenant: Tenant) -> list[UpdateJob]:
    return list(
        UpdateJob.objects.filter(node__tenant=tenant, state__in=UpdateJob.WAITING_STATES)
        .select_related("node", "release")
        .order_by("created_at")
    )


def next_window_label(tenant: Tenant, at: datetime) -> str:
    """'Sat 02:00 America/New_York (in 3 h 12 m)', 'open now until ...' or a reason."""
    return _opening_label(tenant, tenant_blackouts(tenant), at)


def next_window_labels(tenant_ids: Collection[int], at: datetime) -> dict[int, str]:
    """`next_window_label` of each tenant, by id, in three queries however many tenants:
    a page listing many waiting nodes works each tenant's schedule out once."""
    if not tenant_ids:
        return {}
    tenants = (
        Tenant.objects.filter(pk__in=set(tenant_ids))
        .select_related("update_policy")
        .prefetch_related("windows")
    )
    blackouts = list(
        Blackout.objects.filter(Q(tenant_id__in=set(tenant_ids)) | Q(tenant__isnull=True))
    )
    return {
        tenant.pk: _opening_label(
            tenant, [b for b in blackouts if b.tenant_id in (None, tenant.pk)], at
        )
        for tenant in tenants
    }


def _opening_label(tenant: Tenant, blackouts: list[Blackout], at: datetime) -> str:
    try:
        # Reading the schedule may find it invalid too (a zone that no longer exists).
        opening = scheduler.next_window(_schedule(tenant, blackouts), at)
    except scheduler.InvalidSchedule as invalid:
        return f"unknown: the schedule is invalid ({invalid})"
    if opening is None:
        return "no maintenance window in the next two years"
    return scheduler.format_opening(opening, at)


def windows_opening_soon(*, at: datetime) -> list[tuple[Tenant, scheduler.Opening]]:
    """Tenants with windows whose next window opens within their policy's
    notification lead time after `at` (for the notifications that warn them)."""
    soon = []
    for tenant in Tenant.objects.filter(windows__isnull=False).distinct():
        lead = timedelta(minutes=policy_for(tenant).notify_lead_minutes)
        try:
            opening = scheduler.next_window(schedule_for_tenant(tenant), at)
        except scheduler.InvalidSchedule:
            continue  # the gate holds such a tenant's nodes and says why

        if opening is not None and at < opening.start <= at + lead:
            soon.append((tenant, opening))
    return soon


# --- per-tenant rollback ----------------------------------------------------


# --- calendar ---------------------------------------------------------------


@dataclass
class CalendarRow:
    tenant: Tenant | None  # None: the fleet-wide row
    windows: list[scheduler.Span] = field(default_factory=list)
    blackouts: list[scheduler.Span] = field(default_factory=list)


def calendar_week(user: Any, week_start: datetime) -> list[CalendarRow]:
    """One row per visible tenant (windows and the tenant's own blackouts) plus
    a fleet-wide row, for the seven days from `week_start`."""
    tenants = list(
        Tenant.objects.visible_to(user).prefetch_related("windows", "blackouts").order_by("name")
    )
    fleet = [to_blackout(b) for b in Blackout.objects.filter(tenant__isnull=True)]
    rows = [CalendarRow(tenant=None)]
    _, rows[0].blackouts = scheduler.week_spans(
        scheduler.Schedule(blackouts=tuple(fleet)), week_start
    )
    for tenant in tenants:
        try:
            schedule = scheduler.Schedule(
                windows=tuple(to_window(w) for w in tenant.windows.all()),
                blackouts=tuple(to_blackout(b) for b in tenant.blackouts.all()),
            )
        except scheduler.InvalidSchedule:
            schedule = scheduler.Schedule()  # shown empty; its page names the problem
        windows, blackouts = scheduler.week_spans(schedule, week_start)
        rows.append(CalendarRow(tenant=tenant, windows=windows, blackouts=blackouts))
    return rows


# --- users ---------------------------------------------------------------------------


@dataclass(frozen=True)
class UserRow:
    user: User
    role: str
    tenants: list[str]


def user_rows() -> list[UserRow]:
    """Every user with their role and administered tenants (three queries in all)."""
    users = list(
        User.objects.order_by("username").prefetch_related("groups", "administered_tenants")
    )
    return [
        UserRow(
            user=user,
            role=", ".join(sorted(g.name for g in user.groups.all())) or "—",
            tenants=sorted(t.name for t in user.administered_tenants.all()),
        )
        for user in users
    ]
