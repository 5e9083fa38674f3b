"""pipeline.fsutil.RangeCopier: every way of copying gives the same bytes, and a file system
that refuses one way gets the next."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from pipeline.fsutil import CHUNK, RangeCopier


def _source(path: Path) -> bytes:
    data = os.urandom(3 * CHUNK + 12345)
    path.write_bytes(data)
    return data


def _copy(copier: RangeCopier, dst: Path, offset: int, size: int) -> bytes:
    fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        copier.copy(fd, offset, size)
    finally:
        os.close(fd)
    return dst.read_bytes()


@pytest.mark.parametrize("way", ["copy_file_range", "sendfile", "read"])
def test_each_way_copies_the_range(tmp_path: Path, way: str) -> None:
    data = _source(tmp_path / "src")
    fd = os.open(tmp_path / "src", os.O_RDONLY)
    try:
        copier = RangeCopier(fd)
        copier.way = way
        # Ranges that start and end inside buffers, one past a buffer's size, an empty one.
        for i, (offset, size) in enumerate(
            [(0, len(data)), (7, CHUNK + 3), (CHUNK - 1, 2 * CHUNK + 5), (100, 0)]
        ):
            assert _copy(copier, tmp_path / f"out{i}", offset, size) == data[offset : offset + size]
        assert copier.way == way
    finally:
        os.close(fd)


def test_another_file_system_falls_back_to_sendfile(tmp_path: Path) -> None:
    shm = Path("/dev/shm")
    if not shm.is_dir() or os.stat(shm).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("needs /dev/shm on another file system than the temp dir")
    data = _source(tmp_path / "src")
    fd = os.open(tmp_path / "src", os.O_RDONLY)
    out = shm / f"range-copier-{os.getpid()}"
    try:
        copier = RangeCopier(fd)
        assert _copy(copier, out, 5, len(data) - 5) == data[5:]
        # copy_file_range refuses two file systems (EXDEV) on this kernel; sendfile does not.
        assert copier.way in ("copy_file_range", "sendfile")
    finally:
        os.close(fd)
        out.unlink(missing_ok=True)


@pytest.mark.parametrize("way", ["copy_file_range", "sendfile", "read"])
def test_a_source_that_ends_early_is_an_error(tmp_path: Path, way: str) -> None:
    (tmp_path / "src").write_bytes(b"x" * 1000)
    fd = os.open(tmp_path / "src", os.O_RDONLY)
    try:
        copier = RangeCopier(fd)
        copier.way = way
        with pytest.raises(OSError) as info:
            _copy(copier, tmp_path / "out", 500, 600)
        assert info.value.errno == errno.EIO
    finally:
        os.close(fd)
