"""The seams of the system (DESIGN.md): small protocols with one real
implementation each, so unit tests can inject a fake and integration tests
use the real thing."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from .migrate import HistoryEntry, Migration, MigrationResult


class SignatureValidator(Protocol):
    def verify(self, manifest_bytes: bytes, signature: bytes) -> str:
        """Return the signer's subject; raise SignatureInvalid otherwise (fail-closed)."""
        ...


class HotReloadEngine(Protocol):
    def apply(self, bundle: Path, **options: Any) -> Mapping[str, Any]: ...

    def rollback(self, point_id: str | None = None) -> Mapping[str, Any]: ...

    def list_restore_points(self) -> Sequence[Mapping[str, Any]]: ...

    def dry_run(self, bundle: Path) -> Mapping[str, Any]: ...


class DeltaEngine(Protocol):
    def generate(self, old: Path, new: Path, out: Path, algorithm: str = "auto") -> Any: ...

    def apply(self, old: Path, patch: Path, out: Path, expect_sha256: str | None = None) -> Any: ...

    def verify(self, path: Path, sha256: str) -> bool: ...


class SchemaMigrator(Protocol):
    """The node database's schema (real one: migrate.SchemaMigrator); idempotent: a
    version applied with the same checksum is not applied again."""

    def apply(self, migration: Migration) -> MigrationResult: ...

    def rollback(self, version: str) -> MigrationResult: ...

    def get_version(self) -> str | None: ...

    def get_history(self) -> list[HistoryEntry]: ...


class NodeTransport(Protocol):
    """How the coordinator reaches a node (real one: Celery tasks on node.<id>)."""

    def update_node(self, node_id: str, job_id: str, **options: Any) -> None: ...

    def health_check(self, node_id: str) -> Mapping[str, Any]: ...

    def rollback_node(self, node_id: str, job_id: str, point_id: str | None = None) -> None: ...


# (url, body bytes, headers) -> (status code, response headers, response body)
HttpSend = Callable[[str, bytes, Mapping[str, str]], tuple[int, Mapping[str, str], bytes]]


class NotificationWebhook(Protocol):
    def send(self, event: Mapping[str, Any]) -> None: ...


class HealthCheck(Protocol):
    def run(self) -> Mapping[str, Any]:
        """A report with an overall `ok` and one entry per check; at most 2 s."""
        ...
