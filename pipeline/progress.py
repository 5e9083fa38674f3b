"""A tiny progress reporter for downloads, hashing and tar writing.

On a terminal it keeps one line on stderr up to date (stage, bytes done of total, rate),
redrawn at most ten times a second, and replaces it with a one-line summary when the stage
ends. Anywhere else (CI logs, doit output captured to a file, tests) it is quiet apart from that
one summary line per stage.

:class:`Progress` is thread-safe: download workers call :meth:`Progress.update` concurrently.
It never raises on a closed or broken stream (a progress line is not worth failing a pack for).
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from types import TracebackType
from typing import TextIO

_REDRAW_INTERVAL = 0.1
_UNITS = ("B", "KiB", "MiB", "GiB", "TiB")


def human_bytes(count: float) -> str:
    """``1536`` -> ``"1.5 KiB"``; whole bytes below 1 KiB (``"512 B"``)."""
    value = float(count)
    for unit in _UNITS:
        if abs(value) < 1024 or unit == _UNITS[-1]:
            return f"{int(value)} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")  # pragma: no cover


class Progress:
    """Progress of one stage (``label``), counted in bytes.

    ``total`` (bytes) is optional; ``stream`` defaults to ``sys.stderr`` at construction time;
    ``interactive`` defaults to ``stream.isatty()``. ``clock`` is a seam for tests. Use as a
    context manager or call :meth:`done` once; a stage left by an exception is cleared without a
    summary (the error says what happened).
    """

    def __init__(
        self,
        label: str,
        total: int | None = None,
        *,
        stream: TextIO | None = None,
        interactive: bool | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.label = label
        self.total = total
        self.count = 0
        self._stream = stream if stream is not None else sys.stderr
        if interactive is None:
            try:
                interactive = self._stream.isatty()
            except (AttributeError, ValueError):
                interactive = False
        self.interactive = interactive
        self._clock = clock
        self._start = clock()
        self._last_draw = 0.0
        self._lock = threading.Lock()
        self._drawn = False
        self._closed = False

    # ---- counting --------------------------------------------------------------------------

    def update(self, n: int) -> None:
        """Add ``n`` bytes; on a terminal, redraw the line when it is due."""
        with self._lock:
            self.count += n
            if not self.interactive or self._closed:
                return
            now = self._clock()
            if now - self._last_draw < _REDRAW_INTERVAL:
                return
            self._last_draw = now
            self._write("\r" + self._line(now) + "\x1b[K")
            self._drawn = True

    def add_total(self, n: int) -> None:
        """Grow the expected total by ``n`` bytes (work discovered while running)."""
        with self._lock:
            self.total = (self.total or 0) + n

    @property
    def elapsed(self) -> float:
        return self._clock() - self._start

    def rate(self) -> float:
        """Bytes per second since the stage started."""
        elapsed = self.elapsed
        return self.count / elapsed if elapsed > 0 else 0.0

    # ---- ending ----------------------------------------------------------------------------

    def done(self, summary: str | None = None) -> None:
        """End the stage: clear the live line and print ``summary`` (if any) on its own line.

        Idempotent: only the first call prints.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
            text = ""
            if self._drawn:
                text += "\r\x1b[K"
            if summary:
                text += summary + "\n"
            if text:
                self._write(text)

    def __enter__(self) -> Progress:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is not None:
            self.done(None)
        else:
            self.done(f"{self.label}: {human_bytes(self.count)} in {self.elapsed:.1f} s")

    # ---- internals -------------------------------------------------------------------------

    def _line(self, now: float) -> str:
        elapsed = now - self._start
        rate = self.count / elapsed if elapsed > 0 else 0.0
        done = human_bytes(self.count)
        if self.total:
            percent = min(100.0, 100.0 * self.count / self.total)
            done = f"{done} / {human_bytes(self.total)} ({percent:.0f}%)"
        return f"{self.label}: {done}, {human_bytes(rate)}/s"

    def _write(self, text: str) -> None:
        try:
            self._stream.write(text)
            self._stream.flush()
        except (OSError, ValueError):
            pass
