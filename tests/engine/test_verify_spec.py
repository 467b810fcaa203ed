"""The manifest's `verify` key is read strictly: every wrong type or value is refused
with the field named; the latency figure is the nearest-rank 99th percentile."""

from __future__ import annotations

from typing import Any

import pytest

from updates.engine.errors import ManifestInvalid
from updates.engine.verify import (
    CheckKind,
    IntegrationCheck,
    PerformanceCheck,
    SmokeCheck,
    p99_ms,
    parse_verify,
    spec_to_json,
)

FULL = {
    "smoke": [{"name": "runs", "cmd": "bin/themisd --version", "timeout": 5}],
    "integration": [
        {"name": "v", "method": "GET", "path": "/version", "status": 200, "body_contains": "1.1"}
    ],
    "performance": [{"name": "p", "path": "/health", "requests": 50, "p99_ms": 20, "factor": 1.5}],
}


def test_a_full_spec_reads_back_as_written() -> None:
    spec = parse_verify(FULL)
    assert spec.smoke == (SmokeCheck("runs", "bin/themisd --version", 5.0),)
    assert spec.integration == (IntegrationCheck("v", "/version", "GET", 200, "1.1", 30.0),)
    assert spec.performance == (PerformanceCheck("p", "/health", 50, 20.0, 1.5, 30.0),)
    assert parse_verify(spec_to_json(spec)) == spec
    assert spec.needs_http and not spec.empty


def test_absent_means_no_checks() -> None:
    assert parse_verify(None).empty and not parse_verify({}).needs_http


def _with(kind: CheckKind, **change: Any) -> dict[str, Any]:
    item = {**FULL[kind.value][0], **change}
    return {kind.value: [{k: v for k, v in item.items() if v is not ...}]}


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ([], "verify: must be an object"),
        ({"chaos": []}, "unknown kind 'chaos'"),
        ({"smoke": {}}, "verify.smoke: must be a list"),
        ({"smoke": ["x"]}, r"verify.smoke\[0\]: must be an object"),
        (_with(CheckKind.SMOKE, env="X=1"), "unknown field 'env'"),
        (_with(CheckKind.SMOKE, cmd=""), r"smoke\[0\].cmd: must be a non-empty string"),
        (_with(CheckKind.SMOKE, timeout=0), "timeout: must be above 0 and at most 600"),
        (_with(CheckKind.SMOKE, timeout=float("nan")), "timeout: must be a number"),
        (_with(CheckKind.SMOKE, timeout=True), "timeout: must be a number"),
        (_with(CheckKind.INTEGRATION, method="BREW"), "'BREW' is not an HTTP method"),
        (_with(CheckKind.INTEGRATION, status=700), "must be an HTTP status"),
        (_with(CheckKind.INTEGRATION, path="http://evil/"), "absolute path on the service"),
        (_with(CheckKind.INTEGRATION, path="//evil/x"), "absolute path on the service"),
        (_with(CheckKind.PERFORMANCE, p99_ms=...), "p99_ms: required"),
        (_with(CheckKind.PERFORMANCE, requests=2.5), "requests: must be a whole number"),
        (
            _with(CheckKind.PERFORMANCE, requests=10**6),
            "requests: must be above 0 and at most 100000$",
        ),
        ({"smoke": [FULL["smoke"][0], FULL["smoke"][0]]}, "'runs' is used twice"),
        ({"smoke": [{"name": f"c{i}", "cmd": "true"} for i in range(65)]}, "more than 64"),
    ],
)
def test_refused(raw: Any, message: str) -> None:
    with pytest.raises(ManifestInvalid, match=message):
        parse_verify(raw)


def test_p99_is_the_nearest_rank() -> None:
    samples = [i / 1000 for i in range(1, 101)]  # 1..100 ms
    assert p99_ms(samples) == pytest.approx(99.0)
    assert p99_ms([0.005]) == pytest.approx(5.0)
