"""Signed agent reports: tampering, type, replay outside the window, wrong key; the
report sequence survives a restart."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from updates.engine.reports import (
    ReportInvalid,
    ReportSequence,
    ReportType,
    envelope_node_id,
    sign_report,
    verify_report,
)

KEY, OTHER = b"k" * 32, b"o" * 32
HB = ReportType.HEARTBEAT


def test_round_trip() -> None:
    envelope = sign_report(KEY, HB, {"node_id": "n1", "percent": 5}, seq=7, now=1000)
    report = verify_report(KEY, envelope, expected_type=HB, now=1010)
    assert report.payload == {"node_id": "n1", "percent": 5}
    assert (report.seq, report.node_id, report.report_type) == (7, "n1", HB)
    assert envelope_node_id(envelope) == "n1"


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda e: e["payload"].update(percent=99), "signature"),
        (lambda e: e.update(ts=e["ts"] + 1), "signature"),
        (lambda e: e.update(seq=e["seq"] + 1), "signature"),
        (lambda e: e.update(type="job_progress"), "signature"),
        (lambda e: e.update(node_id="n2"), "signature"),
        (lambda e: e.update(sig="0" * 64), "signature"),
        (lambda e: e.update(sig="\x80"), "signature"),  # non-ASCII: no TypeError
        (lambda e: e.update(sig="\ud800" * 64), "signature"),
        (lambda e: e.pop("sig"), "missing"),
        (lambda e: e.update(seq=0), "missing"),
        (lambda e: e.update(seq=2**64), "missing"),
        (lambda e: e.update(payload=[1]), "missing"),
    ],
)
def test_tampered_envelopes_are_refused(
    mutate: Callable[[dict[str, Any]], object], message: str
) -> None:
    envelope = sign_report(KEY, HB, {"node_id": "n1", "percent": 5}, now=1000)
    mutate(envelope)
    with pytest.raises(ReportInvalid, match=message):
        verify_report(KEY, envelope, expected_type=HB, now=1000)


def test_a_report_of_another_type_is_refused() -> None:
    envelope = sign_report(KEY, ReportType.JOB_FINISHED, {"node_id": "n1"}, now=1000)
    with pytest.raises(ReportInvalid, match="sent as a heartbeat"):
        verify_report(KEY, envelope, expected_type=HB, now=1000)


def test_wrong_key_and_stale_and_garbage() -> None:
    envelope = sign_report(KEY, HB, {"node_id": "n1"}, now=1000)
    with pytest.raises(ReportInvalid, match="signature"):
        verify_report(OTHER, envelope, expected_type=HB, now=1000)
    with pytest.raises(ReportInvalid, match="away from now"):
        verify_report(KEY, envelope, expected_type=HB, now=1000 + 301)
    with pytest.raises(ReportInvalid, match="not an envelope"):
        verify_report(KEY, "hello", expected_type=HB, now=1000)
    assert envelope_node_id("hello") == ""


def test_sequence_increases_across_a_restart_even_with_the_clock_set_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "seq.json"
    first = ReportSequence(path)
    numbers = [first.next() for _ in range(3)]
    assert numbers == sorted(set(numbers))
    monkeypatch.setattr("updates.engine.reports.time.time_ns", lambda: 1)  # clock at 1970
    assert ReportSequence(path).next() == numbers[-1] + 1


def test_a_process_numbers_its_reports_one_apart_however_far_apart_in_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = [1_000_000_000_000_000_000]  # ns
    monkeypatch.setattr("updates.engine.reports.time.time_ns", lambda: clock[0])
    sequence = ReportSequence(tmp_path / "seq.json")
    numbers = []
    for _ in range(5):
        numbers.append(sequence.next())
        clock[0] += 5_000_000_000  # five seconds between reports
    start = 1_000_000_000_000_000  # the first clock reading, in microseconds
    assert numbers == [start + 1, start + 2, start + 3, start + 4, start + 5]
    # A restart starts from the clock again (above everything sent before).
    restarted = ReportSequence(tmp_path / "seq.json").next()
    assert restarted == clock[0] // 1000 + 1
