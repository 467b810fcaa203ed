"""Delta patches: round trips, the container, and every failure
leaving nothing behind in the output directory."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import struct
import zlib
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.engine.delta_data import mutate, structured
from updates.engine import delta_codecs
from updates.engine.delta import (
    HEADER_SIZE,
    BinaryDeltaEngine,
    apply_patch,
    create_patch,
    extract_payload,
    read_header,
)
from updates.engine.delta_codecs import CODECS, Budget, choose_algorithm
from updates.engine.errors import EngineError, ManifestInvalid, UsageError
from updates.engine.protocols import DeltaEngine

ALGORITHMS = sorted(CODECS)


@pytest.fixture
def pair(tmp_path: Path) -> tuple[Path, Path]:
    src = tmp_path / "src"
    src.mkdir()
    old, new = src / "old.bin", src / "new.bin"
    old.write_bytes(structured(1, 64 << 10))
    new.write_bytes(mutate(old.read_bytes(), 2))
    return old, new


@pytest.fixture
def outdir(tmp_path: Path) -> Path:
    path = tmp_path / "out"
    path.mkdir()
    return path


@pytest.fixture
def patch(pair: tuple[Path, Path], tmp_path: Path) -> Path:
    old, new = pair
    out = tmp_path / "src" / "p.delta"
    create_patch(old, new, out, algorithm="hdiffpatch")
    return out


# --- round trips ------------------------------------------------------------


@pytest.mark.parametrize("algorithm", [*ALGORITHMS, "auto"])
def test_round_trip_structured(
    algorithm: str, pair: tuple[Path, Path], outdir: Path, tmp_path: Path
) -> None:
    old, new = pair
    patch = tmp_path / "src" / "p.delta"
    made = create_patch(old, new, patch, algorithm=algorithm)
    assert made.patch_size == patch.stat().st_size < new.stat().st_size // 4

    out = outdir / "new.bin"
    applied = apply_patch(old, patch, out, expect_sha256=made.header.target_sha256)

    assert out.read_bytes() == new.read_bytes()
    assert applied.output == out
    assert sorted(os.listdir(outdir)) == ["new.bin"]  # no temp file left
    assert read_header(patch).algorithm == made.header.algorithm != "auto"


@settings(max_examples=30, deadline=None)
@given(
    algorithm=st.sampled_from(ALGORITHMS),
    old=st.binary(max_size=2048),
    new=st.binary(max_size=2048),
)
def test_codecs_round_trip_random(algorithm: str, old: bytes, new: bytes) -> None:
    codec = CODECS[algorithm]
    payload, param = codec.diff(old, new)
    assert codec.patch(old, payload, param) == new


@settings(
    max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(algorithm=st.sampled_from(ALGORITHMS), seed=st.integers(0, 1000), size=st.integers(0, 8000))
def test_file_round_trip_structured(algorithm: str, seed: int, size: int, tmp_path: Path) -> None:
    old_bytes = structured(seed, size)
    new_bytes = mutate(old_bytes, seed + 1) if old_bytes else b"fresh"
    work = tmp_path / f"{algorithm}-{seed}-{size}"
    work.mkdir(exist_ok=True)
    (work / "old").write_bytes(old_bytes)
    (work / "new").write_bytes(new_bytes)
    create_patch(work / "old", work / "new", work / "patch", algorithm=algorithm)
    apply_patch(work / "old", work / "patch", work / "out")
    assert (work / "out").read_bytes() == new_bytes


def test_apply_keeps_base_mode_or_takes_given_one(patch: Path, pair: tuple[Path, Path]) -> None:
    old, _ = pair
    old.chmod(0o755)
    out = patch.parent / "rebuilt"
    apply_patch(old, patch, out)
    assert out.stat().st_mode & 0o777 == 0o755
    apply_patch(old, patch, out, mode=0o640)  # replaces the existing output
    assert out.stat().st_mode & 0o777 == 0o640


def test_engine_implements_protocol(pair: tuple[Path, Path], outdir: Path) -> None:
    old, new = pair
    engine: DeltaEngine = BinaryDeltaEngine()
    made = engine.generate(old, new, outdir / "p", "zstd")
    engine.apply(old, outdir / "p", outdir / "n", made.header.target_sha256)
    assert engine.verify(outdir / "n", made.header.target_sha256)
    assert not engine.verify(outdir / "n", "0" * 64)
    assert not engine.verify(outdir / "missing", made.header.target_sha256)


# --- the container ----------------------------------------------------------


def test_header_records_hashes_and_sizes(patch: Path, pair: tuple[Path, Path]) -> None:
    old, new = pair
    header = read_header(patch)
    assert header.format == 1
    assert header.algorithm == "hdiffpatch"
    assert (header.base_size, header.target_size) == (old.stat().st_size, new.stat().st_size)
    assert header.base_sha256 == hashlib.sha256(old.read_bytes()).hexdigest()
    assert header.target_sha256 == hashlib.sha256(new.read_bytes()).hexdigest()
    assert header.payload_size == patch.stat().st_size - HEADER_SIZE
    assert patch.read_bytes()[:8] == b"THMDELTA"


def test_extract_payload_is_the_bare_algorithm_format(patch: Path, outdir: Path) -> None:
    extract_payload(patch, outdir / "raw")
    assert (outdir / "raw").read_bytes() == patch.read_bytes()[HEADER_SIZE:]


def test_create_rejects_unknown_algorithm_and_missing_input(
    pair: tuple[Path, Path], outdir: Path
) -> None:
    old, new = pair
    with pytest.raises(UsageError, match="unknown algorithm"):
        create_patch(old, new, outdir / "p", algorithm="bzip9")
    with pytest.raises(UsageError, match="cannot read"):
        create_patch(old, outdir / "nope", outdir / "p")
    assert os.listdir(outdir) == []


def test_auto_choice_by_size_and_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    mib = 1 << 20
    assert choose_algorithm(100 * mib, 101 * mib) == "hdiffpatch"
    assert choose_algorithm(400 * mib, 401 * mib) == "zstd"  # suffix array over budget
    assert choose_algorithm(10 * mib, 10 * mib, Budget(seconds=1)) == "zstd"
    monkeypatch.setattr(delta_codecs, "hdiffpatch_available", lambda: False)
    assert choose_algorithm(4 * mib, 4 * mib) == "bsdiff4"
    assert choose_algorithm(100 * mib, 100 * mib) == "zstd"


def test_zstd_parameters_follow_size() -> None:
    mib = 1 << 20
    assert delta_codecs.zstd_window_log(0, 5) == 10
    assert delta_codecs.zstd_window_log(100 * mib, 101 * mib) == 27
    levels = [delta_codecs.zstd_level(n * mib) for n in (1, 100, 1000)]
    assert levels == [19, 15, 12]


# --- failures: exit 12 and nothing left in the output directory ------------


def expect_rejected(
    old: Path, patch: Path, outdir: Path, match: str, *, expect_sha256: str | None = None
) -> None:
    with pytest.raises(ManifestInvalid, match=match) as info:
        apply_patch(old, patch, outdir / "new.bin", expect_sha256=expect_sha256)
    assert info.value.exit_code == 12
    assert os.listdir(outdir) == []


def test_wrong_base_same_size(patch: Path, pair: tuple[Path, Path], outdir: Path) -> None:
    old, _ = pair
    data = bytearray(old.read_bytes())
    data[100] ^= 1
    other = old.with_name("other")
    other.write_bytes(bytes(data))
    expect_rejected(other, patch, outdir, "wrong base: SHA-256")


def test_wrong_base_size(patch: Path, pair: tuple[Path, Path], outdir: Path) -> None:
    _, new = pair
    expect_rejected(new, patch, outdir, "wrong base: .* bytes")


def test_missing_base(patch: Path, outdir: Path) -> None:
    expect_rejected(outdir.parent / "nothing", patch, outdir, "cannot read base")


@pytest.mark.parametrize("keep", [HEADER_SIZE - 1, HEADER_SIZE + 10, -1])
def test_truncated_patch(keep: int, patch: Path, pair: tuple[Path, Path], outdir: Path) -> None:
    patch.write_bytes(patch.read_bytes()[:keep])
    expect_rejected(pair[0], patch, outdir, "truncated")


@pytest.mark.parametrize(
    ("offset", "reason"),
    [(HEADER_SIZE + 5, "payload SHA-256 mismatch"), (20, "header checksum"), (0, "bad magic")],
)
def test_flipped_byte(
    offset: int, reason: str, patch: Path, pair: tuple[Path, Path], outdir: Path
) -> None:
    data = bytearray(patch.read_bytes())
    data[offset] ^= 0x10
    patch.write_bytes(bytes(data))
    expect_rejected(pair[0], patch, outdir, reason)


def test_wrong_expected_hash(patch: Path, pair: tuple[Path, Path], outdir: Path) -> None:
    expect_rejected(pair[0], patch, outdir, "expected", expect_sha256="ab" * 32)


def test_missing_patch(pair: tuple[Path, Path], outdir: Path) -> None:
    expect_rejected(pair[0], outdir.parent / "nope", outdir, "cannot read patch")


def rewrite(patch: Path, payload: bytes | None = None, **changes: Any) -> None:
    """Re-pack `patch` with header fields changed and a valid CRC and payload hash."""
    header = read_header(patch)
    payload = patch.read_bytes()[HEADER_SIZE:] if payload is None else payload
    fields: dict[str, Any] = {  # PatchHeader fields of several types
        "payload_size": len(payload),
        "payload_sha256": hashlib.sha256(payload).hexdigest(),
        **changes,
    }
    header = dataclasses.replace(header, **fields)
    patch.write_bytes(header.pack() + payload)


def test_unsupported_version(patch: Path, pair: tuple[Path, Path], outdir: Path) -> None:
    rewrite(patch, format=9)
    expect_rejected(pair[0], patch, outdir, "unsupported patch format version 9")


def test_unknown_algorithm_code(patch: Path, pair: tuple[Path, Path], outdir: Path) -> None:
    data = bytearray(patch.read_bytes())
    data[9] = 77
    crc_at = HEADER_SIZE - 4
    data[crc_at:HEADER_SIZE] = struct.pack("<I", zlib.crc32(data[:crc_at]))
    patch.write_bytes(bytes(data))
    expect_rejected(pair[0], patch, outdir, "unknown algorithm code 77")


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_payload_that_does_not_decode(
    algorithm: str, patch: Path, pair: tuple[Path, Path], outdir: Path
) -> None:
    rewrite(patch, payload=b"\x28\xb5\x2f\xfd garbage" * 20, algorithm=algorithm)
    expect_rejected(pair[0], patch, outdir, "does not decode")


def test_rebuilt_file_hash_mismatch(patch: Path, pair: tuple[Path, Path], outdir: Path) -> None:
    rewrite(patch, target_sha256="cd" * 32)
    expect_rejected(pair[0], patch, outdir, "rebuilt file SHA-256 mismatch")


def test_rebuilt_file_size_mismatch(patch: Path, pair: tuple[Path, Path], outdir: Path) -> None:
    rewrite(patch, target_size=5)
    expect_rejected(pair[0], patch, outdir, "rebuilt file is .* bytes, expected 5")


def test_failed_apply_keeps_existing_output(
    patch: Path, pair: tuple[Path, Path], outdir: Path
) -> None:
    (outdir / "new.bin").write_bytes(b"previous")
    with pytest.raises(ManifestInvalid):
        apply_patch(pair[1], patch, outdir / "new.bin")
    assert os.listdir(outdir) == ["new.bin"]
    assert (outdir / "new.bin").read_bytes() == b"previous"


def test_crash_during_rename_removes_temp(
    patch: Path, pair: tuple[Path, Path], outdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def boom(*_: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("updates.engine.delta.os.replace", boom)
    with pytest.raises(OSError, match="No space"):
        apply_patch(pair[0], patch, outdir / "new.bin")
    assert os.listdir(outdir) == []


def test_unwritable_output_location(patch: Path, pair: tuple[Path, Path], outdir: Path) -> None:
    with pytest.raises(EngineError, match="cannot create output") as info:
        apply_patch(pair[0], patch, outdir / "missing-dir" / "new.bin")
    assert info.value.exit_code == 1
