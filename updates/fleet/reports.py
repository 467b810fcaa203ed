"""Agent reports in: verify, check, count what is refused.

A report is accepted only when it is signed with its node's key (in force, not
revoked), is of the type of the task that received it, is recent, passes every
field check, and carries a sequence number not accepted before from the node: above
the highest one, or among the REPORT_WINDOW below it not seen yet (a report that a
later one overtook on another queue still counts, as in IPsec's anti-replay window).
The claim is a conditional UPDATE on the node's sequence and window, so a replay loses
even a race.
Everything else is refused whole and counted per node and reason; the audit log
gets at most one Event per node per interval, so a flood of forged messages
cannot grow it without bound."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Generic, NamedTuple, TypeVar

from django.db.models import F, Q
from django.utils import timezone

from updates.audit import event_log
from updates.engine.reports import (
    ReportInvalid,
    ReportType,
    SignedReport,
    envelope_node_id,
    verify_report,
)
from updates.fleet.validation import ReportFieldInvalid
from updates.models import Node, ReportRejection

log = logging.getLogger(__name__)

R = ReportRejection.Reason
T = TypeVar("T")

# Sequence numbers below the highest accepted one that may still arrive (one bit each in
# Node.report_window, a signed 64-bit column: bit 0 is the highest itself).
REPORT_WINDOW = 62
_WINDOW_MASK = (1 << (REPORT_WINDOW + 1)) - 1
# Concurrent reports of one node may change its window between the read and the claim.
CLAIM_ATTEMPTS = 20

# At most one audit Event per source (node, or the unknown-node bucket) per interval.
REJECTION_EVENT_INTERVAL = timedelta(minutes=10)


class OpenedReport(NamedTuple, Generic[T]):
    node: Node
    content: T
    # The agent's sequence number for this report: orders reports of one node.
    seq: int


@dataclass(frozen=True)
class ReportRefused(Exception):
    """Why a report is refused, and the node it claims to come from (None: unknown)."""

    reason: ReportRejection.Reason
    detail: str
    node: Node | None = None


def open_report(
    envelope: Any,
    expected: ReportType,
    parse: Callable[[dict[str, Any]], T],
    *,
    newest_only: bool = False,
    now: datetime | None = None,
) -> OpenedReport[T] | None:
    """The node and parsed content of an acceptable report, or None (refused and
    counted). Call inside the transaction that applies it: if applying fails, the
    sequence number it claimed is given back with the rollback. `newest_only` (a
    snapshot such as a heartbeat) refuses a report that a later one overtook: applied
    late, it would put back what the node no longer is."""
    now = now or timezone.now()
    try:
        claimed = envelope_node_id(envelope)
        node = Node.objects.filter(node_id=claimed[:64]).first() if claimed else None
        opened = open_envelope(envelope, expected, parse, node, now)
        claim_sequence(opened.node, opened.seq, newest_only=newest_only)
    except ReportRefused as refused:
        report_reject(
            node=refused.node,
            claimed_id=envelope_node_id(envelope),
            reason=refused.reason,
            detail=refused.detail,
            task=str(expected),
            now=now,
        )
        return None
    return opened


def window_after(highest: int, window: int, seq: int) -> tuple[int, int] | None:
    """The node's (highest, window) once `seq` is accepted, or None: seen before, or
    older than the window."""
    if seq > highest:
        shift = seq - highest
        moved = (window << shift) & _WINDOW_MASK if shift <= REPORT_WINDOW else 0
        return seq, moved | 1
    behind = highest - seq
    if behind > REPORT_WINDOW or window >> behind & 1:
        return None
    return highest, window | 1 << behind


def claim_sequence(node: Node, seq: int, *, newest_only: bool) -> None:
    nodes = Node.objects.filter(pk=node.pk)
    # First from the row just read to verify the report: a refusal on it holds for any
    # newer state too (numbers only ever become seen or too old), and an acceptance is
    # claimed conditionally; only a lost claim reads the row again.
    highest, window = node.report_sequence, node.report_window
    for attempt in range(CLAIM_ATTEMPTS):
        if attempt:
            highest, window = nodes.values_list("report_sequence", "report_window").get()
        if newest_only and seq <= highest:
            raise ReportRefused(R.REPLAYED, f"sequence {seq}: a later report came first", node)
        after = window_after(highest, window, seq)
        if after is None:
            raise ReportRefused(R.REPLAYED, f"sequence {seq} already seen or too old", node)
        # Nothing a page shows changes here: the fleet page's change marker stays.
        if nodes.filter(report_sequence=highest, report_window=window).update(
            report_sequence=after[0], report_window=after[1], updated_at=F("updated_at")
        ):
            return
    # Fail closed: the report is refused (and counted), never accepted unchecked.
    raise ReportRefused(R.REPLAYED, f"sequence {seq}: the node's window kept changing", node)


def open_envelope(
    envelope: Any,
    expected: ReportType,
    parse: Callable[[dict[str, Any]], T],
    node: Node | None,
    now: datetime,
) -> OpenedReport[T]:
    """The node, parsed content and sequence of an envelope from `node` (the node its id
    names, None if there is none), its sequence not yet claimed; ReportRefused otherwise."""
    node, signed = verify_envelope(envelope, expected, node, now)
    try:
        return OpenedReport(node, parse(signed.payload), signed.seq)
    except ReportFieldInvalid as err:
        raise ReportRefused(R.INVALID, str(err), node) from None


def verify_envelope(
    envelope: Any, expected: ReportType, node: Node | None, now: datetime
) -> tuple[Node, SignedReport]:
    """The signed content of `envelope` from `node` (the node its id names, None if
    there is none); ReportRefused otherwise. The sequence is not checked here."""
    if envelope is None:
        raise ReportRefused(R.UNSIGNED, "unsigned report")
    if not isinstance(envelope, dict):
        raise ReportRefused(R.MALFORMED, "not an envelope")
    if node is None:
        raise ReportRefused(R.UNKNOWN_NODE, f"no node {envelope_node_id(envelope)[:64]!r}")
    if node.agent_key_revoked:
        raise ReportRefused(R.KEY_REVOKED, "the node's key is revoked", node)
    try:
        signed = verify_report(
            bytes.fromhex(node.agent_key), envelope, expected_type=expected, now=now.timestamp()
        )
    except ReportInvalid as err:
        message = str(err)
        if "sent as a" in message:
            reason = R.WRONG_TYPE
        elif "away from now" in message:
            reason = R.STALE
        elif "signature" in message:
            reason = R.BAD_SIGNATURE
        else:
            reason = R.MALFORMED
        raise ReportRefused(reason, message, node) from None
    return node, signed


def report_reject(
    *,
    node: Node | None,
    claimed_id: str,
    reason: ReportRejection.Reason,
    detail: str,
    task: str,
    now: datetime | None = None,
    count: int = 1,
) -> bool:
    """Count a refused report (or a command the agent refused; `count` alike ones at
    once); returns whether this was written to the audit log (the first of its source's
    interval)."""
    now = now or timezone.now()
    source = node.node_id if node is not None else ReportRejection.UNKNOWN_SOURCE
    detail = detail[:200]
    for counted in (reason, R.ALL):
        row, _ = ReportRejection.objects.get_or_create(
            source=source, reason=counted, defaults={"last_at": now}
        )
        ReportRejection.objects.filter(pk=row.pk).update(
            count=F("count") + count, last_at=now, last_detail=detail
        )
    logged = (
        ReportRejection.objects.filter(source=source, reason=R.ALL)
        .filter(Q(logged_at__isnull=True) | Q(logged_at__lte=now - REJECTION_EVENT_INTERVAL))
        .update(logged_at=now)
    )
    if not logged:
        log.debug("%s report for %r refused (%s): %s", task, claimed_id[:64], reason, detail)
        return False
    log.warning("%s report for %r refused (%s): %s", task, claimed_id[:64], reason, detail)
    counts = dict(
        ReportRejection.objects.filter(source=source)
        .exclude(reason=R.ALL)
        .values_list("reason", "count")
    )
    event_log(
        verb="report.rejected",
        actor_label=f"node:{source}",
        tenant=node.tenant_id if node is not None else None,
        obj=node,
        details={
            "node_id": source,
            "claimed_node_id": claimed_id[:64],
            "task": task,
            "reason": str(reason),
            "detail": detail,
            "counts": counts,
            "interval_seconds": int(REJECTION_EVENT_INTERVAL.total_seconds()),
        },
    )
    return True
