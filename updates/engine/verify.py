"""Post-update verification declared in the bundle's manifest (`verify`).

Run after the new version serves (reload) and its health check passed, before the
commit point. Three kinds of check, each with its own timeout:

- smoke: a command that must exit 0 (run in the install dir, like the health command);
- integration: an HTTP request to the service that must answer an expected status,
  and optionally a body containing a fragment;
- performance: N requests to a path whose p99 latency must stay under an absolute
  budget and under `factor` times the same check measured on the old version just
  before the switch.

Any failure rolls the files and the service back (exit 26). Every check's result goes
into the apply result, so the job report and the dashboard show them.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

import requests

from .errors import ManifestInvalid
from .health import run_health_check

MAX_CHECKS = 64
MAX_TIMEOUT = 600.0
MAX_REQUESTS = 100_000
HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH"})


class CheckKind(StrEnum):
    SMOKE = "smoke"
    INTEGRATION = "integration"
    PERFORMANCE = "performance"


@dataclass(frozen=True)
class SmokeCheck:
    name: str
    cmd: str
    timeout: float


@dataclass(frozen=True)
class IntegrationCheck:
    name: str
    path: str
    method: str
    status: int
    body_contains: str | None
    timeout: float


@dataclass(frozen=True)
class PerformanceCheck:
    name: str
    path: str
    requests: int
    p99_ms: float
    factor: float | None
    timeout: float


@dataclass(frozen=True)
class VerifySpec:
    smoke: tuple[SmokeCheck, ...] = ()
    integration: tuple[IntegrationCheck, ...] = ()
    performance: tuple[PerformanceCheck, ...] = ()

    @property
    def empty(self) -> bool:
        return not (self.smoke or self.integration or self.performance)

    @property
    def checks(self) -> tuple[SmokeCheck | IntegrationCheck | PerformanceCheck, ...]:
        return (*self.smoke, *self.integration, *self.performance)

    @property
    def needs_http(self) -> bool:
        return bool(self.integration or self.performance)


@dataclass
class CheckResult:
    name: str
    kind: CheckKind
    ok: bool
    detail: str
    seconds: float
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "kind": self.kind.value, "seconds": round(self.seconds, 3)}


# ------------------------------------------------------------------ the manifest's key


def parse_verify(raw: Any) -> VerifySpec:
    """The manifest's `verify` object, strictly: a wrong type or value names its field."""
    if raw is None:
        return VerifySpec()
    if not isinstance(raw, dict):
        raise ManifestInvalid("manifest: verify: must be an object")
    unknown = set(raw) - {kind.value for kind in CheckKind}
    if unknown:
        raise ManifestInvalid(f"manifest: verify: unknown kind {sorted(unknown)[0]!r}")
    lists = {kind: _check_list(raw, kind) for kind in CheckKind}
    if sum(len(items) for items in lists.values()) > MAX_CHECKS:
        raise ManifestInvalid(f"manifest: verify: more than {MAX_CHECKS} checks")
    spec = VerifySpec(
        smoke=tuple(
            _smoke(item, f"verify.smoke[{i}]") for i, item in enumerate(lists[CheckKind.SMOKE])
        ),
        integration=tuple(
            _integration(item, f"verify.integration[{i}]")
            for i, item in enumerate(lists[CheckKind.INTEGRATION])
        ),
        performance=tuple(
            _performance(item, f"verify.performance[{i}]")
            for i, item in enumerate(lists[CheckKind.PERFORMANCE])
        ),
    )
    names = [check.name for check in spec.checks]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ManifestInvalid(f"manifest: verify: check name {duplicates[0]!r} is used twice")
    return spec


def _check_list(raw: dict[str, Any], kind: CheckKind) -> list[Any]:
    items = raw.get(kind.value, [])
    if not isinstance(items, list):
        raise ManifestInvalid(f"manifest: verify.{kind.value}: must be a list")
    return items


def _fields(item: Any, where: str, allowed: set[str]) -> dict[str, Any]:
    if not isinstance(item, dict):
        raise ManifestInvalid(f"manifest: {where}: must be an object")
    unknown = set(item) - allowed
    if unknown:
        raise ManifestInvalid(f"manifest: {where}: unknown field {sorted(unknown)[0]!r}")
    return item


def _text(item: dict[str, Any], key: str, where: str, *, required: bool = True) -> str | None:
    value = item.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value or len(value) > 4096 or "\0" in value:
        raise ManifestInvalid(f"manifest: {where}.{key}: must be a non-empty string")
    return value


def _number(
    item: dict[str, Any], key: str, where: str, *, default: float | None, low: float, high: float
) -> float | None:
    value = item.get(key, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ManifestInvalid(f"manifest: {where}.{key}: must be a number")
    if not low < value <= high:
        raise ManifestInvalid(
            f"manifest: {where}.{key}: must be above {low:g} and at most {high:g}"
        )
    return float(value)


def _timeout(item: dict[str, Any], where: str) -> float:
    value = _number(item, "timeout", where, default=30.0, low=0, high=MAX_TIMEOUT)
    assert value is not None
    return value


def _path(item: dict[str, Any], where: str) -> str:
    path = _text(item, "path", where)
    assert path is not None
    # A path on the service, never another host: the base URL is the node's own.
    if not path.startswith("/") or path.startswith("//") or any(c in path for c in " \r\n"):
        raise ManifestInvalid(f"manifest: {where}.path: must be an absolute path on the service")
    return path


def _smoke(item: Any, where: str) -> SmokeCheck:
    fields = _fields(item, where, {"name", "cmd", "timeout"})
    return SmokeCheck(
        name=str(_text(fields, "name", where)),
        cmd=str(_text(fields, "cmd", where)),
        timeout=_timeout(fields, where),
    )


def _integration(item: Any, where: str) -> IntegrationCheck:
    fields = _fields(item, where, {"name", "method", "path", "status", "body_contains", "timeout"})
    method = str(fields.get("method", "GET"))
    if method not in HTTP_METHODS:
        raise ManifestInvalid(f"manifest: {where}.method: {method!r} is not an HTTP method")
    status = fields.get("status", 200)
    if isinstance(status, bool) or not isinstance(status, int) or not 100 <= status <= 599:
        raise ManifestInvalid(f"manifest: {where}.status: must be an HTTP status (100-599)")
    return IntegrationCheck(
        name=str(_text(fields, "name", where)),
        path=_path(fields, where),
        method=method,
        status=status,
        body_contains=_text(fields, "body_contains", where, required=False),
        timeout=_timeout(fields, where),
    )


def _performance(item: Any, where: str) -> PerformanceCheck:
    fields = _fields(item, where, {"name", "path", "requests", "p99_ms", "factor", "timeout"})
    count = _number(fields, "requests", where, default=100, low=0, high=MAX_REQUESTS)
    budget = _number(fields, "p99_ms", where, default=None, low=0, high=3_600_000)
    if budget is None:
        raise ManifestInvalid(f"manifest: {where}.p99_ms: required (the absolute budget)")
    assert count is not None
    if count != int(count):
        raise ManifestInvalid(f"manifest: {where}.requests: must be a whole number")
    return PerformanceCheck(
        name=str(_text(fields, "name", where)),
        path=_path(fields, where),
        requests=int(count),
        p99_ms=budget,
        factor=_number(fields, "factor", where, default=None, low=0, high=1000),
        timeout=_timeout(fields, where),
    )


def spec_to_json(spec: VerifySpec) -> dict[str, list[dict[str, Any]]]:
    """The manifest form of a spec (what `parse_verify` reads back)."""
    return {
        kind.value: [asdict(check) for check in getattr(spec, kind.value)]
        for kind in CheckKind
        if getattr(spec, kind.value)
    }


# ------------------------------------------------------------------ running the checks


def p99_ms(samples: list[float]) -> float:
    """The 99th percentile (nearest rank) of latencies in seconds, in milliseconds."""
    ordered = sorted(samples)
    rank = max(math.ceil(0.99 * len(ordered)) - 1, 0)
    return ordered[rank] * 1000


def measure_latency(base_url: str, check: PerformanceCheck) -> tuple[float | None, str]:
    """p99 over the check's requests, or None and why (an error answer, a timeout)."""
    deadline = time.monotonic() + check.timeout
    samples: list[float] = []
    with requests.Session() as session:
        for _ in range(check.requests):
            left = deadline - time.monotonic()
            if left <= 0:
                return (
                    None,
                    f"{len(samples)} of {check.requests} requests within {check.timeout:g}s",
                )
            start = time.perf_counter()
            try:
                answer = session.get(base_url + check.path, timeout=left, allow_redirects=False)
            except requests.RequestException as err:
                return None, f"request failed: {type(err).__name__}"
            samples.append(time.perf_counter() - start)
            if answer.status_code >= 400:
                return None, f"answered {answer.status_code}"
    return p99_ms(samples), ""


def measure_baselines(base_url: str | None, spec: VerifySpec) -> dict[str, float]:
    """The performance checks against the version still serving, before the switch.
    A check that cannot run now has no baseline: only its absolute budget applies."""
    if base_url is None:
        return {}
    baselines = {}
    for check in spec.performance:
        value, _why = measure_latency(base_url, check)
        if value is not None:
            baselines[check.name] = value
    return baselines


def run_verification(
    spec: VerifySpec,
    *,
    base_url: str | None,
    env: Mapping[str, str],
    baselines: Mapping[str, float],
    cwd: Path | None = None,
) -> list[CheckResult]:
    """Every check, in order (smoke, integration, performance); none is skipped after a
    failure, so the report shows the whole picture."""
    results = [_run_smoke(check, env, cwd) for check in spec.smoke]
    if spec.needs_http and base_url is None:
        detail = "no service address to check (no supervisor and no verify URL)"
        results += [
            CheckResult(c.name, kind, False, detail, 0.0)
            for kind, checks in (
                (CheckKind.INTEGRATION, spec.integration),
                (CheckKind.PERFORMANCE, spec.performance),
            )
            for c in checks
        ]
        return results
    assert base_url is not None or not spec.needs_http
    results += [_run_integration(base_url or "", check) for check in spec.integration]
    results += [
        _run_performance(base_url or "", check, baselines.get(check.name))
        for check in spec.performance
    ]
    return results


def _run_smoke(check: SmokeCheck, env: Mapping[str, str], cwd: Path | None) -> CheckResult:
    health = run_health_check(cmd=check.cmd, timeout=check.timeout, env=env, cwd=cwd)
    detail = health.detail.replace("health command", "smoke command")
    return CheckResult(check.name, CheckKind.SMOKE, health.ok, detail, health.seconds, health.extra)


def _run_integration(base_url: str, check: IntegrationCheck) -> CheckResult:
    start = time.monotonic()
    url = base_url + check.path
    try:
        answer = requests.request(check.method, url, timeout=check.timeout, allow_redirects=False)
    except requests.RequestException as err:
        detail = f"{check.method} {check.path} failed: {type(err).__name__}"
        return CheckResult(
            check.name, CheckKind.INTEGRATION, False, detail, time.monotonic() - start
        )
    seconds = time.monotonic() - start
    extra = {"status": answer.status_code}
    if answer.status_code != check.status:
        detail = (
            f"{check.method} {check.path} answered {answer.status_code}, expected {check.status}"
        )
        return CheckResult(check.name, CheckKind.INTEGRATION, False, detail, seconds, extra)
    if check.body_contains is not None and check.body_contains not in answer.text:
        detail = f"{check.method} {check.path}: the body lacks {check.body_contains!r}"
        return CheckResult(check.name, CheckKind.INTEGRATION, False, detail, seconds, extra)
    detail = f"{check.method} {check.path} answered {answer.status_code}"
    return CheckResult(check.name, CheckKind.INTEGRATION, True, detail, seconds, extra)


def _run_performance(base_url: str, check: PerformanceCheck, baseline: float | None) -> CheckResult:
    start = time.monotonic()
    measured, why = measure_latency(base_url, check)
    seconds = time.monotonic() - start
    extra: dict[str, Any] = {"budget_ms": check.p99_ms, "baseline_ms": baseline}
    if measured is None:
        return CheckResult(
            check.name, CheckKind.PERFORMANCE, False, f"GET {check.path}: {why}", seconds, extra
        )
    extra["p99_ms"] = round(measured, 3)
    if measured > check.p99_ms:
        detail = f"p99 {measured:.1f} ms over the budget of {check.p99_ms:g} ms"
        return CheckResult(check.name, CheckKind.PERFORMANCE, False, detail, seconds, extra)
    if check.factor is not None and baseline is not None:
        # A floor of 1 ms: a baseline of microseconds would make any jitter a regression.
        limit = check.factor * max(baseline, 1.0)
        extra["limit_ms"] = round(limit, 3)
        if measured > limit:
            detail = (
                f"p99 {measured:.1f} ms is over {check.factor:g}x the "
                f"{baseline:.1f} ms measured before the update"
            )
            return CheckResult(check.name, CheckKind.PERFORMANCE, False, detail, seconds, extra)
    detail = f"p99 {measured:.1f} ms within the budget"
    return CheckResult(check.name, CheckKind.PERFORMANCE, True, detail, seconds, extra)
