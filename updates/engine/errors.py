"""Engine errors: one type per failure a user must tell apart.

Each carries the `themis-update` exit code from DESIGN.md, so the CLI maps an
exception to its exit code without a lookup table that could drift.
"""

from __future__ import annotations


class EngineError(Exception):
    """Base of every expected engine failure. `str(err)` is the one-line cause."""

    exit_code = 1
    code = "UNEXPECTED"

    def __init__(self, *args: object) -> None:
        super().__init__(*args)
        # Structured detail for the job report (e.g. every verification check's result).
        self.details: dict[str, object] = {}


class UsageError(EngineError):
    exit_code = 2
    code = "USAGE"


class SignatureInvalid(EngineError):
    exit_code = 10
    code = "SIGNATURE_INVALID"


class UnsafePath(EngineError):
    exit_code = 11
    code = "UNSAFE_PATH"


class ManifestInvalid(EngineError):
    exit_code = 12
    code = "MANIFEST_INVALID"


class StaleOrDowngrade(EngineError):
    exit_code = 13
    code = "STALE_OR_DOWNGRADE"


class PreflightFailed(EngineError):
    exit_code = 20
    code = "PREFLIGHT_FAILED"


class DependencyUnmet(PreflightFailed):
    """A manifest dependency is not met by the node's installed components (a required
    one missing or outside its constraint, an optional one installed outside it, a
    conflicting one installed). A pre-flight failure (exit 20): nothing is written."""

    code = "DEPENDENCY_UNMET"


class AlreadyInProgress(EngineError):
    exit_code = 21
    code = "ALREADY_IN_PROGRESS"


class RestorePointFailed(EngineError):
    exit_code = 22
    code = "RESTORE_POINT_FAILED"


class ApplyFailed(EngineError):
    exit_code = 23
    code = "APPLY_FAILED_ROLLED_BACK"


class HealthCheckFailed(EngineError):
    exit_code = 24
    code = "HEALTH_CHECK_FAILED_ROLLED_BACK"


class VerificationFailed(EngineError):
    """A post-update check of the bundle's `verify` failed; files and service are back
    on the old version."""

    exit_code = 26
    code = "VERIFICATION_FAILED_ROLLED_BACK"


class MigrationFailed(EngineError):
    """A schema migration failed; schema, data, files and service are back where the
    apply found them."""

    exit_code = 27
    code = "MIGRATION_FAILED_ROLLED_BACK"


class MigrationTampered(EngineError):
    """A migration version already applied on this node comes with another checksum:
    the bundle's migration is not the one that ran. Nothing is changed."""

    exit_code = 28
    code = "MIGRATION_CHECKSUM_MISMATCH"


class RestorePointCorrupt(EngineError):
    exit_code = 25
    code = "RESTORE_POINT_CORRUPT"


class RecoveryNeeded(EngineError):
    """An automatic rollback or a rollback itself could not finish; the journal
    is kept so `themis-update recover` can complete it (exit 1: not a normal outcome)."""

    exit_code = 1
    code = "RECOVERY_NEEDED"
