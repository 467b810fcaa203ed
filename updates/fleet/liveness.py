"""When each node was last heard of, exactly, in Redis.

The batch heartbeat path (updates.fleet.ingest) writes it once per batch; the database's
`Node.last_heartbeat` may be THEMIS_LIVENESS_WRITE_SECONDS behind, so whoever judges
silence (nodes_mark_offline) reads both. Redis may lose it (a restart): then the database's
coarser time stands, allowing for how far behind it may be."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime

import redis

from updates.redis_clients import REDIS_TIMEOUT, redis_client

log = logging.getLogger(__name__)

LIVENESS_KEY = "themis:liveness"


class Liveness:
    """When each node was last heard of, in a Redis sorted set (score: Unix time)."""

    def __init__(self, client: redis.Redis | None = None) -> None:
        self.client = client or redis_client(REDIS_TIMEOUT)

    def seen(self, node_ids: Iterable[str], at: datetime) -> None:
        mapping = dict.fromkeys(node_ids, at.timestamp())
        if not mapping:
            return
        try:
            # GT: a batch that took longer never moves a node's time back.
            self.client.zadd(LIVENESS_KEY, mapping, gt=True)
        except redis.RedisError:
            # The database's coarser time still stands (nodes_mark_offline allows for it).
            log.warning("liveness not written to Redis; the database's time stands")

    def last_seen(self, node_ids: Sequence[str]) -> dict[str, datetime]:
        """The Redis time of each node that has one; {} when Redis cannot answer."""
        if not node_ids:
            return {}
        try:
            scores = self.client.zmscore(LIVENESS_KEY, list(node_ids))
        except redis.RedisError:
            log.warning("liveness not read from Redis; the database's time stands")
            return {}
        return {
            node_id: datetime.fromtimestamp(float(score), tz=UTC)
            for node_id, score in zip(node_ids, scores, strict=True)
            if score is not None
        }
