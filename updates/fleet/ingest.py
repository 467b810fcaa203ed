"""Heartbeats in bulk: the path that keeps a large fleet's heartbeats stored as they come.

Agents send signed heartbeats on a queue of their own (`HEARTBEAT_QUEUE`); any number
of ingesters (a thread in every coordinator worker, or `manage.py ingest_heartbeats`) take
them off in batches. A pop is atomic, so no heartbeat is handled twice however many
ingesters share the queue. A batch costs the same few statements whatever its size: one read
of its nodes (locked in node order, so two ingesters never deadlock), one read each of the
batch's components, open traffic-role commands and jobs, and one UPDATE for every row,
of only the columns some row changes. A heartbeat with side effects (a node back online, a
job in hand, a lost final report to catch up, refused commands, changed components or
schema, a role command to acknowledge) takes the one-by-one path, which does them.

Every heartbeat is checked as on the one-by-one path: signed by its node's key, fresh, and
newer than anything the node reported before (a heartbeat is a snapshot: an older one would
put back what the node no longer is). Of two heartbeats of one node in a batch the newer
wins; the older is refused and counted, as it would be had they come one after the other.

Liveness: when each node was last heard of is kept exactly in a Redis sorted set (one
write per batch). The database's `last_heartbeat` rides the batch's UPDATE (by default every
batch; THEMIS_LIVENESS_WRITE_SECONDS makes it coarser) and never moves a row's change
marker by itself: a steady fleet leaves the fleet page's live poll idle. `nodes_mark_offline`
reads both.
"""

from __future__ import annotations

import base64
import json
import logging
import sqlite3
import threading
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import redis
from django.conf import settings
from django.db import close_old_connections, connection, transaction
from django.utils import timezone

from updates.engine.reports import HEARTBEAT_QUEUE, ReportType, envelope_node_id
from updates.fleet.liveness import Liveness
from updates.fleet.reports import (
    ReportRefused,
    claim_sequence,
    open_envelope,
    report_reject,
    window_after,
)
from updates.fleet.services import Heartbeat, jobs_a_final_report_closes, node_record_heartbeat
from updates.fleet.validation import FinalReport
from updates.models import (
    Node,
    NodeCommand,
    NodeComponent,
    ReportRejection,
)
from updates.redis_clients import REDIS_TIMEOUT, redis_client
from updates.taskqueue import TaskName

log = logging.getLogger(__name__)

R = ReportRejection.Reason
# The columns a heartbeat sets as they are (each in the batch's UPDATE when some row of the
# batch changes it).
_PLAIN_FIELDS = (
    "installed_version",
    "raft_role",
    "disk_free_bytes",
    "disk_total_bytes",
    "memory_available_bytes",
    "load_1m",
    "restore_points",
    "restore_points_bytes",
    "error_rate",
    "p99_latency_ms",
    "service_healthy",
    "traffic_role",
    "trust_store_version",
)
# What a fleet tile shows of them: a change there moves the node's change marker.
_TILE_FIELDS = frozenset({"installed_version", "raft_role"})
# A tile shows free disk rounded: smaller moves than this share of the disk do not show.
_DISK_SHOWN_SHARE = 0.001
_NODE_COLUMNS = (
    "pk",
    "node_id",
    "tenant_id",
    "status",
    "agent_key",
    "agent_key_revoked",
    "report_sequence",
    "report_window",
    "last_heartbeat",
    "schema_version",
    "schema_history",
    "inventory",
    "updated_at",
    *_PLAIN_FIELDS,
)


@dataclass
class BatchOutcome:
    received: int = 0
    # Written by the batch's one UPDATE.
    stored: int = 0
    # Taken one by one (side effects), and accepted there.
    one_by_one: int = 0
    refused: int = 0

    def add(self, other: BatchOutcome) -> None:
        self.received += other.received
        self.stored += other.stored
        self.one_by_one += other.one_by_one
        self.refused += other.refused


@dataclass(frozen=True)
class _Accepted:
    node: Node
    heartbeat: Heartbeat
    seq: int


@dataclass
class _Refusals:
    """Refusals of one batch, counted per source and reason: a flood costs a few writes."""

    counts: Counter[tuple[str, ReportRejection.Reason]] = field(default_factory=Counter)
    # The last refusal of each (source, reason) and the node id it claimed, for the log.
    last: dict[tuple[str, ReportRejection.Reason], tuple[ReportRefused, str]] = field(
        default_factory=dict
    )

    def add(self, refused: ReportRefused, claimed_id: str) -> None:
        # Unknown nodes share one source, as on the one-by-one path.
        source = refused.node.node_id if refused.node is not None else ""
        key = (source, refused.reason)
        self.counts[key] += 1
        self.last[key] = (refused, claimed_id)

    def record(self, now: datetime) -> int:
        for key, count in self.counts.items():
            refused, claimed_id = self.last[key]
            report_reject(
                node=refused.node,
                claimed_id=claimed_id,
                reason=refused.reason,
                detail=refused.detail,
                task=f"{ReportType.HEARTBEAT} batch",
                now=now,
                count=count,
            )
        return sum(self.counts.values())


def heartbeats_record_batch(
    envelopes: Sequence[Any], *, now: datetime | None = None, liveness: Liveness | None = None
) -> BatchOutcome:
    """Check and store a batch of heartbeat envelopes; each is accepted or refused (and
    counted) on its own, whatever the others are."""
    now = now or timezone.now()
    refusals = _Refusals()
    with transaction.atomic():
        nodes = _lock_nodes(envelopes)
        newest = _newest_per_node(envelopes, nodes, now, refusals)
        slow = _needing_one_by_one(newest)
        fast = [a for pk, a in newest.items() if pk not in slow]
        _store(fast, now)
    outcome = BatchOutcome(received=len(envelopes), stored=len(fast))
    accepted = [a.node.node_id for a in fast]
    for one in (newest[pk] for pk in sorted(slow)):
        if _record_one_by_one(one, now, refusals):
            outcome.one_by_one += 1
            accepted.append(one.node.node_id)
    outcome.refused = refusals.record(now)
    (liveness or Liveness()).seen(accepted, now)
    return outcome


def _lock_nodes(envelopes: Sequence[Any]) -> dict[str, Node]:
    claimed = {envelope_node_id(e)[:64] for e in envelopes} - {""}
    # Locked in one order by every ingester: two batches sharing nodes wait, never deadlock.
    rows = (
        Node.objects.select_for_update()
        .filter(node_id__in=claimed)
        .only(*_NODE_COLUMNS)
        .order_by("pk")
    )
    return {node.node_id: node for node in rows}


def _newest_per_node(
    envelopes: Sequence[Any], nodes: dict[str, Node], now: datetime, refusals: _Refusals
) -> dict[int, _Accepted]:
    newest: dict[int, _Accepted] = {}
    for envelope in envelopes:
        claimed = envelope_node_id(envelope)
        try:
            node, heartbeat, seq = open_envelope(
                envelope, ReportType.HEARTBEAT, Heartbeat.from_payload, nodes.get(claimed[:64]), now
            )
            if seq <= node.report_sequence:
                raise ReportRefused(R.REPLAYED, f"sequence {seq}: a later report came first", node)
            kept = newest.get(node.pk)
            if kept is not None and kept.seq >= seq:
                raise ReportRefused(R.REPLAYED, _overtaken(seq, kept.seq), node)
            if kept is not None:
                refusals.add(ReportRefused(R.REPLAYED, _overtaken(kept.seq, seq), node), claimed)
            newest[node.pk] = _Accepted(node, heartbeat, seq)
        except ReportRefused as refused:
            refusals.add(refused, claimed)
    return newest


def _overtaken(seq: int, by: int) -> str:
    if seq == by:
        return f"sequence {seq} already seen"
    return f"sequence {seq}: a later report came first (sequence {by})"


def _needing_one_by_one(newest: dict[int, _Accepted]) -> set[int]:
    """The nodes whose heartbeat does more than set columns."""
    slow = {
        pk
        for pk, a in newest.items()
        if a.node.status in {Node.Status.OFFLINE, Node.Status.UNKNOWN}
        or a.heartbeat.active_job_id is not None
        or a.heartbeat.refusals
        or a.heartbeat.components_refused
        or (
            a.heartbeat.schema is not None
            and (a.heartbeat.schema.version, list(a.heartbeat.schema.history))
            != (a.node.schema_version, a.node.schema_history)
        )
    }
    rest = {pk: a for pk, a in newest.items() if pk not in slow}
    return (
        slow
        | _components_changed(rest)
        | _roles_to_ack(rest)
        | _trust_stores_to_ack(rest)
        | _jobs_to_catch_up(rest)
    )


def _components_changed(newest: dict[int, _Accepted]) -> set[int]:
    reporting = {pk: a for pk, a in newest.items() if a.heartbeat.components is not None}
    stored: dict[int, dict[str, str]] = {pk: {} for pk in reporting}
    for node_pk, product, version in NodeComponent.objects.filter(
        node_id__in=list(reporting)
    ).values_list("node_id", "product", "version"):
        stored[node_pk][product] = version
    # Compared as NodeComponent stores them (64 characters at most).
    return {
        pk
        for pk, a in reporting.items()
        if {p: v[:64] for p, v in a.heartbeat.component_versions().items()} != stored[pk]
    }


def _roles_to_ack(newest: dict[int, _Accepted]) -> set[int]:
    serving = [pk for pk, a in newest.items() if a.heartbeat.traffic_role]
    return set(
        NodeCommand.objects.filter(
            node_id__in=serving,
            kind=NodeCommand.Kind.TRAFFIC_ROLE,
            state__in=NodeCommand.OPEN_STATES,
        ).values_list("node_id", flat=True)
    )


def _trust_stores_to_ack(newest: dict[int, _Accepted]) -> set[int]:
    """Nodes reporting a trust store that an open offer to them asked for (or newer)."""
    offered = NodeCommand.objects.filter(
        node_id__in=[pk for pk, a in newest.items() if a.heartbeat.trust_store_version > 0],
        kind=NodeCommand.Kind.TRUST_STORE,
        state__in=NodeCommand.OPEN_STATES,
    ).values_list("node_id", "args")
    return {
        pk
        for pk, args in offered
        if int(args.get("store_version") or 0) <= newest[pk].heartbeat.trust_store_version
    }


def _jobs_to_catch_up(newest: dict[int, _Accepted]) -> set[int]:
    """Nodes repeating a final report of a job that is still open here (the report was lost)."""
    named: dict[int, int] = {}
    for pk, a in newest.items():
        if a.heartbeat.last_job:
            # Checked whole when the heartbeat was parsed: it parses again.
            report = FinalReport.from_payload(a.heartbeat.last_job, node_id=a.node.node_id)
            named[report.job_id] = pk
    open_jobs = jobs_a_final_report_closes().filter(pk__in=list(named)).values_list("pk", "node_id")
    return {named[job_pk] for job_pk, node_pk in open_jobs if named[job_pk] == node_pk}


def _store(batch: Sequence[_Accepted], now: datetime) -> None:
    """One UPDATE for the whole batch, of only the columns some row changes."""
    # `updated_at` always named: NodeQuerySet.update would stamp every row otherwise.
    changed: set[str] = {"report_sequence", "report_window", "updated_at"}
    write_liveness_before = now - timedelta(seconds=settings.THEMIS_LIVENESS_WRITE_SECONDS)
    for one in batch:
        node, beat = one.node, one.heartbeat
        # Every number before was below the highest (checked): the window slides forward.
        after = window_after(node.report_sequence, node.report_window, one.seq)
        node.report_sequence, node.report_window = after or (one.seq, 1)
        moved = _set_changed(node, beat)
        changed |= moved
        if node.last_heartbeat is None or node.last_heartbeat <= write_liveness_before:
            node.last_heartbeat = now
            changed.add("last_heartbeat")
        # Liveness alone does not move the change marker: "seen" on a tile is worked out
        # when it is drawn, and a steady fleet's poll stays idle.
        if moved & _TILE_FIELDS or _disk_shown_moved(node, beat):
            node.updated_at = now
    if batch:
        _update_rows([one.node for one in batch], sorted(changed))


def _update_rows(nodes: Sequence[Node], names: Sequence[str]) -> None:
    """`UPDATE node SET … FROM (VALUES (pk, …), …)`: one statement per batch where the
    database takes that many parameters. (The ORM's bulk_update builds a CASE per column
    with one branch per row: its SQL grows with rows × columns and building it cost more
    than all the rest of a batch.)"""
    concrete = {f.name: f for f in Node._meta.concrete_fields}
    fields = [concrete[name] for name in names]
    quote = connection.ops.quote_name
    typed = connection.vendor == "postgresql"  # VALUES' columns need the column's type there
    sets = ", ".join(
        f"{quote(str(f.column))} = "
        + (f"CAST(v.column{i} AS {f.db_type(connection)})" if typed else f"v.column{i}")
        for i, f in enumerate(fields, start=2)
    )
    row = "(" + ", ".join(["%s"] * (len(fields) + 1)) + ")"
    table, pk = (
        quote(Node._meta.db_table),
        quote(str(Node._meta.pk.column if Node._meta.pk else "id")),
    )
    per_statement = max(1, _max_parameters() // (len(fields) + 1))
    with connection.cursor() as cursor:
        for start in range(0, len(nodes), per_statement):
            chunk = nodes[start : start + per_statement]
            params: list[Any] = []
            for node in chunk:
                params.append(node.pk)
                params.extend(
                    f.get_db_prep_save(getattr(node, f.attname), connection) for f in fields
                )
            values = ", ".join([row] * len(chunk))
            cursor.execute(
                f"UPDATE {table} SET {sets} FROM (VALUES {values}) AS v"  # noqa: S608
                f" WHERE {table}.{pk} = v.column1",
                params,
            )


def _max_parameters() -> int:
    if connection.vendor == "sqlite":
        # The library's own limit (32,766 since SQLite 3.32), not Django's conservative 999.
        raw = connection.connection
        if raw is not None:
            return int(raw.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER))
    return connection.features.max_query_params or 65_535


def _set_changed(node: Node, beat: Heartbeat) -> set[str]:
    moved = set()
    for name in _PLAIN_FIELDS:
        value = getattr(beat, name)
        if name == "restore_points":
            value = list(value)
        if getattr(node, name) != value:
            moved.add(name)
        setattr(node, name, value)
    if beat.schema is not None:
        node.schema_version = beat.schema.version
        node.schema_history = list(beat.schema.history)
    if beat.inventory is not None and node.inventory != beat.inventory:
        moved.add("inventory")
        node.inventory = beat.inventory
    return moved


def _disk_shown_moved(node: Node, beat: Heartbeat) -> bool:
    before, after, total = node.disk_free_bytes, beat.disk_free_bytes, beat.disk_total_bytes
    if before is None or after is None or not total:
        return before != after
    return abs(before - after) >= total * _DISK_SHOWN_SHARE


def _record_one_by_one(one: _Accepted, now: datetime, refusals: _Refusals) -> bool:
    try:
        with transaction.atomic():
            claim_sequence(one.node, one.seq, newest_only=True)
            node_record_heartbeat(heartbeat=one.heartbeat, now=now)
    except ReportRefused as refused:
        refusals.add(refused, one.node.node_id)
        return False
    return True


# ------------------------------------------------------------------ the ingester loop


@dataclass(frozen=True)
class IngestOptions:
    batch_size: int = 500
    # How long an idle ingester blocks on the queue before it looks at `stop` again.
    idle_wait_seconds: float = 1.0

    @classmethod
    def from_settings(cls) -> IngestOptions:
        return cls(batch_size=settings.THEMIS_HEARTBEAT_BATCH)


def take_batch(client: redis.Redis, size: int, wait_seconds: float) -> list[bytes]:
    """Up to `size` messages off the heartbeat queue, waiting up to `wait_seconds` for the
    first. The queue is Celery's own list in Redis (kombu pushes on the left, takes from
    the right), so a plain worker on it would take the same messages one by one."""
    first = client.brpop([HEARTBEAT_QUEUE], timeout=wait_seconds)
    if first is None:
        return []
    rest = client.rpop(HEARTBEAT_QUEUE, size - 1) if size > 1 else None
    return [first[1], *(rest or [])]


def ingest_until(
    stop: threading.Event,
    *,
    options: IngestOptions = IngestOptions(),
    client: redis.Redis | None = None,
    until_empty: bool = False,
) -> BatchOutcome:
    """Take and store batches until `stop` is set (or the queue is empty, `until_empty`).
    A batch lost with a crash is lost: heartbeats are snapshots, the next one follows."""
    # Every wait has a deadline: a Redis that stops answering is retried, never waited on.
    timeout = options.idle_wait_seconds + REDIS_TIMEOUT
    client = client or redis_client(timeout)
    liveness = Liveness(client)
    total = BatchOutcome()
    while not stop.is_set():
        try:
            raw = take_batch(client, options.batch_size, options.idle_wait_seconds)
        except redis.RedisError:
            log.warning("heartbeat list unreachable; trying again")
            stop.wait(options.idle_wait_seconds)
            continue
        if not raw:
            if until_empty:
                break
            continue
        close_old_connections()
        try:
            total.add(heartbeats_record_batch(decode_envelopes(raw), liveness=liveness))
        except Exception:
            # Never let one batch stop the ingester (its heartbeats are lost, the next follow).
            log.exception("a heartbeat batch of %d failed", len(raw))
    return total


def decode_envelopes(raw: Iterable[bytes]) -> list[Any]:
    """The envelope in each message (a Celery task message, as the agent sent it); a
    message that is anything else gives None, refused and counted as an unsigned report."""
    return [_envelope_in(item) for item in raw]


def _envelope_in(item: bytes) -> Any:
    try:
        message = json.loads(item)
        headers, body = message["headers"], message["body"]
        if headers.get("task") != TaskName.RECORD_HEARTBEAT:
            return None
        if message.get("properties", {}).get("body_encoding") == "base64":
            body = base64.b64decode(body, validate=True)
        _args, kwargs, _embed = json.loads(body)
        return kwargs.get("envelope")
    except (ValueError, TypeError, KeyError, AttributeError):
        return None


class IngesterThread(threading.Thread):
    """An ingester beside a coordinator worker's own work (one per worker process: they
    share the queue, so more coordinators take more heartbeats)."""

    def __init__(self, options: IngestOptions) -> None:
        super().__init__(name="themis-heartbeat-ingester", daemon=True)
        self.options = options
        self.stop = threading.Event()

    def run(self) -> None:
        try:
            ingest_until(self.stop, options=self.options)
        finally:
            close_old_connections()
