"""The fleet page at scale: one page of tiles with search, filters and sort in the query
string, a summary counted by the database, and a live poll that sends only what changed."""

from __future__ import annotations

import gzip
import html
import re
from datetime import timedelta

import pytest
import time_machine
from django.db import connection
from django.http import HttpResponse, StreamingHttpResponse
from django.test import Client, RequestFactory
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import timezone

from tests.conftest import Fleet
from tests.factories import NodeFactory, make_cluster, make_node, make_release, make_tenant
from tests.fakes import NullTransport
from themis_dashboard.compression import PageGZipMiddleware
from updates.fleet import selectors
from updates.fleet.services import Heartbeat, node_record_heartbeat, nodes_mark_offline
from updates.jobs import services as job_services
from updates.models import Node, UpdateJob

pytestmark = pytest.mark.django_db


def _tiles(body: str) -> list[str]:
    """The node ids of the tiles in a response, in order."""
    return re.findall(r'class="tile [^"]*" href="[^"]*" data-node="([^"]+)"', body)


def _poll_url(body: str) -> str:
    found = re.search(r'id="fleet-poll" hx-get="([^"]+)"', body)
    assert found, "no live poll on the page"
    return html.unescape(found.group(1))


def _many(n: int, *, tenant_name: str = "Big", prefix: str = "n") -> list[Node]:
    tenant = make_tenant(name=tenant_name, slug=tenant_name.lower())
    return Node.objects.bulk_create(
        NodeFactory.build(node_id=f"{prefix}{i:04d}", tenant=tenant, status="online")
        for i in range(n)
    )


def _age_every_node() -> None:
    """Stamp every node as changed a while ago, a minute apart: what a page opened on a
    quiet fleet sees (only the newest write is within the change window)."""
    now = timezone.now()
    for i, pk in enumerate(Node.objects.order_by("-node_id").values_list("pk", flat=True)):
        Node.objects.filter(pk=pk).update(updated_at=now - timedelta(minutes=2 + i))


# -- Node.updated_at: every write that changes a tile moves it -------------------------


def test_save_and_every_queryset_update_stamp_updated_at(fleet: Fleet) -> None:
    with time_machine.travel(timezone.now() + timedelta(minutes=5)):
        Node.objects.filter(pk=fleet.node_b.pk).update(status=Node.Status.FAILED)
        fleet.node_a.hostname = "renamed"
        fleet.node_a.save()
        later = timezone.now()
    stamps = dict(Node.objects.values_list("node_id", "updated_at"))
    assert stamps["b-1"] >= later - timedelta(seconds=1)
    assert stamps["a-1"] >= later - timedelta(seconds=1)
    assert stamps["a-solo"] < later - timedelta(minutes=4)  # untouched


def test_heartbeat_and_going_offline_stamp_updated_at(fleet: Fleet) -> None:
    _age_every_node()
    before = Node.objects.get(node_id="a-1").updated_at
    node_record_heartbeat(heartbeat=Heartbeat(node_id="a-1", installed_version="1.1.0"))
    assert Node.objects.get(node_id="a-1").updated_at > before

    _age_every_node()
    Node.objects.filter(node_id="b-1").update(last_heartbeat=timezone.now() - timedelta(hours=1))
    _age_every_node()
    before = Node.objects.get(node_id="b-1").updated_at
    assert "b-1" in nodes_mark_offline(silence_seconds=60)
    node = Node.objects.get(node_id="b-1")
    assert node.status == Node.Status.OFFLINE and node.updated_at > before


def test_a_finished_job_reaches_the_open_page(
    personas: dict[str, Client], fleet: Fleet, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The job services change a node with queryset updates: its tile is still sent."""
    monkeypatch.setattr(job_services, "default_transport", NullTransport)
    job = UpdateJob.objects.create(
        node=fleet.node_b, release=make_release(version="1.9.0"), state=UpdateJob.State.VERIFYING
    )
    _age_every_node()
    client = personas["operator"]
    poll = _poll_url(client.get(reverse("fleet")).content.decode())
    job_services.job_finish(job_id=job.pk, node_id="b-1", ok=True, result={"version_to": "1.9.0"})
    text = client.get(poll).content.decode()
    assert _tiles(text) == ["b-1"]
    assert '<span class="tile-version">1.9.0</span>' in text


# -- The page: one page of tiles, search, filters, sort --------------------------------


def test_page_shows_one_page_of_tiles_and_links_to_the_next(
    personas: dict[str, Client],
) -> None:
    _many(250)
    client = personas["operator"]
    first = client.get(reverse("fleet")).content.decode()
    tiles = _tiles(first)
    assert len(tiles) == selectors.FLEET_PAGE_SIZE
    assert tiles[:3] == ["a-1", "a-solo", "b-1"]  # by node id
    assert "Nodes 1–100 of 253 · page 1 of 3" in first
    assert 'href="/?page=2" rel="next"' in first

    last = client.get(reverse("fleet"), {"page": 3}).content.decode()
    assert _tiles(last) == [f"n{i:04d}" for i in range(197, 250)]
    assert "page 3 of 3" in last and 'rel="next"' not in last
    seen = set(tiles) | set(_tiles(client.get(reverse("fleet"), {"page": 2}).content.decode()))
    assert len(seen | set(_tiles(last))) == Node.objects.count()  # every node on some page


def test_search_by_node_id_or_hostname_prefix(personas: dict[str, Client]) -> None:
    _many(30)
    Node.objects.filter(node_id="n0007").update(hostname="db-east-7.example")
    client = personas["operator"]
    assert _tiles(client.get(reverse("fleet"), {"q": "n001"}).content.decode()) == [
        f"n{i:04d}" for i in range(10, 20)
    ]
    assert _tiles(client.get(reverse("fleet"), {"q": "DB-EAST"}).content.decode()) == ["n0007"]
    nothing = client.get(reverse("fleet"), {"q": "zz"}).content.decode()
    assert _tiles(nothing) == [] and "No nodes match." in nothing


def test_filters_combine_and_sorts_order(personas: dict[str, Client], fleet: Fleet) -> None:
    Node.objects.filter(node_id="a-solo").update(status=Node.Status.FAILED, installed_version="2.0")
    Node.objects.filter(node_id="b-1").update(
        status=Node.Status.OFFLINE, last_heartbeat=timezone.now()
    )
    client = personas["operator"]

    def shown(**query: str) -> list[str]:
        return _tiles(client.get(reverse("fleet"), query).content.decode())

    assert shown(tenant="tenant-a") == ["a-1", "a-solo"]
    assert shown(tenant="tenant-a", cluster=str(fleet.cluster_a.pk)) == ["a-1"]
    assert shown(status="failed") == ["a-solo"]
    assert shown(version="2.0") == ["a-solo"]
    assert shown(tenant="tenant-b", status="failed") == []
    assert shown(sort="-node") == ["b-1", "a-solo", "a-1"]
    assert shown(sort="status") == ["a-solo", "b-1", "a-1"]  # problems first
    assert shown(sort="-heartbeat") == ["b-1", "a-1", "a-solo"]  # never seen last
    assert shown(sort="heartbeat") == ["a-1", "a-solo", "b-1"]  # never seen first
    assert shown(sort="-version") == ["a-solo", "a-1", "b-1"]


def test_links_keep_the_view_and_the_cluster_filter_follows_the_tenant(
    personas: dict[str, Client], fleet: Fleet
) -> None:
    body = personas["operator"].get(reverse("fleet"), {"tenant": "tenant-a", "sort": "status"})
    text = body.content.decode()
    assert '<select name="cluster"' in text and ">a-main</option>" in text
    # The summary's status pills keep the tenant and the sort, and start at page 1.
    assert 'href="/?tenant=tenant-a&amp;sort=status&amp;status=online"' in text
    poll = _poll_url(text)
    assert poll.startswith("/fleet/poll/?tenant=tenant-a&sort=status&v=")
    without = personas["operator"].get(reverse("fleet")).content.decode()
    assert '<select name="cluster"' not in without


def test_summary_counts_by_status_version_and_tenant(
    personas: dict[str, Client], fleet: Fleet
) -> None:
    Node.objects.filter(node_id="a-solo").update(status=Node.Status.FAILED, installed_version="2.0")
    body = personas["operator"].get(reverse("fleet"), {"status": "online"}).content.decode()
    summary = body[body.index('id="fleet-summary"') : body.index('id="fleet-nodes"')]
    # The summary counts the whole visible fleet, whatever the list is filtered by.
    assert "<strong>3 nodes</strong>" in summary
    assert ">2 online</a>" in summary and ">1 failed</a>" in summary
    assert '<code>1.0.0</code></a> <span class="muted">2</span>' in summary
    assert '<code>2.0</code></a> <span class="muted">1</span>' in summary
    assert '>Tenant A</a> <span class="muted">2</span>' in summary
    assert '<span class="pill status-failed">1 failed</span>' in summary  # Tenant A's problem
    assert '>Tenant B</a> <span class="muted">1</span>' in summary


def test_tenant_admin_cannot_reach_another_tenant_by_filter(
    personas: dict[str, Client], fleet: Fleet
) -> None:
    client = personas["admin_a"]
    other = client.get(reverse("fleet"), {"tenant": "tenant-b"})
    text = other.content.decode()
    assert other.status_code == 200
    assert "b-1" not in text and "Tenant B" not in text
    assert "Select a valid choice" in text
    # Naming the other tenant's node or cluster finds nothing either.
    assert _tiles(client.get(reverse("fleet"), {"q": "b-"}).content.decode()) == []
    b_cluster = make_cluster(tenant=fleet.tenant_b, name="b-main")
    make_node(node_id="b-2", tenant=fleet.tenant_b, cluster=b_cluster)
    leak = client.get(reverse("fleet"), {"cluster": str(b_cluster.pk)}).content.decode()
    assert "b-2" not in leak and "b-main" not in leak
    poll = client.get(reverse("fleet_poll"), {"tenant": "tenant-b", "v": "x"}).content.decode()
    assert "b-1" not in poll and "b-2" not in poll and "Tenant B" not in poll


def test_tiles_never_load_the_json_columns(personas: dict[str, Client]) -> None:
    _many(20)
    with CaptureQueriesContext(connection) as queries:
        personas["operator"].get(reverse("fleet"))
    node_reads = [q["sql"] for q in queries.captured_queries if '"updates_node"' in q["sql"]]
    assert node_reads
    for sql in node_reads:
        assert "restore_points" not in sql and "schema_history" not in sql


NASTY = [
    "",
    "-1",
    "0",
    "x",
    str(2**63),
    str(10**40),
    "nan",
    "\x00",
    "a\x00b",
    "🙂" * 80,
    "x" * 5000,
]


@pytest.mark.parametrize("key", ["q", "tenant", "cluster", "status", "version", "sort", "page"])
@pytest.mark.parametrize("url_name", ["fleet", "fleet_poll"])
def test_hostile_query_strings_are_never_a_server_error(
    personas: dict[str, Client], key: str, url_name: str
) -> None:
    for value in NASTY:
        for extra in ({}, {"v": value, "page_sig": value, "summary_sig": value}):
            response = personas["admin_a"].get(reverse(url_name), {key: value, **extra})
            assert response.status_code in (200, 204), (key, value)


def test_a_bad_value_is_left_out_and_the_rest_still_filter(
    personas: dict[str, Client], fleet: Fleet
) -> None:
    response = personas["operator"].get(
        reverse("fleet"), {"sort": "bogus", "q": "a-", "page": "99"}
    )
    text = response.content.decode()
    assert _tiles(text) == ["a-1", "a-solo"]  # past the end: the last page
    assert "Sort by: Select a valid choice" in text


# -- The live poll: 204 when nothing changed, else only what changed -------------------


def test_idle_poll_is_an_empty_204(personas: dict[str, Client]) -> None:
    _many(120)
    client = personas["operator"]
    poll = _poll_url(client.get(reverse("fleet")).content.decode())
    response = client.get(poll, headers={"HX-Request": "true", "Accept-Encoding": "gzip"})
    assert response.status_code == 204
    assert response.content == b""
    size = len(response.content) + sum(len(k) + len(v) + 4 for k, v in response.items())
    assert size <= 2048


def test_poll_sends_only_the_changed_tile_and_a_new_version(
    personas: dict[str, Client], fleet: Fleet
) -> None:
    _age_every_node()
    client = personas["operator"]
    poll = _poll_url(client.get(reverse("fleet")).content.decode())
    Node.objects.filter(node_id="b-1").update(status=Node.Status.OFFLINE, installed_version="1.7.1")

    response = client.get(poll, headers={"HX-Request": "true"})
    text = response.content.decode()
    assert response.status_code == 200
    assert _tiles(text) == ["b-1"]
    assert 'id="node-b-1" class="tile status-offline"' in text and "1.7.1" in text
    assert 'hx-swap-oob="true">' in text
    assert 'id="fleet-nodes"' not in text  # the list itself is not sent again
    assert '<div id="fleet-counts" hx-swap-oob="true">' in text
    assert '<div id="fleet-tenant-counts" hx-swap-oob="true">' in text
    new_poll = _poll_url(text)
    assert new_poll != poll
    assert client.get(new_poll).status_code == 204  # caught up


def test_poll_leaves_out_an_unchanged_summary(personas: dict[str, Client], fleet: Fleet) -> None:
    _age_every_node()
    client = personas["operator"]
    poll = _poll_url(client.get(reverse("fleet")).content.decode())
    # A heartbeat that changes nothing the summary counts.
    Node.objects.filter(node_id="a-1").update(disk_free_bytes=10 * 2**30)
    text = client.get(poll).content.decode()
    assert _tiles(text) == ["a-1"] and "10.0\xa0GB free" in text
    assert 'id="fleet-counts"' not in text and 'id="fleet-tenant-counts"' not in text


def test_poll_sends_the_whole_list_when_the_page_shows_other_nodes(
    personas: dict[str, Client], fleet: Fleet
) -> None:
    _age_every_node()
    client = personas["operator"]
    poll = _poll_url(client.get(reverse("fleet"), {"status": "online"}).content.decode())
    Node.objects.filter(node_id="a-1").update(status=Node.Status.FAILED)
    text = client.get(poll).content.decode()
    assert '<section id="fleet-nodes" hx-swap-oob="true">' in text
    assert _tiles(text) == ["a-solo", "b-1"]  # a-1 left the filtered list
    assert 'class="tile status-online" href="/nodes/a-solo/" data-node="a-solo" title' in text


def test_poll_sees_a_write_that_committed_after_a_later_one(
    personas: dict[str, Client], fleet: Fleet
) -> None:
    """A write stamped before the newest one, committed after the page read the version:
    the version's count of recent writes changes, and the window re-sends its tile."""
    now = timezone.now()
    Node.objects.update(updated_at=now - timedelta(minutes=5))
    Node.objects.filter(node_id="b-1").update(updated_at=now)
    client = personas["operator"]
    poll = _poll_url(client.get(reverse("fleet")).content.decode())
    Node.objects.filter(node_id="a-solo").update(
        status=Node.Status.FAILED, updated_at=now - timedelta(seconds=3)
    )
    text = client.get(poll).content.decode()
    assert "a-solo" in _tiles(text)
    assert 'id="node-a-solo" class="tile status-failed"' in text


def test_poll_sees_a_node_deleted(personas: dict[str, Client], fleet: Fleet) -> None:
    _age_every_node()
    client = personas["operator"]
    poll = _poll_url(client.get(reverse("fleet")).content.decode())
    Node.objects.filter(node_id="a-solo").delete()
    text = client.get(poll).content.decode()
    assert '<section id="fleet-nodes" hx-swap-oob="true">' in text
    assert _tiles(text) == ["a-1", "b-1"]


def test_a_tenant_admin_poll_ignores_other_tenants_changes(
    personas: dict[str, Client], fleet: Fleet
) -> None:
    _age_every_node()
    client = personas["admin_a"]
    poll = _poll_url(client.get(reverse("fleet")).content.decode())
    Node.objects.filter(node_id="b-1").update(status=Node.Status.FAILED)
    make_node(node_id="b-2", tenant=fleet.tenant_b)
    assert client.get(poll).status_code == 204
    Node.objects.filter(node_id="a-solo").update(status=Node.Status.FAILED)
    assert _tiles(client.get(poll).content.decode()) == ["a-solo"]


def test_a_poll_after_the_session_ended_sends_the_browser_to_log_in(
    personas: dict[str, Client], fleet: Fleet
) -> None:
    client = personas["operator"]
    poll = _poll_url(client.get(reverse("fleet")).content.decode())
    client.logout()
    response = client.get(poll, headers={"HX-Request": "true"})
    assert response.status_code == 200
    assert response["HX-Redirect"] == f"{reverse('login')}?next=/"
    assert response.content == b""


def test_poll_with_a_malformed_version_sends_everything(
    personas: dict[str, Client], fleet: Fleet
) -> None:
    text = personas["operator"].get(reverse("fleet_poll"), {"v": "1.2"}).content.decode()
    assert '<section id="fleet-nodes" hx-swap-oob="true">' in text
    assert 'id="fleet-counts" hx-swap-oob="true"' in text
    assert _tiles(text) == ["a-1", "a-solo", "b-1"]


def test_version_token_round_trips() -> None:
    version = selectors.FleetVersion(latest=timezone.now(), total=12, recent=3)
    assert selectors.FleetVersion.from_token(version.token) == version
    assert selectors.FleetVersion.from_token("0.0.0") == selectors.FleetVersion(None, 0, 0)
    for bad in ("", "1.2", "a.b.c", "1.2.3.4", "-1.2.3", "1" * 19 + ".1.1", "١.1.1"):
        assert selectors.FleetVersion.from_token(bad) is None


# -- Compression -----------------------------------------------------------------------


def test_pages_are_gzipped_for_browsers_that_accept_it(personas: dict[str, Client]) -> None:
    _many(150)
    response = personas["operator"].get(reverse("fleet"), headers={"Accept-Encoding": "gzip"})
    assert response["Content-Encoding"] == "gzip"
    assert "Accept-Encoding" in response["Vary"]
    body = gzip.decompress(response.content).decode()
    assert len(_tiles(body)) == selectors.FLEET_PAGE_SIZE
    assert len(response.content) * 4 < len(body)
    plain = personas["operator"].get(reverse("fleet"))
    assert not plain.has_header("Content-Encoding")


def test_streams_and_binary_answers_are_never_gzipped() -> None:
    request = RequestFactory().get("/", headers={"Accept-Encoding": "gzip"})
    middleware = PageGZipMiddleware(lambda r: HttpResponse())
    page = middleware.process_response(request, HttpResponse("x" * 1000))
    assert page["Content-Encoding"] == "gzip"
    bundle = StreamingHttpResponse(iter([b"x" * 1000]), content_type="application/octet-stream")
    bundle["Content-Length"] = "1000"
    assert not middleware.process_response(request, bundle).has_header("Content-Encoding")
    assert bundle["Content-Length"] == "1000"
    binary = HttpResponse(b"x" * 1000, content_type="application/gzip")
    assert not middleware.process_response(request, binary).has_header("Content-Encoding")


# -- The table view -----------------------------------------------------------------------


def test_the_table_view_shows_a_row_per_node_and_its_poll_sends_changed_rows(
    personas: dict[str, Client], fleet: Fleet
) -> None:
    _age_every_node()
    client = personas["operator"]
    page = client.get(reverse("fleet"), {"layout": "table", "q": "a-"}).content.decode()
    table = page[page.index('id="fleet-table"') : page.index("</table>")]
    assert table.count('<tr id="row-') == 2
    assert '<tr id="row-a-1" class="status-' in table and 'value="a-1"' in table
    assert 'class="tile ' not in page  # no tiles beside it
    assert "Show as tiles" in page
    poll = _poll_url(page)
    assert "layout=table" in poll  # the poll asks for rows

    Node.objects.filter(node_id="a-1").update(installed_version="1.7.2")
    text = client.get(poll, headers={"HX-Request": "true"}).content.decode()
    assert '<tr id="row-a-1"' in text and 'hx-swap-oob="true"' in text and "1.7.2" in text
    assert 'id="node-a-1"' not in text


def test_the_tiles_are_the_default_and_a_bad_layout_is_left_out(
    personas: dict[str, Client], fleet: Fleet
) -> None:
    page = personas["operator"].get(reverse("fleet"), {"layout": "cards"}).content.decode()
    assert 'id="fleet-table"' not in page and 'id="node-a-1" class="tile' in page
    assert "Show as: Select a valid choice" in page
    assert "Show as a table" in page
