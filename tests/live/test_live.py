"""Live pages (updates.live) against a real Redis: what is announced, when, how often; the
event stream's bytes; the stream views' answers (scoped like their pages, refused when Redis
is down or every stream is in use, off when live updates are off)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Generator, Iterator

import pytest
import redis
from django.db import transaction
from django.test import Client
from django.urls import reverse
from pytest_django.fixtures import DjangoCaptureOnCommitCallbacks, Settings

from tests.conftest import Fleet
from tests.factories import make_release
from tests.fakes import NullTransport
from tests.procs import free_port

# The rollout views tests' three-node cluster and its canary awaiting approval.
from tests.rollouts.test_rollout_views import awaiting, cluster_b, release
from updates.jobs import services as jobs
from updates.live import services as live
from updates.live import streams
from updates.live.services import StreamLimits, Topic, event_stream, event_topics
from updates.models import Cluster, Release, Rollout
from updates.rollouts import coordinator
from updates.rollouts import services as rollouts

__all__ = ["awaiting", "cluster_b", "release"]

NODE = Topic.node("a-1")
ROLLOUT = Topic.rollout(7)


@pytest.fixture(autouse=True)
def _no_agents(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(jobs, "default_transport", NullTransport)


@pytest.fixture
def listener(redis_url: str) -> Iterator[Callable[[float], list[str]]]:
    """Subscribed to every live channel; `heard(wait)` returns what was published."""
    pubsub = redis.Redis.from_url(redis_url).pubsub(ignore_subscribe_messages=True)  # type: ignore[no-untyped-call]
    pubsub.psubscribe(f"{live.CHANNEL_PREFIX}*")
    pubsub.get_message(timeout=1.0)  # the psubscribe confirmation

    def heard(wait: float = 0.3) -> list[str]:
        channels = []
        deadline = time.monotonic() + wait
        while (left := deadline - time.monotonic()) > 0:
            message = pubsub.get_message(timeout=left)
            if message is not None:
                channels.append(message["channel"].decode().removeprefix(live.CHANNEL_PREFIX))
        return channels

    yield heard
    pubsub.close()


@pytest.fixture
def fresh_publisher(monkeypatch: pytest.MonkeyPatch, redis_url: str) -> live.Publisher:
    """A publisher with no back-off left over from a test that ran without Redis."""
    publisher = live.Publisher()
    monkeypatch.setattr(live, "publisher", publisher)
    return publisher


# --- announcing --------------------------------------------------------------------------


@pytest.mark.django_db
@pytest.mark.usefixtures("fresh_publisher")
def test_a_transaction_publishes_each_topic_once_when_it_commits(
    listener: Callable[[float], list[str]],
    django_capture_on_commit_callbacks: DjangoCaptureOnCommitCallbacks,
) -> None:
    with django_capture_on_commit_callbacks(execute=True) as callbacks, transaction.atomic():
        for _ in range(1000):
            live.announce(ROLLOUT)
        live.announce(NODE, ROLLOUT)
        assert listener(0.2) == []  # nothing before the commit
    assert len(callbacks) == 1
    assert sorted(listener(0.5)) == ["node:a-1", "rollout:7"]


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("fresh_publisher")
def test_a_rolled_back_change_is_never_announced(listener: Callable[[float], list[str]]) -> None:
    def rolled_back() -> None:
        with transaction.atomic():
            live.announce(ROLLOUT)
            raise RuntimeError("rolled back")

    with pytest.raises(RuntimeError):
        rolled_back()
    assert listener(0.3) == []


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("fresh_publisher")
def test_an_announcement_after_a_rolled_back_savepoint_still_goes_out(
    listener: Callable[[float], list[str]],
) -> None:
    """The savepoint took the batch's commit callback with it: the next announcement of the
    same transaction registers a new one instead of adding to a batch nobody publishes."""

    def savepoint_rolled_back() -> None:
        with transaction.atomic():
            live.announce(ROLLOUT)
            raise RuntimeError("savepoint rolled back")

    with transaction.atomic():
        with pytest.raises(RuntimeError):
            savepoint_rolled_back()
        live.announce(NODE)
    assert listener(0.5) == ["node:a-1"]


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("fresh_publisher")
def test_outside_a_transaction_an_announcement_goes_out_at_once(
    listener: Callable[[float], list[str]],
) -> None:
    live.announce(NODE)
    assert listener(0.5) == ["node:a-1"]


def test_a_redis_that_is_down_drops_announcements_for_a_while(
    caplog: pytest.LogCaptureFixture,
) -> None:
    port = free_port()  # nothing listens there
    made: list[int] = []

    def factory() -> redis.Redis:
        made.append(port)
        return redis.Redis(port=port, socket_connect_timeout=0.25, socket_timeout=0.25)

    publisher = live.Publisher(factory)
    with caplog.at_level(logging.WARNING, logger="updates.live.services"):
        assert publisher.publish((NODE,)) == 0
        assert publisher.publish((NODE, ROLLOUT)) == 0  # within the back-off: not tried
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "live announcements off for 5 s" in warnings[0]
    assert made == [port]


def test_which_events_announce_what() -> None:
    assert event_topics("rollout", "12", {}) == (Topic.rollout(12),)
    assert event_topics("updatejob", "3", {"node_id": "a-1", "rollout_id": 12}) == (
        Topic.node("a-1"),
        Topic.rollout(12),
    )
    assert event_topics("updatejob", "3", {"node_id": "a-1", "rollout_id": None}) == (
        Topic.node("a-1"),
    )
    assert event_topics("updatejob", "3", {"step": "APPLYING"}) == ()
    assert event_topics("node", "5", {"node_id": "a-1"}) == ()
    assert event_topics("rollout", "x", {}) == ()
    assert event_topics("updatejob", "3", "not a dict") == ()


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("fresh_publisher")
def test_a_progress_report_announces_its_node_and_rollout(
    listener: Callable[[float], list[str]], release: Release, cluster_b: Cluster
) -> None:
    rollout = rollouts.rollout_create(
        release=release, strategy="canary", nodes=list(cluster_b.nodes.all()), user=None
    )
    rollouts.rollout_start(rollout=rollout, user=None)
    coordinator.rollout_drive(rollout.pk)
    assert sorted(set(listener(0.5))) == ["node:bm-0", f"rollout:{rollout.pk}"]
    job = rollout.jobs.get()
    node_id = job.node.node_id
    assert jobs.job_record_progress(job_id=job.pk, node_id=node_id, step="DOWNLOADING", percent=5)
    assert sorted(listener(0.5)) == [f"node:{node_id}", f"rollout:{rollout.pk}"]
    # The same state, a higher percentage: no event is logged, the pages still hear of it.
    assert jobs.job_record_progress(job_id=job.pk, node_id=node_id, step="DOWNLOADING", percent=9)
    assert sorted(listener(0.5)) == [f"node:{node_id}", f"rollout:{rollout.pk}"]


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("fresh_publisher")
def test_a_report_for_an_ended_job_announces_nothing(
    listener: Callable[[float], list[str]], fleet: Fleet
) -> None:
    job = jobs.job_start_update(node=fleet.node_a, release=make_release(), user=None)
    jobs.job_finish(job_id=job.pk, node_id="a-1", ok=True, result={"version_to": "1.7.0"})
    listener(0.3)
    assert not jobs.job_record_progress(job_id=job.pk, node_id="a-1", step="APPLYING")
    assert listener(0.3) == []


# --- the event stream --------------------------------------------------------------------


def _subscribed(redis_url: str, *topics: Topic) -> redis.client.PubSub:
    pubsub: redis.client.PubSub = redis.Redis.from_url(redis_url).pubsub(  # type: ignore[no-untyped-call]
        ignore_subscribe_messages=True
    )
    pubsub.subscribe(*(t.channel for t in topics))
    return pubsub


def _events(chunks: list[bytes]) -> list[str]:
    return [c.decode().split("\n")[0] for c in chunks]


def test_a_stream_opens_with_a_change_and_sends_one_per_burst(redis_url: str) -> None:
    pubsub = _subscribed(redis_url, NODE)
    limits = StreamLimits(lifetime=1.5, keepalive=10.0, min_gap=0.5, retry_ms=700)
    chunks: list[bytes] = []
    stream = event_stream(pubsub, (NODE,), limits)
    chunks.append(next(stream))
    chunks.append(next(stream))

    def burst() -> None:
        publisher = redis.Redis.from_url(redis_url)
        for _ in range(20):
            publisher.publish(NODE.channel, "changed")

    threading.Thread(target=burst).start()
    chunks.extend(stream)  # until its lifetime is over
    assert chunks[0] == b"retry: 700\n\n"
    assert chunks[1] == b"event: changed\ndata: subscribed\n\n"
    changes = [c for c in chunks[2:] if c.startswith(b"event: changed")]
    # Twenty announcements within a gap: one event, or two when the burst straddles the
    # end of the first gap; never one each.
    assert 1 <= len(changes) <= 2, chunks
    assert changes[0] == b"event: changed\ndata: node:a-1\n\n"
    assert pubsub.subscribed is False  # the stream closed its subscription


def test_a_quiet_stream_says_it_is_alive_and_ends_on_time(redis_url: str) -> None:
    pubsub = _subscribed(redis_url, NODE)
    limits = StreamLimits(lifetime=1.0, keepalive=0.3, min_gap=0.1)
    started = time.monotonic()
    chunks = list(event_stream(pubsub, (NODE,), limits))
    elapsed = time.monotonic() - started
    assert _events(chunks[:2]) == ["retry: 1000", "event: changed"]
    assert chunks[2:] and set(chunks[2:]) == {b": keepalive\n\n"}
    assert 1.0 <= elapsed < 5.0  # a deadline, not a hang


def test_a_stream_closed_by_the_browser_lets_go_of_its_subscription(redis_url: str) -> None:
    pubsub = _subscribed(redis_url, NODE)
    stream = event_stream(pubsub, (NODE,), StreamLimits(lifetime=30.0))
    assert isinstance(stream, Generator)
    next(stream)
    stream.close()  # what the server does when the browser went away
    assert pubsub.subscribed is False


# --- the stream views --------------------------------------------------------------------


def _body(response: object) -> bytes:
    return b"".join(response.streaming_content)  # type: ignore[attr-defined]


@pytest.fixture
def short_streams(settings: Settings, redis_url: str) -> Settings:
    settings.THEMIS_LIVE_STREAM_SECONDS = 1
    settings.THEMIS_LIVE_KEEPALIVE_SECONDS = 1
    return settings


@pytest.mark.usefixtures("short_streams")
def test_a_nodes_stream_is_scoped_like_its_page(personas: dict[str, Client], fleet: Fleet) -> None:
    url = reverse("live_node", args=["a-1"])
    response = personas["admin_a"].get(url)
    assert response.status_code == 200
    assert response["Content-Type"] == "text/event-stream"
    assert response["Cache-Control"] == "no-cache"
    assert "Content-Encoding" not in response  # a stream is never gzip'd (held back)
    assert _body(response).startswith(b"retry: 1000\n\nevent: changed\ndata: subscribed\n\n")
    assert personas["admin_b"].get(url).status_code == 404
    assert personas["anonymous"].get(url).status_code == 302  # to the login page


@pytest.mark.usefixtures("short_streams")
def test_a_rollouts_stream_is_scoped_like_its_page(
    personas: dict[str, Client], awaiting: Rollout
) -> None:
    url = reverse("live_rollout", args=[awaiting.pk])
    assert personas["admin_a"].get(url).status_code == 404  # tenant B's rollout
    response = personas["admin_b"].get(url)
    assert response.status_code == 200
    assert b"event: changed" in _body(response)


def test_with_redis_down_a_stream_is_refused_and_gives_its_slot_back(
    personas: dict[str, Client], fleet: Fleet, settings: Settings
) -> None:
    settings.REDIS_URL = f"redis://127.0.0.1:{free_port()}/0"
    for _ in range(settings.THEMIS_LIVE_MAX_STREAMS + 1):
        response = personas["admin_a"].get(reverse("live_node", args=["a-1"]))
        assert response.status_code == 503
    assert response.content == b"live updates are unavailable (Redis)"
    assert streams.slots.take()  # each refusal gave its slot back
    streams.slots.give_back()


@pytest.mark.usefixtures("short_streams")
def test_when_every_stream_is_in_use_the_next_page_polls(
    personas: dict[str, Client], fleet: Fleet, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(streams, "slots", live.StreamSlots(1))
    url = reverse("live_node", args=["a-1"])
    first = personas["admin_a"].get(url)
    assert first.status_code == 200
    second = personas["admin_a"].get(url)
    assert second.status_code == 503
    assert second.content == b"every live stream of this server is in use"
    _body(first)  # the first stream ends: its slot is free again
    assert personas["admin_a"].get(url).status_code == 200


def test_with_live_updates_off_a_stream_tells_the_browser_to_stop_asking(
    personas: dict[str, Client], fleet: Fleet, settings: Settings
) -> None:
    settings.THEMIS_LIVE_UPDATES = False
    assert personas["admin_a"].get(reverse("live_node", args=["a-1"])).status_code == 204
