"""The dashboard's Redis clients (heartbeat liveness and ingestion, live pages): each gives
up at once on a Redis that is down."""

from __future__ import annotations

import redis
from django.conf import settings
from redis.backoff import NoBackoff
from redis.retry import Retry

# A Redis that does not answer in this time is taken as down.
REDIS_TIMEOUT = 2.0


def redis_client(socket_timeout: float, connect_timeout: float = REDIS_TIMEOUT) -> redis.Redis:
    """A client that gives up at once on a Redis that is down (redis-py would otherwise
    retry with back-off, seconds per call) and waits at most `socket_timeout` on one that
    does not answer (`connect_timeout` for the connection)."""
    return redis.Redis.from_url(
        settings.REDIS_URL,
        socket_connect_timeout=connect_timeout,
        socket_timeout=socket_timeout,
        retry=Retry(NoBackoff(), 0),
    )
