"""How doit talks to people: one-line errors, progress on stderr, data alone on stdout.

stdout carries only what a command produces (``doit plan`` JSON, ``doit status`` tables) so it
can be piped; task titles and errors go to stderr. A :class:`~pipeline.errors.PipelineError`
raised by an action becomes ``error: <message>`` and a non-zero exit; anything else becomes one
line too, with the traceback only when ``PIPELINE_DEBUG=1``.
"""

from __future__ import annotations

import functools
import sys
import traceback
from collections.abc import Callable
from typing import Any

from doit.exceptions import BaseFail, TaskFailed
from doit.reporter import ConsoleReporter

from pipeline.errors import PipelineError

DEBUG = False  # set from Settings.debug when the tasks load


def say(message: str) -> None:
    """One progress line on stderr, flushed at once (stdout stays for data)."""
    print(message, file=sys.stderr, flush=True)


def action(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a doit python-action so user errors fail the task with their one-line message."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except PipelineError as exc:
            if DEBUG:
                traceback.print_exc()
            return TaskFailed(exc.message)

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
