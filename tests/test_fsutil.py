"""pipeline.fsutil.RangeCopier: every way of copying gives the same bytes, and a file system
that refuses one way gets the next."""

from __future__ import annotations

import errno
import io
import os
from pathlib import Path

import pytest

from pipeline.fsutil import CHUNK, RangeCopier


def _source(path: Path) -> bytes:
    data = os.urandom(3 * CHUNK + 12345)
    path.write_bytes(data)
    return data


def _copy(copier: RangeCopier, src: int, dst: Path, offset: int, size: int) -> bytes:
    fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        os.write(fd, b"head")  # written at the file's position, which ends after the range
        copier.copy(src, fd, offset, size)
        os.write(fd, b"tail")
    finally:
        os.close(fd)
    data = dst.read_bytes()
    assert data[:4] == b"head" and data[-4:] == b"tail"
    return data[4:-4]


@pytest.mark.parametrize("way", ["copy_file_range", "sendfile", "read"])
def test_each_way_copies_the_range(tmp_path: Path, way: str) -> None:
    data = _source(tmp_path / "src")
    fd = os.open(tmp_path / "src", os.O_RDONLY)
    try:
        copier = RangeCopier()
        copier.way = way
        # Ranges that start and end inside buffers, one past a buffer's size, an empty one.
        for i, (offset, size) in enumerate(
            [(0, len(data)), (7, CHUNK + 3), (CHUNK - 1, 2 * CHUNK + 5), (100, 0)]
        ):
            assert (
                _copy(copier, fd, tmp_path / f"out{i}", offset, size)
                == data[offset : offset + size]
            )
        assert copier.way == way
    finally:
        os.close(fd)


def test_another_file_system_falls_back_to_sendfile(tmp_path: Path) -> None:
    shm = Path("/dev/shm")
    if not shm.is_dir() or shm.stat().st_dev == tmp_path.stat().st_dev:
        pytest.skip("needs /dev/shm on another file system than the temp dir")
    data = _source(tmp_path / "src")
    fd = os.open(tmp_path / "src", os.O_RDONLY)
    out = shm / f"range-copier-{os.getpid()}"
    try:
        copier = RangeCopier()
        assert _copy(copier, fd, out, 5, len(data) - 5) == data[5:]
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
        copier = RangeCopier()
        copier.way = way
        with pytest.raises(OSError) as info:
            _copy(copier, fd, tmp_path / "out", 500, 600)
        assert info.value.errno == errno.EIO
    finally:
        os.close(fd)


def test_a_tar_written_from_another_file_system_holds_the_same_bytes(tmp_path: Path) -> None:
    import tarfile

    from pipeline.bundle.tar import TarMember, write_tar

    shm = Path("/dev/shm") / f"tar-source-{os.getpid()}"
    shm.mkdir()
    try:
        sources = {}
        for i, size in enumerate([0, 1, CHUNK + 7, 3 * CHUNK]):
            (shm / f"f{i}").write_bytes(os.urandom(size))
            sources[f"pkgs/f{i}"] = shm / f"f{i}"
        members = [TarMember.file(n, p, p.stat().st_size) for n, p in sources.items()]
        result = write_tar(tmp_path / "out.tar", members, progress_stream=io.StringIO())
        with tarfile.open(result.path) as tar:
            for name, path in sources.items():
                assert tar.extractfile(name).read() == path.read_bytes()
    finally:
        for path in shm.iterdir():
            path.unlink()
        shm.rmdir()


def test_a_member_whose_size_changed_is_refused_and_nothing_is_written(tmp_path: Path) -> None:
    from pipeline.bundle.tar import TarMember, write_tar
    from pipeline.errors import BundleError

    (tmp_path / "f").write_bytes(b"x" * 100)
    member = TarMember.file("pkgs/f", tmp_path / "f", 200)  # the size it had when listed
    with pytest.raises(BundleError, match="changed size"):
        write_tar(tmp_path / "out.tar", [member], progress_stream=io.StringIO())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f"]
