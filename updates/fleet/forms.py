from __future__ import annotations

from typing import Any

from django import forms

from tenants.models import Tenant
from updates.fleet.selectors import EventFilter
from updates.models import Node


class EventFilterForm(forms.Form):
    tenant = forms.ModelChoiceField(queryset=Tenant.objects.none(), required=False)
    node = forms.ModelChoiceField(
        queryset=Node.objects.none(), required=False, to_field_name="node_id"
    )
    verb = forms.CharField(required=False, max_length=64)
    since = forms.DateTimeField(
        required=False, widget=forms.DateTimeInput(attrs={"type": "datetime-local"})
    )
    until = forms.DateTimeField(
        required=False, widget=forms.DateTimeInput(attrs={"type": "datetime-local"})
    )

    def __init__(self, *args: Any, user: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Choices are scoped too: a tenant admin cannot even name another tenant.
        self.fields["tenant"].queryset = Tenant.objects.visible_to(user)  # type: ignore[attr-defined]
        self.fields["node"].queryset = Node.objects.visible_to(user)  # type: ignore[attr-defined]

    def to_filter(self) -> EventFilter:
        data = self.cleaned_data if self.is_valid() else {}
        return EventFilter(
            tenant=data.get("tenant"),
            node=data.get("node"),
            verb=data.get("verb", ""),
            since=data.get("since"),
            until=data.get("until"),
        )
