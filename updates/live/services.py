"""Announcing changes to the pages watching them, and the event stream a page holds."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from enum import StrEnum

import redis
from django.db import transaction
from django.db.backends.base.base import BaseDatabaseWrapper

from updates.models import Event
from updates.redis_clients import redis_client

log = logging.getLogger(__name__)

CHANNEL_PREFIX = "themis:live:"
# A publish waits at most this long on a Redis that does not answer: a change is worth
# announcing, but never worth holding up the report that made it.
PUBLISH_TIMEOUT = 0.25
# After a publish failed, announcements are dropped for this long (the pages' slow poll
# covers them) instead of each one waiting for the same dead Redis.
PUBLISH_BACKOFF_SECONDS = 5.0


class TopicKind(StrEnum):
    NODE = "node"
    ROLLOUT = "rollout"


@dataclass(frozen=True)
class Topic:
    """Something a page shows live: a node (its page and its job pages) or a rollout."""

    kind: TopicKind
    key: str

    @property
    def channel(self) -> str:
        return f"{CHANNEL_PREFIX}{self.kind}:{self.key}"

    @classmethod
    def node(cls, node_id: str) -> Topic:
        return cls(TopicKind.NODE, node_id)

    @classmethod
    def rollout(cls, rollout_id: int) -> Topic:
        return cls(TopicKind.ROLLOUT, str(rollout_id))


def job_topics(node_id: str, rollout_id: int | None) -> tuple[Topic, ...]:
    """What a change of a job changes: its node's pages, and its rollout's if it has one."""
    node = Topic.node(node_id)
    return (node,) if rollout_id is None else (node, Topic.rollout(rollout_id))


class Publisher:
    """Publishes announcements; drops them for a while after Redis failed (never raises)."""

    def __init__(self, client_factory: Callable[[], redis.Redis] | None = None) -> None:
        self._client_factory = client_factory or (
            lambda: redis_client(PUBLISH_TIMEOUT, connect_timeout=PUBLISH_TIMEOUT)
        )
        self._client: redis.Redis | None = None
        self._lock = threading.Lock()
        self._quiet_until = 0.0

    def publish(self, topics: tuple[Topic, ...]) -> int:
        """Publish each topic once; returns how many were published."""
        if time.monotonic() < self._quiet_until:
            return 0
        try:
            client = self._connected()
            with client.pipeline(transaction=False) as pipe:
                for topic in dict.fromkeys(topics):
                    pipe.publish(topic.channel, "changed")
                pipe.execute()
        except redis.RedisError as err:
            self._quiet_until = time.monotonic() + PUBLISH_BACKOFF_SECONDS
            log.warning(
                "live announcements off for %.0f s (Redis: %s); pages poll meanwhile",
                PUBLISH_BACKOFF_SECONDS,
                err,
            )
            return 0
        return len(set(topics))

    def _connected(self) -> redis.Redis:
        with self._lock:
            if self._client is None:
                self._client = self._client_factory()
            return self._client


publisher = Publisher()


class _Batch:
    """The topics one transaction announced: published together, once, when it commits."""

    def __init__(self) -> None:
        self.topics: dict[Topic, None] = {}

    def __call__(self) -> None:
        publisher.publish(tuple(self.topics))


_local = threading.local()


def announce(*topics: Topic) -> None:
    """Tell the pages watching `topics` they changed, once the surrounding transaction
    commits (a rolled-back change is never announced); at once outside a transaction.

    One transaction publishes each topic once however often it announced it: a drive that
    starts a thousand jobs of a rollout announces that rollout once."""
    if not topics:
        return
    conn = transaction.get_connection()
    if not conn.in_atomic_block:
        publisher.publish(topics)
        return
    _batch(conn).topics.update(dict.fromkeys(topics))


def _batch(conn: BaseDatabaseWrapper) -> _Batch:
    """This transaction's batch: the one registered before, if its commit callback is still
    pending (a rolled-back savepoint drops the callbacks registered inside it, and a commit
    all of them), else a new one."""
    held: tuple[int, _Batch] | None = getattr(_local, "batch", None)
    if held is not None:
        index, batch = held
        pending = conn.run_on_commit
        if index < len(pending) and pending[index][1] is batch:
            return batch
    batch = _Batch()
    conn.on_commit(batch)
    _local.batch = (len(conn.run_on_commit) - 1, batch)
    return batch


def announce_event(event: Event) -> None:
    """An audit Event about a rollout or a job announces what it changed (subscribed to the
    audit log at start-up: every state change of either logs one)."""
    announce(*event_topics(event.object_type, event.object_id, event.details))


def event_topics(object_type: str, object_id: str, details: object) -> tuple[Topic, ...]:
    details = details if isinstance(details, dict) else {}
    rollout_id = details.get("rollout_id")
    rollout = (Topic.rollout(rollout_id),) if isinstance(rollout_id, int) else ()
    if object_type == "rollout" and object_id.isdigit():
        return (Topic.rollout(int(object_id)),)
    if object_type == "updatejob":
        node_id = details.get("node_id")
        return ((Topic.node(node_id),) if isinstance(node_id, str) else ()) + rollout
    return ()


@dataclass(frozen=True)
class StreamLimits:
    """How one event stream behaves: it ends after `lifetime` seconds (the browser opens a
    new one `retry_ms` later: no request holds a server thread for ever), says it is alive
    every `keepalive` seconds (a proxy does not close it, a closed browser is noticed), and
    sends at most one `changed` per `min_gap` seconds (a burst of reports is one fetch)."""

    lifetime: float = 55.0
    keepalive: float = 15.0
    min_gap: float = 0.15
    retry_ms: int = 1000


def sse(event: str, data: str = "") -> bytes:
    return f"event: {event}\ndata: {data}\n\n".encode()


def event_stream(
    pubsub: redis.client.PubSub,
    topics: tuple[Topic, ...],
    limits: StreamLimits,
    clock: Callable[[], float] = time.monotonic,
) -> Iterator[bytes]:
    """The bytes of one Server-Sent Events stream for `topics`, already subscribed by the
    caller on `pubsub` (closed here when the stream ends, however it ends).

    The first event is a `changed`: whatever changed between the page's render and this
    subscription is fetched. After that, one `changed` per burst of announcements."""
    channels = {topic.channel for topic in topics}
    try:
        yield f"retry: {limits.retry_ms}\n\n".encode()
        yield sse("changed", "subscribed")
        deadline = clock() + limits.lifetime
        last_sent = last_changed = clock()
        while (left := deadline - clock()) > 0:
            message = pubsub.get_message(timeout=min(left, limits.keepalive))
            if message is not None and _channel(message) in channels:
                # The first change after a quiet spell goes at once; in a burst, the rest
                # of the gap gathers whatever else arrives into the next single event.
                _drain(pubsub, until=min(deadline, last_changed + limits.min_gap), clock=clock)
                yield sse("changed", _channel(message).removeprefix(CHANNEL_PREFIX))
                last_sent = last_changed = clock()
            elif clock() - last_sent >= limits.keepalive:
                yield b": keepalive\n\n"
                last_sent = clock()
    finally:
        pubsub.close()


def _channel(message: dict[str, object]) -> str:
    channel = message.get("channel", b"")
    return channel.decode() if isinstance(channel, bytes) else str(channel)


def _drain(pubsub: redis.client.PubSub, *, until: float, clock: Callable[[], float]) -> None:
    while (left := until - clock()) > 0:
        pubsub.get_message(timeout=left)


class StreamSlots:
    """At most `limit` streams open at once in this process: each holds a server thread."""

    def __init__(self, limit: int) -> None:
        self._free = threading.BoundedSemaphore(limit)

    def take(self) -> bool:
        return self._free.acquire(blocking=False)

    def give_back(self) -> None:
        self._free.release()
