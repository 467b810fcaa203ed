"""Path rules for everything a bundle names (DESIGN.md, verification step 3).

A manifest path is a *relative POSIX path* that lands inside the target on
every platform and every filesystem we might meet, so it must not need any
interpretation: no `.`/`..`, no drive letters or backslashes (Windows), no
control characters (terminals, logs), NFC-normal (macOS would normalise it and
make two listed names one file), bounded length and depth.
"""

from __future__ import annotations

import os
import re
import stat
import unicodedata
from pathlib import Path

from .errors import UnsafePath

MAX_PATH_BYTES = 4096
MAX_SEGMENT_BYTES = 255
MAX_DEPTH = 32

_DRIVE = re.compile(r"^[A-Za-z]:")
# Bidirectional overrides make a name display differently from what it is.
_BIDI_CONTROLS = frozenset(
    "\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"
)


def path_problem(path: object) -> str | None:
    """Why `path` is not a safe manifest path, or None when it is."""
    if not isinstance(path, str):
        return f"must be a string, not {type(path).__name__}"
    if not path:
        return "is empty"
    problem = _character_problem(path)
    if problem:
        return problem
    if path.startswith("/"):
        return "is absolute"
    if _DRIVE.match(path):
        return "has a drive prefix"
    if path.endswith("/"):
        return "has a trailing slash"
    if len(path.encode("utf-8")) > MAX_PATH_BYTES:
        return f"is longer than {MAX_PATH_BYTES} bytes"
    return _segments_problem(path.split("/"))


def _character_problem(path: str) -> str | None:
    if "\\" in path:
        return "contains a backslash"
    for char in path:
        category = unicodedata.category(char)
        # Cc: NUL and other controls; Cs: lone surrogates (undecodable bytes).
        if category in ("Cc", "Cs") or char in _BIDI_CONTROLS:
            return f"contains the control character {char!r}"
    if not unicodedata.is_normalized("NFC", path):
        return "is not NFC-normalised"
    return None


def _segments_problem(segments: list[str]) -> str | None:
    if len(segments) > MAX_DEPTH:
        return f"is deeper than {MAX_DEPTH} segments"
    for segment in segments:
        if segment == "":
            return "has an empty segment"
        if segment in (".", ".."):
            return f"has a {segment!r} segment"
        if len(segment.encode("utf-8")) > MAX_SEGMENT_BYTES:
            return f"has a segment longer than {MAX_SEGMENT_BYTES} bytes"
    return None


def is_safe_path(path: object) -> bool:
    """True if `path` may appear in a manifest's `files` or `remove`."""
    return path_problem(path) is None


def require_safe_path(path: object, where: str) -> str:
    """Return `path` if safe, else raise UnsafePath naming `where` and why."""
    problem = path_problem(path)
    if problem is not None:
        raise UnsafePath(f"{where}: {path!r} {problem}")
    assert isinstance(path, str)
    return path


def collision_key(path: str) -> str:
    """The name a case-insensitive, normalising filesystem would see.

    Two paths with the same key would be one file on macOS or Windows, so a
    bundle listing both is ambiguous and rejected.
    """
    return unicodedata.normalize("NFC", unicodedata.normalize("NFC", path).casefold())


def check_no_symlink_components(target_dir: Path, relpath: str) -> None:
    """Raise UnsafePath if any existing component of `target_dir/relpath` is a
    symlink (apply time: a symlink planted in the target could redirect a write
    outside it). Components that do not exist yet are fine; `target_dir`
    itself is the operator's choice and is not checked.
    """
    require_safe_path(relpath, "path")
    current = Path(target_dir)
    for segment in relpath.split("/"):
        current = current / segment
        try:
            mode = os.lstat(current).st_mode
        except FileNotFoundError:
            return
        if stat.S_ISLNK(mode):
            raise UnsafePath(f"target: {str(current)!r} is a symlink (while placing {relpath!r})")
