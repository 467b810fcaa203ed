"""Tenant pages: windows, blackouts, policy, consent, calendar. Thin views:
fetch through the scoped helpers in selectors, write through services."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime, timedelta
from typing import Any
from zoneinfo import available_timezones

from django.conf import settings
from django.contrib import messages
from django.contrib.auth.decorators import permission_required
from django.contrib.auth.models import User
from django.core.exceptions import ValidationError
from django.forms import Form
from django.http import HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.utils import timezone
from django.views.decorators.http import require_GET, require_http_methods, require_POST

from themis_dashboard.htmx import HtmxHttpRequest
from updates.models import Release
from updates.rollouts.rollback_plan import tenant_rollback_plan

from . import scheduler, selectors, services
from .forms import BlackoutForm, ConsentForm, PasswordSetForm, PolicyForm, UserForm, WindowForm
from .models import Blackout, Tenant


def _tz_names() -> list[str]:
    return sorted(available_timezones())


def _form_failed(form: Form, error: ValidationError) -> None:
    """Put a service's ValidationError on the form, on its field when it names one."""
    if hasattr(error, "error_dict"):
        for field, errors in error.error_dict.items():
            form.add_error(field if field in form.fields else None, errors)
    else:
        form.add_error(None, error)


def _policy_form(tenant: Tenant) -> PolicyForm:
    policy = selectors.policy_for(tenant)
    return PolicyForm(
        initial={
            "auto_update": policy.auto_update,
            "auto_apply_critical": policy.auto_apply_critical,
            "requires_consent": policy.requires_consent,
            "notify_lead_minutes": policy.notify_lead_minutes,
            "consent_valid_days": policy.consent_valid_days,
        }
    )


def _tenant_page(
    request: HtmxHttpRequest, tenant: Tenant, status: int = 200, **forms: Form
) -> HttpResponse:
    now = timezone.now()
    can_edit = selectors.can_edit_tenant(request.user, tenant)
    context: dict[str, Any] = {
        "tenant": tenant,
        "can_edit": can_edit,
        "windows": tenant.windows.all(),
        "blackouts": selectors.tenant_blackouts(tenant),
        "policy": selectors.policy_for(tenant),
        "pending": selectors.pending_consents(tenant),
        "waiting": selectors.waiting_jobs(tenant),
        "next_window": selectors.next_window_label(tenant, now),
        "now": now,
        "poll_seconds": max(settings.THEMIS_FLEET_POLL_SECONDS, 10),
        "window_form": forms.get("window_form") or WindowForm(initial={"timezone": "UTC"}),
        "blackout_form": forms.get("blackout_form") or BlackoutForm(),
        "policy_form": forms.get("policy_form") or _policy_form(tenant),
        "consent_form": forms.get("consent_form") or ConsentForm(),
        "releases": Release.objects.filter(state=Release.State.PUBLISHED) if can_edit else [],
        "tz_names": _tz_names() if can_edit else [],
    }
    template = "tenants/tenant_detail.html"
    if request.htmx:
        template += "#waiting"
    return render(request, template, context, status=status)


@require_GET
def tenant_list(request: HtmxHttpRequest) -> HttpResponse:
    now = timezone.now()
    tenants = list(Tenant.objects.visible_to(request.user).prefetch_related("windows"))
    # Every tenant's schedule worked out in three queries, not four per tenant.
    labels = selectors.next_window_labels([t.pk for t in tenants], now)
    rows = [(t, labels[t.pk]) for t in tenants]
    can_fleet = selectors.can_manage_fleet(request.user)
    context = {
        "rows": rows,
        "fleet_blackouts": Blackout.objects.filter(tenant__isnull=True),
        "can_manage_fleet": can_fleet,
        "blackout_form": BlackoutForm(),
        "tz_names": _tz_names() if can_fleet else [],
    }
    return render(request, "tenants/tenant_list.html", context)


@require_GET
def tenant_detail(request: HtmxHttpRequest, slug: str) -> HttpResponse:
    return _tenant_page(request, selectors.get_tenant_for_user(request.user, slug))


@require_POST
def window_create(request: HtmxHttpRequest, slug: str) -> HttpResponse:
    tenant = selectors.get_tenant_for_editor(request.user, slug)
    form = WindowForm(request.POST)
    if form.is_valid():
        try:
            window = services.maintenance_window_create(
                tenant=tenant, user=request.user, data=form.to_input()
            )
        except ValidationError as error:
            _form_failed(form, error)
        else:
            messages.success(request, f"Window {window.describe()} added.")
            return redirect("tenant_detail", slug=tenant.slug)
    return _tenant_page(request, tenant, status=400, window_form=form)


@require_http_methods(["GET", "POST"])
def window_edit(request: HtmxHttpRequest, slug: str, pk: int) -> HttpResponse:
    window = selectors.get_window_for_editor(request.user, slug, pk)
    form = WindowForm(request.POST or None, initial=WindowForm.initial_from(window))
    status = 200
    if request.method == "POST":
        if form.is_valid():
            try:
                services.maintenance_window_update(
                    window=window, user=request.user, data=form.to_input()
                )
            except ValidationError as error:
                _form_failed(form, error)
            else:
                messages.success(request, f"Window changed to {window.describe()}.")
                return redirect("tenant_detail", slug=slug)
        status = 400
    context = {"window": window, "tenant": window.tenant, "form": form, "tz_names": _tz_names()}
    return render(request, "tenants/window_edit.html", context, status=status)


@require_POST
def window_delete(request: HtmxHttpRequest, slug: str, pk: int) -> HttpResponse:
    window = selectors.get_window_for_editor(request.user, slug, pk)
    services.maintenance_window_delete(window=window, user=request.user)
    messages.success(request, f"Window {window.describe()} removed.")
    return redirect("tenant_detail", slug=slug)


@require_POST
def blackout_create(request: HtmxHttpRequest, slug: str) -> HttpResponse:
    tenant = selectors.get_tenant_for_editor(request.user, slug)
    form = BlackoutForm(request.POST)
    if form.is_valid():
        try:
            blackout = services.blackout_create(
                tenant=tenant, user=request.user, data=form.to_input()
            )
        except ValidationError as error:
            _form_failed(form, error)
        else:
            messages.success(request, f"Blackout '{blackout.name}' added.")
            return redirect("tenant_detail", slug=tenant.slug)
    return _tenant_page(request, tenant, status=400, blackout_form=form)


@require_POST
@permission_required("tenants.manage_all_tenants", raise_exception=True)
def fleet_blackout_create(request: HtmxHttpRequest) -> HttpResponse:
    form = BlackoutForm(request.POST)
    if form.is_valid():
        try:
            blackout = services.blackout_create(
                tenant=None, user=request.user, data=form.to_input()
            )
        except ValidationError as error:
            _form_failed(form, error)
        else:
            messages.success(request, f"Fleet-wide blackout '{blackout.name}' added.")
            return redirect("tenant_list")
    messages.error(request, "The blackout was not saved: " + _errors_text(form))
    return redirect("tenant_list")


def _errors_text(form: Form) -> str:
    return " ".join(f"{e}" for errors in form.errors.values() for e in errors)


@require_POST
def blackout_delete(request: HtmxHttpRequest, pk: int) -> HttpResponse:
    blackout = selectors.get_blackout_for_editor(request.user, pk)
    services.blackout_delete(blackout=blackout, user=request.user)
    messages.success(request, f"Blackout '{blackout.name}' removed.")
    if blackout.tenant is None:
        return redirect("tenant_list")
    return redirect("tenant_detail", slug=blackout.tenant.slug)


@require_POST
def policy_update(request: HtmxHttpRequest, slug: str) -> HttpResponse:
    tenant = selectors.get_tenant_for_editor(request.user, slug)
    form = PolicyForm(request.POST)
    if form.is_valid():
        try:
            services.update_policy_set(tenant=tenant, user=request.user, **form.cleaned_data)
        except ValidationError as error:
            _form_failed(form, error)
        else:
            messages.success(request, "Update policy saved.")
            return redirect("tenant_detail", slug=tenant.slug)
    return _tenant_page(request, tenant, status=400, policy_form=form)


@require_POST
def consent_decide(request: HtmxHttpRequest, slug: str) -> HttpResponse:
    tenant = selectors.get_tenant_for_editor(request.user, slug)
    form = ConsentForm(request.POST)
    if form.is_valid():
        data = form.cleaned_data
        release = data["release"]
        try:
            if data["decision"] == "grant":
                services.consent_grant(
                    tenant=tenant,
                    release=release,
                    user=request.user,
                    valid_days=data["valid_days"],
                    note=data["reason"],
                )
            else:
                services.consent_decline(
                    tenant=tenant, release=release, user=request.user, reason=data["reason"]
                )
        except ValidationError as error:
            _form_failed(form, error)
        else:
            verb = "granted" if data["decision"] == "grant" else "declined"
            messages.success(request, f"Consent for {release.version} {verb}.")
            return redirect("tenant_detail", slug=tenant.slug)
    return _tenant_page(request, tenant, status=400, consent_form=form)


@require_GET
def rollback_plan(request: HtmxHttpRequest, slug: str) -> HttpResponse:
    tenant = selectors.get_tenant_for_user(request.user, slug)
    context = {"tenant": tenant, "plan": tenant_rollback_plan(tenant)}
    return render(request, "tenants/rollback_plan.html", context)


# --- calendar ---------------------------------------------------------------

LABEL_WIDTH, DAY_WIDTH, ROW_HEIGHT, HEAD_HEIGHT = 170, 130, 34, 28


@dataclass(frozen=True)
class Bar:
    x: float
    y: float
    width: float
    kind: str  # "window" or "blackout"
    title: str


def _week_start(request: HttpRequest, tz: str) -> datetime:
    """Monday 00:00 (in `tz`) of the asked week; this week when the date is missing, malformed
    or outside the years a schedule may name."""
    today = timezone.now().astimezone(scheduler.zone(tz)).date()
    try:
        day = date.fromisoformat(request.GET.get("week", ""))
    except ValueError:
        day = today
    if not scheduler.FIRST_YEAR <= day.year <= scheduler.LAST_YEAR:
        day = today
    monday = day - timedelta(days=day.weekday())
    return scheduler.local_to_utc(datetime.combine(monday, datetime.min.time()), tz)


def _bars(row: selectors.CalendarRow, index: int, lo: datetime, tz: str) -> list[Bar]:
    hi, scale = lo + timedelta(days=7), DAY_WIDTH / 86400
    bars = []
    spans = [("window", s) for s in row.windows] + [("blackout", s) for s in row.blackouts]
    for kind, span in spans:
        start, end = max(span.start, lo), min(span.end, hi)
        if end <= start:
            continue
        when = f"{scheduler.format_local(span.start, tz)} - {scheduler.format_local(span.end, tz)}"
        bars.append(
            Bar(
                x=LABEL_WIDTH + (start - lo).total_seconds() * scale,
                y=HEAD_HEIGHT + index * ROW_HEIGHT + (4 if kind == "window" else 2),
                width=max((end - start).total_seconds() * scale, 1.0),
                kind=kind,
                title=f"{span.label}: {when}",
            )
        )
    return bars


def _now_x(lo: datetime) -> float | None:
    """Where 'now' falls on the week's x axis, if it is in that week."""
    elapsed = (timezone.now() - lo).total_seconds()
    if not 0 <= elapsed < 7 * 86400:
        return None
    return LABEL_WIDTH + elapsed * DAY_WIDTH / 86400


@require_GET
@permission_required("tenants.view_all_tenants", raise_exception=True)
def calendar(request: HtmxHttpRequest) -> HttpResponse:
    """A week of windows and blackouts across tenants, as an SVG, in a chosen zone."""
    tz = request.GET.get("tz") or "UTC"
    try:
        scheduler.zone(tz)
    except scheduler.InvalidSchedule:
        messages.error(request, f"Unknown timezone {tz!r}; showing UTC.")
        tz = "UTC"
    lo = _week_start(request, tz)
    rows = selectors.calendar_week(request.user, lo)
    days = [(lo + timedelta(days=i)).astimezone(scheduler.zone(tz)) for i in range(7)]
    context = {
        "tz": tz,
        "rows": [(i, row, HEAD_HEIGHT + i * ROW_HEIGHT) for i, row in enumerate(rows)],
        "bars": [bar for i, row in enumerate(rows) for bar in _bars(row, i, lo, tz)],
        "days": [(LABEL_WIDTH + i * DAY_WIDTH, d) for i, d in enumerate(days)],
        "width": LABEL_WIDTH + 7 * DAY_WIDTH,
        "height": HEAD_HEIGHT + len(rows) * ROW_HEIGHT,
        "row_height": ROW_HEIGHT,
        "label_width": LABEL_WIDTH,
        "day_width": DAY_WIDTH,
        "now_x": _now_x(lo),
        "prev_week": (days[0] - timedelta(days=7)).date().isoformat(),
        "next_week": (days[0] + timedelta(days=7)).date().isoformat(),
        "tz_names": _tz_names(),
    }
    return render(request, "tenants/calendar.html", context)


# --- users ---------------------------------------------------------------------------------

MANAGE_USERS = "tenants.manage_all_tenants"


def _actor(request: HtmxHttpRequest) -> User:
    # Signed in (the middleware) with the permission (the decorator): a real user.
    assert isinstance(request.user, User)
    return request.user


@require_GET
@permission_required(MANAGE_USERS, raise_exception=True)
def user_list(request: HtmxHttpRequest) -> HttpResponse:
    return render(request, "tenants/users.html", {"rows": selectors.user_rows()})


@require_http_methods(["GET", "POST"])
@permission_required(MANAGE_USERS, raise_exception=True)
def user_create(request: HtmxHttpRequest) -> HttpResponse:
    form = UserForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        data = form.cleaned_data
        try:
            user = services.user_create(
                username=data["username"],
                password=data["password"],
                role=data["role"],
                tenants=list(data["tenants"]),
                actor=_actor(request),
            )
        except ValidationError as error:
            _form_failed(form, error)
        else:
            messages.success(request, f"User {user.get_username()} created.")
            return redirect("user_list")
    status = 400 if request.method == "POST" else 200
    return render(request, "tenants/user_form.html", {"form": form}, status=status)


@require_http_methods(["GET", "POST"])
@permission_required(MANAGE_USERS, raise_exception=True)
def user_edit(request: HtmxHttpRequest, user_id: int) -> HttpResponse:
    person = get_object_or_404(User, pk=user_id)
    initial = {
        "role": next(iter(person.groups.values_list("name", flat=True)), ""),
        "tenants": list(person.administered_tenants.all()),
        "active": person.is_active,
    }
    form = UserForm(request.POST or None, editing=True, initial=initial)
    password_form = PasswordSetForm(request.POST if "set_password" in request.POST else None)
    if request.method == "POST" and "set_password" in request.POST:
        if password_form.is_valid():
            try:
                services.user_set_password(
                    user=person,
                    password=password_form.cleaned_data["password"],
                    actor=_actor(request),
                )
            except ValidationError as error:
                _form_failed(password_form, error)
            else:
                messages.success(request, f"Password of {person.get_username()} set.")
                return redirect("user_list")
        form = UserForm(editing=True, initial=initial)
    elif request.method == "POST" and form.is_valid():
        data = form.cleaned_data
        try:
            services.user_update(
                user=person,
                role=data["role"],
                tenants=list(data["tenants"]),
                active=data["active"],
                actor=_actor(request),
            )
        except ValidationError as error:
            _form_failed(form, error)
        else:
            messages.success(request, f"User {person.get_username()} saved.")
            return redirect("user_list")
    status = 400 if request.method == "POST" else 200
    context = {"form": form, "password_form": password_form, "person": person}
    return render(request, "tenants/user_form.html", context, status=status)
