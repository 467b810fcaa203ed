"""The import-linter contracts that keep the node side free of the dashboard name every
dashboard package: a package added later is forbidden to the engine and the agent too,
not silently allowed because no list mentions it."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
NODE_SIDE = {
    "The engine runs on nodes: no Django, no Celery, nothing of the project outside itself",
    "The node agent has no database: no Django, only the engine",
}


def _contracts() -> dict[str, dict[str, object]]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    return {c["name"]: c for c in config["contracts"]}


def _dashboard_modules() -> set[str]:
    """Every package and top-level module of `updates` but the engine and migrations."""
    found = set()
    for path in (ROOT / "updates").iterdir():
        name = path.stem if path.suffix == ".py" else path.name
        is_package = path.is_dir() and (path / "__init__.py").exists()
        if (is_package or path.suffix == ".py") and name not in {
            "__init__",
            "engine",
            "migrations",
        }:
            found.add(f"updates.{name}")
    return found


@pytest.mark.parametrize("contract", sorted(NODE_SIDE))
def test_the_node_side_contracts_forbid_every_dashboard_module(contract: str) -> None:
    forbidden = set(_contracts()[contract]["forbidden_modules"])  # type: ignore[call-overload]
    missing = _dashboard_modules() - forbidden
    assert not missing, f"{contract!r} does not forbid {sorted(missing)}"
    assert "django" in forbidden
