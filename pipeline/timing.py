"""Where a stage's time goes: named phases, each with its wall time and its CPU time.

``doit install`` runs its stages in one process; a :class:`PhaseClock` goes through all of
them (extract, patch-channels, frozen-install), so the install record, the install log and
the one-line summary hold the whole run, doit's own start-up included. CPU time is
``getrusage`` of this process (every thread: the hash pass's readers and hashers) plus that
of the children waited for during the phase (uv, the rattler worker, the verify task), user
and system together: on a busy machine the wall time says how long one waited, the CPU time
how much work there was.
"""

from __future__ import annotations

import contextlib
import os
import resource
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class PhaseTime:
    """One phase: ``wall`` seconds, ``cpu`` seconds (this process and its children, user and
    system), of which ``children`` seconds were spent by the children."""

    name: str
    wall: float
    cpu: float
    children: float = 0.0

    def to_json(self) -> list[object]:
        return [self.name, round(self.wall, 3), round(self.cpu, 3), round(self.children, 3)]


def cpu_seconds() -> tuple[float, float]:
    """``(self, children)``: user + system CPU seconds of this process (all its threads) and
    of its children waited for so far."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime, kids.ru_utime + kids.ru_stime


def process_age() -> float | None:
    """Seconds since this process started (``/proc/self/stat``, in clock ticks), or None
    where there is no such file. The start-up of the interpreter, doit and the task loading
    before the first stage ran."""
    try:
        with open("/proc/self/stat", "rb") as fh:  # noqa: PTH123
            raw = fh.read()
        ticks = int(raw[raw.rfind(b")") + 2 :].split()[19])  # field 22: starttime
        return time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, AttributeError):
        return None


class PhaseClock:
    """Times the phases of one run, in the order they end.

    ``wall`` and ``cpu`` are seams (tests). Not thread-safe: phases are entered by the stage's
    own thread, one after the other (a phase that overlaps others is timed by its caller and
    :meth:`add`-ed). Never raises on its own.
    """

    def __init__(
        self,
        *,
        wall: Callable[[], float] = time.monotonic,
        cpu: Callable[[], tuple[float, float]] = cpu_seconds,
    ) -> None:
        self._wall = wall
        self._cpu = cpu
        self._phases: list[PhaseTime] = []
        self._lap: tuple[float, float, float] | None = None

    @property
    def phases(self) -> tuple[PhaseTime, ...]:
        return tuple(self._phases)

    def add(self, phase: PhaseTime) -> None:
        self._phases.append(phase)

    def add_startup(self, age: float | None = None) -> None:
        """Record ``start-up``: from the process start (``age`` seconds ago; default: read from
        /proc) to now, with all the CPU this process has used so far. Nothing when unknown."""
        age = process_age() if age is None else age
        if age is not None:
            own, kids = self._cpu()
            self.add(PhaseTime("start-up", max(age, 0.0), own + kids, kids))

    def begin(self) -> None:
        """Start a lap here: the next :meth:`lap` times what runs from now."""
        self._lap = (self._wall(), *self._cpu())

    def lap(self, name: str) -> None:
        """Record ``name`` as the time since the last :meth:`begin` or :meth:`lap`, and start
        the next lap (for a stage's consecutive steps, without a block around each)."""
        now = (self._wall(), *self._cpu())
        if self._lap is not None:
            wall0, own0, kids0 = self._lap
            kids = now[2] - kids0
            self.add(PhaseTime(name, now[0] - wall0, now[1] - own0 + kids, kids))
        self._lap = now

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time the block as ``name``; recorded when the block ends, also by an exception."""
        start = self._wall()
        own0, kids0 = self._cpu()
        try:
            yield
        finally:
            own1, kids1 = self._cpu()
            kids = kids1 - kids0
            self.add(PhaseTime(name, self._wall() - start, own1 - own0 + kids, kids))


def summary(phases: Sequence[PhaseTime]) -> str:
    """One line: ``timing (s, wall/cpu): start-up 0.41/0.40, bundle hash 0.62/1.10, ...;
    total 17.5/29.4``."""
    parts = [f"{p.name} {p.wall:.2f}/{p.cpu:.2f}" for p in phases]
    wall = sum(p.wall for p in phases)
    cpu = sum(p.cpu for p in phases)
    return f"timing (s, wall/cpu): {', '.join(parts)}; total {wall:.1f}/{cpu:.1f}"


def table(phases: Sequence[PhaseTime]) -> str:
    """The phases as a text table (for the install log), one row each and a total row."""
    width = max([len(p.name) for p in phases] + [len("total")])
    rows = [f"{'phase':<{width}}  {'wall s':>8}  {'cpu s':>8}  {'children':>8}"]
    rows += [f"{p.name:<{width}}  {p.wall:8.2f}  {p.cpu:8.2f}  {p.children:8.2f}" for p in phases]
    rows.append(
        f"{'total':<{width}}  {sum(p.wall for p in phases):8.2f}  "
        f"{sum(p.cpu for p in phases):8.2f}  {sum(p.children for p in phases):8.2f}"
    )
    return "\n".join(rows) + "\n"


__all__ = ["PhaseClock", "PhaseTime", "cpu_seconds", "process_age", "summary", "table"]
