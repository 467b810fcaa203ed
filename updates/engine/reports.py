"""Signed reports from a node agent to the dashboard.

The broker is shared: without a signature any client could claim to be any
node and, say, report another node's update as done. Each agent holds a key of
its own; every heartbeat and job report travels in an envelope whose
HMAC-SHA256 covers the node, the report's type, a per-node sequence number, a
timestamp and the payload. So a node speaks only for itself, a job report
cannot be passed off as a heartbeat, and the dashboard refuses any sequence
number it has already passed (no replay, even inside the timestamp window).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
import time
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from .state import write_json_atomic

MAX_SKEW_SECONDS = 300
# Sequence numbers are non-negative 64-bit integers (the dashboard's column).
MAX_SEQUENCE = 2**63 - 1
# The queue agents send heartbeats on, apart from job reports (queue "dashboard"): the
# dashboard's ingesters take them off in batches (updates.fleet.ingest), and a job's
# reports never wait behind a fleet's heartbeats.
HEARTBEAT_QUEUE = "heartbeats"


class ReportType(StrEnum):
    HEARTBEAT = "heartbeat"
    JOB_PROGRESS = "job_progress"
    JOB_FINISHED = "job_finished"


class ReportInvalid(Exception):
    """The envelope is malformed, stale, or not signed by the node's key."""


@dataclass(frozen=True)
class SignedReport:
    report_type: ReportType
    node_id: str
    seq: int
    ts: int
    payload: dict[str, Any]


def canonical_json(value: Any) -> str:
    """The exact text a signature covers: sorted keys, no spaces."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def _mac(key: bytes, header: dict[str, Any], payload: dict[str, Any]) -> str:
    body = canonical_json({**header, "payload": payload})
    return hmac.new(key, body.encode(), hashlib.sha256).hexdigest()


class ReportSequence:
    """A node's report sequence: strictly increasing, also across restarts, and dense.

    A process starts at max(the high-water mark on disk, microseconds since the epoch),
    so a restarted agent starts above anything it sent before even if the file is lost
    (and the file covers a clock set back); from there each report is one more. Dense
    because the dashboard accepts a report overtaken by later ones only within a window
    of the 62 numbers below the highest (updates.fleet.reports): counted in microseconds,
    a job report that a heartbeat (on its own queue) overtook by a millisecond fell
    outside it and was refused."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._last = self._load()
        self._started = False

    def _load(self) -> int:
        if self.path is None:
            return 0
        try:
            value = json.loads(self.path.read_text()).get("seq", 0)
        except (OSError, ValueError, AttributeError):
            return 0
        return value if isinstance(value, int) and 0 <= value < MAX_SEQUENCE else 0

    def next(self) -> int:
        with self._lock:
            if not self._started:
                self._last = max(self._last, time.time_ns() // 1000)
                self._started = True
            self._last += 1
            if self.path is not None:
                write_json_atomic(self.path, {"seq": self._last})
            return self._last


# Signers that keep no state of their own (tests, tools) draw from this one.
_default_sequence = ReportSequence()


def sign_report(
    key: bytes,
    report_type: ReportType,
    payload: dict[str, Any],
    *,
    seq: int | None = None,
    now: float | None = None,
) -> dict[str, Any]:
    """An envelope for `payload` (which names its node in `node_id`)."""
    ts = int(now if now is not None else time.time())
    # JSON round trip: the signature covers exactly what the receiver will see.
    plain = json.loads(json.dumps(payload, default=str))
    header = {
        "type": str(ReportType(report_type)),
        "node_id": str(plain.get("node_id", "")),
        "seq": seq if seq is not None else _default_sequence.next(),
        "ts": ts,
    }
    return {**header, "payload": plain, "sig": _mac(key, header, plain)}


def verify_report(
    key: bytes,
    envelope: Any,
    *,
    expected_type: ReportType,
    now: float | None = None,
    max_skew: int = MAX_SKEW_SECONDS,
) -> SignedReport:
    """The content of a valid envelope of the expected type; ReportInvalid otherwise.
    The caller still has to check the sequence against the last one it accepted."""
    if not isinstance(envelope, dict):
        raise ReportInvalid("not an envelope")
    payload, sig = envelope.get("payload"), envelope.get("sig")
    kind, node_id, seq, ts = (envelope.get(k) for k in ("type", "node_id", "seq", "ts"))
    if (
        not isinstance(payload, dict)
        or not isinstance(sig, str)
        or not isinstance(kind, str)
        or not isinstance(node_id, str)
        or not _int_in_range(seq, 1, MAX_SEQUENCE)
        or not _int_in_range(ts, 0, MAX_SEQUENCE)
    ):
        raise ReportInvalid("envelope fields missing or of the wrong type")
    assert isinstance(seq, int) and isinstance(ts, int)
    header = {"type": kind, "node_id": node_id, "seq": seq, "ts": ts}
    try:
        expected_sig = _mac(key, header, payload)
    except (TypeError, ValueError, RecursionError):
        raise ReportInvalid("payload is not plain JSON") from None
    # A signature is 64 hex digits; anything else (non-ASCII text included, which
    # compare_digest cannot take) does not match.
    if not is_hex_digest(sig) or not hmac.compare_digest(expected_sig, sig):
        raise ReportInvalid("signature does not match the node's key")
    if kind != expected_type:
        raise ReportInvalid(f"a {kind} report sent as a {expected_type}")
    if payload.get("node_id", node_id) != node_id:
        raise ReportInvalid("payload names another node than its envelope")
    current = now if now is not None else time.time()
    if abs(current - ts) > max_skew:
        raise ReportInvalid(f"timestamp {ts} is more than {max_skew} s away from now")
    return SignedReport(ReportType(kind), node_id, seq, ts, {**payload, "node_id": node_id})


def envelope_node_id(envelope: Any) -> str:
    """The node an envelope claims to come from (to look its key up)."""
    node_id = envelope.get("node_id") if isinstance(envelope, dict) else None
    return node_id if isinstance(node_id, str) else ""


def is_hex_digest(value: str) -> bool:
    return len(value) == 64 and all(c in "0123456789abcdef" for c in value)


def _int_in_range(value: Any, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high
