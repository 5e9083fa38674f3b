"""The tasks of a pixi manifest (``[tasks]``): what one is, the order pixi runs a task and its
``depends-on`` in, and a task's shell text. The doit tasks of this project live in
:mod:`pipeline.tasks`, not here. Pure.
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from dataclasses import dataclass

from pipeline.errors import PipelineError


@dataclass(frozen=True)
class Task:
    """A pixi task. ``cmd`` is a string, a list of arguments, or ``None`` for an alias."""

    name: str
    cmd: str | tuple[str, ...] | None = None
    depends_on: tuple[str, ...] = ()
    cwd: str | None = None
    env: tuple[tuple[str, str], ...] = ()
    description: str | None = None


def task_chain(tasks: Sequence[Task], name: str, where: str, *, hint: str = "") -> list[Task]:
    """``name`` and its ``depends-on`` tasks, dependencies first, each once: the order pixi
    runs them in.

    Raises PipelineError for an unknown task name or a dependency cycle; ``hint`` ends the
    message for a missing ``name`` (what else the caller may do). Pure.
    """
    by_name = {t.name: t for t in tasks}
    order: list[Task] = []
    visiting: list[str] = []

    def visit(task_name: str) -> None:
        if any(t.name == task_name for t in order):
            return
        if task_name in visiting:
            cycle = " -> ".join([*visiting[visiting.index(task_name) :], task_name])
            raise PipelineError(f"{where}: tasks depend on each other in a cycle ({cycle})")
        task = by_name.get(task_name)
        if task is None:
            if task_name == name:
                raise PipelineError(
                    f"{where}: no `{name}` task; add one under [tasks] (for example "
                    f"{name} = \"python -c 'import vllm; print(vllm.__version__)'\")"
                    + (f", {hint}" if hint else "")
                )
            raise PipelineError(
                f"{where}: task `{visiting[-1]}` depends on unknown task `{task_name}`"
            )
        visiting.append(task_name)
        for dep in task.depends_on:
            visit(dep)
        visiting.pop()
        order.append(task)

    visit(name)
    return order


def command_text(task: Task) -> str | None:
    """The shell text of a task's ``cmd`` (a list is quoted and joined); None for an alias."""
    if task.cmd is None:
        return None
    if isinstance(task.cmd, str):
        return task.cmd
    return shlex.join(task.cmd)
