"""The audit log: `event_log` appends one Event; everything that changes the fleet calls it.

It imports only models. Whoever must hear of events (notifications) subscribes at start-up
with `subscribe`, so nothing here imports back up."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypedDict, Unpack

from django.contrib.auth.models import User
from django.db import models

from tenants.models import Tenant
from updates.models import Event

SYSTEM = "system"

EventListener = Callable[[Event], None]
_listeners: list[EventListener] = []


def subscribe(listener: EventListener) -> None:
    """Call `listener(event)` for every Event logged from now on (idempotent). A listener must
    not raise or block: it runs inside the caller's transaction."""
    if listener not in _listeners:
        _listeners.append(listener)


class EventFields(TypedDict, total=False):
    """What an Event says besides its verb."""

    actor: User | None
    actor_label: str | None  # defaults to the actor's username, else "system"
    tenant: Tenant | int | None
    obj: models.Model | None
    details: dict[str, Any] | None


def event_log(*, verb: str, **fields: Unpack[EventFields]) -> Event:
    """Append one audit Event. The actor is a user, or a label like 'system'."""
    event = new_event(verb=verb, **fields)
    event.save()
    _tell_listeners([event])
    return event


def new_event(*, verb: str, **fields: Unpack[EventFields]) -> Event:
    """An Event not yet stored, for `event_log_many`."""
    actor, tenant, obj = fields.get("actor"), fields.get("tenant"), fields.get("obj")
    return Event(
        verb=verb,
        actor=actor,
        actor_label=fields.get("actor_label") or (actor.get_username() if actor else SYSTEM),
        tenant_id=tenant.pk if isinstance(tenant, Tenant) else tenant,
        object_type=(obj._meta.model_name or "") if obj is not None else "",
        object_id=str(obj.pk) if obj is not None else "",
        details=fields.get("details") or {},
    )


def event_log_many(events: list[Event]) -> list[Event]:
    """Append many Events (from `new_event`) with one INSERT; listeners hear each."""
    stored = Event.objects.bulk_create(events)
    _tell_listeners(stored)
    return stored


def _tell_listeners(events: list[Event]) -> None:
    for event in events:
        for listener in _listeners:
            listener(event)
