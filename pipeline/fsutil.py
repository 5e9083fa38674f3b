"""File-system helpers that never leave a half-written file under a final name."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

CHUNK = 1 << 20


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


def atomic_write_bytes(path: Path, data: bytes, mode: int = 0o644) -> None:
    with atomic_output(path, mode) as fh:
        fh.write(data)


def atomic_write_text(path: Path, text: str, mode: int = 0o644) -> None:
    atomic_write_bytes(path, text.encode("utf-8"), mode)


def sha256_file(path: Path, progress: object | None = None) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks; ``progress`` gets ``update(n)`` calls."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(CHUNK):
            digest.update(chunk)
            if progress is not None:
                progress.update(len(chunk))  # type: ignore[attr-defined]
    return digest.hexdigest()


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
    return f"{text}: {where}" if where is not None else text
