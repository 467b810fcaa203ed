"""Node state kept in the state dir: installed version, highest version ever
installed (rollback protection) and installed components (dependency checks).

One JSON file, replaced atomically, so a crash leaves either the old or the new
state and never a torn file.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path

from packaging.version import InvalidVersion, Version

from .errors import ManifestInvalid, StaleOrDowngrade

STATE_FILE = "node-state.json"


@dataclass
class NodeState:
    installed_version: str | None = None
    highest_version: str | None = None
    product: str | None = None
    # component name -> version, checked against manifest `dependencies`
    components: dict[str, str] = field(default_factory=dict)

    @property
    def is_empty(self) -> bool:
        return self.installed_version is None and self.highest_version is None


def load_state(state_dir: Path) -> NodeState:
    """Read the node state; a missing file means a fresh node."""
    path = Path(state_dir) / STATE_FILE
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return NodeState()
    data = json.loads(raw)
    return NodeState(
        installed_version=data.get("installed_version"),
        highest_version=data.get("highest_version"),
        product=data.get("product"),
        components=dict(data.get("components") or {}),
    )


def save_state(state_dir: Path, state: NodeState) -> None:
    """Write the node state durably: temp file, fsync, rename, fsync dir."""
    state_dir = Path(state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(state_dir / STATE_FILE, asdict(state))


# A writer's temp file: `.<name>.<pid>.<thread>.tmp`. The pid lets a sweep tell a
# dead writer's leftover from a live one's write in flight; the thread keeps two
# threads of one process (heartbeat and job) from sharing one temp file.
TEMP_SUFFIX = ".tmp"


def write_json_atomic(path: Path, data: object) -> None:
    """Replace `path` with `data` as JSON so readers see old or new, never half."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}{TEMP_SUFFIX}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
    try:
        os.write(fd, json.dumps(data, indent=2, sort_keys=True).encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def sweep_dead_writers_temps(directory: Path) -> list[str]:
    """Delete the temp files that writers killed mid-write left in `directory`; the
    temps of living processes (an agent's heartbeat writing while the engine
    recovers) are writes in flight and stay. Returns the names deleted."""
    doomed = [
        name
        for name in os.listdir(directory)
        if name.startswith(".") and name.endswith(TEMP_SUFFIX) and not _writer_alive(name)
    ]
    for name in doomed:
        with contextlib.suppress(FileNotFoundError):  # its writer finished after all
            os.unlink(directory / name)
    if doomed:
        fsync_dir(directory)
    return doomed


def _writer_alive(temp_name: str) -> bool:
    parts = temp_name[: -len(TEMP_SUFFIX)].split(".")
    # `.<name>.<pid>.<thread>` now, `.<name>.<pid>` from older agents.
    pids = [int(part) for part in parts[-2:] if part.isdigit()]
    if not pids:
        return False
    try:
        os.kill(pids[0], 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def parse_version(text: str, *, field_name: str = "version") -> Version:
    try:
        return Version(text)
    except (InvalidVersion, TypeError) as exc:
        raise ManifestInvalid(f"{field_name}: {text!r} is not a valid version") from exc


def check_version_rule(candidate: str, state: NodeState, *, allow_downgrade: bool = False) -> None:
    """Rollback protection (DESIGN.md): newer than installed and not older than
    the highest ever installed. An empty state accepts any version."""
    new = parse_version(candidate)
    if allow_downgrade or state.is_empty:
        return
    if state.installed_version is not None:
        installed = parse_version(state.installed_version, field_name="installed_version")
        if new <= installed:
            raise StaleOrDowngrade(
                f"version: {candidate} is not newer than the installed {installed}"
            )
    if state.highest_version is not None:
        highest = parse_version(state.highest_version, field_name="highest_version")
        if new < highest:
            raise StaleOrDowngrade(
                f"version: {candidate} is older than the highest ever installed {highest}"
            )


def record_installed(state_dir: Path, version: str, product: str | None = None) -> NodeState:
    """Mark `version` installed and raise the high-water mark if needed."""
    state = load_state(state_dir)
    state.installed_version = version
    if product:
        state.product = product
    if state.highest_version is None or parse_version(version) > parse_version(
        state.highest_version, field_name="highest_version"
    ):
        state.highest_version = version
    save_state(state_dir, state)
    return state
