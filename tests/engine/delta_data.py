"""Test data for the delta tests: small structured "binaries" and releases of them."""

from __future__ import annotations

import random
import struct


def structured(seed: int, size: int) -> bytes:
    """ELF-ish bytes: little-endian records with addresses, names and padding."""
    rng = random.Random(seed)
    out = bytearray()
    address = 0x400000
    while len(out) < size:
        address += rng.choice((8, 16, 24, 64))
        name = f"sym_{rng.randrange(400)}".encode()
        out += struct.pack("<QII", address, rng.randrange(64), len(name)) + name + b"\0" * 7
    return bytes(out[:size])


def mutate(data: bytes, seed: int) -> bytes:
    """A new release: shifted pointers in one region, a few edits, an append."""
    rng = random.Random(seed)
    new = bytearray(data)
    start = len(new) // 3 & ~7
    for off in range(start, min(len(new) - 8, start + 2048), 24):
        (value,) = struct.unpack_from("<Q", new, off)
        struct.pack_into("<Q", new, off, (value + 0x40) % (1 << 64))
    for _ in range(5):
        pos = rng.randrange(len(new))
        new[pos:pos] = rng.randbytes(rng.randint(1, 64))
    return bytes(new + rng.randbytes(300))
