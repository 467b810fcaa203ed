from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import models

from .scheduler import InvalidSchedule, days_label, zone


class TenantQuerySet(models.QuerySet["Tenant"]):
    def visible_to(self, user: Any) -> TenantQuerySet:
        """Operators and responders see every tenant; a tenant admin only their own."""
        if not user.is_authenticated:
            return self.none()
        if user.has_perm("tenants.view_all_tenants"):
            return self.all()
        return self.filter(admins=user)

    def editable_by(self, user: Any) -> TenantQuerySet:
        """Operators change every tenant's schedule; a tenant admin only their own;
        responders none (they read)."""
        if not user.is_authenticated:
            return self.none()
        if user.has_perm("tenants.manage_all_tenants"):
            return self.all()
        return self.filter(admins=user)


class Tenant(models.Model):
    name = models.CharField(max_length=120, unique=True)
    slug = models.SlugField(max_length=60, unique=True)
    admins = models.ManyToManyField(
        settings.AUTH_USER_MODEL, blank=True, related_name="administered_tenants"
    )
    created_at = models.DateTimeField(auto_now_add=True)

    objects = TenantQuerySet.as_manager()

    class Meta:
        ordering = ["name"]
        permissions = [
            ("view_all_tenants", "Can see every tenant and its nodes"),
            ("manage_all_tenants", "Can change every tenant's windows, blackouts and policy"),
        ]

    def __str__(self) -> str:
        return self.name


class MaintenanceWindow(models.Model):
    """A weekly local time range in which the tenant's nodes may update.
    Semantics (midnight, DST) are those of tenants.scheduler.Window."""

    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="windows")
    # Weekday numbers, Monday = 0, as a sorted string: "56" is Saturday and Sunday.
    days = models.CharField(max_length=7)
    start_time = models.TimeField()
    end_time = models.TimeField(help_text="at or before the start: runs past midnight")
    timezone = models.CharField(max_length=64, help_text="IANA name, e.g. Europe/Berlin")
    label = models.CharField(max_length=80, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["tenant__name", "days", "start_time"]

    def __str__(self) -> str:
        return f"{self.tenant}: {self.describe()}"

    @property
    def day_numbers(self) -> frozenset[int]:
        return frozenset(int(d) for d in self.days)

    def clean(self) -> None:
        errors = _timezone_errors(self.timezone)
        digits = set(self.days)
        if not self.days or not digits <= set("0123456") or len(digits) != len(self.days):
            errors["days"] = "Weekday digits 0 (Monday) to 6 (Sunday), each once."
        if errors:
            raise ValidationError(errors)

    def describe(self) -> str:
        times = f"{self.start_time:%H:%M}-{self.end_time:%H:%M}"
        return f"{days_label(self.day_numbers)} {times} {self.timezone}"


class Blackout(models.Model):
    """A period without updates; tenant None means fleet-wide."""

    tenant = models.ForeignKey(
        Tenant, on_delete=models.CASCADE, related_name="blackouts", null=True, blank=True
    )
    name = models.CharField(max_length=120)
    starts_at = models.DateTimeField()
    ends_at = models.DateTimeField()
    # The zone it was entered in: for display and for the yearly repeat.
    timezone = models.CharField(max_length=64, default="UTC")
    yearly = models.BooleanField(default=False, help_text="repeat every year on the same dates")
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.SET_NULL, null=True, blank=True, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["starts_at"]
        constraints = [
            models.CheckConstraint(
                condition=models.Q(ends_at__gt=models.F("starts_at")),
                name="blackout_ends_after_start",
            )
        ]

    def __str__(self) -> str:
        return f"{self.name} ({self.tenant or 'fleet-wide'})"

    @property
    def fleet_wide(self) -> bool:
        return self.tenant_id is None

    def clean(self) -> None:
        errors = _timezone_errors(self.timezone)
        if self.starts_at and self.ends_at and self.ends_at <= self.starts_at:
            errors["ends_at"] = "The blackout must end after it starts."
        if errors:
            raise ValidationError(errors)


def _timezone_errors(key: str) -> dict[str, str]:
    try:
        zone(key)
    except InvalidSchedule as invalid:
        return {"timezone": str(invalid)}
    return {}


class UpdatePolicy(models.Model):
    """How a tenant takes releases. A tenant without a row gets the defaults.
    The decision table is in tenants.scheduler (Policy and priorities)."""

    tenant = models.OneToOneField(Tenant, on_delete=models.CASCADE, related_name="update_policy")
    auto_update = models.BooleanField(
        default=True, help_text="off: every release waits for an admin's consent"
    )
    auto_apply_critical = models.BooleanField(
        default=True,
        help_text="critical releases skip windows and consent (never a blackout)",
    )
    requires_consent = models.BooleanField(
        default=False, help_text="normal and low releases wait for an admin's consent"
    )
    notify_lead_minutes = models.PositiveIntegerField(
        default=60, help_text="tell the tenant this long before a window is used"
    )
    consent_valid_days = models.PositiveSmallIntegerField(
        default=14, help_text="a consent expires after this many days"
    )
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        verbose_name_plural = "update policies"

    def __str__(self) -> str:
        return f"policy of {self.tenant}"


class Consent(models.Model):
    """A tenant's current answer for one release; every decision is also an Event."""

    class Decision(models.TextChoices):
        GRANTED = "granted"
        DECLINED = "declined"

    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="consents")
    release = models.ForeignKey("updates.Release", on_delete=models.CASCADE, related_name="+")
    decision = models.CharField(max_length=10, choices=Decision.choices)
    reason = models.CharField(max_length=500, blank=True)
    decided_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.SET_NULL, null=True, blank=True, related_name="+"
    )
    decided_at = models.DateTimeField()
    expires_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-decided_at"]
        constraints = [
            models.UniqueConstraint(fields=["tenant", "release"], name="one_consent_per_release")
        ]

    def __str__(self) -> str:
        return f"{self.tenant} {self.decision} {self.release_id}"
