"""install.py primitives at their edges."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from updates.engine import install
from updates.engine.errors import UnsafePath


def test_place_file_when_dest_already_is_the_staged_inode(tmp_path: Path) -> None:
    staged = tmp_path / "staged"
    staged.write_bytes(b"new")
    dest = tmp_path / "t" / "bin"
    dest.parent.mkdir()
    os.link(staged, dest)
    assert install.place_file(staged, dest, 0o750, "tok", link=True)
    assert sorted(os.listdir(dest.parent)) == ["bin"]  # no temp name left behind
    assert os.stat(dest).st_mode & 0o777 == 0o750


def test_place_file_copies_across_devices(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src, dest = tmp_path / "src", tmp_path / "dest"
    src.write_bytes(b"x" * 100_000)
    dest.write_bytes(b"old")

    def exdev(*a: object, **kw: object) -> None:
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", exdev)
    assert not install.place_file(src, dest, 0o644, "tok", link=True)
    assert dest.read_bytes() == src.read_bytes()
    assert os.stat(dest).st_ino != os.stat(src).st_ino


def test_copy_fd_falls_back_to_read_write(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def nosys(*a: object) -> int:
        raise OSError(errno.ENOSYS, "not implemented")

    monkeypatch.setattr(os, "copy_file_range", nosys)
    src, dst = tmp_path / "a", tmp_path / "b"
    src.write_bytes(os.urandom(300_000))
    assert install.copy_file(src, dst) == 300_000
    assert dst.read_bytes() == src.read_bytes()


def test_failed_rename_leaves_no_temp(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.write_bytes(b"x")
    dest = tmp_path / "dir-in-the-way"
    (dest / "inner").mkdir(parents=True)
    with pytest.raises(IsADirectoryError):
        install.place_file(src, dest, 0o644, "tok", link=False)
    assert sorted(os.listdir(tmp_path)) == ["dir-in-the-way", "src"]


def test_ensure_parents_refuses_a_file_in_the_way(tmp_path: Path) -> None:
    (tmp_path / "lib").write_bytes(b"not a dir")
    with pytest.raises(UnsafePath, match="not a directory"):
        install.ensure_parents(tmp_path, "lib/x.so")


def test_remove_empty_dirs_keeps_non_empty_ones(tmp_path: Path) -> None:
    (tmp_path / "a/b/c").mkdir(parents=True)
    (tmp_path / "a/keep").write_bytes(b"")
    install.remove_empty_dirs(tmp_path, ["a", "a/b", "a/b/c", "gone"])
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == ["a", "a/keep"]


def test_missing_parents(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    assert install.missing_parents(tmp_path, "a/b/c/f") == ["a/b", "a/b/c"]
    assert install.missing_parents(tmp_path, "f") == []
