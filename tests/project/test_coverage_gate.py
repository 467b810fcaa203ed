"""The coverage gate (`tests/coverage_gate.py`, run by `make test`) on small
synthetic coverage reports: per-file line and branch floors, globs, exemptions,
and floors that match nothing."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests import coverage_gate
from tests.coverage_gate import Exempt, Floor, Rule

ROOT = Path(__file__).resolve().parent.parent.parent

FLOORS: dict[str, Rule] = {
    "pkg/core.py": Floor(lines=90, branches=85),
    "pkg/jobs/*.py": Floor(lines=80, branches=70),
    "pkg/jobs/views.py": Exempt("UI"),
}


def _file(lines: tuple[int, int], branches: tuple[int, int] | None = (10, 10)) -> dict[str, Any]:
    """A file's entry as coverage's JSON report writes it: (covered, total) lines and
    branches; branches None is a report made without branch measurement."""
    summary: dict[str, Any] = {"covered_lines": lines[0], "num_statements": lines[1]}
    if branches is not None:
        summary.update(covered_branches=branches[0], num_branches=branches[1])
    return {"summary": summary}


def _good() -> dict[str, dict[str, Any]]:
    return {
        "pkg/core.py": _file((95, 100), (9, 10)),
        "pkg/jobs/services.py": _file((80, 100), (7, 10)),
        "pkg/jobs/outbox.py": _file((50, 50), (0, 0)),  # no branches: nothing to miss
        "pkg/jobs/views.py": _file((1, 100), (0, 10)),  # exempt
        "pkg/jobs/__init__.py": _file((0, 0), (0, 0)),  # nothing to measure
        "pkg/other.py": _file((0, 10), (0, 4)),  # guarded by no floor
    }


def _gate(tmp_path: Path, files: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> str:
    report = tmp_path / "coverage.json"
    report.write_text(json.dumps({"meta": {}, "files": files, "totals": {}}))
    code = coverage_gate.main(str(report), FLOORS)
    out = capsys.readouterr().out
    return f"exit {code}\n{out}"


def test_a_report_above_every_floor_passes_and_shows_each_guarded_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = _gate(tmp_path, _good(), capsys)
    assert out.startswith("exit 0\n"), out
    assert "coverage gate: ok (3 files)" in out
    table = {line.split()[0]: line.split() for line in out.splitlines() if line.startswith("pkg/")}
    # per file, not pooled; the exempt view, the empty __init__.py and the unguarded file
    # are not listed
    assert sorted(table) == ["pkg/core.py", "pkg/jobs/outbox.py", "pkg/jobs/services.py"]
    assert table["pkg/core.py"][1:] == ["100", "95.0", "%", "90", "10", "90.0", "%", "85", "ok"]
    assert table["pkg/jobs/outbox.py"][5:8] == ["0", "100.0", "%"]


def test_one_file_below_its_line_floor_fails_though_the_package_is_above(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    files = _good()
    # pooled with outbox.py the package would be at (79 + 50) / 150 = 86 %
    files["pkg/jobs/services.py"] = _file((79, 100), (10, 10))
    out = _gate(tmp_path, files, capsys)
    assert out.startswith("exit 1\n"), out
    assert "coverage FAIL pkg/jobs/services.py: lines 79.0 % < 80 %" in out
    assert "coverage gate: FAILED" in out


def test_a_branch_floor_breach_fails_with_full_line_coverage(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    files = _good()
    files["pkg/core.py"] = _file((100, 100), (84, 100))
    out = _gate(tmp_path, files, capsys)
    assert out.startswith("exit 1\n"), out
    assert "coverage FAIL pkg/core.py: branches 84.0 % < 85 %" in out


def test_a_percentage_just_below_the_floor_is_not_printed_as_reaching_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    files = _good()
    files["pkg/core.py"] = _file((100, 100), (8499, 10000))  # 84.99 %
    out = _gate(tmp_path, files, capsys)
    assert out.startswith("exit 1\n"), out
    assert "branches 84.9 % < 85 %" in out


def test_a_report_without_branch_data_fails(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    files = {name: _file((100, 100), None) for name in _good()}
    out = _gate(tmp_path, files, capsys)
    assert out.startswith("exit 1\n"), out
    assert "pkg/core.py: no branch data in the report" in out


@pytest.mark.parametrize("gone", ["pkg/core.py", "pkg/jobs/views.py"])
def test_a_floor_or_exemption_matching_no_file_fails(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], gone: str
) -> None:
    files = _good()
    del files[gone]
    out = _gate(tmp_path, files, capsys)
    assert out.startswith("exit 1\n"), out
    assert f"coverage FAIL {gone}: matches no measured file (renamed or removed?)" in out


def test_a_glob_matching_nothing_fails(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    files = {"pkg/core.py": _file((100, 100))}
    out = _gate(tmp_path, files, capsys)
    assert out.startswith("exit 1\n"), out
    assert "coverage FAIL pkg/jobs/*.py: matches no measured file" in out


def test_a_glob_stays_inside_one_folder() -> None:
    assert coverage_gate.matches("pkg/jobs/*.py", "pkg/jobs/outbox.py")
    assert not coverage_gate.matches("pkg/jobs/*.py", "pkg/jobs/sub/outbox.py")
    assert not coverage_gate.matches("pkg/jobs/*.py", "other/pkg/jobs/outbox.py")


def test_the_most_specific_rule_wins() -> None:
    assert coverage_gate.rule_for("pkg/jobs/views.py", FLOORS) == (
        "pkg/jobs/views.py",
        Exempt("UI"),
    )
    floors: dict[str, Rule] = {"pkg/*.py": Floor(1, 1), "pkg/c*.py": Floor(2, 2)}
    assert coverage_gate.rule_for("pkg/core.py", floors) == ("pkg/c*.py", Floor(2, 2))


def test_every_floor_of_the_project_names_files_that_exist() -> None:
    """Caught here, in seconds, rather than at the end of a full `make test`."""
    packages = ("updates", "tenants", "workers", "themis_dashboard")
    sources = [str(p.relative_to(ROOT)) for top in packages for p in (ROOT / top).rglob("*.py")]
    for pattern in coverage_gate.FLOORS:
        assert any(coverage_gate.matches(pattern, name) for name in sources), pattern


def test_the_gate_runs_as_a_script(tmp_path: Path) -> None:
    report = tmp_path / "coverage.json"
    report.write_text(json.dumps({"files": {"updates/x.py": _file((1, 1))}}))
    result = subprocess.run(
        [sys.executable, "tests/coverage_gate.py", str(report)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    # the project's floors match nothing in this report: every one of them fails
    assert result.returncode == 1, result.stdout + result.stderr
    assert "updates/rollouts/coordinator.py: matches no measured file" in result.stdout
