"""The event stream a live page holds (one per open node, job or rollout page): the answer its
view gives once it checked the user may see the page."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import redis
from django.conf import settings
from django.db import connection
from django.http import HttpResponse, StreamingHttpResponse
from redis.client import PubSub

from updates.live.services import StreamLimits, StreamSlots, Topic, event_stream
from updates.redis_clients import REDIS_TIMEOUT, redis_client

log = logging.getLogger(__name__)

# What a live page's stream request is answered with: the stream, or why there is none.
StreamAnswer = HttpResponse | StreamingHttpResponse

slots = StreamSlots(settings.THEMIS_LIVE_MAX_STREAMS)


def stream_response(topics: tuple[Topic, ...]) -> StreamAnswer:
    """The answer to a page asking for its event stream, once its view checked the user
    may see what `topics` name."""
    if not settings.THEMIS_LIVE_UPDATES:
        # 204 tells a browser's EventSource to stop asking: the page polls.
        return HttpResponse(status=204)
    if not slots.take():
        log.warning("live streams: all %d in use; a page polls", settings.THEMIS_LIVE_MAX_STREAMS)
        return _unavailable("every live stream of this server is in use")
    # redis-py leaves `pubsub` unannotated.
    pubsub = redis_client(REDIS_TIMEOUT).pubsub(ignore_subscribe_messages=True)  # type: ignore[no-untyped-call]
    try:
        pubsub.subscribe(*(topic.channel for topic in topics))
    except redis.RedisError as err:
        slots.give_back()
        pubsub.close()
        log.warning("live stream refused: Redis: %s", err)
        return _unavailable("live updates are unavailable (Redis)")
    if not connection.in_atomic_block:
        # The stream reads nothing more from the database: its connection is not held for
        # the stream's minute.
        connection.close()
    response = StreamingHttpResponse(
        OpenStream(event_stream(pubsub, topics, _limits()), pubsub, slots),
        content_type="text/event-stream",
    )
    response["Cache-Control"] = "no-cache"
    response["X-Accel-Buffering"] = "no"  # a buffering proxy would hold the events back
    return response


def _limits() -> StreamLimits:
    return StreamLimits(
        lifetime=settings.THEMIS_LIVE_STREAM_SECONDS,
        keepalive=settings.THEMIS_LIVE_KEEPALIVE_SECONDS,
    )


class OpenStream:
    """A stream's bytes, holding its slot and its subscription until it is closed: at its
    end, or by the server when the browser went away (Django's response calls `close`,
    even for a stream never started)."""

    def __init__(self, stream: Iterator[bytes], pubsub: PubSub, held: StreamSlots) -> None:
        self._stream = stream
        self._pubsub = pubsub
        self._held: StreamSlots | None = held

    def __iter__(self) -> OpenStream:
        return self

    def __next__(self) -> bytes:
        try:
            return next(self._stream)
        except StopIteration:
            self.close()
            raise

    def close(self) -> None:
        if self._held is None:
            return
        held, self._held = self._held, None
        try:
            self._pubsub.close()
        finally:
            held.give_back()


def _unavailable(reason: str) -> HttpResponse:
    # A 503 closes the browser's EventSource; htmx asks again later, and the page polls
    # meanwhile.
    return HttpResponse(reason, status=503, content_type="text/plain")
