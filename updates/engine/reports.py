"""Signed reports from a node agent to the dashboard.

The broker is shared: without a signature any client could claim to be any
node and, say, report another node's update as done. Each agent holds a key of
its own; every heartbeat and job report travels in an envelope with a
timestamp and an HMAC-SHA256 over both, so a node can speak only for itself
and an old message cannot be replayed outside a short window.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from typing import Any

MAX_SKEW_SECONDS = 300


class ReportInvalid(Exception):
    """The envelope is malformed, stale, or not signed by the node's key."""


def _mac(key: bytes, ts: int, payload: dict[str, Any]) -> str:
    body = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hmac.new(key, f"{ts}.{body}".encode(), hashlib.sha256).hexdigest()


def sign_report(key: bytes, payload: dict[str, Any], *, now: float | None = None) -> dict[str, Any]:
    ts = int(now if now is not None else time.time())
    # JSON round trip: the signature covers exactly what the receiver will see.
    plain = json.loads(json.dumps(payload, default=str))
    return {"payload": plain, "ts": ts, "sig": _mac(key, ts, plain)}


def verify_report(
    key: bytes, envelope: Any, *, now: float | None = None, max_skew: int = MAX_SKEW_SECONDS
) -> dict[str, Any]:
    """Return the payload of a valid envelope; raise ReportInvalid otherwise."""
    if not isinstance(envelope, dict):
        raise ReportInvalid("not an envelope")
    payload, ts, sig = envelope.get("payload"), envelope.get("ts"), envelope.get("sig")
    if not isinstance(payload, dict) or not isinstance(ts, int) or not isinstance(sig, str):
        raise ReportInvalid("envelope fields missing or of the wrong type")
    current = now if now is not None else time.time()
    if abs(current - ts) > max_skew:
        raise ReportInvalid(f"timestamp {ts} is more than {max_skew} s away from now")
    if not hmac.compare_digest(_mac(key, ts, payload), sig):
        raise ReportInvalid("signature does not match the node's key")
    return payload


def envelope_node_id(envelope: Any) -> str:
    """The node an envelope claims to come from (to look its key up)."""
    payload = envelope.get("payload") if isinstance(envelope, dict) else None
    node_id = payload.get("node_id") if isinstance(payload, dict) else None
    return node_id if isinstance(node_id, str) else ""
