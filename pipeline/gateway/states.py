"""The instances' states as the supervisor last wrote them in ``state.json``.

The supervisor is the only writer and replaces the file atomically (write + rename), so a read
never sees half a file and every write gets a new inode. :meth:`StateFollower.refresh` costs one
``stat`` when nothing changed, and re-reads the file only when (inode, mtime, size) moved; it is
called at most every ``min_interval`` seconds from the request path and once a second by the
gateway's housekeeping, so a state change is seen within that time without restarting anything.

Plain ``json`` on purpose: the gateway stays light (no pydantic model of the state here). The
state names come from :class:`pipeline.serve.record.InstanceState`, whose module loads no
pydantic either, nor the state store's locks and processes (tests keep it so).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from pipeline.fsutil import Fingerprint
from pipeline.serve.record import InstanceState, parse_instance

RUNNING = InstanceState.RUNNING


@dataclass(frozen=True)
class InstanceStatus:
    state: str
    reason: str | None = None
    restarts: int = 0
    ready_at: float | None = None

    @property
    def ready(self) -> bool:
        return self.state == RUNNING


# A managed instance in one of these will not come back by itself for a held request.
GIVEN_UP = frozenset(
    {
        InstanceState.BACKOFF,
        InstanceState.FAILED,
        InstanceState.EXITED,
        InstanceState.STOPPED,
        InstanceState.STOPPING,
    }
)

ALWAYS_READY = InstanceStatus(RUNNING, None)
NOT_YET = InstanceStatus(InstanceState.PENDING, "the supervisor has not reported this instance yet")


def unavailable(instance: str, status: InstanceStatus) -> tuple[str, int | None]:
    """Why ``instance`` cannot take a request, and the Retry-After seconds if it will recover."""
    reason = f": {status.reason}" if status.reason else ""
    state = status.state
    if state == InstanceState.PENDING:
        return f"instance {instance!r} is waiting to start{reason}", 10
    if state == InstanceState.STARTING:
        return f"instance {instance!r} is starting (loading the model)", 5
    if state == InstanceState.BACKOFF:
        return f"instance {instance!r} is restarting after a failure{reason}", 10
    if state in (InstanceState.STOPPING, InstanceState.STOPPED):
        return (
            f"instance {instance!r} is {state}{reason}; `doit serve` starts it again",
            None,
        )
    if state in (InstanceState.UNLOADED, InstanceState.ASLEEP):
        return f"instance {instance!r} is {state} (on demand){reason}", 5
    if state in (InstanceState.SLEEPING, InstanceState.UNLOADING):
        return f"instance {instance!r} is being put away ({state}){reason}", 5
    if state == InstanceState.WAKING:
        return f"instance {instance!r} is waking up", 5
    if state == InstanceState.EXITED:
        return f"instance {instance!r} exited{reason}", None
    if state == InstanceState.FAILED:
        return f"instance {instance!r} failed{reason}; see `doit logs {instance}`", None
    return f"instance {instance!r} is {state}{reason}", None


# Longer than a file-time tick (a jiffy: 1-10 ms) with room for clock skew.
RACY_NS = 100_000_000


class StateFollower:
    """Per-instance :class:`InstanceStatus` from the supervisor's state file.

    ``path`` empty: no supervisor, every instance is running. A missing or unreadable file
    keeps the last known states (or ``pending`` before the first read): a reader never fails.
    Each record is checked field by field, as ``doit status`` checks it
    (:func:`~pipeline.serve.record.parse_instance`): a bad field is named once and the rest of
    the record is used. ``say`` gets one line per state change or problem. Not thread-safe:
    the event loop owns it.
    """

    def __init__(
        self,
        path: str,
        names: Iterable[str],
        *,
        min_interval: float = 0.02,
        clock: Callable[[], float] = time.monotonic,
        say: Callable[[str], None] | None = None,
    ) -> None:
        self.path = path
        self.names = tuple(names)
        self.min_interval = min_interval
        self.clock = clock
        self.say = say
        self._checked = -1e9
        self._signature: Fingerprint | None = None
        default = ALWAYS_READY if not path else NOT_YET
        self.statuses: dict[str, InstanceStatus] = dict.fromkeys(self.names, default)
        # Statuses the supervisor pushed ahead of its state file (name -> when, Unix time):
        # a file written before that cannot take them back.
        self.pushed: dict[str, float] = {}

    def push_running(self, name: str, ready_at: float, at: float) -> None:
        """The supervisor says ``name`` is running since ``ready_at`` (sent at ``at``), ahead
        of the state file; the file replaces it once it was written after ``at``."""
        before = self.statuses.get(name)
        restarts = before.restarts if before is not None else 0
        self.statuses[name] = InstanceStatus(RUNNING, None, restarts, ready_at)
        self.pushed[name] = at
        if self.say is not None and (before is None or before.state != RUNNING):
            was = before.state if before is not None else "unknown"
            self.say(f"instance {name}: {was} -> running")

    def status(self, name: str) -> InstanceStatus:
        return self.statuses.get(name, NOT_YET)

    def refresh(self, *, force: bool = False) -> None:
        """Re-read the file if it changed; at most every ``min_interval`` unless ``force``."""
        if not self.path:
            return
        now = self.clock()
        if not force and now - self._checked < self.min_interval:
            return
        self._checked = now
        try:
            st = os.stat(self.path)  # noqa: PTH116 - hot path, no Path object
        except OSError:
            return
        signature = Fingerprint.of(st)
        if signature == self._signature:
            return
        read_at = time.time_ns()
        try:
            with open(self.path, "rb") as fh:  # noqa: PTH123 - hot path, no Path object
                data = json.loads(fh.read())
        except (OSError, ValueError, RecursionError):
            return
        records = data.get("instances") if isinstance(data, dict) else None
        if not isinstance(records, dict):
            return
        # "Racily clean", as git calls it: file times advance in coarse ticks, and a freed
        # inode number comes back, so a file replaced again within a tick of this read can
        # show the very signature read here with other contents. Such a signature is not
        # trusted: the next refresh reads again, until one comes a tick after the write.
        racy = read_at - st.st_mtime_ns < RACY_NS
        self._signature = None if racy else signature
        written = data.get("updated_at")
        written = written if isinstance(written, int | float) else 0.0
        for name in self.names:
            if name not in records:
                continue
            pushed = self.pushed.get(name)
            if pushed is not None:
                if written < pushed:
                    continue  # older than what the supervisor told since
                del self.pushed[name]
            problems: list[str] = []
            rec = parse_instance(name, records[name], problems)
            for problem in problems:
                if self.say is not None:
                    self.say(f"state file {self.path}: {problem}")
            if rec is None:
                continue
            status = InstanceStatus(
                state=rec.state.value,
                reason=rec.reason,
                restarts=rec.restarts,
                ready_at=rec.ready_at,
            )
            before = self.statuses.get(name)
            if (before is None or before.state != status.state) and self.say is not None:
                was = before.state if before is not None else "unknown"
                why = f" ({status.reason})" if status.reason and not status.ready else ""
                self.say(f"instance {name}: {was} -> {status.state}{why}")
            self.statuses[name] = status
