"""Rollout options: every setting a rollout runs with, and its default, in one place.

Plain Python that imports nothing of the project (only Django's settings, for the job
deadline defaults), so the models (`Rollout.opts`), the jobs and the rollout coordinator
can all read it without importing one another.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from django.conf import settings

# Canary stages as cumulative fractions of the targeted nodes.
DEFAULT_STAGE_FRACTIONS: tuple[float, ...] = (0.01, 0.05, 0.25, 1.0)
# The longest a cluster's contract migrations may be held back after it runs the release:
# a wait of the rollout, so it has a bound.
MAX_CONTRACT_DELAY = 7 * 24 * 3600


class OptionsError(ValueError):
    """Stored or submitted rollout options of the wrong type; the message names the key."""


def _int(data: Mapping[str, Any], key: str, default: int, where: str) -> int:
    value = data.get(key)
    if value is None:
        return default
    # bool is an int to Python, but `true` for a node count is a mistake, not a number.
    if isinstance(value, bool) or not isinstance(value, int):
        raise OptionsError(f"rollout option {where}{key} must be an integer, not {value!r}")
    return value


def _float(data: Mapping[str, Any], key: str, default: float, where: str) -> float:
    value = data.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise OptionsError(f"rollout option {where}{key} must be a number, not {value!r}")
    return float(value)


def _bool(data: Mapping[str, Any], key: str, default: bool, where: str) -> bool:
    value = data.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise OptionsError(f"rollout option {where}{key} must be true or false, not {value!r}")
    return value


def _mapping(value: Any, where: str) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise OptionsError(f"rollout option {where} must be an object, not {value!r}")
    return value


@dataclass(frozen=True)
class StageOptions:
    """One canary stage: the cumulative fraction of nodes it reaches."""

    fraction: float
    # Promote into this stage without a person when the gate passes.
    auto_promote: bool = False

    @classmethod
    def from_json(cls, data: Any, index: int) -> StageOptions:
        where = f"stages[{index}]."
        item = _mapping(data, f"stages[{index}]")
        if item.get("fraction") is None:
            raise OptionsError(f"rollout option {where}fraction is missing")
        return cls(
            fraction=_float(item, "fraction", 0.0, where),
            auto_promote=_bool(item, "auto_promote", False, where),
        )

    def to_json(self) -> dict[str, Any]:
        return {"fraction": self.fraction, "auto_promote": self.auto_promote}


@dataclass(frozen=True)
class GateOptions:
    """The canary health gate: thresholds on the updated nodes' reported metrics."""

    max_error_rate: float = 0.05
    max_p99_ms: float = 500.0
    # A passing gate promotes to the final stage (100 %) without a person.
    automatic: bool = False
    # Wait after a stage completes before reading the metrics.
    bake_seconds: int = 0

    @classmethod
    def from_json(cls, data: Any) -> GateOptions:
        gate = _mapping(data, "gate")
        default = cls()
        return cls(
            max_error_rate=_float(gate, "max_error_rate", default.max_error_rate, "gate."),
            max_p99_ms=_float(gate, "max_p99_ms", default.max_p99_ms, "gate."),
            automatic=_bool(gate, "automatic", default.automatic, "gate."),
            bake_seconds=_int(gate, "bake_seconds", default.bake_seconds, "gate."),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "max_error_rate": self.max_error_rate,
            "max_p99_ms": self.max_p99_ms,
            "automatic": self.automatic,
            "bake_seconds": self.bake_seconds,
        }


DEFAULT_STAGES: tuple[StageOptions, ...] = tuple(
    StageOptions(fraction=f) for f in DEFAULT_STAGE_FRACTIONS
)


@dataclass(frozen=True)
class RolloutOptions:
    """How a rollout runs. Stored as JSON in `Rollout.options`; read as `Rollout.opts`."""

    # Nodes of one cluster updating at the same time.
    max_unavailable: int = 1
    # Rolling: use the whole per-cluster budget at once instead of one node per cluster.
    parallel: bool = False
    # Seconds the agent waits for the updated service to report healthy.
    health_timeout: int = 30
    # Rolling/blue-green: a failed node stops the rollout.
    rollback_on_failure: bool = True
    # Fleet-wide cap on nodes updating at once; 0: no cap.
    max_parallel: int = 0
    stages: tuple[StageOptions, ...] = DEFAULT_STAGES
    gate: GateOptions = GateOptions()
    # Job deadlines (defaults from settings, read when the options are): re-send a command
    # not acknowledged after `ack_timeout` s, `max_sends` times in all; end a job LOST after
    # `progress_timeout` s without a report, or `offline_grace` s after its node went offline.
    ack_timeout: int = field(default_factory=lambda: int(settings.THEMIS_JOB_ACK_TIMEOUT))
    max_sends: int = field(default_factory=lambda: int(settings.THEMIS_JOB_MAX_SENDS))
    progress_timeout: int = field(default_factory=lambda: int(settings.THEMIS_JOB_PROGRESS_TIMEOUT))
    offline_grace: int = field(default_factory=lambda: int(settings.THEMIS_JOB_OFFLINE_GRACE))
    # Expand/contract: seconds between a cluster running the release on every node and its
    # contract migrations starting (0: at once); at most MAX_CONTRACT_DELAY.
    contract_delay: int = 0
    # Four eyes: a canary's promotion must be approved by someone other than who started it.
    four_eyes: bool = False

    @property
    def stage_fractions(self) -> tuple[float, ...]:
        return tuple(s.fraction for s in self.stages)

    @classmethod
    def from_json(cls, data: Mapping[str, Any] | None) -> RolloutOptions:
        """Options from JSON (stored, or a partial dict from a caller): a missing or
        null key takes its default, `gate` is merged key by key, unknown keys are
        ignored, and a value of the wrong type raises OptionsError."""
        options = _mapping(data, "options")
        default = cls()
        raw_stages = options.get("stages")
        if raw_stages is None:
            stages = default.stages
        elif isinstance(raw_stages, Sequence) and not isinstance(raw_stages, str):
            stages = tuple(StageOptions.from_json(s, i) for i, s in enumerate(raw_stages))
        else:
            raise OptionsError(f"rollout option stages must be a list, not {raw_stages!r}")
        return cls(
            max_unavailable=_int(options, "max_unavailable", default.max_unavailable, ""),
            parallel=_bool(options, "parallel", default.parallel, ""),
            health_timeout=_int(options, "health_timeout", default.health_timeout, ""),
            rollback_on_failure=_bool(
                options, "rollback_on_failure", default.rollback_on_failure, ""
            ),
            max_parallel=_int(options, "max_parallel", default.max_parallel, ""),
            stages=stages,
            gate=GateOptions.from_json(options.get("gate")),
            ack_timeout=_int(options, "ack_timeout", default.ack_timeout, ""),
            max_sends=_int(options, "max_sends", default.max_sends, ""),
            progress_timeout=_int(options, "progress_timeout", default.progress_timeout, ""),
            offline_grace=_int(options, "offline_grace", default.offline_grace, ""),
            contract_delay=_contract_delay(options),
            four_eyes=_bool(options, "four_eyes", default.four_eyes, ""),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "max_unavailable": self.max_unavailable,
            "parallel": self.parallel,
            "health_timeout": self.health_timeout,
            "rollback_on_failure": self.rollback_on_failure,
            "max_parallel": self.max_parallel,
            "stages": [s.to_json() for s in self.stages],
            "gate": self.gate.to_json(),
            "ack_timeout": self.ack_timeout,
            "max_sends": self.max_sends,
            "progress_timeout": self.progress_timeout,
            "offline_grace": self.offline_grace,
            "contract_delay": self.contract_delay,
            "four_eyes": self.four_eyes,
        }


def _contract_delay(options: Mapping[str, Any]) -> int:
    delay = _int(options, "contract_delay", 0, "")
    if not 0 <= delay <= MAX_CONTRACT_DELAY:
        raise OptionsError(
            f"rollout option contract_delay must be 0..{MAX_CONTRACT_DELAY} seconds, not {delay}"
        )
    return delay
