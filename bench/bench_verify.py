"""Benchmark bundle verification (issue 3).

    .venv/bin/python bench/bench_verify.py [--size-mb 200] [--runs 200]

1. Manifest signature verification (leaf + intermediate chain): median ms.
   Target <= 5 ms, requirement <= 50 ms.
2. Whole-bundle verification of a large payload, as a ratio to plain
   hashlib.sha256 over the same bundle bytes in the same run (one pass over
   the data; target <= 1.15). Memory stays bounded: everything streams.
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
from updates.engine.devpki import make_pki  # noqa: E402

CHUNK = 1 << 20


def _median_ms(func: Callable[[], object], runs: int) -> float:
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        func()
        samples.append((time.perf_counter() - start) * 1000)
    return statistics.median(samples)


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _write_payload(directory: Path, size_mb: int) -> None:
    (directory / "bin").mkdir(parents=True)
    # Random data in a few files; incompressible like real binaries.
    per_file = max(1, size_mb // 4)
    for index in range(4):
        with open(directory / "bin" / f"part{index}.bin", "wb") as out:
            for _ in range(per_file):
                out.write(os.urandom(CHUNK))


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size-mb", type=int, default=200)
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=5, help="large-bundle timing repeats")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="themis-bench-") as tmp:
        work = Path(tmp)
        pki = make_pki(work / "pki")
        anchors = load_trust_anchors(pki.root)
        src = work / "src"
        _write_payload(src, args.size_mb)
        bundle = work / "bundle.tar"
        create_bundle(
            src,
            product="themisdb",
            version="1.0.0",
            key_path=pki.leaf.key,
            cert_path=pki.leaf.cert,
            chain_path=pki.chain,
            out_path=bundle,
        )
        manifest_bytes, signature = read_manifest(bundle)

        sig_ms = _median_ms(
            lambda: verify_manifest_signature(manifest_bytes, signature, anchors), args.runs
        )
        print(f"signature verification (leaf + intermediate), median of {args.runs}: "
              f"{sig_ms:.2f} ms  (target <= 5 ms, requirement <= 50 ms)")

        size = bundle.stat().st_size
        _sha256_file(bundle)  # warm the page cache so both sides read from memory
        base, full, staged = [], [], []
        state = work / "state"
        state.mkdir()
        for _ in range(args.repeats):
            base.append(_median_ms(lambda: _sha256_file(bundle), 1))
            full.append(_median_ms(lambda: verify_bundle(bundle, trust_anchor=pki.root), 1))
            staged.append(
                _median_ms(
                    lambda: verify_bundle(
                        bundle, trust_anchor=pki.root, state_dir=state, stage=True
                    ).cleanup(),
                    1,
                )
            )
        base_ms, full_ms, staged_ms = (statistics.median(x) for x in (base, full, staged))
        mb = size / 1e6
        print(f"bundle: {mb:.0f} MB, median of {args.repeats} runs each")
        print(f"  hashlib.sha256 over the bundle: {base_ms:8.1f} ms  ({mb / base_ms * 1000:6.0f} MB/s)")
        print(f"  verify_bundle (hash, discard):  {full_ms:8.1f} ms  ratio {full_ms / base_ms:.3f}"
              "  (aim <= 1.15)")
        print(f"  verify_bundle (stage to disk):  {staged_ms:8.1f} ms  ratio {staged_ms / base_ms:.3f}")
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(f"  peak RSS of this process: {peak:.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
