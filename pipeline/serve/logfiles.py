"""Instance log files: reading their end, following them. No heavy imports (status path)."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import TextIO

# Logs are rotated (one `.1` kept) when an instance starts and its log exceeds this.
LOG_ROTATE_BYTES = 256 << 20
LOG_TAIL_LINES = 20


def tail(path: Path | str, lines: int = LOG_TAIL_LINES) -> list[str]:
    """The last ``lines`` lines of a text file (reads at most 64 KiB from its end)."""
    try:
        with Path(path).open("rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - 65536))
            data = fh.read()
    except OSError:
        return []
    return data.decode("utf-8", "replace").splitlines()[-lines:]


def follow(path: Path, out: TextIO, poll: float = 0.5) -> None:
    """Print what is appended to ``path`` until interrupted; reopens it after a rotation."""
    fh = path.open("rb")
    fh.seek(0, os.SEEK_END)
    inode = path.stat().st_ino
    try:
        while True:
            chunk = fh.read()
            if chunk:
                out.write(chunk.decode("utf-8", "replace"))
                out.flush()
                continue
            time.sleep(poll)
            try:
                if path.stat().st_ino != inode:  # rotated: reopen from the start
                    fh.close()
                    fh = path.open("rb")
                    inode = path.stat().st_ino
            except FileNotFoundError:
                pass
    finally:
        fh.close()
