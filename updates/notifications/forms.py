from __future__ import annotations

import re
from typing import Any

from django import forms
from django.conf import settings

from tenants.models import Tenant

from .egress import EgressPolicy, EgressRefused, check_url
from .kinds import PAGERDUTY_KINDS, Kind
from .models import Channel, Delivery
from .selectors import can_manage_fleet_channels, editable_tenants
from .services import SECRET_FIELDS

ROUTING_KEY = re.compile(r"^[A-Za-z0-9]{20,64}$")


def _secret_input() -> forms.PasswordInput:
    # Write-only: a saved secret is never rendered back into the page.
    return forms.PasswordInput(render_value=False, attrs={"autocomplete": "new-password"})


# The form's write-only inputs (whichever the channel's type uses).
SECRET_INPUTS = ("url", "routing_key", "signing_secret")


class ChannelForm(forms.Form):
    name = forms.CharField(max_length=120)
    type = forms.ChoiceField(choices=Channel.Type.choices)
    tenant: forms.ModelChoiceField[Tenant] = forms.ModelChoiceField(
        queryset=None, required=False, empty_label="Fleet-wide (every tenant)"
    )
    kinds = forms.MultipleChoiceField(
        choices=Kind.choices,
        widget=forms.CheckboxSelectMultiple,
        label="Events",
        help_text="PagerDuty only acts on failures, rollbacks, security rejections, "
        "nodes going offline, and (to resolve) promotions and completions.",
    )
    enabled = forms.BooleanField(required=False, initial=True)
    url = forms.CharField(
        required=False,
        max_length=2000,
        widget=_secret_input(),
        label="Webhook URL",
        help_text="Slack incoming-webhook URL, or your endpoint for the signed webhook.",
    )
    routing_key = forms.CharField(
        required=False, max_length=64, widget=_secret_input(), label="PagerDuty routing key"
    )
    signing_secret = forms.CharField(
        required=False,
        min_length=16,
        max_length=256,
        widget=_secret_input(),
        help_text="At least 16 characters; receivers verify X-Themis-Signature with it.",
    )

    def __init__(self, *args: Any, user: Any, channel: Channel | None = None, **kwargs: Any):
        if channel is not None:
            kwargs.setdefault(
                "initial",
                {
                    "name": channel.name,
                    "type": channel.type,
                    "tenant": channel.tenant,
                    "kinds": channel.kinds,
                    "enabled": channel.enabled,
                },
            )
        else:
            kwargs.setdefault("initial", {"kinds": list(Kind.values), "enabled": True})
        super().__init__(*args, **kwargs)
        self.channel = channel
        if self.is_bound:
            # A form sent back with an error keeps what was typed in it, secrets included:
            # they go back only to who just sent them (the page is not cached). A saved
            # secret is never in the form's data, so it still never renders.
            for name in SECRET_INPUTS:
                widget = self.fields[name].widget
                assert isinstance(widget, forms.PasswordInput)
                widget.render_value = True
        tenant_field = self.fields["tenant"]
        tenant_field.queryset = editable_tenants(user)  # type: ignore[attr-defined]
        # Only operators configure fleet-wide channels.
        tenant_field.required = not can_manage_fleet_channels(user)
        if channel is not None:
            # Type and scope are fixed once created: the secrets and the audience depend on them.
            self.fields["type"].disabled = True
            tenant_field.disabled = True
            for name, hint in channel.secret_hints.items():
                if name in self.fields:
                    self.fields[name].widget.attrs["placeholder"] = f"saved: {hint} (leave empty)"

    def clean_url(self) -> str:
        url = str(self.cleaned_data["url"]).strip()
        if not url:
            return url
        allow_http = settings.THEMIS_NOTIFY_ALLOW_HTTP
        try:
            check_url(
                url,
                EgressPolicy.from_setting(settings.THEMIS_NOTIFY_EGRESS_ALLOW),
                allow_http=allow_http,
            )
        except EgressRefused as refused:
            wanted = "an http(s) URL" if allow_http else "an https:// URL"
            raise forms.ValidationError(f"Enter {wanted} of a public host ({refused}).") from None
        return url

    def clean_routing_key(self) -> str:
        key = str(self.cleaned_data["routing_key"]).strip()
        if key and not ROUTING_KEY.match(key):
            raise forms.ValidationError("A PagerDuty routing key is 20-64 letters and digits.")
        return key

    def clean(self) -> dict[str, Any]:
        data = super().clean() or {}
        channel_type = str(self.channel.type if self.channel else data.get("type") or "")
        if channel_type == Channel.Type.PAGERDUTY and data.get("kinds"):
            data["kinds"] = [k for k in data["kinds"] if k in PAGERDUTY_KINDS]
            if not data["kinds"]:
                self.add_error("kinds", "Pick at least one event PagerDuty can act on.")
        saved = self.channel.secret_hints if self.channel else {}
        for name in SECRET_FIELDS.get(channel_type, ()):
            if not data.get(name) and name not in saved and name not in self.errors:
                self.add_error(name, "Required for this channel type.")
        return data

    def secrets(self) -> dict[str, str]:
        return {name: self.cleaned_data.get(name) or "" for name in SECRET_FIELDS_ALL}


SECRET_FIELDS_ALL = ("url", "routing_key", "signing_secret")


class DeliveryFilterForm(forms.Form):
    channel: forms.ModelChoiceField[Channel] = forms.ModelChoiceField(queryset=None, required=False)
    status = forms.ChoiceField(
        choices=[("", "any status"), *Delivery.Status.choices], required=False
    )

    def __init__(self, *args: Any, channels: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fields["channel"].queryset = channels  # type: ignore[attr-defined]
