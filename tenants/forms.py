"""Input shape only; the rules (overlap, past, permissions) live in services."""

from __future__ import annotations

from typing import Any

from django import forms

from updates.models import Release

from . import scheduler
from .models import Tenant
from .services import BlackoutInput, Role, WindowInput

DAY_CHOICES = [(str(i), name.capitalize()) for i, name in enumerate(scheduler.WEEKDAYS)]


def _clean_tz(value: str) -> str:
    value = value.strip()
    try:
        scheduler.zone(value)
    except scheduler.InvalidSchedule:
        raise forms.ValidationError(
            f"Unknown timezone {value!r}: use an IANA name such as Europe/Berlin."
        ) from None
    return value


class TimezoneField(forms.CharField):
    def __init__(self, **kwargs: Any) -> None:
        attrs = {"list": "tz-names", "autocomplete": "off", "placeholder": "Europe/Berlin"}
        super().__init__(max_length=64, widget=forms.TextInput(attrs=attrs), **kwargs)

    def clean(self, value: Any) -> str:
        return _clean_tz(super().clean(value))


class WindowForm(forms.Form):
    days = forms.MultipleChoiceField(
        choices=DAY_CHOICES, widget=forms.CheckboxSelectMultiple, help_text="tick all for daily"
    )
    start_time = forms.TimeField(widget=forms.TimeInput(attrs={"type": "time"}, format="%H:%M"))
    end_time = forms.TimeField(
        widget=forms.TimeInput(attrs={"type": "time"}, format="%H:%M"),
        help_text="at or before the start: the window runs past midnight",
    )
    timezone = TimezoneField()
    label = forms.CharField(max_length=80, required=False)

    def to_input(self) -> WindowInput:
        data = self.cleaned_data
        return WindowInput(
            days=frozenset(int(d) for d in data["days"]),
            start_time=data["start_time"],
            end_time=data["end_time"],
            timezone=data["timezone"],
            label=data["label"].strip(),
        )

    @classmethod
    def initial_from(cls, window: Any) -> dict[str, Any]:
        return {
            "days": sorted(str(d) for d in window.day_numbers),
            "start_time": window.start_time,
            "end_time": window.end_time,
            "timezone": window.timezone,
            "label": window.label,
        }


class BlackoutForm(forms.Form):
    name = forms.CharField(max_length=120)
    starts_local = forms.DateTimeField(
        label="Starts", widget=forms.DateTimeInput(attrs={"type": "datetime-local"})
    )
    ends_local = forms.DateTimeField(
        label="Ends", widget=forms.DateTimeInput(attrs={"type": "datetime-local"})
    )
    timezone = TimezoneField(initial="UTC")
    yearly = forms.BooleanField(required=False, label="Repeat every year")

    def to_input(self) -> BlackoutInput:
        data = self.cleaned_data
        # The site runs in UTC, so Django made these aware in UTC with the
        # typed wall time; the wall time in the chosen zone is what was meant.
        return BlackoutInput(
            name=data["name"],
            starts_local=data["starts_local"].replace(tzinfo=None),
            ends_local=data["ends_local"].replace(tzinfo=None),
            timezone=data["timezone"],
            yearly=data["yearly"],
        )


class PolicyForm(forms.Form):
    auto_update = forms.BooleanField(
        required=False, help_text="off: every release waits for an admin's consent"
    )
    auto_apply_critical = forms.BooleanField(
        required=False, help_text="critical releases skip windows and consent, never a blackout"
    )
    requires_consent = forms.BooleanField(
        required=False, help_text="normal and low releases wait for an admin's consent"
    )
    notify_lead_minutes = forms.IntegerField(min_value=0, max_value=7 * 24 * 60)
    consent_valid_days = forms.IntegerField(min_value=1, max_value=365)


class ConsentForm(forms.Form):
    # Releases are fleet-wide and readable by every role; the tenant comes from the URL.
    release = forms.ModelChoiceField(queryset=Release.objects.all())
    decision = forms.ChoiceField(choices=[("grant", "Grant"), ("decline", "Decline")])
    reason = forms.CharField(max_length=500, required=False)
    valid_days = forms.IntegerField(min_value=1, max_value=365, required=False)

    def clean(self) -> dict[str, Any]:
        data = super().clean() or {}
        if data.get("decision") == "decline" and not (data.get("reason") or "").strip():
            self.add_error("reason", "Say why the release is declined.")
        return data


class UserForm(forms.Form):
    """A person's role and tenants; a new user also gets a username and a first password."""

    username = forms.RegexField(
        regex=r"^[\w.@+-]{1,150}$",
        max_length=150,
        error_messages={"invalid": "letters, digits and @ . + - _ only"},
    )
    password = forms.CharField(
        widget=forms.PasswordInput(render_value=False, attrs={"autocomplete": "new-password"}),
        help_text="at least 8 characters, not a common password",
    )
    role = forms.ChoiceField(choices=Role.choices, widget=forms.RadioSelect)
    tenants = forms.ModelMultipleChoiceField(
        queryset=Tenant.objects.order_by("name"),
        required=False,
        widget=forms.CheckboxSelectMultiple,
        help_text="the tenants a tenant admin administers",
    )
    active = forms.BooleanField(required=False, initial=True, help_text="may sign in")

    def __init__(self, *args: Any, editing: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if editing:
            # The username stays; a new password is set on its own form.
            del self.fields["username"]
            del self.fields["password"]
        else:
            del self.fields["active"]


class PasswordSetForm(forms.Form):
    password = forms.CharField(
        widget=forms.PasswordInput(render_value=False, attrs={"autocomplete": "new-password"}),
        label="New password",
    )
