"""Lean restore point benchmark (plain script):

    .venv/bin/python bench/bench_restore.py [--scale 1.0] [--files 40] [--dir DIR]

A node has release 1.0 installed: 500 MB (x scale) in FILES files of real ELF bytes
from this machine (bench/delta/gen.py). Release 2.0 (a full, signed bundle) changes
10 % of it: 10 % of the files, three quarters of them rebuilt (relocations, scattered
edits, moved blocks: what a new build of a binary looks like) and one quarter rewritten
with other content; the rest is byte for byte the same.

The apply makes its restore point; printed: the point's disk use (restore.DiskUse:
bytes only the points hold) against a full copy of the installed files, the ratio
(requirement: <= 0.20) and, as the baseline, what a point made the way points were
made before lean storage holds after the same update: every replaced file's old inode
(measured: the blocks of the installed files the bundle replaces); how the point stores
the files, the time the apply spent making it, and a rollback checked byte for byte.
"""

from __future__ import annotations

import argparse
import hashlib
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.delta import gen  # noqa: E402
from updates.engine.apply import apply_bundle, rollback  # noqa: E402
from updates.engine.bundle import create_bundle  # noqa: E402
from updates.engine.devpki import make_pki  # noqa: E402
from updates.engine.restore import create_point, load_point, points_disk_usage  # noqa: E402

TOTAL = 500 << 20
CHANGED_SHARE = 0.10
REQUIREMENT = 0.20


def build_releases(old_dir: Path, new_dir: Path, total: int, files: int) -> dict[str, int]:
    """1.0 in old_dir, 2.0 in new_dir; returns counts of unchanged/rebuilt/rewritten."""
    sources = gen.elf_files(seed=5)
    size = total // files
    changed = max(1, round(files * CHANGED_SHARE))
    rewritten = max(1, changed // 4)
    rng = random.Random(17)
    index = 0
    counts = {"unchanged": 0, "rebuilt": 0, "rewritten": 0}
    for n in range(files):
        rel = f"lib/part{n:03d}.so" if n else "bin/themisd"
        old, index = gen.concat(sources, size, start=index)
        if n < changed - rewritten:
            new = bytearray(old)
            gen.relocate(new, rng, size)
            gen.edit(new, rng)
            if size >= 4 << 20:  # its blocks are 256 KiB-1 MiB
                gen.move_blocks(new, rng)
            kind = "rebuilt"
        elif n < changed:
            new, index = gen.concat(sources, size, start=index)
            kind = "rewritten"
        else:
            new = old
            kind = "unchanged"
        counts[kind] += 1
        for root, data in ((old_dir, old), (new_dir, new)):
            path = root / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            path.chmod(0o755 if rel.startswith("bin/") else 0o644)
    return counts


def tree_digest(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(root)).encode() + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
        digest.update(oct(path.stat().st_mode & 0o7777).encode())
    return digest.hexdigest()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=1.0, help="of 500 MB (default 1.0)")
    parser.add_argument("--files", type=int, default=40, help="files in a release (default 40)")
    parser.add_argument("--dir", type=Path, default=None, help="work dir (default: /var/tmp)")
    args = parser.parse_args()
    total = int(TOTAL * args.scale)
    work = Path(tempfile.mkdtemp(prefix="bench-restore-", dir=args.dir or "/var/tmp"))
    try:
        return run(work, total, args.files)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run(work: Path, total: int, files: int) -> int:
    target, state, new_src = work / "target", work / "state", work / "src-2.0"
    started = time.perf_counter()
    counts = build_releases(target, new_src, total, files)
    pki = make_pki(work / "pki")
    bundle = work / "themisdb-2.0.tar"
    create_bundle(
        new_src,
        product="themisdb",
        version="2.0",
        key_path=pki.leaf.key,
        cert_path=pki.leaf.cert,
        chain_path=pki.chain,
        out_path=bundle,
    )
    before = tree_digest(target)
    installed = sum(p.stat().st_size for p in target.rglob("*") if p.is_file())
    # Baseline: before lean storage a point kept every replaced file's old inode, which
    # the switch leaves to the point alone (the bundle replaces every file here).
    baseline = sum(p.stat().st_blocks * 512 for p in target.rglob("*") if p.is_file())
    print(
        f"restore point for an update changing {CHANGED_SHARE:.0%} of {installed >> 20} MiB:"
        f" {files} files, {counts['rebuilt']} rebuilt, {counts['rewritten']} rewritten,"
        f" {counts['unchanged']} unchanged (set-up {time.perf_counter() - started:.1f} s)"
    )
    # The time a point took to make before lean storage (hardlinks, every old file hashed:
    # these were not installed by the engine, so no hash is known), thrown away at once.
    paths = sorted(str(p.relative_to(target)) for p in target.rglob("*") if p.is_file())
    begun = time.perf_counter()
    create_point(
        target,
        work / "state-baseline",
        replaced=paths,
        removed=[],
        version="1.0",
        to_version="2.0",
        product="themisdb",
        txid="baseline00000000",
        lean=False,
    )
    baseline_ms = (time.perf_counter() - begun) * 1000
    shutil.rmtree(work / "state-baseline")
    result = apply_bundle(bundle, target=target, state_dir=state, trust_anchor=pki.root)
    point = load_point(state, result.restore_point)
    held = points_disk_usage(state)
    ratio = held / installed
    verdict = "PASS" if ratio <= REQUIREMENT else "FAIL"
    print(f"full copy of the installed files:        {installed:>12,} B")
    print(
        f"restore point on disk (lean):            {held:>12,} B"
        f"  ratio to a full copy {ratio:.4f} (requirement <= {REQUIREMENT:.2f}: {verdict})"
    )
    print(
        f"point as made before lean storage:       {baseline:>12,} B"
        f"  ratio to a full copy {baseline / installed:.4f}"
        f"  (lean / baseline {held / baseline:.4f})"
    )
    kinds: dict[str, list[int]] = {}
    for entry in point.files:
        slot = kinds.setdefault(entry.storage, [0, 0, 0])
        slot[0] += 1
        slot[1] += entry.size
        slot[2] += entry.stored_size if entry.stored_size is not None else 0
    for kind, (count, content, stored) in sorted(kinds.items()):
        kept = f", stored in {stored:,} B" if stored else " (hardlinks)"
        print(f"  {kind:5s} {count:3d} files, {content:>12,} B of old bytes{kept}")
    print(
        f"point made in {result.durations_ms['restore_point']:.0f} ms"
        f" (whole apply {result.durations_ms['total']:.0f} ms); before lean storage:"
        f" {baseline_ms:.0f} ms (both hash every old file: not installed by the engine)"
    )
    started = time.perf_counter()
    rollback(target=target, state_dir=state)
    seconds = time.perf_counter() - started
    same = tree_digest(target) == before
    print(f"rollback from it: {seconds * 1000:.0f} ms, byte for byte: {'yes' if same else 'NO'}")
    return 0 if verdict == "PASS" and same else 1


if __name__ == "__main__":
    sys.exit(main())
