"""Benchmark bundle verification.

    .venv/bin/python bench/bench_verify.py [--size-mb 200] [--runs 200] [--repeats 5]

1. Manifest signature verification with a leaf + intermediate chain (CMS
   parse, messageDigest, RSA signature, chain building with a fresh verifier):
   median ms. Target <= 5 ms, requirement <= 50 ms.
2. Whole-bundle verification of a SIZE_MB payload as a ratio to
   `hashlib.file_digest(f, "sha256")` over the same bundle file in the same
   run (aim <= 1.15: one pass over the data). Runs are interleaved and the
   file is in the page cache, so both sides do the same I/O. On a busy
   machine the best-of-runs ratio is the steadier figure.
3. For information: the same with staging to disk, and a .tar.zst bundle.

Memory stays bounded (everything streams); peak RSS is printed.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from updates.engine.bundle import (  # noqa: E402
    create_bundle,
    read_manifest,
    verify_bundle,
    verify_manifest_signature,
)
from updates.engine.cms import load_trust_anchors  # noqa: E402
from updates.engine.devpki import Pki, make_pki  # noqa: E402

MiB = 1 << 20


def _ms(func: Callable[[], object]) -> float:
    start = time.perf_counter()
    func()
    return (time.perf_counter() - start) * 1000


def _sha256_file(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def _write_payload(directory: Path, size_mb: int) -> None:
    # Random bytes (incompressible, like binaries) in four files, written in
    # 1 MiB steps so generating them needs no big buffer either.
    (directory / "bin").mkdir(parents=True)
    for index in range(4):
        with open(directory / "bin" / f"part{index}.bin", "wb") as out:
            for _ in range(max(1, size_mb // 4)):
                out.write(os.urandom(MiB))


def _bundle(src: Path, out: Path, pki: Pki) -> Path:
    create_bundle(
        src,
        product="themisdb",
        version="1.0.0",
        key_path=pki.leaf.key,
        cert_path=pki.leaf.cert,
        chain_path=pki.chain,
        out_path=out,
    )
    return out


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size-mb", type=int, default=200)
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=5, help="large-bundle timing repeats")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="themis-bench-") as tmp:
        work = Path(tmp)
        pki = make_pki(work / "pki")
        src = work / "src"
        _write_payload(src, args.size_mb)
        bundle = _bundle(src, work / "bundle.tar", pki)
        zst = _bundle(src, work / "bundle.tar.zst", pki)

        anchors = load_trust_anchors(pki.root)
        manifest_bytes, signature = read_manifest(bundle)
        samples = [
            _ms(lambda: verify_manifest_signature(manifest_bytes, signature, anchors))
            for _ in range(args.runs)
        ]
        print(
            f"signature verification (leaf + intermediate), median of {args.runs}: "
            f"{statistics.median(samples):.2f} ms  (target <= 5 ms, requirement <= 50 ms)"
        )

        state = work / "state"
        state.mkdir()
        runs: dict[str, list[float]] = {"sha256": [], "verify": [], "stage": [], "zstd": []}
        _sha256_file(bundle)  # warm the page cache
        for _ in range(args.repeats):  # interleaved, so load changes hit all alike
            runs["sha256"].append(_ms(lambda: _sha256_file(bundle)))
            runs["verify"].append(_ms(lambda: verify_bundle(bundle, trust_anchor=pki.root)))
            runs["stage"].append(
                _ms(
                    lambda: verify_bundle(
                        bundle, trust_anchor=pki.root, state_dir=state, stage=True
                    ).cleanup()
                )
            )
            runs["zstd"].append(_ms(lambda: verify_bundle(zst, trust_anchor=pki.root)))
        med = {name: statistics.median(values) for name, values in runs.items()}
        best = {name: min(values) for name, values in runs.items()}
        size = bundle.stat().st_size
        print(f"bundle: {size / 1e6:.0f} MB tar, median of {args.repeats} interleaved runs")
        print(f"  hashlib.file_digest sha256:     {med['sha256']:8.1f} ms "
              f"({size / 1e3 / med['sha256']:.0f} MB/s)")  # fmt: skip
        print(f"  verify_bundle (hash, discard):  {med['verify']:8.1f} ms  "
              f"ratio {med['verify'] / med['sha256']:.3f}  (aim <= 1.15; "
              f"best-of-runs ratio {best['verify'] / best['sha256']:.3f})")  # fmt: skip
        print(f"  verify_bundle (stage to disk):  {med['stage']:8.1f} ms  "
              f"ratio {med['stage'] / med['sha256']:.3f}")  # fmt: skip
        print(f"  verify_bundle (.tar.zst, {zst.stat().st_size / 1e6:.0f} MB): "
              f"{med['zstd']:8.1f} ms  ratio {med['zstd'] / med['sha256']:.3f}")  # fmt: skip
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(f"  peak RSS of this process: {peak:.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
