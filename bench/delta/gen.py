"""Reproducible generator of a realistic binary release pair (old, new).

`old` is real ELF files from this machine (/usr/bin, /usr/lib/x86_64-linux-gnu)
concatenated to the requested size; `new` is `old` with what a rebuild of a
large binary typically changes, driven by a fixed seed:

* relocation-like edits: in scattered 64 KiB chunks, 4-byte little-endian
  fields at a fixed stride shift by one per-chunk constant (code moved, so
  every pointer into it moved by the same amount);
* 200 scattered edits of 16-4096 bytes (replace, insert or delete);
* a few blocks of 256 KiB-1 MiB moved elsewhere (functions reordered);
* 1 MiB appended, taken from ELF files that are not in `old` (new code).

About 2 % of the bytes change.  The file list is sorted and shuffled with the
seed, so the same machine gives the same pair; `describe()` prints the SHA-256
of both files so a run can be compared with another.

    python bench/delta/gen.py --size-mb 20 --out var/bench-delta
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SOURCE_DIRS = (Path("/usr/bin"), Path("/usr/lib/x86_64-linux-gnu"))
MAX_MEMBER = 16 << 20  # skip giant libraries so the mix stays varied
CHUNK = 64 << 10
EDITS = 200
MOVES = 4
APPEND = 1 << 20
RELOC_FRACTION = 0.01  # share of bytes touched by relocation-like shifts


@dataclass(frozen=True)
class Pair:
    old: Path
    new: Path
    old_sha256: str
    new_sha256: str
    changed_fraction: float


def elf_files(seed: int) -> list[Path]:
    """Regular ELF files from the source dirs in a seed-determined order."""
    found: list[Path] = []
    for directory in SOURCE_DIRS:
        for path in sorted(directory.glob("*")):
            if _is_elf(path):
                found.append(path)
    random.Random(seed).shuffle(found)
    return found


def _is_elf(path: Path) -> bool:
    try:
        if path.is_symlink() or not path.is_file():
            return False
        if not 4096 <= path.stat().st_size <= MAX_MEMBER:
            return False
        with path.open("rb") as fh:
            return fh.read(4) == b"\x7fELF"
    except OSError:
        return False


def concat(files: list[Path], size: int, start: int = 0) -> tuple[bytearray, int]:
    """Concatenate files from index `start` until `size` bytes; returns the next index."""
    out = bytearray()
    index = start
    while len(out) < size:
        out += files[index % len(files)].read_bytes()
        index += 1
    del out[size:]
    return out, index


def relocate(data: bytearray, rng: random.Random, size: int) -> None:
    """Shift 4-byte fields at a stride in scattered 64 KiB chunks by a per-chunk constant."""
    chunks = max(1, int(size * RELOC_FRACTION / (CHUNK / 4)))  # stride 16 touches 1/4 of a chunk
    for _ in range(chunks):
        base = rng.randrange(0, len(data) - CHUNK) & ~0xF
        shift = rng.choice((0x40, 0x80, 0x1000, 0x2000, -0x40, -0x1000))
        for off in range(base, base + CHUNK, 16):
            (value,) = struct.unpack_from("<I", data, off)
            struct.pack_into("<I", data, off, (value + shift) & 0xFFFFFFFF)


def edit(data: bytearray, rng: random.Random) -> None:
    """200 scattered replace / insert / delete edits of 16-4096 random bytes."""
    for _ in range(EDITS):
        length = rng.randint(16, 4096)
        pos = rng.randrange(0, len(data) - length)
        kind = rng.choice(("replace", "replace", "insert", "delete"))
        if kind == "replace":
            data[pos : pos + length] = rng.randbytes(length)
        elif kind == "insert":
            data[pos:pos] = rng.randbytes(length)
        else:
            del data[pos : pos + length]


def move_blocks(data: bytearray, rng: random.Random) -> None:
    for _ in range(MOVES):
        length = rng.randint(256 << 10, 1 << 20)
        src = rng.randrange(0, len(data) - length)
        block = bytes(data[src : src + length])
        del data[src : src + length]
        dst = rng.randrange(0, len(data))
        data[dst:dst] = block


def make_pair(size_mb: int, out_dir: Path, seed: int = 5) -> Pair:
    """Write `old-<N>m.bin` and `new-<N>m.bin` under `out_dir` (reused if present)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{size_mb}m-s{seed}"
    old_path, new_path = out_dir / f"old-{stem}.bin", out_dir / f"new-{stem}.bin"
    meta_path = out_dir / f"pair-{stem}.json"
    if old_path.exists() and new_path.exists() and meta_path.exists():
        return Pair(old=old_path, new=new_path, **json.loads(meta_path.read_text()))
    size = size_mb << 20
    files = elf_files(seed)
    rng = random.Random(seed * 1000 + size_mb)
    old, next_index = concat(files, size)
    new = bytearray(old)
    relocate(new, rng, size)
    edit(new, rng)
    move_blocks(new, rng)
    appended, _ = concat(files, APPEND, start=next_index)
    new += appended
    old_path.write_bytes(old)
    new_path.write_bytes(new)
    meta: dict[str, Any] = {
        "old_sha256": hashlib.sha256(old).hexdigest(),
        "new_sha256": hashlib.sha256(new).hexdigest(),
        "changed_fraction": _changed_fraction(size),
    }
    meta_path.write_text(json.dumps(meta, indent=2))
    return Pair(old=old_path, new=new_path, **meta)


def _changed_fraction(size: int) -> float:
    """Bytes changed by construction (relocations + edits + append), as a fraction of size."""
    reloc = max(1, int(size * RELOC_FRACTION / (CHUNK / 4))) * CHUNK // 4
    edits = EDITS * (16 + 4096) // 2
    return round((reloc + edits + APPEND) / size, 4)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=20)
    parser.add_argument("--out", type=Path, default=Path("var/bench-delta"))
    parser.add_argument("--seed", type=int, default=5)
    args = parser.parse_args()
    pair = make_pair(args.size_mb, args.out, args.seed)
    print(json.dumps({k: str(v) for k, v in pair.__dict__.items()}, indent=2))


if __name__ == "__main__":
    main()
