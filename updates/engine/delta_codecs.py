"""Delta algorithms behind the patch container (see `delta.py`).

Each codec turns (old, new) into a payload and back.  The payloads are the
algorithms' own formats, so an extracted payload applies with the reference
tools: `bspatch` for bsdiff4, `zstd -d --long=27 --patch-from=OLD` for zstd.

Why three (measured by `bench/delta/run.py` on a 100 MB ELF release pair):

* hdiffpatch: the smallest patch (smaller than bsdiff's), ~5x faster to diff
  than bsdiff and applies in ~0.2 s; the default.
* zstd with the old file as prefix and long-distance matching: larger patches
  but linear-time diff with bounded memory, so it takes over for big files.
* bsdiff4: for receivers that only have `bspatch`; never chosen by `auto`
  because hdiffpatch beats it on size, diff time and apply time.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Protocol

import bsdiff4
import pyzstd

MIB = 1 << 20

# Rough costs per byte of max(old, new) on a 2-core dev VM, used by `auto`.
HDIFF_MEMORY_PER_BYTE = 7.0  # suffix array over old + old/new in memory
HDIFF_SECONDS_PER_MIB = 0.25
BSDIFF_MEMORY_PER_BYTE = 18.0
BSDIFF_SECONDS_PER_MIB = 0.65
DEFAULT_MEMORY_BUDGET = 1 << 30
DEFAULT_TIME_BUDGET = 60.0


class CodecError(Exception):
    """A payload the codec cannot decode (corrupt, or made for another base)."""


class Codec(Protocol):
    name: str
    code: int

    def diff(self, old: bytes, new: bytes) -> tuple[bytes, int]:
        """Return (payload, param); `param` is stored in the header for `patch`."""
        ...

    def patch(self, old: bytes, payload: bytes, param: int) -> bytes: ...


class Bsdiff4Codec:
    name = "bsdiff4"
    code = 1

    def diff(self, old: bytes, new: bytes) -> tuple[bytes, int]:
        # bsdiff4 writes the classic BSDIFF40 layout (bz2 streams), which is
        # exactly what Debian's bspatch reads.
        return bsdiff4.diff(old, new), 0

    def patch(self, old: bytes, payload: bytes, param: int) -> bytes:
        try:
            return bytes(bsdiff4.patch(old, payload))
        except Exception as err:  # untrusted input: any decoder failure means "corrupt"
            raise CodecError(f"bsdiff4 payload does not decode: {err}") from err


def zstd_window_log(old_size: int, new_size: int) -> int:
    """The window the zstd CLI picks for --patch-from: it must cover the whole old file."""
    return max(10, min(31, max(old_size, new_size, 1).bit_length()))


def zstd_level(size: int) -> int:
    """Level by size, measured: above ~32 MiB the optimal parsers (levels 16+)
    make *larger* patches with long-distance matching (100 MB pair: level 15
    gives 1.5 MB in 21 s, level 19 gives 4.7 MB in 32 s), and level 15 costs
    ~0.2 s/MiB, so very large files drop to level 12 (~0.03 s/MiB)."""
    if size <= 32 * MIB:
        return 19
    if size <= 256 * MIB:
        return 15
    return 12


class ZstdCodec:
    name = "zstd"
    code = 2

    def diff(self, old: bytes, new: bytes) -> tuple[bytes, int]:
        window = zstd_window_log(len(old), len(new))
        options: dict[int, int] = {
            pyzstd.CParameter.compressionLevel: zstd_level(max(len(old), len(new))),
            pyzstd.CParameter.enableLongDistanceMatching: 1,
            pyzstd.CParameter.windowLog: window,
            pyzstd.CParameter.checksumFlag: 1,
        }
        # The old file as a raw-content *prefix* (not a trained dictionary) is
        # what `zstd --patch-from` does; it gives the CLI's patch sizes.
        return pyzstd.compress(new, level_or_option=options, zstd_dict=_prefix(old)), window

    def patch(self, old: bytes, payload: bytes, param: int) -> bytes:
        try:
            return pyzstd.decompress(
                payload, zstd_dict=_prefix(old), option={pyzstd.DParameter.windowLogMax: 31}
            )
        except Exception as err:  # untrusted input: any decoder failure means "corrupt"
            raise CodecError(f"zstd payload does not decode: {err}") from err


def _prefix(old: bytes) -> tuple[pyzstd.ZstdDict, int] | None:
    # zstd refuses dictionaries under 8 bytes; such a base is worthless as a
    # reference anyway, so both sides then use a plain frame (the base's size
    # is verified before decoding, so they always agree).
    if len(old) < 8:
        return None
    return pyzstd.ZstdDict(old, is_raw=True).as_prefix


class HDiffPatchCodec:
    name = "hdiffpatch"
    code = 3

    def diff(self, old: bytes, new: bytes) -> tuple[bytes, int]:
        import hdiffpatch

        # zstd inside: the payload is tiny, so the codec barely matters for
        # size, and zstd decodes fastest.  big_cache_match trades ~1 byte per
        # old byte of memory for a faster match search; output is identical.
        config = hdiffpatch.ZStdConfig(level=19, window=23)
        payload = hdiffpatch.diff(
            old, new, compression=config, validate=False, big_cache_match=True
        )
        return payload, 0

    def patch(self, old: bytes, payload: bytes, param: int) -> bytes:
        import hdiffpatch

        try:
            return hdiffpatch.apply(old, payload)
        except Exception as err:  # untrusted input: any decoder failure means "corrupt"
            raise CodecError(f"hdiffpatch payload does not decode: {err}") from err


CODECS: dict[str, Codec] = {c.name: c for c in (Bsdiff4Codec(), ZstdCodec(), HDiffPatchCodec())}
BY_CODE: dict[int, Codec] = {c.code: c for c in CODECS.values()}


def hdiffpatch_available() -> bool:
    return importlib.util.find_spec("hdiffpatch") is not None


@dataclass(frozen=True)
class Budget:
    memory: int = DEFAULT_MEMORY_BUDGET
    seconds: float = DEFAULT_TIME_BUDGET


def choose_algorithm(old_size: int, new_size: int, budget: Budget | None = None) -> str:
    """Pick the algorithm for `auto`: the smallest patch that fits the budget.

    hdiffpatch while its suffix array fits the memory budget; bsdiff4 for
    small files only if hdiffpatch is missing; otherwise zstd, whose memory
    is about old + new + window and whose time is linear.
    """
    budget = budget or Budget()
    size = max(old_size, new_size)
    if hdiffpatch_available() and _fits(size, HDIFF_MEMORY_PER_BYTE, HDIFF_SECONDS_PER_MIB, budget):
        return "hdiffpatch"
    if not hdiffpatch_available() and _fits(
        size, BSDIFF_MEMORY_PER_BYTE, BSDIFF_SECONDS_PER_MIB, budget
    ):
        return "bsdiff4"
    return "zstd"


def _fits(size: int, memory_per_byte: float, seconds_per_mib: float, budget: Budget) -> bool:
    return (
        size * memory_per_byte <= budget.memory and size / MIB * seconds_per_mib <= budget.seconds
    )
