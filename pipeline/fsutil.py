"""File-system helpers: files never left half-written under a final name, one answer to "is
this file unchanged?" (:class:`Fingerprint`), and OSErrors turned into one line."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

CHUNK = 1 << 20
_RANGE_CHUNK = 64 * CHUNK  # per kernel copy call: big enough to be fast, small enough for ^C
_NO_KERNEL_COPY = {
    errno.EXDEV,
    errno.ENOSYS,
    errno.EOPNOTSUPP,
    errno.EINVAL,
    errno.EBADF,
    errno.EPERM,
}


class RangeCopier:
    """Copies byte ranges of files into other files, in the kernel where it can.

    ``copy_file_range(2)`` first (a reflink or an in-kernel copy on one file system), else
    ``sendfile(2)`` (any two files: a bundle on another mount, a pack cache on another disk),
    else ``preadv`` into one reused buffer. The first call that a file system refuses switches
    this copier to the next way for good. Never a fresh buffer per read: ``os.pread`` of 64 MiB
    allocates and page-faults its buffer every time, which made extracting a 587 MiB bundle
    across mounts take 1.6 s of CPU where ``sendfile`` takes 0.25 s.
    """

    def __init__(self) -> None:
        self.way = "copy_file_range" if hasattr(os, "copy_file_range") else "sendfile"
        self._buffer: bytearray | None = None

    def copy(
        self,
        src: int,
        dst: int,
        offset: int,
        size: int,
        progress: Callable[[int], object] | None = None,
    ) -> None:
        """Write ``size`` bytes of ``src`` from ``offset`` at ``dst``'s position, and leave that
        position after them (``src``'s is not used). ``progress`` gets each piece's size.
        Raises OSError (EIO when ``src`` ends early)."""
        at = os.lseek(dst, 0, os.SEEK_CUR)
        done = 0
        while done < size:
            count = min(_RANGE_CHUNK, size - done)
            copied = self._copy_some(src, dst, offset + done, count, at + done)
            if copied <= 0:
                raise OSError(errno.EIO, "unexpected end of the file copied from")
            done += copied
            if progress is not None:
                progress(copied)
        os.lseek(dst, at + size, os.SEEK_SET)

    def _copy_some(self, src: int, dst: int, offset: int, count: int, at: int) -> int:
        if self.way == "copy_file_range":
            try:
                return os.copy_file_range(src, dst, count, offset, at)
            except OSError as exc:
                if exc.errno not in _NO_KERNEL_COPY:
                    raise
                self.way = "sendfile"
        if self.way == "sendfile":
            try:
                os.lseek(dst, at, os.SEEK_SET)
                return os.sendfile(dst, src, offset, count)
            except OSError as exc:
                if exc.errno not in _NO_KERNEL_COPY:
                    raise
                self.way = "read"
        if self._buffer is None:
            self._buffer = bytearray(CHUNK)
        view = memoryview(self._buffer)[: min(count, CHUNK)]
        got = os.preadv(src, [view], offset)
        written = 0
        while written < got:
            written += os.pwrite(dst, view[written:got], at + written)
        return got


@contextlib.contextmanager
def atomic_output(path: Path, mode: int = 0o644, *, fsync: bool = False) -> Iterator[IO[bytes]]:
    """Write ``path`` through a temp file in the same directory, renamed into place on success.

    On any exception (Ctrl-C and disk-full included) the temp file is removed and ``path`` is
    left as it was. ``fsync`` makes the content durable before the rename (for big outputs
    that must survive a power cut; state files skip it).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as fh:
            yield fh
            fh.flush()
            if fsync:
                os.fsync(fh.fileno())
        tmp.chmod(mode)
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: Path, data: bytes, mode: int = 0o644) -> Fingerprint:
    """Write ``data`` to ``path`` (:func:`atomic_output`); returns the written file's
    :class:`Fingerprint`, taken after the rename through a descriptor of the file itself: a
    path's stat taken then could already be someone else's file, or none."""
    held: int | None = None
    try:
        with atomic_output(path, mode) as fh:
            fh.write(data)
            held = os.dup(fh.fileno())
        return Fingerprint.of(os.fstat(held))
    finally:
        if held is not None:
            os.close(held)


def atomic_write_text(path: Path, text: str, mode: int = 0o644) -> Fingerprint:
    return atomic_write_bytes(path, text.encode("utf-8"), mode)


def sha256_file(path: Path, progress: object | None = None) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks; ``progress`` gets ``update(n)`` calls."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(CHUNK):
            digest.update(chunk)
            if progress is not None:
                progress.update(len(chunk))  # type: ignore[attr-defined]
    return digest.hexdigest()


@dataclass(frozen=True)
class Fingerprint:
    """What says a file is unchanged without reading it: size, mtime, inode and ctime.

    The one rule for the build's and the container's "trust it, do not hash it again" checks
    (the pack stamp, the pack cache's verified stamps, the extraction record):

    - size and mtime alone are not enough: anyone who rewrites a file in place can put both
      back (``os.utime``, ``touch -r``, ``cp -p``, ``rsync -t``);
    - ctime is what makes it safe: the kernel sets it on every change (content, mode, owner,
      links) and no call sets it back. A chmod or a new hard link therefore costs one hash
      too many, never one too few;
    - the inode: a file replaced by a rename (an atomic rewrite, a copy put in its place) is
      another file, even when its size and times happen to be the same.

    Two fingerprints are equal when all four are; a stat that cannot be taken has none.
    """

    size: int
    mtime_ns: int
    ino: int
    ctime_ns: int

    @classmethod
    def of(cls, st: os.stat_result) -> Fingerprint:
        return cls(st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns)

    @classmethod
    def read(cls, path: Path) -> Fingerprint | None:
        """The fingerprint of ``path`` now (following symlinks), or None when it cannot be
        stat'ed (gone, unreadable). Never raises."""
        try:
            return cls.of(path.stat())
        except OSError:
            return None


class BackgroundRemoval:
    """Remove directory trees on worker threads while the caller goes on with its work.

    For scratch trees whose removal is pure garbage collection (uv's cache of an install:
    tens of thousands of hard links, about a second of ``unlink`` calls) and need not hold up
    the next step. Use as a context manager: leaving the block (also by an exception or
    Ctrl-C) waits until every tree handed over is gone, so nothing outlives the stage that
    made it. Removal is best effort, like ``shutil.rmtree(ignore_errors=True)``: a tree left
    by a crash is the next run's leftover to remove (its name says what it is).
    """

    def __init__(self) -> None:
        self._threads: list[threading.Thread] = []

    def remove(self, path: Path) -> None:
        """Start removing ``path``; returns at once."""
        thread = threading.Thread(
            target=shutil.rmtree,
            args=(path,),
            kwargs={"ignore_errors": True},
            name=f"remove-{path.name}",
            daemon=True,
        )
        thread.start()
        self._threads.append(thread)

    def wait(self) -> None:
        """Block until every removal started so far has finished."""
        while self._threads:
            self._threads.pop().join()

    def __enter__(self) -> BackgroundRemoval:
        return self

    def __exit__(self, *exc: object) -> None:
        self.wait()


def fsync_dir(path: Path) -> None:
    """Make renames inside ``path`` durable (best effort: some filesystems refuse)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def os_error_text(exc: OSError, path: Path | str | None = None) -> str:
    """``exc`` for a message: its strerror, the errno's name and the path, never ``None``.

    ``No space left on device (ENOSPC): /x/y``. An error raised on a file descriptor has no
    ``filename``; ``path`` (the file being written) names it then.
    """
    code = errno.errorcode.get(exc.errno) if exc.errno is not None else None
    text = exc.strerror or str(exc) or type(exc).__name__
    if code and code not in text:
        text = f"{text} ({code})"
    where = exc.filename if exc.filename is not None else path
    if where is not None and exc.filename2 is not None:  # a rename or link: both names
        where = f"{where} -> {exc.filename2}"
    return f"{text}: {where}" if where is not None else text


# What to do about an OSError, by errno: the one place that decides the advice, so a name too
# long is not told to free disk space.
_ADVICE = {
    errno.ENOSPC: "free disk space there",
    errno.EDQUOT: "free disk space there (the disk quota is used up)",
    errno.EACCES: "fix the permissions there",
    errno.EPERM: "fix the permissions there",
    errno.EROFS: "the file system is read-only: use a writable place",
    errno.ENAMETOOLONG: "use a shorter path (or shorter names inside it)",
    errno.ELOOP: "remove the symbolic-link loop",
    errno.ENOTDIR: "a file stands where a directory must be: move it aside",
    errno.EEXIST: "something else already has that name: move it aside",
    errno.EISDIR: "a directory stands where a file must be: move it aside",
    errno.EMFILE: "too many open files: raise the limit (ulimit -n)",
    errno.ENFILE: "too many open files on the system: close some or raise the limit",
    errno.EIO: "the disk reported an I/O error: check it",
}


def os_error_advice(exc: OSError, otherwise: str = "check the file system there") -> str:
    """What a user can do about ``exc``, chosen by its errno (``otherwise`` for the rest)."""
    return _ADVICE.get(exc.errno or 0, otherwise)


@contextlib.contextmanager
def os_errors_as(error: Callable[[str], Exception], what: str) -> Iterator[None]:
    """Turn an OSError raised in the block into ``error``: ``what``, the error's text and
    path (:func:`os_error_text`) and the advice for its errno (:func:`os_error_advice`).
    For a stage's file work as a whole, so that a file system surprise (a directory where a
    file belongs, a name too long) is one line instead of a crash."""
    try:
        yield
    except OSError as exc:
        raise error(f"{what} ({os_error_text(exc)}); {os_error_advice(exc)}") from None
