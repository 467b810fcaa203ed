"""The node-side engine: bundle signing and verification, safe extraction, binary deltas,
pre-flight, restore points, atomic apply, recovery and rollback; the `themis-update` CLI.

Plain Python with no Django and nothing of the project outside this package (an import
contract checks it), so it runs on nodes without the dashboard. Its public API is below."""

from .apply import apply_bundle, list_points, prune_points, recover, rollback
from .bundle import VerifiedBundle, create_bundle, verify_bundle
from .delta import BinaryDeltaEngine
from .delta_bundle import FullBundleFallback, create_delta_bundle, delta_rebuilder
from .errors import (
    AlreadyInProgress,
    ApplyFailed,
    EngineError,
    HealthCheckFailed,
    ManifestInvalid,
    PreflightFailed,
    RecoveryNeeded,
    RestorePointCorrupt,
    RestorePointFailed,
    SignatureInvalid,
    StaleOrDowngrade,
    UnsafePath,
    UsageError,
)
from .preflight import preflight
from .reports import sign_report, verify_report

__all__ = [
    "AlreadyInProgress",
    "ApplyFailed",
    "BinaryDeltaEngine",
    "EngineError",
    "FullBundleFallback",
    "HealthCheckFailed",
    "ManifestInvalid",
    "PreflightFailed",
    "RecoveryNeeded",
    "RestorePointCorrupt",
    "RestorePointFailed",
    "SignatureInvalid",
    "StaleOrDowngrade",
    "UnsafePath",
    "UsageError",
    "VerifiedBundle",
    "apply_bundle",
    "create_bundle",
    "create_delta_bundle",
    "delta_rebuilder",
    "list_points",
    "preflight",
    "prune_points",
    "recover",
    "rollback",
    "sign_report",
    "verify_bundle",
    "verify_report",
]
