"""`themis-update delta ...`: exit codes and one-line errors, progress only on
a TTY, and interop of extracted payloads with the reference CLIs."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.engine.delta_data import mutate, structured
from updates.engine.cli import main
from updates.engine.cli.delta import ProgressLine
from updates.engine.delta import create_patch, extract_payload


@pytest.fixture
def files(tmp_path: Path) -> tuple[Path, Path]:
    old, new = tmp_path / "old.bin", tmp_path / "new.bin"
    old.write_bytes(structured(7, 48 << 10))
    new.write_bytes(mutate(old.read_bytes(), 8))
    return old, new


def test_create_info_apply(
    files: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    old, new = files
    patch, out = tmp_path / "p.delta", tmp_path / "rebuilt.bin"

    assert main(["delta", "create", str(old), str(new), "-o", str(patch)]) == 0
    created = json.loads(capsys.readouterr().out)
    assert created["algorithm"] == "hdiffpatch"
    assert created["patch_size"] == patch.stat().st_size

    assert main(["delta", "info", str(patch)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["target_sha256"] == created["target_sha256"]

    sha = created["target_sha256"]
    assert (
        main(["delta", "apply", str(old), str(patch), "-o", str(out), "--expect-sha256", sha]) == 0
    )
    assert out.read_bytes() == new.read_bytes()
    assert capsys.readouterr().err == ""  # not a TTY: no progress drawn


def test_bad_patch_exits_12_with_one_line(
    files: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    old, new = files
    patch = tmp_path / "p.delta"
    create_patch(old, new, patch, algorithm="zstd")
    outdir = tmp_path / "out"
    outdir.mkdir()

    code = main(["delta", "apply", str(new), str(patch), "-o", str(outdir / "x")])

    err = capsys.readouterr().err
    assert code == 12
    assert err.count("\n") == 1
    assert "MANIFEST_INVALID" in err and "wrong base" in err
    assert os.listdir(outdir) == []


def test_info_on_garbage_exits_12(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    junk = tmp_path / "junk"
    junk.write_bytes(b"not a patch at all" * 20)
    assert main(["delta", "info", str(junk)]) == 12
    assert "bad magic" in capsys.readouterr().err


def test_usage_errors_exit_2(files: tuple[Path, Path], tmp_path: Path) -> None:
    old, new = files
    with pytest.raises(SystemExit) as info:
        main(["delta", "create", str(old), str(new), "-o", "p", "--algorithm", "bzip9"])
    assert info.value.code == 2
    assert main(["delta"]) == 2
    assert main(["delta", "create", str(old), str(tmp_path / "nope"), "-o", "p"]) == 2


def test_console_script_runs(files: tuple[Path, Path], tmp_path: Path) -> None:
    """The real entry point, as a separate process, with exit code and stderr."""
    old, _ = files
    run = subprocess.run(
        [sys.executable, "-m", "updates.engine", "delta", "info", str(old)],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[2],
        check=False,
    )
    assert run.returncode == 12
    assert run.stderr.startswith("themis-update: MANIFEST_INVALID:")


class FakeTty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_only_on_tty() -> None:
    tty = FakeTty()
    with ProgressLine(tty, interval=0.01) as progress:
        progress("diffing (zstd)")
    assert "diffing (zstd)" in tty.getvalue()
    assert tty.getvalue().endswith("\r\x1b[K")  # the line is cleared at the end

    plain = io.StringIO()
    with ProgressLine(plain) as progress:
        progress("diffing")
    assert plain.getvalue() == ""


# --- interop with the reference tools ---------------------------------------


def _installed(tool: str) -> None:
    if shutil.which(tool) is None:
        pytest.fail(f"{tool} is not installed: run `make install`")


def test_bsdiff4_payload_applies_with_bspatch(files: tuple[Path, Path], tmp_path: Path) -> None:
    _installed("bspatch")
    old, new = files
    create_patch(old, new, tmp_path / "p", algorithm="bsdiff4")
    extract_payload(tmp_path / "p", tmp_path / "raw.bsdiff")
    assert (tmp_path / "raw.bsdiff").read_bytes()[:8] == b"BSDIFF40"

    subprocess.run(
        ["bspatch", str(old), str(tmp_path / "out"), str(tmp_path / "raw.bsdiff")], check=True
    )
    assert (tmp_path / "out").read_bytes() == new.read_bytes()


def test_zstd_payload_decodes_with_zstd_patch_from(
    files: tuple[Path, Path], tmp_path: Path
) -> None:
    _installed("zstd")
    old, new = files
    create_patch(old, new, tmp_path / "p", algorithm="zstd")
    extract_payload(tmp_path / "p", tmp_path / "raw.zst")

    subprocess.run(
        [
            "zstd",
            "-q",
            "-d",
            "--long=27",
            f"--patch-from={old}",
            str(tmp_path / "raw.zst"),
            "-o",
            str(tmp_path / "out"),
        ],
        check=True,
    )
    assert (tmp_path / "out").read_bytes() == new.read_bytes()
