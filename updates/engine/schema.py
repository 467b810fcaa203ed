"""Schema migrations as part of an apply, its undo, recovery and a release rollback.

A bundle's migrations (`migrations/<version>.json`, listed in the manifest's `migrations`
and in `files`, so hashed and signed) run after the files are switched and before the
service is reloaded onto them: the new code starts on the new schema. Only `expand`
migrations run in an apply (old and new code both work on their schema); `contract`
ones run later, once every node of the cluster runs the new version (`themis-update
migrate contract`, which the rollout coordinator asks for).

The restore point made before an apply with migrations records the schema version it
found; undoing that apply (automatic rollback, recovery, a release rollback) rolls the
schema back to that version before the files go back, so the old code never meets the
new schema.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from .errors import ManifestInvalid, MigrationFailed, RecoveryNeeded
from .manifest import MIGRATIONS_DIR, Manifest
from .migrate import Migration, MigrationResult, Phase, SchemaMigrator, parse_migration
from .migrate.connection import connect
from .migrate.store import HISTORY, Store

DATABASE_URL_ENV = "THEMIS_NODE_DATABASE_URL"
DATA_DIR = "data"
DATABASE_FILE = "themis.db"


def node_database_url(state_dir: Path, database_url: str | None = None) -> str:
    """The node database: given, else THEMIS_NODE_DATABASE_URL, else SQLite in the
    state dir's `data/` (the demo service uses the same default)."""
    if database_url:
        return database_url
    from_env = os.environ.get(DATABASE_URL_ENV, "").strip()
    if from_env:
        return from_env
    return f"sqlite:///{(Path(state_dir) / DATA_DIR / DATABASE_FILE).absolute()}"


def load_migrations(manifest: Manifest, root: Path) -> tuple[Migration, ...]:
    """The bundle's migrations, read from `root` (staging: files already hash-checked)."""
    found = []
    for ref in manifest.migrations:
        try:
            data = (root / ref.path).read_bytes()
        except OSError as exc:
            raise ManifestInvalid(f"{ref.path}: cannot read: {exc.strerror or exc}") from None
        migration = parse_migration(data, name=ref.path)
        if migration.phase.value != ref.phase:
            raise ManifestInvalid(
                f"{ref.path}: phase: {migration.phase.value!r}, but the manifest says {ref.phase!r}"
            )
        found.append(migration)
    return tuple(found)


def installed_migrations(target: Path) -> tuple[Migration, ...]:
    """The migrations of the installed version, from the target's `migrations/` dir."""
    folder = Path(target) / MIGRATIONS_DIR
    if not folder.is_dir():
        return ()
    found = []
    for path in sorted(folder.glob("*.json"), key=lambda p: (len(p.stem), p.stem)):
        name = f"{MIGRATIONS_DIR}/{path.name}"
        found.append(parse_migration(path.read_bytes(), name=name))
    return tuple(found)


@contextmanager
def migrator(state_dir: Path, database_url: str | None = None) -> Iterator[SchemaMigrator]:
    with SchemaMigrator(
        node_database_url(state_dir, database_url), state_dir=Path(state_dir)
    ) as opened:
        yield opened


def schema_version(state_dir: Path, database_url: str | None = None) -> str | None:
    with migrator(state_dir, database_url) as schema:
        schema.resume()
        return schema.get_version()


def run_expand(
    migrations: Sequence[Migration], state_dir: Path, database_url: str | None = None
) -> tuple[list[MigrationResult], str | None]:
    """The apply's step: every `expand` migration not yet applied; returns their results
    and the schema version after them. A failure has already been rolled back by the
    migrator (the schema is as it was) when MigrationFailed propagates."""
    with migrator(state_dir, database_url) as schema:
        results = schema.apply_all(migrations, phase=Phase.EXPAND)
        return results, schema.get_version()


def run_contract(
    target: Path, state_dir: Path, database_url: str | None = None
) -> dict[str, object]:
    """After the whole cluster runs the new version: the installed version's `contract`
    migrations, then the column drops whose grace period has ended."""
    migrations = installed_migrations(target)
    with migrator(state_dir, database_url) as schema:
        schema.resume()
        results = schema.apply_all(migrations, phase=Phase.CONTRACT)
        dropped = schema.finish_grace()
        return {
            "ok": True,
            "applied": [r.to_dict() for r in results],
            "dropped": dropped,
            "schema_version": schema.get_version(),
        }


def roll_schema_back(
    version: str | None, state_dir: Path, database_url: str | None = None
) -> list[MigrationResult]:
    """Back to `version` (None: before any migration). A failure here leaves files and
    schema apart: recovery must finish it, so it is RecoveryNeeded (the journal stays)."""
    try:
        with migrator(state_dir, database_url) as schema:
            schema.resume()
            return schema.rollback_to(version)
    except (MigrationFailed, OSError) as exc:
        raise RecoveryNeeded(
            f"schema rollback to {version or 'no migration'} did not finish ({exc});"
            " the journal is kept: run `themis-update recover`"
        ) from exc


def schema_status(state_dir: Path, database_url: str | None = None) -> dict[str, object]:
    """Schema version and history, read only: a database that does not exist is not
    created, and one never migrated gets no tables (a heartbeat calls this)."""
    url = node_database_url(state_dir, database_url)
    empty: dict[str, object] = {"schema_version": None, "history": []}
    if url.startswith("sqlite:///") and not Path(url.removeprefix("sqlite:///")).exists():
        return empty
    conn = connect(url)
    try:
        if not conn.table_exists(HISTORY):
            return empty
        store = Store(conn)
        applied = store.applied()
        return {
            "schema_version": max(applied, key=int) if applied else None,
            "history": [entry.to_dict() for entry in store.history()],
        }
    finally:
        conn.close()
