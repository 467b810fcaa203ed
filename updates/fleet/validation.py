"""Strict checks of what an agent reports. A report is taken whole or refused whole:
one bad field (a number out of range, NaN, a wrong type, an endless string) refuses
the report, with a reason, before anything is written."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from packaging.version import InvalidVersion, Version

from updates.engine.manifest import PRODUCT_SLUG

MAX_INT = 2**63 - 1
MAX_ETA = 2**31 - 1  # seconds, what the job's column holds
MAX_ERROR_MESSAGE = 20_000
MAX_RESULT_ITEMS = 2_000
MAX_RESULT_DEPTH = 8
MAX_RESULT_STRING = 4_096
MAX_RESTORE_POINTS = 200
MAX_REFUSALS = 50
# The node database's schema history a heartbeat carries: its newest entries only.
MAX_SCHEMA_HISTORY = 20
SCHEMA_PHASES = frozenset({"expand", "contract"})
# The components a heartbeat may list (the server, storage, query engine, plugins).
MAX_COMPONENTS = 64


class ReportFieldInvalid(ValueError):
    """A field of an agent report fails its type or range check."""


def integer(value: Any, name: str, *, low: int = 0, high: int = MAX_INT) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ReportFieldInvalid(f"{name}: expected an integer in {low}..{high}")
    return value


def optional_integer(value: Any, name: str, *, low: int = 0, high: int = MAX_INT) -> int | None:
    return None if value is None else integer(value, name, low=low, high=high)


def optional_float(value: Any, name: str, *, low: float = 0.0) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ReportFieldInvalid(f"{name}: expected a number")
    try:
        number = float(value)
    except OverflowError:
        raise ReportFieldInvalid(f"{name}: out of range") from None
    if not math.isfinite(number) or number < low:
        raise ReportFieldInvalid(f"{name}: expected a finite number >= {low}")
    return number


def text(value: Any, name: str, *, max_len: int, required: bool = False) -> str:
    if value is None and not required:
        return ""
    if not isinstance(value, str) or len(value) > max_len or "\x00" in value:
        raise ReportFieldInvalid(f"{name}: expected text of at most {max_len} characters")
    if required and not value:
        raise ReportFieldInvalid(f"{name}: must not be empty")
    return value


def optional_bool(value: Any, name: str) -> bool | None:
    if value is None or isinstance(value, bool):
        return value
    raise ReportFieldInvalid(f"{name}: expected true, false or null")


def job_id(value: Any, name: str = "job_id") -> int:
    """A job id as the agent sends it: a decimal string (or an int)."""
    if isinstance(value, str) and value.isascii() and value.isdigit() and len(value) <= 18:
        value = int(value)
    return integer(value, name, low=1)


def plain_json(value: Any, name: str) -> dict[str, Any]:
    """A small JSON object of finite numbers, bounded strings and bounded nesting."""
    if not isinstance(value, dict):
        raise ReportFieldInvalid(f"{name}: expected an object")
    budget = [MAX_RESULT_ITEMS]
    _check_json(value, name, 0, budget)
    return value


def _check_json(value: Any, name: str, depth: int, budget: list[int]) -> None:
    budget[0] -= 1
    if budget[0] < 0 or depth > MAX_RESULT_DEPTH:
        raise ReportFieldInvalid(f"{name}: too large or too deeply nested")
    if value is None or isinstance(value, bool):
        return
    if isinstance(value, int):
        integer(value, name, low=-MAX_INT)
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise ReportFieldInvalid(f"{name}: not a finite number")
    elif isinstance(value, str):
        text(value, name, max_len=MAX_RESULT_STRING)
    elif isinstance(value, list):
        for item in value:
            _check_json(item, name, depth + 1, budget)
    elif isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str) or len(key) > 128:
                raise ReportFieldInvalid(f"{name}: keys must be short text")
            _check_json(item, name, depth + 1, budget)
    else:
        raise ReportFieldInvalid(f"{name}: not JSON")


@dataclass(frozen=True)
class ProgressReport:
    job_id: int
    node_id: str
    step: str
    percent: int
    bytes_done: int | None
    bytes_total: int | None
    bytes_per_second: int | None = None
    eta_seconds: int | None = None

    @classmethod
    def from_payload(cls, payload: dict[str, Any]) -> ProgressReport:
        done = optional_integer(payload.get("bytes_done"), "bytes_done")
        total = optional_integer(payload.get("bytes_total"), "bytes_total")
        if (done is None) != (total is None) or (
            done is not None and total is not None and done > total
        ):
            raise ReportFieldInvalid("bytes_done: must come with bytes_total and not exceed it")
        return cls(
            job_id=job_id(payload.get("job_id")),
            node_id=text(payload.get("node_id"), "node_id", max_len=64, required=True),
            step=text(payload.get("step"), "step", max_len=64, required=True),
            percent=integer(payload.get("percent", 0), "percent", high=100),
            bytes_done=done,
            bytes_total=total,
            bytes_per_second=optional_integer(payload.get("bytes_per_second"), "bytes_per_second"),
            eta_seconds=optional_integer(payload.get("eta_seconds"), "eta_seconds", high=MAX_ETA),
        )


@dataclass(frozen=True)
class FinalReport:
    job_id: int
    node_id: str
    ok: bool
    error_code: str
    error_message: str
    result: dict[str, Any]

    @classmethod
    def from_payload(cls, payload: dict[str, Any], node_id: str | None = None) -> FinalReport:
        ok = payload.get("ok")
        if not isinstance(ok, bool):
            raise ReportFieldInvalid("ok: expected true or false")
        result = payload.get("result")
        result = plain_json({} if result is None else result, "result")
        text(result.get("version_to"), "result.version_to", max_len=64)
        return cls(
            job_id=job_id(payload.get("job_id")),
            node_id=node_id
            if node_id is not None
            else text(payload.get("node_id"), "node_id", max_len=64, required=True),
            ok=ok,
            error_code=text(payload.get("error_code"), "error_code", max_len=64),
            error_message=text(
                payload.get("error_message"), "error_message", max_len=MAX_ERROR_MESSAGE
            ),
            result=result,
        )


def restore_points(value: Any) -> tuple[dict[str, Any], ...]:
    """The restore points a heartbeat lists, each with its known fields checked."""
    if value is None:
        return ()
    if not isinstance(value, list) or len(value) > MAX_RESTORE_POINTS:
        raise ReportFieldInvalid(f"restore_points: expected a list of at most {MAX_RESTORE_POINTS}")
    points = []
    for item in value:
        if not isinstance(item, dict):
            raise ReportFieldInvalid("restore_points: each entry must be an object")
        point: dict[str, Any] = {
            "id": text(item.get("id"), "restore_points.id", max_len=128, required=True)
        }
        version = text(item.get("version"), "restore_points.version", max_len=64)
        if version:
            point["version"] = version
        created = item.get("created")
        if isinstance(created, str):
            point["created"] = text(created, "restore_points.created", max_len=64)
        elif created is not None:
            point["created"] = optional_float(created, "restore_points.created")
        for key in ("file_count", "size"):
            number = optional_integer(item.get(key), f"restore_points.{key}")
            if number is not None:
                point[key] = number
        points.append(point)
    return tuple(points)


@dataclass(frozen=True)
class CommandRefusal:
    """A command the agent refused (reported in its next heartbeat)."""

    command: str
    reason: str


def refusals(value: Any) -> tuple[CommandRefusal, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or len(value) > MAX_REFUSALS:
        raise ReportFieldInvalid(f"commands_refused: expected a list of at most {MAX_REFUSALS}")
    out = []
    for item in value:
        if not isinstance(item, dict):
            raise ReportFieldInvalid("commands_refused: each entry must be an object")
        out.append(
            CommandRefusal(
                command=text(item.get("command"), "commands_refused.command", max_len=32),
                reason=text(item.get("reason"), "commands_refused.reason", max_len=200),
            )
        )
    return tuple(out)


@dataclass(frozen=True)
class SchemaReport:
    """The node database's schema as the agent reads it: its version ("" before any
    migration) and its newest history entries, oldest first."""

    version: str
    history: tuple[dict[str, Any], ...]


def schema_report(value: Any) -> SchemaReport | None:
    """A heartbeat's `schema` (None: not reported, e.g. the node has no database yet).
    Each history entry keeps only its known fields, each checked."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ReportFieldInvalid("schema: expected an object")
    version = text(value.get("version"), "schema.version", max_len=64)
    listed = value.get("history")
    if listed is None:
        listed = []
    if not isinstance(listed, list) or len(listed) > MAX_SCHEMA_HISTORY:
        raise ReportFieldInvalid(f"schema.history: expected a list of at most {MAX_SCHEMA_HISTORY}")
    history = []
    for item in listed:
        if not isinstance(item, dict):
            raise ReportFieldInvalid("schema.history: each entry must be an object")
        phase = text(item.get("phase"), "schema.history.phase", max_len=16)
        if phase and phase not in SCHEMA_PHASES:
            raise ReportFieldInvalid("schema.history.phase: expected expand or contract")
        entry: dict[str, Any] = {
            "version": text(
                item.get("version"), "schema.history.version", max_len=64, required=True
            ),
            "phase": phase,
            "outcome": text(item.get("outcome"), "schema.history.outcome", max_len=32),
            "started": text(item.get("started"), "schema.history.started", max_len=64),
            "duration_ms": optional_float(item.get("duration_ms"), "schema.history.duration_ms"),
        }
        history.append(entry)
    return SchemaReport(version=version, history=tuple(history))


@dataclass(frozen=True)
class ComponentReport:
    """One component the agent reports installed: a release product and its version."""

    product: str
    version: str


def components(value: Any) -> tuple[ComponentReport, ...] | None:
    """A heartbeat's `components` (None: not reported, an agent from before components).
    Each product is a release product name, listed once; each version parses as PEP 440,
    or is "" for a component the node is set up for but has never installed (left out:
    it is not installed)."""
    if value is None:
        return None
    if not isinstance(value, list) or len(value) > MAX_COMPONENTS:
        raise ReportFieldInvalid(f"components: expected a list of at most {MAX_COMPONENTS}")
    out: dict[str, ComponentReport] = {}
    seen: set[str] = set()
    for item in value:
        if not isinstance(item, dict):
            raise ReportFieldInvalid("components: each entry must be an object")
        product = text(item.get("product"), "components.product", max_len=64, required=True)
        if not PRODUCT_SLUG.match(product):
            raise ReportFieldInvalid(f"components.product: {product[:64]!r} is not a product name")
        if product in seen:
            raise ReportFieldInvalid(f"components: {product} is listed twice")
        if item.get("version") is None:
            raise ReportFieldInvalid(f"components.version: missing for {product}")
        version = text(item.get("version"), "components.version", max_len=64)
        seen.add(product)
        if not version:
            continue
        try:
            Version(version)
        except InvalidVersion:
            raise ReportFieldInvalid(
                f"components.version: {version!r} of {product} is not a version"
            ) from None
        out[product] = ComponentReport(product=product, version=version)
    return tuple(out.values())


# A heartbeat's `inventory`: the host as the agent sees it, each key bounded.
INVENTORY_TEXT = {"os": 128, "kernel": 128, "arch": 32, "python": 32}
INVENTORY_COUNTS = {"cpus": 4096}
INVENTORY_BYTES = ("memory_total_bytes", "disk_total_bytes")


def inventory(value: Any) -> dict[str, str | int] | None:
    """The host's inventory (None: not reported). Unknown keys are left out (a newer agent
    may say more); a known key of the wrong type or size refuses the field whole."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ReportFieldInvalid("inventory: expected an object")
    out: dict[str, str | int] = {}
    for key, limit in INVENTORY_TEXT.items():
        if value.get(key) is not None:
            out[key] = text(value[key], f"inventory.{key}", max_len=limit)
    for key, high in INVENTORY_COUNTS.items():
        if value.get(key) is not None:
            out[key] = integer(value[key], f"inventory.{key}", low=1, high=high)
    for key in INVENTORY_BYTES:
        if value.get(key) is not None:
            out[key] = integer(value[key], f"inventory.{key}")
    return out
