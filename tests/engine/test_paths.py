"""Path rules: examples, properties (hypothesis), member names, symlinks."""

from __future__ import annotations

import os
import posixpath
import unicodedata
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from updates.engine.errors import ManifestInvalid, UnsafePath
from updates.engine.extract import BundleReader, _header_names_agree
from updates.engine.manifest import ManifestFile
from updates.engine.paths import (
    MAX_DEPTH,
    MAX_PATH_BYTES,
    MAX_SEGMENT_BYTES,
    check_no_symlink_components,
    collision_key,
    is_safe_path,
    path_problem,
    require_safe_path,
)


@pytest.mark.parametrize(
    "path",
    ["bin/themisd", "a", "lib/libthemis.so.1.7", "share/名前/ünï.txt", "a b/c-d_e~f",
     ".hidden/.x", "..a/b..", "x" * MAX_SEGMENT_BYTES, "/".join(["d"] * MAX_DEPTH)],
)  # fmt: skip
def test_safe_paths(path: str) -> None:
    assert is_safe_path(path), path_problem(path)


@pytest.mark.parametrize(
    "path",
    ["", "/etc/passwd", "../x", "a/../b", "a/..", "./a", "a/./b", "a//b", "a/", "/",
     "a\\b", "C:/x", "c:x", "a/\x00b", "a\nb", "a\x7fb", "a\u202eb", "\ud800",
     unicodedata.normalize("NFD", "é"), "x" * (MAX_SEGMENT_BYTES + 1),
     "/".join(["d"] * (MAX_DEPTH + 1)), ("d" * 200 + "/") * 21 + "x", None, 7, b"a"],
)  # fmt: skip
def test_unsafe_paths(path: object) -> None:
    assert not is_safe_path(path)
    with pytest.raises(UnsafePath, match="where"):
        require_safe_path(path, "where")


# A segment alphabet that includes the dangerous characters on purpose.
_segment = st.text(
    alphabet=st.sampled_from(list("abcXYZ09._-~ é\u0301/\\:\x00\n\u202e")), min_size=0, max_size=12
)
_paths = st.one_of(st.lists(_segment, min_size=1, max_size=6).map("/".join), st.text(max_size=40))


@settings(max_examples=200, deadline=None)
@given(_paths)
def test_safe_paths_stay_inside_any_root(path: str) -> None:
    if not is_safe_path(path):
        return
    # Lexically: no normalisation changes it, nothing climbs out.
    assert posixpath.normpath(path) == path
    assert not posixpath.isabs(path) and ".." not in path.split("/")
    assert "\\" not in path and "\x00" not in path
    assert unicodedata.is_normalized("NFC", path)
    assert len(path.encode()) <= MAX_PATH_BYTES and path.count("/") < MAX_DEPTH
    root = "/srv/target"
    joined = os.path.normpath(os.path.join(root, path))
    assert joined.startswith(root + "/")


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(["a", "b", ".", "..", ""]), min_size=1, max_size=5))
def test_any_dot_or_empty_segment_is_unsafe(segments: list[str]) -> None:
    path = "/".join(segments)
    has_bad = any(s in (".", "..", "") for s in segments)
    assert is_safe_path(path) is not has_bad


@settings(max_examples=200, deadline=None)
@given(st.text(min_size=1, max_size=20), st.text(alphabet="abcXYZ/", min_size=1, max_size=20))
def test_collision_key_is_idempotent_and_case_blind(path: str, ascii_path: str) -> None:
    key = collision_key(path)
    assert collision_key(key) == key
    assert collision_key(unicodedata.normalize("NFD", path)) == key
    assert collision_key(ascii_path.upper()) == collision_key(ascii_path.lower())


class _FakeMember:
    def __init__(self, name: str) -> None:
        self.name = name
        self.header_name = name
        self.type = b"0"
        self.sparse = None
        self.mode = 0o644
        self.size = 1


@settings(max_examples=200, deadline=None)
@given(_paths)
def test_member_names_outside_payload_or_unsafe_are_unsafe_path(rel: str) -> None:
    """Whatever the name, a member either maps to a listed, safe manifest path
    or is refused; an unsafe or outside name is always exit 11."""
    expected = {"payload/bin/themisd": ManifestFile("bin/themisd", 1, "0" * 64, 0o644)}
    for name in (rel, "payload/" + rel):
        member = _FakeMember(name)
        try:
            entry = BundleReader._check_member(None, member, expected, {})  # type: ignore[arg-type]  # no reader, a stand-in member
        except UnsafePath:
            assert not name.startswith("payload/") or not is_safe_path(name[8:])
        except ManifestInvalid:
            assert name.startswith("payload/") and is_safe_path(name[8:])
        else:
            assert name == "payload/bin/themisd" and entry is expected[name]


@pytest.mark.parametrize(
    ("header", "name", "agree"),
    [
        ("payload/a", "payload/a", True),
        ("", "payload/a", True),
        ("payload/a", "payload/b", False),
        ("payload/a", "payload/ab", False),  # short enough for ustar: must be exact
        ("payload/" + "x" * 92, "payload/" + "x" * 150, True),  # truncated long name
        ("payload/??.so", "payload/ñé.so", True),  # Python's pax writer
        ("payload/??.so", "payload/../x", False),
    ],
)
def test_pax_header_name_agreement(header: str, name: str, agree: bool) -> None:
    assert _header_names_agree(header, name) is agree


def test_check_no_symlink_components(tmp_path: Path) -> None:
    target = tmp_path / "target"
    (target / "bin").mkdir(parents=True)
    (target / "bin" / "themisd").write_text("x")
    check_no_symlink_components(target, "bin/themisd")
    check_no_symlink_components(target, "new/dir/file")  # not there yet: fine
    (target / "lib").symlink_to(tmp_path)
    with pytest.raises(UnsafePath, match="symlink"):
        check_no_symlink_components(target, "lib/libthemis.so")
    (target / "bin" / "link").symlink_to("/etc/passwd")
    with pytest.raises(UnsafePath, match="symlink"):
        check_no_symlink_components(target, "bin/link")
    with pytest.raises(UnsafePath, match="'..' segment"):
        check_no_symlink_components(target, "../etc/passwd")
