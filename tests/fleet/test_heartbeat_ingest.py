"""Heartbeats in batches (updates.fleet.ingest): the same checks as one by one, a constant
number of statements per batch, side effects through the one-by-one path, liveness exact in
Redis and coarse in the database, several ingesters sharing the queue without double work."""

from __future__ import annotations

import threading
import time
from datetime import datetime, timedelta
from typing import Any

import pytest
import redis
from django.db import connection
from django.test.utils import CaptureQueriesContext, override_settings
from django.utils import timezone

from tests.conftest import Fleet
from tests.factories import make_cluster, make_node, make_release, make_tenant
from tests.security.signing import signed_report
from themis_dashboard.celery import app
from updates.engine.reports import HEARTBEAT_QUEUE, ReportType
from updates.fleet.ingest import (
    IngestOptions,
    decode_envelopes,
    heartbeats_record_batch,
    ingest_until,
)
from updates.fleet.liveness import LIVENESS_KEY, Liveness
from updates.fleet.services import nodes_mark_offline
from updates.models import Event, Node, NodeComponent, ReportRejection, UpdateJob
from updates.taskqueue import TaskName

pytestmark = pytest.mark.django_db

HB = ReportType.HEARTBEAT


def _beat(node_id: str, seq: int, at: datetime | None = None, **fields: Any) -> dict[str, Any]:
    payload = {"installed_version": "1.0.0", "disk_free_bytes": 10**9, **fields}
    return signed_report(node_id, HB, payload, seq=seq, now=(at or timezone.now()).timestamp())


def _online_nodes(count: int, prefix: str = "n") -> list[Node]:
    tenant = make_tenant()
    cluster = make_cluster(tenant=tenant)
    return [
        make_node(
            node_id=f"{prefix}-{i}", tenant=tenant, cluster=cluster, status=Node.Status.ONLINE
        )
        for i in range(count)
    ]


def _refused(node_id: str, reason: str) -> int:
    row = ReportRejection.objects.filter(source=node_id, reason=reason).first()
    return row.count if row is not None else 0


def _liveness(redis_url: str) -> Liveness:
    return Liveness(redis.Redis.from_url(redis_url))


def test_a_batch_stores_every_node_in_the_same_few_statements_whatever_its_size(
    redis_url: str,
) -> None:
    nodes = _online_nodes(60)
    counts = []
    for size, seq in ((10, 5), (60, 6)):
        envelopes = [
            _beat(n.node_id, seq, installed_version=f"1.{seq}.0", load_1m=0.5) for n in nodes[:size]
        ]
        with CaptureQueriesContext(connection) as queries:
            outcome = heartbeats_record_batch(envelopes, liveness=_liveness(redis_url))
        assert (outcome.received, outcome.stored, outcome.refused) == (size, size, 0)
        counts.append(len(queries))
    assert counts[0] == counts[1] <= 8, counts
    stored = Node.objects.get(node_id="n-3")
    assert (stored.installed_version, stored.load_1m, stored.report_sequence) == ("1.6.0", 0.5, 6)
    assert Node.objects.get(node_id="n-40").installed_version == "1.6.0"
    assert Node.objects.get(node_id="n-40").report_sequence == 6


def test_replayed_and_overtaken_heartbeats_in_a_batch_are_refused_and_counted(
    fleet: Fleet, redis_url: str
) -> None:
    Node.objects.filter(node_id="a-1").update(status=Node.Status.ONLINE)
    newest = _beat("a-1", 12, installed_version="1.2.0")
    batch = [_beat("a-1", 10, installed_version="1.0.0"), newest, newest]
    batch.append(_beat("a-1", 11, installed_version="1.1.0"))
    outcome = heartbeats_record_batch(batch, liveness=_liveness(redis_url))
    assert (outcome.stored, outcome.refused) == (1, 3)
    node = Node.objects.get(node_id="a-1")
    assert (node.installed_version, node.report_sequence) == ("1.2.0", 12)
    assert _refused("a-1", "replayed") == 3
    # The same heartbeat once more, in a later batch: refused, nothing moves back.
    again = heartbeats_record_batch([newest, _beat("a-1", 9)], liveness=_liveness(redis_url))
    assert (again.stored, again.refused) == (0, 2)
    assert Node.objects.get(node_id="a-1").installed_version == "1.2.0"


def test_a_heartbeat_older_than_an_accepted_job_report_is_refused(
    fleet: Fleet, redis_url: str
) -> None:
    Node.objects.filter(node_id="a-1").update(
        status=Node.Status.ONLINE, installed_version="2.0.0", report_sequence=50, report_window=1
    )
    outcome = heartbeats_record_batch(
        [_beat("a-1", 40, installed_version="1.0.0")], liveness=_liveness(redis_url)
    )
    assert outcome.refused == 1
    node = Node.objects.get(node_id="a-1")
    assert (node.installed_version, node.report_sequence) == ("2.0.0", 50)


def test_forged_unknown_and_garbage_messages_are_refused_the_rest_stored(
    fleet: Fleet, redis_url: str
) -> None:
    Node.objects.filter(node_id__in=["a-1", "b-1"]).update(status=Node.Status.ONLINE)
    forged = _beat("b-1", 7, installed_version="6.6.6")
    forged["sig"] = "0" * 64
    garbage = decode_envelopes([b"not json", b'{"headers": {"task": "x"}, "body": ""}'])
    assert garbage == [None, None]
    stranger = signed_report("ghost", HB, {}, key=b"k" * 32, seq=1)
    batch = [forged, stranger, *garbage, _beat("a-1", 3, installed_version="1.3.0")]
    outcome = heartbeats_record_batch(batch, liveness=_liveness(redis_url))
    assert (outcome.received, outcome.stored, outcome.refused) == (5, 1, 4)
    assert Node.objects.get(node_id="a-1").installed_version == "1.3.0"
    assert Node.objects.get(node_id="b-1").installed_version != "6.6.6"
    assert _refused("b-1", "bad_signature") == 1
    assert _refused(ReportRejection.UNKNOWN_SOURCE, "unknown_node") == 1
    assert _refused(ReportRejection.UNKNOWN_SOURCE, "unsigned") == 2


def test_a_node_back_online_takes_the_one_by_one_path_and_is_logged(
    fleet: Fleet, redis_url: str
) -> None:
    Node.objects.filter(node_id="a-1").update(status=Node.Status.OFFLINE)
    outcome = heartbeats_record_batch([_beat("a-1", 4)], liveness=_liveness(redis_url))
    assert (outcome.stored, outcome.one_by_one) == (0, 1)
    assert Node.objects.get(node_id="a-1").status == Node.Status.ONLINE
    assert Event.objects.filter(verb="node.online", details__version="1.0.0").count() == 1


def test_side_effects_take_the_one_by_one_path(fleet: Fleet, redis_url: str) -> None:
    Node.objects.filter(node_id__in=["a-1", "a-solo", "b-1"]).update(status=Node.Status.ONLINE)
    release = make_release(version="1.1.0")
    running = UpdateJob.objects.create(
        node=fleet.node_a, release=release, state=UpdateJob.State.DOWNLOADING
    )
    lost_final = UpdateJob.objects.create(
        node=fleet.node_b, release=release, state=UpdateJob.State.VERIFYING
    )
    final = {
        "job_id": str(lost_final.pk),
        "ok": False,
        "error_code": "HEALTH",
        "error_message": "x",
    }
    batch = [
        _beat("a-1", 2, active_job_id=str(running.pk)),
        _beat("b-1", 2, last_job=final),
        _beat("a-solo", 2, components=[{"product": "themis-query", "version": "1.4.5"}]),
    ]
    before = UpdateJob.objects.get(pk=running.pk).last_report_at
    outcome = heartbeats_record_batch(batch, liveness=_liveness(redis_url))
    assert (outcome.stored, outcome.one_by_one, outcome.refused) == (0, 3, 0)
    assert UpdateJob.objects.get(pk=running.pk).last_report_at != before
    assert UpdateJob.objects.get(pk=lost_final.pk).state not in UpdateJob.ACTIVE_STATES
    assert set(
        NodeComponent.objects.filter(node__node_id="a-solo").values_list("product", flat=True)
    ) == {"themis-query", "themisdb"}
    # The same components again: nothing to do, the batch stores it.
    same = [_beat("a-solo", 3, components=[{"product": "themis-query", "version": "1.4.5"}])]
    assert heartbeats_record_batch(same, liveness=_liveness(redis_url)).stored == 1


@override_settings(THEMIS_LIVENESS_WRITE_SECONDS=60)
def test_liveness_is_exact_in_redis_and_written_to_the_database_only_when_behind(
    fleet: Fleet, redis_url: str
) -> None:
    live = _liveness(redis_url)
    Node.objects.filter(node_id="a-1").update(status=Node.Status.ONLINE, last_heartbeat=None)
    t0 = timezone.now().replace(microsecond=0)
    heartbeats_record_batch([_beat("a-1", 1, at=t0)], now=t0, liveness=live)
    first = Node.objects.get(node_id="a-1")
    assert first.last_heartbeat == t0
    later = t0 + timedelta(seconds=20)
    heartbeats_record_batch([_beat("a-1", 2, at=later)], now=later, liveness=live)
    second = Node.objects.get(node_id="a-1")
    # Nothing a tile shows changed: neither the row's time nor its change marker moved.
    assert (second.last_heartbeat, second.updated_at) == (t0, first.updated_at)
    assert second.report_sequence == 2
    assert live.last_seen(["a-1"]) == {"a-1": later}
    # 45 s after the first, 25 after the second: silent for 30 s by the database, not by Redis.
    assert "a-1" not in nodes_mark_offline(silence_seconds=30, now=t0 + timedelta(seconds=45))
    # Redis lost: the database's time stands, allowing for how far behind it may be.
    redis.Redis.from_url(redis_url).delete(LIVENESS_KEY)
    assert "a-1" not in nodes_mark_offline(silence_seconds=30, now=t0 + timedelta(seconds=80))
    assert "a-1" in nodes_mark_offline(silence_seconds=30, now=t0 + timedelta(seconds=100))
    # Once the row is a whole interval behind, the batch writes it again.
    late = t0 + timedelta(seconds=61)
    Node.objects.filter(node_id="a-1").update(status=Node.Status.ONLINE)
    heartbeats_record_batch([_beat("a-1", 3, at=late)], now=late, liveness=live)
    assert Node.objects.get(node_id="a-1").last_heartbeat == late


def test_a_redis_that_does_not_answer_leaves_the_database_time_standing(fleet: Fleet) -> None:
    Node.objects.filter(node_id="a-1").update(status=Node.Status.ONLINE)
    down = Liveness(redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.5))
    outcome = heartbeats_record_batch([_beat("a-1", 1)], liveness=down)
    assert outcome.stored == 1
    assert down.last_seen(["a-1"]) == {}
    assert Node.objects.get(node_id="a-1").last_heartbeat is not None


def _send_as_the_agent_does(envelope: dict[str, Any]) -> None:
    app.send_task(
        str(TaskName.RECORD_HEARTBEAT), kwargs={"envelope": envelope}, queue=HEARTBEAT_QUEUE
    )


@pytest.mark.django_db(transaction=True)
def test_two_ingesters_share_the_queue_and_store_each_heartbeat_once(redis_url: str) -> None:
    nodes = _online_nodes(120, prefix="q")
    for node in nodes:
        _send_as_the_agent_does(_beat(node.node_id, 1, installed_version="3.0.0"))
    client = redis.Redis.from_url(redis_url)
    assert client.llen(HEARTBEAT_QUEUE) == 120
    stop = threading.Event()
    totals = []

    def ingest() -> None:
        totals.append(
            ingest_until(
                stop, options=IngestOptions(batch_size=7, idle_wait_seconds=0.2), until_empty=True
            )
        )

    threads = [threading.Thread(target=ingest) for _ in range(2)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 60
    for thread in threads:
        thread.join(timeout=max(0.1, deadline - time.monotonic()))
    stop.set()
    assert not any(thread.is_alive() for thread in threads)
    assert sum(t.received for t in totals) == 120
    assert sum(t.stored + t.one_by_one for t in totals) == 120
    assert sum(t.refused for t in totals) == 0
    assert Node.objects.filter(node_id__startswith="q-", installed_version="3.0.0").count() == 120
    assert client.llen(HEARTBEAT_QUEUE) == 0
    assert client.zcard(LIVENESS_KEY) == 120
