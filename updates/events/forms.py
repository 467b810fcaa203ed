from __future__ import annotations

from typing import Any

from django import forms
from django.urls import reverse

from tenants.models import Tenant
from updates.events.selectors import BadCursor, EventCursor, EventFilter, node_for_filter
from updates.models import Node


class EventFilterForm(forms.Form):
    tenant = forms.ModelChoiceField(queryset=Tenant.objects.none(), required=False)
    # A node id typed (or picked from the suggestions): a <select> of every node would be
    # thousands of options on every page view.
    node = forms.CharField(required=False, max_length=64)
    verb = forms.CharField(required=False, max_length=64, help_text="a verb or its prefix")
    actor = forms.CharField(
        required=False, max_length=150, help_text="user name, system, node:<id>"
    )
    since = forms.DateTimeField(
        required=False, widget=forms.DateTimeInput(attrs={"type": "datetime-local"})
    )
    until = forms.DateTimeField(
        required=False, widget=forms.DateTimeInput(attrs={"type": "datetime-local"})
    )
    cursor = forms.CharField(required=False, widget=forms.HiddenInput)

    def __init__(self, *args: Any, user: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.user = user
        # Choices are scoped too: a tenant admin cannot even name another tenant.
        self.fields["tenant"].queryset = Tenant.objects.visible_to(user)  # type: ignore[attr-defined]
        # Suggestions as you type: htmx fills the <datalist> from a small endpoint. The
        # form's own hx-* attributes are inherited, so this input sets target, swap and
        # push-url itself. Without JavaScript it is a plain text field.
        self.fields["node"].widget.attrs.update(
            {
                "list": "node-options",
                "autocomplete": "off",
                "placeholder": "node id",
                "hx-get": reverse("event_node_search"),
                "hx-trigger": "input changed delay:250ms",
                "hx-target": "#node-options",
                "hx-swap": "outerHTML",
                "hx-push-url": "false",
            }
        )

    def clean_node(self) -> Node | None:
        node_id = self.cleaned_data["node"].strip()
        if not node_id:
            return None
        node = node_for_filter(self.user, node_id)
        if node is None:
            # The same words for a node that does not exist and one of another tenant.
            raise forms.ValidationError("Select a valid choice: no such node.")
        return node

    def clean_cursor(self) -> EventCursor | None:
        text = self.cleaned_data["cursor"]
        if not text:
            return None
        try:
            return EventCursor.decode(text)
        except BadCursor as error:
            raise forms.ValidationError(
                f"Bad page link: {error}. Start from the newest events."
            ) from None

    @property
    def bad_cursor(self) -> bool:
        return "cursor" in self.errors

    def to_filter(self) -> EventFilter:
        data = self.cleaned_data if self.is_valid() else {}
        return EventFilter(
            tenant=data.get("tenant"),
            node=data.get("node"),
            verb=data.get("verb", ""),
            actor=data.get("actor", ""),
            since=data.get("since"),
            until=data.get("until"),
        )

    def page_cursor(self) -> EventCursor | None:
        return self.cleaned_data.get("cursor") if self.is_valid() else None
