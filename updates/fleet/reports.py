"""Agent reports in: verify, check, count what is refused.

A report is accepted only when it is signed with its node's key (in force, not
revoked), is of the type of the task that received it, is recent, passes every
field check, and carries a sequence number above the last one accepted from the
node (claimed with a conditional UPDATE, so a replay loses even a race).
Everything else is refused whole and counted per node and reason; the audit log
gets at most one Event per node per interval, so a flood of forged messages
cannot grow it without bound."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, TypeVar

from django.db.models import F, Q
from django.utils import timezone

from updates.audit import event_log
from updates.engine.reports import ReportInvalid, ReportType, envelope_node_id, verify_report
from updates.fleet.validation import ReportFieldInvalid
from updates.models import Node, ReportRejection

log = logging.getLogger(__name__)

R = ReportRejection.Reason
T = TypeVar("T")

# At most one audit Event per source (node, or the unknown-node bucket) per interval.
REJECTION_EVENT_INTERVAL = timedelta(minutes=10)


@dataclass(frozen=True)
class _Refused(Exception):
    reason: ReportRejection.Reason
    detail: str
    node: Node | None = None


def open_report(
    envelope: Any,
    expected: ReportType,
    parse: Callable[[dict[str, Any]], T],
    *,
    now: datetime | None = None,
) -> tuple[Node, T] | None:
    """The node and parsed content of an acceptable report, or None (refused and
    counted). Call inside the transaction that applies it: if applying fails, the
    sequence number it claimed is given back with the rollback."""
    now = now or timezone.now()
    try:
        node, signed = _verify(envelope, expected, now)
        try:
            parsed = parse(signed.payload)
        except ReportFieldInvalid as err:
            raise _Refused(R.INVALID, str(err), node) from None
        claimed = Node.objects.filter(pk=node.pk, report_sequence__lt=signed.seq).update(
            report_sequence=signed.seq
        )
        if not claimed:
            raise _Refused(R.REPLAYED, f"sequence {signed.seq} already passed", node)
    except _Refused as refused:
        report_reject(
            node=refused.node,
            claimed_id=envelope_node_id(envelope),
            reason=refused.reason,
            detail=refused.detail,
            task=str(expected),
            now=now,
        )
        return None
    return node, parsed


def _verify(envelope: Any, expected: ReportType, now: datetime) -> tuple[Node, Any]:
    if envelope is None:
        raise _Refused(R.UNSIGNED, "unsigned report")
    if not isinstance(envelope, dict):
        raise _Refused(R.MALFORMED, "not an envelope")
    claimed = envelope_node_id(envelope)
    node = Node.objects.filter(node_id=claimed[:64]).first() if claimed else None
    if node is None:
        raise _Refused(R.UNKNOWN_NODE, f"no node {claimed[:64]!r}")
    if node.agent_key_revoked:
        raise _Refused(R.KEY_REVOKED, "the node's key is revoked", node)
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
        raise _Refused(reason, message, node) from None
    return node, signed


def report_reject(
    *,
    node: Node | None,
    claimed_id: str,
    reason: ReportRejection.Reason,
    detail: str,
    task: str,
    now: datetime | None = None,
) -> bool:
    """Count a refused report (or a command the agent refused); returns whether this
    one was written to the audit log (the first of its source's interval)."""
    now = now or timezone.now()
    source = node.node_id if node is not None else ReportRejection.UNKNOWN_SOURCE
    detail = detail[:200]
    for counted in (reason, R.ALL):
        row, _ = ReportRejection.objects.get_or_create(
            source=source, reason=counted, defaults={"last_at": now}
        )
        ReportRejection.objects.filter(pk=row.pk).update(
            count=F("count") + 1, last_at=now, last_detail=detail
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
