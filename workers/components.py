"""The components of one node: the primary one (the server, `THEMIS_PRODUCT` in
`THEMIS_INSTALL_DIR` / `THEMIS_STATE_DIR`) and the others it runs beside it (storage,
query engine, plugins), each released on its own and installed by the engine into its
own install dir, with its own state dir (version, restore points, lock).

The others come from `THEMIS_COMPONENTS`, a JSON list such as
`[{"product": "themis-storage", "install_dir": "/opt/storage", "state_dir": "/var/lib/s",
"health_cmd": "storagectl ping"}]`. Nothing here imports Django.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from updates.engine.manifest import PRODUCT_SLUG
from updates.engine.state import load_state

ENV_VAR = "THEMIS_COMPONENTS"
_REQUIRED = ("product", "install_dir", "state_dir")
_OPTIONAL = ("health_cmd", "health_url")
# More would be a configuration mistake, not a node.
MAX_COMPONENTS = 32


@dataclass(frozen=True)
class Component:
    """One separately released part of the node, and where the engine installs it."""

    product: str
    install_dir: Path
    state_dir: Path
    health_cmd: str | None = None
    health_url: str | None = None

    def installed_version(self) -> str | None:
        """The version the engine recorded for it; None when never installed (or unreadable:
        the engine itself refuses to work on a state it cannot read)."""
        try:
            return load_state(self.state_dir).installed_version
        except (OSError, ValueError):
            return None


def parse_components(text: str | None, primary: Component) -> tuple[Component, ...]:
    """The node's other components from THEMIS_COMPONENTS (unset or empty: none). A bad
    value raises RuntimeError naming the variable and the entry, like every other
    setting: an agent must not start on half a picture of its node."""
    if not text or not text.strip():
        return ()
    try:
        data = json.loads(text)
    except ValueError:
        raise RuntimeError(f"{ENV_VAR}: not JSON: {text[:80]!r}") from None
    if not isinstance(data, list):
        raise RuntimeError(f"{ENV_VAR}: expected a JSON list of components")
    if len(data) > MAX_COMPONENTS:
        raise RuntimeError(f"{ENV_VAR}: {len(data)} components, at most {MAX_COMPONENTS}")
    components = tuple(_component(entry, index) for index, entry in enumerate(data, start=1))
    _check_distinct((primary, *components))
    return components


def _component(entry: Any, index: int) -> Component:
    where = f"{ENV_VAR}: entry {index}"
    if not isinstance(entry, dict):
        raise RuntimeError(f"{where}: expected an object")
    name = entry.get("product")
    if isinstance(name, str) and name:
        where += f" ({name})"
    unknown = sorted(set(entry) - {*_REQUIRED, *_OPTIONAL})
    if unknown:
        raise RuntimeError(f"{where}: unknown keys {unknown}")
    for key in _REQUIRED:
        value = entry.get(key)
        if not isinstance(value, str) or not value.strip():
            raise RuntimeError(f"{where}: {key!r} missing or not a non-empty string")
    for key in _OPTIONAL:
        if entry.get(key) is not None and not isinstance(entry[key], str):
            raise RuntimeError(f"{where}: {key!r} must be a string")
    if not PRODUCT_SLUG.match(entry["product"]):
        raise RuntimeError(f"{where}: {entry['product']!r} is not a product name")
    return Component(
        product=entry["product"],
        install_dir=Path(entry["install_dir"]),
        state_dir=Path(entry["state_dir"]),
        health_cmd=entry.get("health_cmd") or None,
        health_url=entry.get("health_url") or None,
    )


def _check_distinct(components: Iterable[Component]) -> None:
    """Each product once, and no two components sharing a directory: the engine keeps one
    installed version, one lock and one set of restore points per state dir."""
    seen: dict[object, str] = {}
    for component in components:
        keys = (
            ("product", component.product),
            ("install_dir", component.install_dir.absolute()),
            ("state_dir", component.state_dir.absolute()),
        )
        for key in keys:
            if key in seen:
                raise RuntimeError(
                    f"{ENV_VAR}: {component.product}: {key[0]} {key[1]} is also {seen[key]}'s"
                )
            seen[key] = component.product
