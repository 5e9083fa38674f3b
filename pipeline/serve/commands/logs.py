"""``doit logs``: the end of an instance's (or the supervisor's) log, optionally followed."""

from __future__ import annotations

import contextlib
import dataclasses
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import TextIO

from pipeline.errors import ServeError
from pipeline.serve.commands.common import load, read_state
from pipeline.serve.logfiles import follow as follow_log
from pipeline.serve.logfiles import tail
from pipeline.serve.state import StateStore
from pipeline.settings import Settings


def log_path(
    settings: Settings, name: str | None, config_path: str | None, environ: Mapping[str, str]
) -> Path:
    store = StateStore(settings.serve_state)
    state = read_state(store)[0]
    if name in (None, "", "supervisor"):
        if name == "supervisor" or state is None or len(state.instances) != 1:
            if name != "supervisor" and state is not None:
                raise ServeError(
                    "logs: name an instance: "
                    + ", ".join(sorted(state.instances))
                    + " (or `supervisor`)"
                )
            return store.supervisor_log
        return Path(next(iter(state.instances.values())).log_file)
    if state is not None and name in state.instances:
        return Path(state.instances[name].log_file)
    if config_path or settings.serve_config:
        _, plan = load(settings, config_path, environ, check=False)
        return Path(plan.instance(name).log_file)
    known = ", ".join(sorted(state.instances)) if state else "none served yet"
    raise ServeError(f"logs: no instance named {name!r} (instances: {known})")


@dataclasses.dataclass(frozen=True)
class LogsArgs:
    name: str | None
    lines: int
    follow: bool
    config: str | None


def parse_logs_args(words: list[str], *, lines: int, follow: bool, config: str | None) -> LogsArgs:
    """`doit logs`'s positional words with the options doit left among them. Pure.

    doit takes options only before the first positional word (`doit logs -n 2 a`), and hands
    `doit logs a -n 2` over as three names; this reads ``-n N``, ``-nN``, ``--lines N``,
    ``--lines=N``, ``-f``/``--follow`` and ``-c``/``--config FILE`` wherever they stand.
    Raises ServeError (one line) for a bad count, a missing value or two names.
    """
    names: list[str] = []
    rest = iter(words)
    for word in rest:
        flag, eq, value = word.partition("=")
        if word in ("-f", "--follow"):
            follow = True
            continue
        if word in ("-n", "--lines", "-c", "--config") or (flag in ("--lines", "--config") and eq):
            if not eq:
                value = next(rest, "")
                if not value:
                    raise ServeError(f"logs: {word} needs a value (`doit logs -n 200 NAME`)")
            if flag in ("-c", "--config"):
                config = value
                continue
            word, flag = f"-n{value}", "-n"
        if word.startswith("-n") and len(word) > 2:
            try:
                lines = int(word[2:])
            except ValueError:
                lines = -1
            if lines < 0:
                raise ServeError(f"logs: -n/--lines takes a count >= 0, got {word[2:]!r}")
            continue
        if word.startswith("-") and word != "-":
            raise ServeError(
                f"logs: unknown option {word!r} (options: -n N, --lines N, -f, --config FILE)"
            )
        names.append(word)
    if len(names) > 1:
        raise ServeError(f"logs: one instance at a time, got {', '.join(names)}")
    return LogsArgs(names[0] if names else None, lines, follow, config)


def logs_command(
    settings: Settings,
    name: str | None,
    environ: Mapping[str, str],
    *,
    lines: int = 50,
    follow: bool = False,
    config_path: str | None = None,
    out: TextIO | None = None,
) -> int:
    """Print the last ``lines`` of an instance's log; ``follow`` keeps printing until Ctrl-C."""
    out = out or sys.stdout
    path = log_path(settings, name, config_path, environ)
    if not path.exists():
        raise ServeError(f"logs: {path} does not exist yet (the instance never started)")
    for line in tail(path, lines):
        out.write(line + "\n")
    out.flush()
    if not follow:
        return 0
    with contextlib.suppress(KeyboardInterrupt):
        follow_log(path, out)
    return 0
