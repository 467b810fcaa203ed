"""Writes for tenant schedules, and the gate every update passes before it starts.

`update_gate` is the one question job and rollout code asks before starting a
node: it says whether the node may start now and, if not, which waiting state
it belongs in and why. The rules themselves live in tenants.scheduler.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, time, timedelta
from typing import Any

from django.contrib.auth.models import Group, User
from django.contrib.auth.password_validation import validate_password
from django.core.exceptions import PermissionDenied, ValidationError
from django.db import models, transaction
from django.db.models import Q
from django.utils import timezone

from updates.audit import event_log
from updates.models import Event, Node, Release, Rollout, UpdateJob

from . import scheduler
from .gate import GateDecision
from .models import Blackout, Consent, MaintenanceWindow, Tenant, UpdatePolicy
from .roles import OPERATOR, RESPONDER, TENANT_ADMIN
from .selectors import (
    can_edit_tenant,
    can_manage_fleet,
    consent_state,
    policy_for,
    release_priority,
    schedule_for_tenant,
    to_window,
    windows_opening_soon,
)

log = logging.getLogger(__name__)

SYSTEM = "system"


# --- the gate -------------------------------------------------------------


def update_gate(*, node: Node, release: Release | None, at: datetime | None = None) -> GateDecision:
    """May `node` start updating to `release` at `at` (default: now)?

    A rollback (`release=None`) is never held: it is how a broken update is
    undone, so no window, blackout or consent may stand in its way."""
    at = at or timezone.now()
    if release is None:
        return GateDecision(True, None, "rollback: not held by windows or consent", None, "")
    try:
        schedule = schedule_for_tenant(node.tenant)
    except scheduler.InvalidSchedule as invalid:
        return _broken_schedule(invalid)
    return _gate(schedule, consent_state(node.tenant_id, release), release, at)


def _broken_schedule(invalid: Exception) -> GateDecision:
    # Fail closed: a schedule we cannot read (say, a zone tzdata dropped) holds
    # the node; guessing could update it in the middle of the tenant's day.
    log.error("tenant schedule cannot be evaluated: %s", invalid)
    reason = f"tenant schedule is invalid ({invalid}); fix its windows or blackouts"
    return GateDecision(False, "WAITING_FOR_WINDOW", reason[:255], None, "unknown")


def _gate(
    schedule: scheduler.Schedule,
    consent: scheduler.ConsentState | None,
    release: Release,
    at: datetime,
) -> GateDecision:
    info = scheduler.ReleaseInfo(version=release.version, priority=release_priority(release))
    verdict = scheduler.can_update_now(schedule, info, at, consent)
    opening = verdict.opening
    label = (
        scheduler.format_opening(opening, at)
        if opening is not None
        else "no maintenance window in the next two years"
    )
    return GateDecision(
        allowed=verdict.allowed,
        wait_state=verdict.hold.value if verdict.hold else None,
        reason=verdict.reason,
        next_window_utc=opening.start if opening is not None else None,
        next_window_label=label,
    )


# --- releasing waiting jobs (the beat task) -------------------------------


def waiting_jobs_release(
    *, at: datetime | None = None, start_job: Callable[[UpdateJob], object]
) -> list[int]:
    """Re-evaluate every waiting job; move the allowed ones to QUEUED and call
    `start_job(job)` in the same transaction (it writes the job's command, sent once
    committed). Returns the released job ids.

    Each job is claimed with `UPDATE ... WHERE state = <its waiting state>`,
    so two beats racing each other start a job once. Critical releases first,
    then oldest first. Jobs still held get their state and reason refreshed
    (a granted consent turns WAITING_FOR_CONSENT into WAITING_FOR_WINDOW).
    A job of a rollout that is not running (paused, awaiting approval,
    stopping) stays parked with its reason until the rollout runs again."""
    at = at or timezone.now()
    jobs = list(
        UpdateJob.objects.filter(state__in=UpdateJob.WAITING_STATES).select_related(
            "node__tenant", "release", "rollout"
        )
    )
    jobs.sort(
        key=lambda j: (scheduler.priority_rank(release_priority(j.release)), j.created_at, j.pk)
    )
    schedules: dict[int, scheduler.Schedule] = {}
    released = []
    for job in jobs:
        if _release_withdrawn(job):
            _job_withdraw(job, at)
            continue
        decision = _job_decision(job, at, schedules)
        if decision.allowed:
            if job.rollout is not None and job.rollout.state != Rollout.State.RUNNING:
                continue
            try:
                started = _job_release(job, start_job)
            except Exception:  # one job's failure (rolled back, still waiting) holds no other
                log.exception("job %s: could not be released; it stays waiting", job.pk)
                continue
            if started:
                released.append(job.pk)
        else:
            _job_hold(job, decision)
    return released


def _job_decision(
    job: UpdateJob, at: datetime, schedules: dict[int, scheduler.Schedule]
) -> GateDecision:
    tenant = job.node.tenant
    if job.release is None:
        return update_gate(node=job.node, release=None, at=at)
    if tenant.pk not in schedules:
        try:
            schedules[tenant.pk] = schedule_for_tenant(tenant)
        except scheduler.InvalidSchedule as invalid:
            return _broken_schedule(invalid)
    return _gate(schedules[tenant.pk], consent_state(tenant.pk, job.release), job.release, at)


def _job_release(job: UpdateJob, start_job: Callable[[UpdateJob], object]) -> bool:
    waited = job.state
    # The rollout is checked in the claiming UPDATE itself: a pause committed
    # after the job was read still holds it.
    of_running_rollout = Q(rollout__isnull=True) | Q(rollout__state=Rollout.State.RUNNING)
    with transaction.atomic():
        claimed = UpdateJob.objects.filter(of_running_rollout, pk=job.pk, state=waited).update(
            state=UpdateJob.State.QUEUED, wait_reason=""
        )
        if not claimed:
            return False
        job.state, job.wait_reason = UpdateJob.State.QUEUED, ""
        event_log(
            verb="job.released",
            actor_label=SYSTEM,
            tenant=job.node.tenant_id,
            obj=job,
            details={"node_id": job.node.node_id, "waited_in": waited, "kind": job.kind},
        )
        # In the same transaction: the command to the node (the outbox row) commits with the
        # state change, so a crash between them cannot leave a QUEUED job nobody sends.
        start_job(job)
    return True


def _release_withdrawn(job: UpdateJob) -> bool:
    return job.release is not None and job.release.state != Release.State.PUBLISHED


def _job_withdraw(job: UpdateJob, at: datetime) -> None:
    """A job parked for a release deprecated since: it will never start, so it ends
    CANCELLED now (its command was never sent: parked jobs have none). A rollout's
    job is left to its rollout, which cancels it when it stops for the same reason."""
    if job.rollout_id is not None:
        return
    assert job.release is not None
    reason = f"release {job.release.version} was {job.release.state} before the job could start"
    with transaction.atomic():
        moved = UpdateJob.objects.filter(pk=job.pk, state=job.state).update(
            state=UpdateJob.State.CANCELLED, wait_reason="", error_message=reason, finished_at=at
        )
        if moved:
            event_log(
                verb="job.cancelled",
                actor_label=SYSTEM,
                tenant=job.node.tenant_id,
                obj=job,
                details={"node_id": job.node.node_id, "reason": reason},
            )


def _job_hold(job: UpdateJob, decision: GateDecision) -> None:
    state, reason = decision.wait_state or job.state, decision.reason[:255]
    if state == job.state and reason == job.wait_reason:
        return
    with transaction.atomic():
        moved = UpdateJob.objects.filter(pk=job.pk, state=job.state).update(
            state=state, wait_reason=reason
        )
        if moved and state != job.state:
            event_log(
                verb=f"job.{state.lower()}",
                actor_label=SYSTEM,
                tenant=job.node.tenant_id,
                obj=job,
                details={"node_id": job.node.node_id, "reason": reason},
            )


# --- consent --------------------------------------------------------------


def _require_editor(user: Any, tenant: Tenant) -> None:
    # Views check this too; services repeat it so no caller can forget.
    if not can_edit_tenant(user, tenant):
        raise PermissionDenied(f"{user} may not decide for {tenant}")


@transaction.atomic
def consent_grant(
    *,
    tenant: Tenant,
    release: Release,
    user: Any,
    valid_days: int | None = None,
    note: str = "",
    at: datetime | None = None,
) -> Consent:
    """A tenant admin (or operator) lets the tenant's nodes take `release`,
    until the consent expires. Waiting jobs start at the next beat."""
    _require_editor(user, tenant)
    at = at or timezone.now()
    days = valid_days or policy_for(tenant).consent_valid_days
    if not 1 <= days <= 365:
        raise ValidationError({"valid_days": "A consent is valid for 1 to 365 days."})
    consent = _consent_set(
        tenant, release, user, Consent.Decision.GRANTED, note, at, at + timedelta(days=days)
    )
    return consent


@transaction.atomic
def consent_decline(
    *, tenant: Tenant, release: Release, user: Any, reason: str, at: datetime | None = None
) -> Consent:
    """A tenant admin (or operator) refuses `release` for the tenant. The
    tenant's jobs waiting for this consent are cancelled: a decline is an
    answer, not a delay. A later grant lets new jobs through."""
    _require_editor(user, tenant)
    reason = reason.strip()
    if not reason:
        raise ValidationError({"reason": "Say why the release is declined."})
    at = at or timezone.now()
    consent = _consent_set(tenant, release, user, Consent.Decision.DECLINED, reason, at, None)
    _cancel_waiting_for_consent(tenant, release, user, reason)
    return consent


def _consent_set(
    tenant: Tenant,
    release: Release,
    user: Any,
    decision: str,
    reason: str,
    at: datetime,
    expires_at: datetime | None,
) -> Consent:
    consent, _ = Consent.objects.update_or_create(
        tenant=tenant,
        release=release,
        defaults={
            "decision": decision,
            "reason": reason[:500],
            "decided_by": user,
            "decided_at": at,
            "expires_at": expires_at,
        },
    )
    event_log(
        verb=f"consent.{decision}",
        actor=user,
        tenant=tenant,
        obj=consent,
        details={
            "release": release.pk,
            "version": release.version,
            "reason": reason[:500],
            "expires_at": expires_at.isoformat() if expires_at else None,
        },
    )
    return consent


def _cancel_waiting_for_consent(tenant: Tenant, release: Release, user: Any, reason: str) -> None:
    waiting = UpdateJob.objects.filter(
        node__tenant=tenant, release=release, state=UpdateJob.State.WAITING_FOR_CONSENT
    )
    for job in waiting.select_related("node"):
        cancelled = UpdateJob.objects.filter(
            pk=job.pk, state=UpdateJob.State.WAITING_FOR_CONSENT
        ).update(
            state=UpdateJob.State.CANCELLED,
            finished_at=timezone.now(),
            wait_reason=f"consent declined: {reason}"[:255],
        )
        if cancelled:
            event_log(
                verb="job.cancelled",
                actor=user,
                tenant=tenant,
                obj=job,
                details={"node_id": job.node.node_id, "reason": "consent declined"},
            )


# --- maintenance windows ----------------------------------------------------


@dataclass(frozen=True)
class WindowInput:
    days: frozenset[int]
    start_time: time
    end_time: time
    timezone: str
    label: str = ""


def _window_checked(tenant: Tenant, data: WindowInput, exclude_pk: int | None) -> None:
    """Valid timezone and days, and no overlap with the tenant's other windows."""
    try:
        candidate = scheduler.Window(
            days=data.days, start=data.start_time, end=data.end_time, tz=data.timezone
        )
    except scheduler.InvalidSchedule as invalid:
        field = "timezone" if "timezone" in str(invalid) else "days"
        raise ValidationError({field: str(invalid)}) from None
    others = tenant.windows.all() if exclude_pk is None else tenant.windows.exclude(pk=exclude_pk)
    for other in others:
        if scheduler.windows_overlap(candidate, to_window(other)):
            raise ValidationError(
                f"Overlaps the window {other.describe()}: change the times or edit that one."
            )


def _days_text(days: frozenset[int]) -> str:
    return "".join(str(d) for d in sorted(days))


@transaction.atomic
def maintenance_window_create(*, tenant: Tenant, user: Any, data: WindowInput) -> MaintenanceWindow:
    _require_editor(user, tenant)
    _window_checked(tenant, data, exclude_pk=None)
    window = MaintenanceWindow.objects.create(
        tenant=tenant,
        days=_days_text(data.days),
        start_time=data.start_time,
        end_time=data.end_time,
        timezone=data.timezone,
        label=data.label,
    )
    event_log(
        verb="window.created",
        actor=user,
        tenant=tenant,
        obj=window,
        details={"window": window.describe()},
    )
    return window


@transaction.atomic
def maintenance_window_update(
    *, window: MaintenanceWindow, user: Any, data: WindowInput
) -> MaintenanceWindow:
    _require_editor(user, window.tenant)
    _window_checked(window.tenant, data, exclude_pk=window.pk)
    before = window.describe()
    window.days = _days_text(data.days)
    window.start_time, window.end_time = data.start_time, data.end_time
    window.timezone, window.label = data.timezone, data.label
    window.save()
    event_log(
        verb="window.updated",
        actor=user,
        tenant=window.tenant,
        obj=window,
        details={"before": before, "after": window.describe()},
    )
    return window


@transaction.atomic
def maintenance_window_delete(*, window: MaintenanceWindow, user: Any) -> None:
    _require_editor(user, window.tenant)
    event_log(
        verb="window.deleted",
        actor=user,
        tenant=window.tenant,
        obj=window,
        details={"window": window.describe()},
    )
    window.delete()


# --- blackouts --------------------------------------------------------------


@dataclass(frozen=True)
class BlackoutInput:
    name: str
    starts_local: datetime  # naive wall time in `timezone`
    ends_local: datetime
    timezone: str
    yearly: bool = False


def _blackout_instants(data: BlackoutInput, at: datetime) -> tuple[datetime, datetime]:
    for field, value in (("starts_local", data.starts_local), ("ends_local", data.ends_local)):
        try:
            scheduler.check_in_range(value, "the date")
        except scheduler.InvalidSchedule as invalid:
            raise ValidationError({field: str(invalid).capitalize() + "."}) from None
    try:
        starts = scheduler.local_to_utc(data.starts_local, data.timezone)
        ends = scheduler.local_to_utc(data.ends_local, data.timezone)
    except scheduler.InvalidSchedule as invalid:
        raise ValidationError({"timezone": str(invalid)}) from None
    if ends <= starts:
        raise ValidationError({"ends_local": "The blackout must end after it starts."})
    if ends <= at:
        raise ValidationError(
            {"ends_local": "This blackout is already over; enter its next occurrence."}
        )
    if data.yearly and ends - starts >= timedelta(days=365):
        raise ValidationError({"yearly": "A yearly blackout must be shorter than a year."})
    return starts, ends


@transaction.atomic
def blackout_create(
    *, tenant: Tenant | None, user: Any, data: BlackoutInput, at: datetime | None = None
) -> Blackout:
    """A blackout for one tenant, or fleet-wide (`tenant=None`, operators only)."""
    if tenant is None:
        if not can_manage_fleet(user):
            raise PermissionDenied("fleet-wide blackouts are set by operators")
    else:
        _require_editor(user, tenant)
    starts, ends = _blackout_instants(data, at or timezone.now())
    blackout = Blackout.objects.create(
        tenant=tenant,
        name=data.name.strip(),
        starts_at=starts,
        ends_at=ends,
        timezone=data.timezone,
        yearly=data.yearly,
        created_by=user,
    )
    event_log(
        verb="blackout.created",
        actor=user,
        tenant=tenant,
        obj=blackout,
        details=_blackout_details(blackout),
    )
    return blackout


def _blackout_details(blackout: Blackout) -> dict[str, Any]:
    return {
        "name": blackout.name,
        "starts_at": blackout.starts_at.isoformat(),
        "ends_at": blackout.ends_at.isoformat(),
        "timezone": blackout.timezone,
        "yearly": blackout.yearly,
        "fleet_wide": blackout.tenant_id is None,
    }


@transaction.atomic
def blackout_delete(*, blackout: Blackout, user: Any) -> None:
    if blackout.tenant is None:
        if not can_manage_fleet(user):
            raise PermissionDenied("fleet-wide blackouts are changed by operators")
    else:
        _require_editor(user, blackout.tenant)
    event_log(
        verb="blackout.deleted",
        actor=user,
        tenant=blackout.tenant_id,
        obj=blackout,
        details=_blackout_details(blackout),
    )
    blackout.delete()


# --- policy -----------------------------------------------------------------


@transaction.atomic
def update_policy_set(
    *,
    tenant: Tenant,
    user: Any,
    auto_update: bool,
    auto_apply_critical: bool,
    requires_consent: bool,
    notify_lead_minutes: int,
    consent_valid_days: int,
) -> UpdatePolicy:
    _require_editor(user, tenant)
    if not 0 <= notify_lead_minutes <= 7 * 24 * 60:
        raise ValidationError({"notify_lead_minutes": "Between 0 minutes and 7 days."})
    if not 1 <= consent_valid_days <= 365:
        raise ValidationError({"consent_valid_days": "Between 1 and 365 days."})
    fields = {
        "auto_update": auto_update,
        "auto_apply_critical": auto_apply_critical,
        "requires_consent": requires_consent,
        "notify_lead_minutes": notify_lead_minutes,
        "consent_valid_days": consent_valid_days,
    }
    policy, _ = UpdatePolicy.objects.update_or_create(tenant=tenant, defaults=fields)
    event_log(verb="policy.updated", actor=user, tenant=tenant, obj=policy, details=fields)
    return policy


WINDOW_OPENING = "tenant.window_opening"


def window_reminders_send(*, at: datetime | None = None) -> list[str]:
    """Tell each tenant its next maintenance window opens soon, its policy's
    `notify_lead_minutes` ahead: one Event per tenant and opening (notifications route it),
    however often the beat asks. Returns the slugs of the tenants reminded now."""
    at = at or timezone.now()
    reminded = []
    for tenant, opening in windows_opening_soon(at=at):
        start = opening.start.isoformat()
        with transaction.atomic():
            # Serialise racing beats on the tenant row, then look for this opening's reminder.
            Tenant.objects.select_for_update().filter(pk=tenant.pk).first()
            if Event.objects.filter(
                verb=WINDOW_OPENING, tenant_id=tenant.pk, details__opening_start=start
            ).exists():
                continue
            event_log(
                verb=WINDOW_OPENING,
                tenant=tenant,
                obj=tenant,
                details={
                    "opening_start": start,
                    "opening_end": opening.end.isoformat() if opening.end else None,
                    "timezone": opening.tz,
                    "lead_minutes": policy_for(tenant).notify_lead_minutes,
                },
            )
        reminded.append(tenant.slug)
    return reminded


# --- users: people, their role and their tenants (operators, without the Django admin) ---


class Role(models.TextChoices):
    OPERATOR = OPERATOR, "operator: publishes, rolls out, manages everything"
    RESPONDER = RESPONDER, "responder: approves, pauses and aborts rollouts"
    TENANT_ADMIN = TENANT_ADMIN, "tenant admin: windows, policy and consent of their tenants"


def _role_tenants(user: User, role: str, tenants: list[Tenant]) -> None:
    user.groups.set([Group.objects.get(name=role)])
    # Only a tenant admin administers tenants: a changed role leaves none behind.
    user.administered_tenants.set(tenants if role == TENANT_ADMIN else [])


@transaction.atomic
def user_create(
    *, username: str, password: str, role: str, tenants: list[Tenant], actor: User
) -> User:
    if User.objects.filter(username__iexact=username).exists():
        raise ValidationError({"username": f"A user named {username!r} exists already."})
    _check_password(password, User(username=username))
    if role == TENANT_ADMIN and not tenants:
        raise ValidationError({"tenants": "A tenant admin administers at least one tenant."})
    user = User.objects.create_user(username=username, password=password)
    _role_tenants(user, role, tenants)
    event_log(
        verb="user.created",
        actor=actor,
        details={"username": username, "role": role, "tenants": [t.slug for t in tenants]},
    )
    return user


@transaction.atomic
def user_update(*, user: User, role: str, tenants: list[Tenant], active: bool, actor: User) -> User:
    if user.pk == actor.pk and (not active or role != OPERATOR):
        raise ValidationError("You cannot deactivate yourself or give up your own operator role.")
    if role == TENANT_ADMIN and not tenants:
        raise ValidationError({"tenants": "A tenant admin administers at least one tenant."})
    _role_tenants(user, role, tenants)
    if user.is_active != active:
        user.is_active = active
        user.save(update_fields=["is_active"])
    event_log(
        verb="user.updated",
        actor=actor,
        details={
            "username": user.get_username(),
            "role": role,
            "tenants": [t.slug for t in tenants] if role == TENANT_ADMIN else [],
            "active": active,
        },
    )
    return user


def _check_password(password: str, user: User) -> None:
    try:
        validate_password(password, user)
    except ValidationError as weak:
        raise ValidationError({"password": weak.messages}) from None


@transaction.atomic
def user_set_password(*, user: User, password: str, actor: User) -> None:
    _check_password(password, user)
    user.set_password(password)
    user.save(update_fields=["password"])
    event_log(verb="user.password_set", actor=actor, details={"username": user.get_username()})
