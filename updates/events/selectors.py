"""Reads of the audit log, always scoped to the requesting user.

A page of events is a keyset read: newest first by (created_at, id), the next page starting
strictly after the last row shown. There is no COUNT and no OFFSET, so a page costs the same on
the first and the millionth row, and a row logged meanwhile never shifts a page by one."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any

from django.core import signing
from django.db import connection
from django.db.models import Q, QuerySet
from django.utils.dateparse import parse_datetime

from tenants.models import Tenant
from updates.models import Event, Node

PAGE_SIZE = 50
NODE_MATCHES = 20
# A verb prefix is turned into the list of verbs it names, read from the verb index. Verbs are
# names in the code, a few dozen; past this many the page falls back to a plain prefix match.
MAX_VERBS = 500
# A prefix naming up to this many verbs, or a user of up to this many tenants, is read one
# verb or tenant at a time (see `_page_rows`); more is most of the log, which the newest-first
# index finds quickly enough on its own.
MAX_MERGED = 30
NEWEST_FIRST = ("-created_at", "-id")
OLDEST_FIRST = ("created_at", "id")
CURSOR_SALT = "themis.events.cursor"
MAX_CURSOR_CHARS = 200


# A column and the values a page is read one at a time for: ("verb", [...]), ("tenant_id", [...])
Split = tuple[str, list[Any]]


class Direction(StrEnum):
    OLDER = "o"
    NEWER = "n"


class BadCursor(ValueError):
    """The page's position parameter was not one this dashboard handed out."""


@dataclass(frozen=True)
class EventCursor:
    """A position in the log: the rows strictly older (or newer) than this (created_at, id)."""

    created_at: datetime
    pk: int
    direction: Direction

    def encode(self) -> str:
        # Signed, so a cursor is ours or refused with a plain message: never an
        # unparsable datetime reaching the database.
        value = [self.created_at.isoformat(), self.pk, str(self.direction)]
        return signing.dumps(value, salt=CURSOR_SALT)

    @classmethod
    def decode(cls, text: str) -> EventCursor:
        if len(text) > MAX_CURSOR_CHARS:
            raise BadCursor("the page position is too long")
        try:
            value = signing.loads(text, salt=CURSOR_SALT)
        except signing.BadSignature:
            raise BadCursor("the page position was not made by this dashboard") from None
        match value:
            case [str(stamp), int(pk), "o" | "n" as direction] if pk > 0:
                created_at = parse_datetime(stamp)
                if created_at is not None and created_at.tzinfo is not None:
                    return cls(created_at=created_at, pk=pk, direction=Direction(direction))
        raise BadCursor("the page position is malformed")


@dataclass(frozen=True)
class EventFilter:
    tenant: Tenant | None = None
    node: Node | None = None
    verb: str = ""
    actor: str = ""
    since: datetime | None = None
    until: datetime | None = None


@dataclass(frozen=True)
class EventPage:
    events: list[Event]
    newer: str = ""  # the cursor of the page before this one, "" when this is the newest
    older: str = ""  # the cursor of the page after this one, "" when this is the oldest
    at_start: bool = True  # no cursor was given: this page starts at the newest event


def _visible_tenants(user: Any) -> list[int] | None:
    """The tenants whose events a user may read; None for all. Read first (one small query) so
    the filter is `tenant_id = n` or `IN (n, m)`: literals the tenant index can range over
    newest first, where a subquery would make the planner read and sort every row of the tenant."""
    if not user.is_authenticated:
        return []
    if user.has_perm("tenants.view_all_tenants"):
        return None
    return list(Tenant.objects.visible_to(user).values_list("id", flat=True))


def event_verbs(prefix: str) -> list[str] | None:
    """The distinct verbs starting with `prefix`, found by hopping through the verb index (one
    seek per distinct verb); None when there are too many to list."""
    table = connection.ops.quote_name(Event._meta.db_table)
    sql = (
        f"WITH RECURSIVE v(verb) AS ("  # noqa: S608 - the table name is the model's, quoted
        f" SELECT MIN(verb) FROM {table}"
        f" UNION ALL"
        f" SELECT (SELECT MIN(verb) FROM {table} WHERE verb > v.verb) FROM v"
        f" WHERE v.verb IS NOT NULL"
        f") SELECT verb FROM v WHERE verb IS NOT NULL LIMIT %s"
    )
    with connection.cursor() as cursor:
        cursor.execute(sql, [MAX_VERBS + 1])
        verbs = [row[0] for row in cursor.fetchall()]
    if len(verbs) > MAX_VERBS:
        return None
    return [verb for verb in verbs if verb.startswith(prefix)]


def events_for_user(user: Any, flt: EventFilter) -> QuerySet[Event]:
    """The events a user may read that match the filter, newest first."""
    events = _filtered(flt, _visible_tenants(user))
    if flt.verb:
        events = _verb_filter(events, flt.verb, event_verbs(flt.verb))
    return events.order_by(*NEWEST_FIRST)


def _filtered(flt: EventFilter, tenants: list[int] | None) -> QuerySet[Event]:
    """Every filter but the verb's, within the tenants the user may read."""
    events = Event.objects.select_related("tenant")
    if tenants is not None and len(tenants) == 1:
        events = events.filter(tenant_id=tenants[0])
    elif tenants is not None:
        events = events.filter(tenant_id__in=tenants)
    if flt.tenant is not None:
        events = events.filter(tenant_id=flt.tenant.pk)
    if flt.node is not None:
        events = events.filter(object_type="node", object_id=str(flt.node.pk))
    if flt.actor:
        events = events.filter(actor_label=flt.actor)
    if flt.since is not None:
        events = events.filter(created_at__gte=flt.since)
    if flt.until is not None:
        events = events.filter(created_at__lt=flt.until)
    return events


def _verb_filter(events: QuerySet[Event], prefix: str, verbs: list[str] | None) -> QuerySet[Event]:
    # An exact verb (or the few a prefix names) rides the (verb, created_at, id) index;
    # `LIKE 'x%'` could use no index on SQLite and only a special one on PostgreSQL.
    if verbs is None:
        return events.filter(verb__startswith=prefix)
    if len(verbs) == 1:
        return events.filter(verb=verbs[0])
    return events.filter(verb__in=verbs)


def _page_rows(
    events: QuerySet[Event], split: Split | None, ordering: tuple[str, str], limit: int
) -> list[Event]:
    """The first `limit` rows in `ordering`. With a split (several verbs, several tenants),
    each value's own first `limit` rows are read from its index and only those are sorted:
    `verb IN (...)` alone makes the database sort every row of every value named, or scan the
    whole table for a rare one, unless its statistics tell it which (SQLite has none unless
    someone runs ANALYZE)."""
    if split is None:
        return list(events.order_by(*ordering)[:limit])
    column, values = split
    if connection.features.supports_slicing_ordering_in_compound:
        return _page_rows_by_union(events, split, ordering, limit)
    picks = Q()
    for value in values:
        one = events.filter(**{column: value}).order_by(*ordering).values("pk")[:limit]
        picks |= Q(pk__in=one)
    return list(Event.objects.filter(picks).select_related("tenant").order_by(*ordering)[:limit])


def _page_rows_by_union(
    events: QuerySet[Event], split: Split, ordering: tuple[str, str], limit: int
) -> list[Event]:
    """PostgreSQL's way (its event table is partitioned by month): each value's first rows
    in one UNION ALL, then those rows by id within the months they span. An outer
    `id IN (subquery)` read in order would have to probe every month's partition for a first
    match, and the months that hold none are read to their end."""
    column, values = split
    heads = [
        events.filter(**{column: value}).order_by(*ordering).values_list("id", "created_at")[:limit]
        for value in values
    ]
    picked = list(heads[0].union(*heads[1:], all=True).order_by(*ordering)[:limit])
    if not picked:
        return []
    stamps = [created_at for _, created_at in picked]
    rows = Event.objects.filter(
        pk__in=[pk for pk, _ in picked], created_at__gte=min(stamps), created_at__lte=max(stamps)
    )
    return list(rows.select_related("tenant").order_by(*ordering))


def events_page(
    user: Any, flt: EventFilter, cursor: EventCursor | None, size: int = PAGE_SIZE
) -> EventPage:
    """One page of `events_for_user`: `size` rows from the cursor on, one more read to learn
    whether the page has a successor."""
    tenants = _visible_tenants(user)
    events = _filtered(flt, tenants)
    verbs = event_verbs(flt.verb) if flt.verb else None
    split: Split | None = None
    # A node's or an actor's events are few: their own index finds them, and the verbs are
    # a filter on those. Read per verb instead, PostgreSQL walked each verb's index back
    # through every node's events (420 ms at a million events, against 23 ms).
    narrow = flt.node is not None or bool(flt.actor)
    if verbs is not None and 1 < len(verbs) <= MAX_MERGED and not narrow:
        split = ("verb", verbs)
    elif flt.verb:
        events = _verb_filter(events, flt.verb, verbs)
    if split is None and flt.tenant is None and tenants and 1 < len(tenants) <= MAX_MERGED:
        split = ("tenant_id", tenants)
    if cursor is None:
        rows = _page_rows(events, split, NEWEST_FIRST, size + 1)
        more = len(rows) > size
        rows = rows[:size]
        older = _cursor(rows[-1], Direction.OLDER) if more else ""
        return EventPage(events=rows, older=older)
    # The bound on created_at alone is an index range; the id only breaks ties within it.
    at, pk = cursor.created_at, cursor.pk
    if cursor.direction is Direction.OLDER:
        older_rows = events.filter(
            Q(created_at__lt=at) | Q(created_at=at, id__lt=pk), created_at__lte=at
        )
        rows = _page_rows(older_rows, split, NEWEST_FIRST, size + 1)
        more = len(rows) > size
        rows = rows[:size]
    else:
        newer_rows = events.filter(
            Q(created_at__gt=at) | Q(created_at=at, id__gt=pk), created_at__gte=at
        )
        rows = _page_rows(newer_rows, split, OLDEST_FIRST, size + 1)
        more = len(rows) > size
        rows = rows[:size][::-1]
    if not rows:
        return EventPage(events=[], at_start=False)
    if cursor.direction is Direction.OLDER:
        newer, older = _cursor(rows[0], Direction.NEWER), _cursor(rows[-1], Direction.OLDER)
        return EventPage(events=rows, newer=newer, older=older if more else "", at_start=False)
    newer = _cursor(rows[0], Direction.NEWER) if more else ""
    return EventPage(
        events=rows, newer=newer, older=_cursor(rows[-1], Direction.OLDER), at_start=False
    )


def _cursor(event: Event, direction: Direction) -> str:
    return EventCursor(created_at=event.created_at, pk=event.pk, direction=direction).encode()


def nodes_matching(user: Any, text: str, limit: int = NODE_MATCHES) -> list[Node]:
    """Nodes the user may see whose id starts with `text` (the node filter's suggestions)."""
    text = text.strip()
    if not text or "\x00" in text:  # PostgreSQL refuses a NUL in a string: no node has one
        return []
    return list(
        Node.objects.visible_to(user).filter(node_id__startswith=text).order_by("node_id")[:limit]
    )


def node_for_filter(user: Any, node_id: str) -> Node | None:
    """The node of this id if the user may see it, else None."""
    return Node.objects.visible_to(user).filter(node_id=node_id).first()
