"""The events page at scale: keyset pages, a refused position, node suggestions, constant
queries, and the index each filter reads."""

from __future__ import annotations

import html
import re
from datetime import UTC, datetime, timedelta

import pytest
from django.contrib.auth.models import User
from django.core import signing
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.urls import reverse

from tests.conftest import Fleet
from tests.factories import NodeFactory, make_user
from updates.events import selectors
from updates.events.selectors import CURSOR_SALT, PAGE_SIZE, Direction, EventCursor, EventFilter
from updates.models import Event, Node

pytestmark = pytest.mark.django_db

URL = reverse("event_list")
SEARCH = reverse("event_node_search")
T0 = datetime(2026, 1, 1, tzinfo=UTC)


def _events(fleet: Fleet, n: int, *, same_time: bool = False, node: Node | None = None) -> None:
    """n events one second apart (or all at one instant), tenant A's, oldest first."""
    target = node or fleet.node_a
    Event.objects.bulk_create(
        Event(
            verb=f"test.e{i:04d}",
            actor_label="system",
            tenant_id=target.tenant_id,
            object_type="node",
            object_id=str(target.pk),
        )
        for i in range(n)
    )
    # auto_now_add stamps every row with now: spread them with the ids as the clock.
    with connection.cursor() as cursor:
        for event in Event.objects.filter(verb__startswith="test.e").order_by("id"):
            at = T0 if same_time else T0 + timedelta(seconds=event.pk)
            cursor.execute(
                "UPDATE updates_event SET created_at = %s WHERE id = %s",
                [connection.ops.adapt_datetimefield_value(at), event.pk],
            )


def _link(body: str, rel: str) -> str | None:
    match = re.search(rf'<a href="(\?[^"]*)" rel="{rel}">', body)
    return html.unescape(match.group(1)) if match else None


def _verbs(body: str) -> list[str]:
    return re.findall(r"<code>(test\.e\d+)</code>", body)


@pytest.mark.parametrize("same_time", [False, True])
def test_walking_older_then_newer_shows_every_event_once(
    personas: dict[str, Client], fleet: Fleet, same_time: bool
) -> None:
    _events(fleet, 2 * PAGE_SIZE + 7, same_time=same_time)
    client = personas["operator"]
    seen: list[str] = []
    pages: list[list[str]] = []
    query: str | None = ""
    while query is not None:
        body = client.get(URL + query).content.decode()
        pages.append(_verbs(body))
        seen += pages[-1]
        query = _link(body, "next")
    # Newest first by (created_at, id): ties at one instant are ordered by id.
    assert seen == [f"test.e{i:04d}" for i in reversed(range(2 * PAGE_SIZE + 7))]
    assert [len(p) for p in pages] == [PAGE_SIZE, PAGE_SIZE, 7]
    back = _link(body, "prev")
    assert back is not None
    newer = client.get(URL + back).content.decode()
    assert _verbs(newer) == pages[1]
    top = client.get(URL + (_link(newer, "prev") or "")).content.decode()
    assert _verbs(top) == pages[0] and _link(top, "prev") is None


def test_an_event_logged_meanwhile_does_not_shift_the_next_page(
    personas: dict[str, Client], fleet: Fleet
) -> None:
    _events(fleet, PAGE_SIZE + 5)
    client = personas["operator"]
    first = client.get(URL).content.decode()
    Event.objects.create(verb="test.e9999", actor_label="system", tenant=fleet.tenant_a)
    second = client.get(URL + (_link(first, "next") or "")).content.decode()
    assert _verbs(second) == [f"test.e{i:04d}" for i in reversed(range(5))]


@pytest.mark.parametrize(
    "cursor",
    [
        "garbage",
        "x" * 5000,
        signing.dumps(["2026-01-01T00:00:00+00:00", 5, "o"], salt="another purpose"),
        signing.dumps(["yesterday", 5, "o"], salt=CURSOR_SALT),
        signing.dumps(["2026-01-01T00:00:00", 5, "o"], salt=CURSOR_SALT),  # no timezone
        signing.dumps(["2026-01-01T00:00:00+00:00", -5, "o"], salt=CURSOR_SALT),
        signing.dumps(["2026-01-01T00:00:00+00:00", 5, "sideways"], salt=CURSOR_SALT),
        signing.dumps({"t": 1}, salt=CURSOR_SALT),
    ],
    # Named, not shown: a signed value carries its time, and every test process (xdist)
    # must collect the same ids.
    ids=[
        "garbage",
        "too-long",
        "other-salt",
        "not-a-time",
        "no-timezone",
        "negative-id",
        "no-direction",
        "not-a-list",
    ],
)
def test_a_position_not_made_here_is_a_400_with_words(
    personas: dict[str, Client], fleet: Fleet, cursor: str
) -> None:
    _events(fleet, 3)
    response = personas["operator"].get(URL, {"cursor": cursor})
    body = response.content.decode()
    assert response.status_code == 400
    assert "Bad page link" in body and "Start from the newest events" in body
    assert _verbs(body) == [] and 'href="?"' in body  # a way back to the newest page
    partial = personas["operator"].get(URL, {"cursor": cursor}, headers={"HX-Request": "true"})
    assert partial.status_code == 400 and b"Bad page link" in partial.content


def test_a_position_keeps_the_filters(personas: dict[str, Client], fleet: Fleet) -> None:
    _events(fleet, PAGE_SIZE + 3)
    _events(fleet, 4, node=fleet.node_b)  # tenant B's node, same verbs, newer ids
    client = personas["operator"]
    first = client.get(URL, {"node": "a-1"}).content.decode()
    query = _link(first, "next")
    assert query is not None and "node=a-1" in query
    assert len(_verbs(client.get(URL + query).content.decode())) == 3


def test_pages_read_no_count_and_no_offset(personas: dict[str, Client], fleet: Fleet) -> None:
    _events(fleet, PAGE_SIZE + 3)
    client = personas["admin_a"]
    with CaptureQueriesContext(connection) as first:
        body = client.get(URL, {"verb": "test."}).content.decode()
    with CaptureQueriesContext(connection) as second:
        client.get(URL + (_link(body, "next") or ""))
    sql = [q["sql"].upper() for q in [*first.captured_queries, *second.captured_queries]]
    reads = [s for s in sql if '"UPDATES_EVENT"' in s]
    assert reads and not any("COUNT(" in s or "OFFSET" in s for s in reads)
    assert all(f"LIMIT {PAGE_SIZE + 1}" in s for s in reads if "ORDER BY" in s)


def _fleet_of(fleet: Fleet, n_nodes: int, n_events: int, first: int = 0) -> None:
    """n_nodes more nodes (n0000... from `first`) of both tenants, n_events about them."""
    nodes = Node.objects.bulk_create(
        NodeFactory.build(node_id=f"n{i:04d}", tenant=fleet.tenant_a if i % 2 else fleet.tenant_b)
        for i in range(first, first + n_nodes)
    )
    Event.objects.bulk_create(
        Event(
            verb=f"node.v{i % 7}",
            actor_label="system",
            tenant_id=nodes[i % n_nodes].tenant_id,
            object_type="node",
            object_id=str(nodes[i % n_nodes].pk),
        )
        for i in range(n_events)
    )


@pytest.mark.parametrize("persona", ["operator", "admin_a"])
@pytest.mark.parametrize(
    "params", [{}, {"verb": "node.v"}, {"node": "n0003"}, {"tenant": "tenant"}, {"actor": "x"}]
)
def test_queries_do_not_grow_with_events_or_nodes(
    personas: dict[str, Client], fleet: Fleet, persona: str, params: dict[str, str]
) -> None:
    if params.get("tenant"):
        params = {"tenant": str(fleet.tenant_a.pk)}
    counts = []
    # 20 nodes and 100 events, then grown to 200 nodes and 2,000 events.
    for n_nodes, n_events, first in [(20, 100, 0), (180, 1900, 20)]:
        _fleet_of(fleet, n_nodes, n_events, first)
        client = personas[persona]
        with CaptureQueriesContext(connection) as queries:
            response = client.get(URL, params)
        assert response.status_code == 200
        rows = response.content.decode().count("<tr><td>")
        assert rows <= PAGE_SIZE
        counts.append(len(queries))
    assert counts[0] == counts[1], counts


def test_node_filter_is_a_text_field_not_a_list_of_every_node(
    personas: dict[str, Client], fleet: Fleet
) -> None:
    _fleet_of(fleet, 300, 10)
    body = personas["operator"].get(URL).content.decode()
    assert "<option" not in body.split('id="event-results"')[0].split('name="tenant"')[1][200:]
    assert re.search(r'<input type="text" name="node"[^>]*list="node-options"', body)
    assert f'hx-get="{SEARCH}"' in body and '<datalist id="node-options">' in body


def test_a_new_filter_starts_from_the_newest_events(
    personas: dict[str, Client], fleet: Fleet
) -> None:
    _events(fleet, PAGE_SIZE + 3)
    client = personas["operator"]
    second = client.get(URL + (_link(client.get(URL).content.decode(), "next") or ""))
    form = second.content.decode().split('class="filters"')[1].split("</form>")[0]
    assert 'name="cursor"' not in form and 'name="verb"' in form


@pytest.mark.parametrize(
    ("persona", "typed", "expected"),
    [
        ("operator", "a-", ["a-1", "a-solo"]),
        ("operator", "b", ["b-1"]),
        ("admin_a", "a", ["a-1", "a-solo"]),
        ("admin_a", "b-", []),  # tenant B's node is not even suggested
        ("admin_b", "a-1", []),
        ("operator", "", []),
        ("operator", "zz", []),
    ],
)
def test_node_suggestions_are_scoped(
    personas: dict[str, Client], fleet: Fleet, persona: str, typed: str, expected: list[str]
) -> None:
    response = personas[persona].get(SEARCH, {"node": typed}, headers={"HX-Request": "true"})
    assert response.status_code == 200
    body = response.content.decode()
    assert body.strip().startswith('<datalist id="node-options">')
    assert re.findall(r'<option value="([^"]+)"', body) == expected


def test_node_suggestions_are_few(personas: dict[str, Client], fleet: Fleet) -> None:
    _fleet_of(fleet, 300, 0)
    body = personas["operator"].get(SEARCH, {"node": "n0"}).content.decode()
    assert re.findall(r'<option value="([^"]+)"', body) == [f"n{i:04d}" for i in range(20)]


def test_node_of_another_tenant_is_refused_as_unknown(
    personas: dict[str, Client], fleet: Fleet
) -> None:
    _events(fleet, 2, node=fleet.node_b)
    mine = personas["admin_a"].get(URL, {"node": "b-1"}).content.decode()
    nobody = personas["admin_a"].get(URL, {"node": "no-such-node"}).content.decode()
    assert "no such node" in mine and "no such node" in nobody
    assert _verbs(mine) == []
    assert len(_verbs(personas["operator"].get(URL, {"node": "b-1"}).content.decode())) == 2


# ------------------------------------------------------------------ query plans (SQLite)


def _plans(user: object, flt: EventFilter, cursor: EventCursor | None = None) -> list[str]:
    """SQLite's plan of each query a page runs on the event table."""
    with CaptureQueriesContext(connection) as queries:
        selectors.events_page(user, flt, cursor)
    plans = []
    for query in queries.captured_queries:
        if '"updates_event"' in query["sql"] and "ORDER BY" in query["sql"]:
            with connection.cursor() as db:
                db.execute(f"EXPLAIN QUERY PLAN {query['sql']}")
                plans.append(" | ".join(str(row[-1]) for row in db.fetchall()))
    return plans


@pytest.mark.skipif(connection.vendor != "sqlite", reason="SQLite's EXPLAIN QUERY PLAN")
@pytest.mark.parametrize("direction", [None, Direction.OLDER, Direction.NEWER])
@pytest.mark.parametrize(
    ("name", "index"),
    [
        ("none", "event_created"),
        ("tenant", "event_tenant_created"),
        ("node", "event_object_created"),
        ("verb", "event_verb_created"),
        ("actor", "event_actor_created"),
        ("since", "event_created"),
        ("until", "event_created"),
    ],
)
def test_each_filter_reads_its_index_in_page_order(
    fleet: Fleet, name: str, index: str, direction: Direction | None
) -> None:
    _fleet_of(fleet, 50, 500)
    operator = make_user(username="op", is_superuser=True)
    flt = {
        "none": EventFilter(),
        "tenant": EventFilter(tenant=fleet.tenant_a),
        "node": EventFilter(node=Node.objects.get(node_id="n0003")),
        "verb": EventFilter(verb="node.v3"),
        "actor": EventFilter(actor="system"),
        "since": EventFilter(since=T0),
        "until": EventFilter(until=T0 + timedelta(days=3650)),
    }[name]
    middle = Event.objects.order_by("id")[250]
    cursor = None
    if direction is not None:
        cursor = EventCursor(created_at=middle.created_at, pk=middle.pk, direction=direction)
    [plan] = _plans(operator, flt, cursor)
    assert f"INDEX {index}" in plan, plan
    assert "TEMP B-TREE" not in plan, plan  # no sort: the index is already in page order


@pytest.mark.skipif(connection.vendor != "sqlite", reason="SQLite's EXPLAIN QUERY PLAN")
def test_a_prefix_naming_several_verbs_reads_a_page_of_each(fleet: Fleet) -> None:
    _fleet_of(fleet, 50, 500)
    operator = make_user(username="op", is_superuser=True)
    [plan] = _plans(operator, EventFilter(verb="node.v"))
    # One index range per verb (7 of them), their first rows fetched by id, and only those
    # sorted (each list subquery is run once; the plan names it again where it is checked).
    assert plan.startswith("MULTI-INDEX OR"), plan
    assert plan.count("LIST SUBQUERY 7 | SEARCH U0 USING COVERING INDEX event_verb_created"), plan
    assert "SCAN updates_event" not in plan, plan
    page = selectors.events_page(operator, EventFilter(verb="node.v"), None)
    newest = Event.objects.filter(verb__startswith="node.v").order_by("-created_at", "-id")
    assert [e.pk for e in page.events] == [e.pk for e in newest[:PAGE_SIZE]]


@pytest.mark.skipif(connection.vendor != "sqlite", reason="SQLite's EXPLAIN QUERY PLAN")
def test_an_admin_of_several_tenants_reads_a_page_of_each(
    personas: dict[str, Client], fleet: Fleet
) -> None:
    _fleet_of(fleet, 50, 500)
    admin = User.objects.get(username="alice")
    [one] = _plans(admin, EventFilter())
    assert "SEARCH updates_event USING INDEX event_tenant_created (tenant_id=?)" in one, one
    fleet.tenant_b.admins.add(admin)
    [both] = _plans(admin, EventFilter())
    assert both.startswith("MULTI-INDEX OR"), both
    assert "LIST SUBQUERY 2 | SEARCH U0 USING COVERING INDEX event_tenant_created" in both, both
    # Walking every page gives the same rows as one plain read of both tenants.
    seen: list[int] = []
    cursor = None
    while True:
        page = selectors.events_page(admin, EventFilter(), cursor)
        seen += [e.pk for e in page.events]
        if not page.older:
            break
        cursor = EventCursor.decode(page.older)
    newest = Event.objects.filter(tenant__in=[fleet.tenant_a, fleet.tenant_b])
    assert seen == list(newest.order_by("-created_at", "-id").values_list("pk", flat=True))
    assert len(seen) == 500
