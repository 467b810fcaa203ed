"""The node commands of `themis-update`, in-process through cli.main (the
subprocess tests in test_apply/test_lock/test_restore/test_crash cover the
real entry point): JSON on stdout, exit code + one stderr line on failure."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.engine.apply_fixtures import (  # noqa: F401  (fixtures)
    NEW_FILES,
    NEW_REMOVE,
    Node,
    bundles_fixture,
    node_fixture,
    snapshot,
)
from updates.engine.cli import main


def run(capsys: pytest.CaptureFixture[str], *argv: object) -> tuple[int, Any, str]:
    """Exit code, the JSON document printed on stdout (or None), stderr."""
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, (json.loads(out) if out.strip() else None), err


def test_full_cycle(node: Node, capsys: pytest.CaptureFixture[str]) -> None:
    before = snapshot(node.target)
    bundle = node.maker.make("2.0", NEW_FILES, remove=NEW_REMOVE)
    dirs = ["--target", node.target, "--state-dir", node.state]

    code, report, _ = run(capsys, "preflight", bundle, *dirs, "--min-memory-mb", "1")
    assert code == 0 and report["ok"]

    code, result, err = run(
        capsys, "apply", bundle, *dirs, "--trust-anchor", node.trust_anchor,
        "--health-cmd", "true", "--keep", "2",
    )  # fmt: skip
    assert code == 0, err
    assert result["version_to"] == "2.0" and result["health"]["ok"]

    code, points, _ = run(capsys, "points", "--state-dir", node.state)
    assert [p["id"] for p in points] == [result["restore_point"]]

    code, rec, _ = run(capsys, "recover", *dirs)
    assert code == 0 and rec == {"action": "none"}

    code, back, _ = run(capsys, "rollback", *dirs, "--point", result["restore_point"])
    assert code == 0 and back["version_to"] is None
    assert snapshot(node.target) == before

    code, pruned, _ = run(capsys, "prune", "--state-dir", node.state, "--keep", "0")
    # After the rollback to nothing installed, no point is needed: all go.
    assert code == 0 and pruned == {"pruned": [result["restore_point"]], "restore_points_bytes": 0}


def test_failures_are_one_stderr_line(node: Node, capsys: pytest.CaptureFixture[str]) -> None:
    bundle = node.maker.make("2.0", NEW_FILES)
    dirs = ["--target", node.target, "--state-dir", node.state]
    code, _, err = run(capsys, "preflight", bundle, *dirs, "--min-memory-mb", str(1 << 30))
    assert code == 20 and err.count("\n") == 1 and "memory" in err
    code, _, err = run(capsys, "rollback", *dirs)
    assert code == 2 and err.count("\n") == 1 and "restore point" in err
    code, _, err = run(
        capsys, "apply", bundle, *dirs, "--trust-anchor", node.trust_anchor,
        "--health-cmd", "exit 7",
    )  # fmt: skip
    assert code == 24 and "exited 7" in err
