"""`{{ value|readable }}`: an event's or a decision's details as a person reads them, never a
raw Python dict. Known keys get their words, None is left out, lists are joined (the first
ten), nested mappings are written inline, long text is cut."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import Any

from django import template
from django.utils import timezone
from django.utils.html import format_html, format_html_join
from django.utils.safestring import SafeString
from django.utils.timesince import timesince

register = template.Library()

# Keys whose plain humanized form would read worse.
LABELS = {
    "node_id": "node",
    "rollout_id": "rollout",
    "job_id": "job",
    "release_id": "release",
    "p99_ms": "p99 (ms)",
    "max_p99_ms": "max p99 (ms)",
    "error_rate": "error rate",
    "max_error_rate": "max error rate",
    "bake_seconds": "bake (s)",
    "nodes_total": "nodes",
    "restore_point": "restore point",
    "restore_version": "restores",
    "wait_reason": "waiting for",
}
LIST_SHOWN = 10
TEXT_SHOWN = 200


def label(key: str) -> str:
    return LABELS.get(key, key.replace("_", " "))


def value_text(value: Any) -> str:
    """One value as text: numbers rounded, lists joined, mappings inline."""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, Mapping):
        return ", ".join(
            f"{label(str(k))} {value_text(v)}" for k, v in value.items() if v is not None
        )
    if isinstance(value, list | tuple):
        shown = ", ".join(value_text(item) for item in value[:LIST_SHOWN])
        more = len(value) - LIST_SHOWN
        return f"{shown} and {more} more" if more > 0 else shown
    text = str(value)
    return text if len(text) <= TEXT_SHOWN else f"{text[: TEXT_SHOWN - 1]}…"


@register.filter
def readable(details: Any) -> SafeString:
    if not isinstance(details, Mapping):
        return format_html("{}", value_text(details) if details not in (None, "") else "—")
    pairs = [(label(str(k)), value_text(v)) for k, v in details.items() if v not in (None, "")]
    if not pairs:
        return format_html("{}", "—")
    return format_html_join(
        " · ", '<span class="detail"><span class="detail-key">{}</span> {}</span>', pairs
    )


@register.filter
def ago(moment: datetime | None) -> str:
    """'just now' under a minute (never '0 minutes ago'), else Django's timesince."""
    if moment is None:
        return "never"
    if timezone.now() - moment < timedelta(minutes=1):
        return "just now"
    return f"{timesince(moment)} ago"
