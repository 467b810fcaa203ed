"""Signed agent reports: tampering, replay outside the window, wrong key."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from updates.engine.reports import ReportInvalid, envelope_node_id, sign_report, verify_report

KEY, OTHER = b"k" * 32, b"o" * 32


def test_round_trip() -> None:
    envelope = sign_report(KEY, {"node_id": "n1", "percent": 5}, now=1000)
    assert verify_report(KEY, envelope, now=1010) == {"node_id": "n1", "percent": 5}
    assert envelope_node_id(envelope) == "n1"


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda e: e["payload"].update(percent=99), "signature"),
        (lambda e: e.update(ts=e["ts"] + 1), "signature"),
        (lambda e: e.update(sig="0" * 64), "signature"),
        (lambda e: e.pop("sig"), "missing"),
        (lambda e: e.update(payload=[1]), "missing"),
    ],
)
def test_tampered_envelopes_are_refused(
    mutate: Callable[[dict[str, Any]], object], message: str
) -> None:
    envelope = sign_report(KEY, {"node_id": "n1", "percent": 5}, now=1000)
    mutate(envelope)
    with pytest.raises(ReportInvalid, match=message):
        verify_report(KEY, envelope, now=1000)


def test_wrong_key_and_stale_and_garbage() -> None:
    envelope = sign_report(KEY, {"node_id": "n1"}, now=1000)
    with pytest.raises(ReportInvalid, match="signature"):
        verify_report(OTHER, envelope, now=1000)
    with pytest.raises(ReportInvalid, match="away from now"):
        verify_report(KEY, envelope, now=1000 + 301)
    with pytest.raises(ReportInvalid, match="not an envelope"):
        verify_report(KEY, "hello", now=1000)
    assert envelope_node_id("hello") == ""
