"""How doit talks to people: one-line errors, progress on stderr, data alone on stdout.

stdout carries only what a command produces (``doit plan`` JSON, ``doit status`` tables) so it
can be piped; task titles and errors go to stderr. A :class:`~pipeline.errors.PipelineError`
raised by an action becomes ``error: <message>`` and a non-zero exit; anything else becomes one
line too, with the traceback only when ``PIPELINE_DEBUG=1``. An interrupted action (Ctrl-C;
SIGTERM or SIGHUP for the stages that ask for it with ``interrupt=``) unwinds through its
``finally`` blocks, which stop its children and remove what it had half-written, then says so
in one line and exits with 128 + the signal's number (130, 143, 129).
"""

from __future__ import annotations

import contextlib
import functools
import signal
import sys
import threading
import traceback
from collections.abc import Callable, Iterator
from types import FrameType
from typing import Any, TextIO

from doit.exceptions import BaseFail, TaskFailed
from doit.reporter import ConsoleReporter

from pipeline.errors import PipelineError, error_line

DEBUG = False  # set from Settings.debug when the tasks load


def say(message: str) -> None:
    """One progress line on stderr, flushed at once (stdout stays for data)."""
    print(message, file=sys.stderr, flush=True)


def print_error(message: str, *, program: str = "", file: TextIO | None = None) -> None:
    """Print :func:`error_line` to ``file`` (stderr by default), flushed at once."""
    print(error_line(message, program), file=sys.stderr if file is None else file, flush=True)


class Interrupted(BaseException):
    """SIGTERM or SIGHUP, raised in the main thread as Python raises KeyboardInterrupt for
    SIGINT: a BaseException, so ``except Exception`` does not swallow it and every ``finally``
    on the way runs (:func:`pipeline.procs.run_logged` kills its child's group there)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


@contextlib.contextmanager
def signals_as_interrupts() -> Iterator[None]:
    """While the block runs, SIGINT raises KeyboardInterrupt and SIGTERM/SIGHUP raise
    :class:`Interrupted`, once: later signals are ignored, so that the cleanup the first one
    started (stopping a child's group: bounded, a few seconds) is not cut short. The previous
    handlers come back afterwards. Does nothing outside the main thread (signals are
    delivered there only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    fired = False

    def handler(signum: int, _frame: FrameType | None) -> None:
        nonlocal fired
        if fired:
            return
        fired = True
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise Interrupted(signum)

    previous = {sig: signal.signal(sig, handler) for sig in _STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def action(
    fn: Callable[..., Any] | None = None, *, interrupt: str | None = None
) -> Callable[..., Any]:
    """Wrap a doit python-action so user errors fail the task with their one-line message.

    Ctrl-C becomes one line, ``error: interrupted (SIGINT)``, and exit 130 instead of doit's
    traceback. ``interrupt`` (for stages with children and half-written outputs) says what an
    interruption leaves, for that line; SIGTERM and SIGHUP are then caught too
    (:func:`signals_as_interrupts`), so a stopped container or a closed terminal unwinds the
    stage like Ctrl-C instead of killing it with its children left running. Use as
    ``@action`` or ``@action(interrupt="...")``.
    """
    if fn is None:
        return functools.partial(action, interrupt=interrupt)

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        signals = signals_as_interrupts() if interrupt else contextlib.nullcontext()
        try:
            with signals:
                return fn(*args, **kwargs)
        except PipelineError as exc:
            if DEBUG:
                traceback.print_exc()
            return TaskFailed(exc.message)
        except (KeyboardInterrupt, Interrupted) as exc:
            signum = exc.signum if isinstance(exc, Interrupted) else int(signal.SIGINT)
            if DEBUG:
                traceback.print_exc()
            more = f"; {interrupt}" if interrupt else ""
            print_error(f"interrupted ({signal.Signals(signum).name}){more}")
            # SystemExit passes through doit (it closes its database on the way out).
            raise SystemExit(128 + signum) from None

    return wrapper


def _is_command(task: Any) -> bool:
    return bool(getattr(task, "meta", None) and task.meta.get("command"))


class Reporter(ConsoleReporter):
    """doit's console reporter, reshaped for the habits above."""

    desc = "one-line errors on stderr; stdout left to the commands"

    def __init__(self, outstream: Any, options: dict[str, Any]) -> None:
        super().__init__(sys.stderr, options)

    def execute_task(self, task: Any) -> None:
        if task.actions and not task.name.startswith("_") and not _is_command(task):
            self.write(f".  {task.title()}\n")

    def skip_uptodate(self, task: Any) -> None:
        if not task.name.startswith("_") and not _is_command(task):
            self.write(f"-- {task.title()} (up to date)\n")

    def add_failure(self, task: Any, fail: BaseFail) -> None:
        if not fail.report:
            return
        self.failures.append({"task": task, "exception": fail})
        message = fail.message if isinstance(fail, TaskFailed) else None
        if message:
            self.write(f"error: {message.strip()}\n")
            return
        # An unexpected exception: one line naming the task, the traceback on request.
        detail = fail.get_msg().strip().splitlines()
        last = detail[-1] if detail else fail.get_name()
        if DEBUG:
            self.write(fail.get_msg())
        hint = "" if DEBUG else "; rerun with PIPELINE_DEBUG=1 for the traceback"
        self.write(f"error: task {task.name} crashed: {last}{hint}\n")

    def complete_run(self) -> None:
        if self.runtime_errors:
            self.write("error: " + " ".join(" ".join(self.runtime_errors).split()) + "\n")
