"""From audit Events to channel-neutral notifications (plain JSON-able dicts).

A notification is rendered once, when its Delivery is created, and stored in
Delivery.payload, so every retry sends the same content and the delivery log
can show exactly what was (or would have been) sent. The keys are listed in
README.md; channels.py turns them into Slack, PagerDuty or webhook bodies.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from django.conf import settings
from django.urls import NoReverseMatch, reverse

from tenants.models import Tenant
from updates.models import Event, Rollout, RolloutNode, UpdateJob

from .kinds import RESOLVE, SPEC_BY_KIND, TRIGGER, Kind, KindSpec, spec_for, worst


@dataclass(frozen=True)
class Occurrence:
    """One Event, understood: what kind, which rollout (if any), and the message."""

    event: Event
    spec: KindSpec
    rollout_id: int | None
    stage: int | None
    notification: dict[str, Any]

    @property
    def kind(self) -> str:
        return self.spec.kind.value

    @property
    def aggregated(self) -> bool:
        """Node-level events of a rollout are summed up, never sent one by one."""
        return self.spec.node_level and self.rollout_id is not None


def dashboard_url(path: str) -> str:
    return settings.THEMIS_DASHBOARD_URL.rstrip("/") + path


def rollout_url(rollout_id: int) -> str:
    try:
        return dashboard_url(reverse("rollout_detail", args=[rollout_id]))
    except NoReverseMatch:  # before the rollout pages exist: the audit log, filtered
        return dashboard_url(reverse("event_list") + "?verb=rollout")


def node_url(node_id: str) -> str:
    try:
        return dashboard_url(reverse("node_detail", args=[node_id]))
    except NoReverseMatch:
        return dashboard_url("/")


def _source() -> str:
    return urlsplit(settings.THEMIS_DASHBOARD_URL).hostname or "themis-update-manager"


def _int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _rollout_context(event: Event, spec: KindSpec) -> tuple[int | None, int | None]:
    """(rollout id, stage) of an Event: from its details, else from the rollout plan."""
    details = event.details or {}
    rollout_id = _int(details.get("rollout_id"))
    if event.object_type == "rollout" and rollout_id is None:
        rollout_id = _int(event.object_id)
    stage = _int(details.get("stage"))
    if rollout_id is not None or not spec.node_level:
        return rollout_id, stage
    rows = RolloutNode.objects.filter(rollout__state__in=Rollout.ACTIVE_STATES)
    object_pk = _int(event.object_id)
    if object_pk is None:
        return None, stage
    if event.object_type == "updatejob":
        rows = RolloutNode.objects.filter(job_id=object_pk)
    elif event.object_type == "node":
        rows = rows.filter(node_id=object_pk)
    else:
        return None, stage
    row = rows.order_by("-rollout_id").values_list("rollout_id", "stage").first()
    return (row[0], row[1]) if row else (None, stage)


def _node_in_update(event: Event) -> bool:
    node_pk = _int(event.object_id)
    if node_pk is None:
        return False
    return UpdateJob.objects.filter(node_id=node_pk, state__in=UpdateJob.ACTIVE_STATES).exists()


def describe(event: Event) -> Occurrence | None:
    """The notification for an Event, or None when it is not something we notify."""
    spec = spec_for(event.verb, event.details or {})
    if spec is None:
        return None
    rollout_id, stage = _rollout_context(event, spec)
    if spec.kind == Kind.NODE_OFFLINE and rollout_id is None and not _node_in_update(event):
        return None  # a node going offline is news only while it is being updated
    notification = _base(event, spec, rollout_id, stage)
    notification.update(_specific(event, spec, rollout_id, stage))
    return Occurrence(event, spec, rollout_id, stage, notification)


def _tenant_name(tenant_id: int | None) -> str | None:
    if tenant_id is None:
        return None
    return Tenant.objects.filter(pk=tenant_id).values_list("name", flat=True).first()


def _base(
    event: Event, spec: KindSpec, rollout_id: int | None, stage: int | None
) -> dict[str, Any]:
    details = event.details or {}
    incident = f"themis-rollout-{rollout_id}" if rollout_id else f"themis-event-{event.pk}"
    return {
        "kind": spec.kind.value,
        "kind_label": spec.kind.label,
        "verb": event.verb,
        "severity": spec.severity,
        "emoji": spec.emoji,
        "pagerduty_action": spec.pagerduty,
        "incident_key": incident,
        "tenant": _tenant_name(event.tenant_id),
        "release": details.get("release_version") or details.get("version_to") or None,
        "rollout": {"id": rollout_id, "name": _rollout_name(rollout_id)} if rollout_id else None,
        "stage": stage,
        "nodes": None,
        "node": details.get("node_id"),
        "action_needed": None,
        "url": rollout_url(rollout_id) if rollout_id else dashboard_url("/"),
        "source": _source(),
        "component": event.object_type or "themis",
        "occurred_at": event.created_at.isoformat().replace("+00:00", "Z"),
        "event_ids": [event.pk],
        "details": {k: details[k] for k in ("reason", "error_code", "code") if details.get(k)},
        "test": False,
    }


def _rollout_name(rollout_id: int | None) -> str:
    if rollout_id is None:
        return ""
    row = Rollout.objects.filter(pk=rollout_id).values_list("name", "strategy").first()
    return (row[0] or row[1]) if row else ""


def _nodes(details: dict[str, Any]) -> dict[str, int] | None:
    counts = {
        key: _int(details.get(f"nodes_{key}")) for key in ("done", "failed", "total", "rolled_back")
    }
    present = {key: value for key, value in counts.items() if value is not None}
    return present or None


def _specific(
    event: Event, spec: KindSpec, rollout_id: int | None, stage: int | None
) -> dict[str, Any]:
    details = event.details or {}
    if spec.kind.value in _ROLLOUT_TITLES:
        return _rollout_fields(details, spec, rollout_id, stage)
    node = str(details.get("node_id") or "?")
    if spec.kind == Kind.NODE_FAILED:
        return {
            "title": f"Update of {node} failed",
            "text": _error_text(details),
            "url": node_url(node),
        }
    if spec.kind == Kind.NODE_ROLLED_BACK:
        back_to = details.get("version_from") or "its previous version"
        return {
            "title": f"{node} rolled back to {back_to}",
            "text": _error_text(details),
            "url": node_url(node),
        }
    if spec.kind == Kind.NODE_OFFLINE:
        return {
            "title": f"{node} went offline during an update",
            "text": f"No heartbeat since {details.get('last_heartbeat') or 'never'}.",
            "url": node_url(node),
        }
    return _security_fields(details)


_ROLLOUT_TITLES = {
    Kind.ROLLOUT_STARTED: "started",
    Kind.STAGE_COMPLETED: "completed stage {stage}",
    Kind.AWAITING_APPROVAL: "is awaiting approval",
    Kind.PROMOTED: "promoted to stage {stage}",
    Kind.PAUSED: "paused",
    Kind.ABORTED: "aborted",
    Kind.ROLLOUT_FAILED: "failed",
    Kind.ROLLED_BACK: "rolled back",
    Kind.COMPLETED: "completed",
}


def _rollout_fields(
    details: dict[str, Any], spec: KindSpec, rollout_id: int | None, stage: int | None
) -> dict[str, Any]:
    verb = _ROLLOUT_TITLES[spec.kind].format(stage=stage if stage is not None else "?")
    release = details.get("release_version") or "?"
    parts = [f"Release {release}"]
    if details.get("strategy"):
        parts.append(str(details["strategy"]))
    if stage is not None:
        parts.append(f"stage {stage}")
    text = " · ".join(parts) + "."
    if details.get("reason"):
        text += f" Reason: {details['reason']}"
    if details.get("approved_by"):
        text += f" Approved by {details['approved_by']}."
    fields: dict[str, Any] = {
        "title": f"Rollout #{rollout_id} {verb}",
        "text": text,
        "nodes": _nodes(details),
    }
    if spec.kind == Kind.AWAITING_APPROVAL:
        target = "100%" if details.get("final") else f"stage {details.get('next_stage', '?')}"
        fields["action_needed"] = (
            f"Approve the promotion to {target}, or pause/abort the rollout, in the dashboard."
        )
    return fields


def _error_text(details: dict[str, Any]) -> str:
    code = details.get("error_code") or "error"
    message = str(details.get("error") or "").strip()
    return f"{code}: {message[:500]}" if message else str(code)


def _security_fields(details: dict[str, Any]) -> dict[str, Any]:
    code = str(details.get("code") or "REJECTED")
    return {
        "title": f"Bundle rejected by {'signature' if code == 'SIGNATURE_INVALID' else 'path'} "
        "checks",
        "text": f"{details.get('file') or 'upload'}: {code}: {str(details.get('reason'))[:500]}",
        "url": _release_url(),
        "component": "release",
    }


def _release_url() -> str:
    try:
        return dashboard_url(reverse("release_list"))
    except NoReverseMatch:
        return dashboard_url("/")


# ---------------------------------------------------------------- aggregates

MAX_ITEMS_IN_PAYLOAD = 1000
_AGGREGATE_WORDS = {
    Kind.NODE_FAILED: "failed",
    Kind.NODE_ROLLED_BACK: "rolled back",
    Kind.NODE_OFFLINE: "went offline",
}


def item_summary(occurrence: Occurrence) -> dict[str, Any]:
    details = occurrence.event.details or {}
    return {
        "node": details.get("node_id"),
        "kind": occurrence.kind,
        "label": occurrence.spec.kind.label,
        "error_code": details.get("error_code") or None,
        "error": str(details.get("error") or "")[:200] or None,
        "event_id": occurrence.event.pk,
    }


def aggregate_notification(
    *, rollout_id: int, items: Iterable[dict[str, Any]], first: dict[str, Any]
) -> dict[str, Any]:
    """One summary for many node-level events of a rollout (the storm brake)."""
    items = list(items)
    counts = Counter(item["kind"] for item in items)
    parts = [
        f"{n} node{'s' if n != 1 else ''} {_AGGREGATE_WORDS.get(k, k)}"
        for k, n in counts.most_common()
    ]
    codes = Counter(item.get("error_code") or "no error code" for item in items)
    stage = Rollout.objects.filter(pk=rollout_id).values_list("current_stage", flat=True).first()
    return {
        **first,
        "kind": counts.most_common(1)[0][0],
        "kind_label": "Node problems in a rollout",
        "severity": worst([SPEC_BY_KIND[k].severity for k in counts]),
        "pagerduty_action": TRIGGER,
        "title": f"Rollout #{rollout_id}: {len(items)} node event{'s' if len(items) != 1 else ''}",
        "text": ", ".join(parts)
        + ". Most common: "
        + ", ".join(f"{code} ×{n}" for code, n in codes.most_common(3))
        + ".",
        "stage": stage if stage is not None else first.get("stage"),
        "node": None,
        "url": rollout_url(rollout_id),
        "items": items[:MAX_ITEMS_IN_PAYLOAD],
        "items_total": len(items),
        "event_ids": [item["event_id"] for item in items][:MAX_ITEMS_IN_PAYLOAD],
        "aggregated": True,
    }


def test_notification(*, channel_name: str, tenant: str | None, now: str) -> dict[str, Any]:
    """What 'Send test' sends: a harmless, clearly labelled message."""
    return {
        "kind": "test",
        "kind_label": "Test",
        "verb": "notification.test",
        "severity": "info",
        "emoji": ":wave:",
        # PagerDuty has no 'test' event: a trigger and immediate resolve would
        # page someone. We send a resolve for a key that never had an incident.
        "pagerduty_action": RESOLVE,
        "incident_key": "themis-test",
        "title": f"Test notification for {channel_name}",
        "text": "If you can read this, Themis Update Manager can reach this channel.",
        "tenant": tenant,
        "url": dashboard_url("/"),
        "source": _source(),
        "component": "notifications",
        "occurred_at": now,
        "event_ids": [],
        "details": {},
        "test": True,
    }
