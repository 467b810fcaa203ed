"""{% next_window_label tenant %}: the countdown shown wherever a node waits.

Computed at render time (the stored `wait_reason` cannot count down)."""

from __future__ import annotations

from datetime import datetime

from django import template
from django.utils import timezone

from tenants.models import Tenant
from tenants.selectors import next_window_label as _label

register = template.Library()


@register.simple_tag
def next_window_label(tenant: Tenant | None, at: datetime | None = None) -> str:
    """'Sat 02:00 America/New_York (in 3 h 12 m)' for the tenant's next window."""
    if tenant is None:
        return ""
    return _label(tenant, at or timezone.now())
