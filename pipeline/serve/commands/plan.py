"""``doit plan``: print the resolved launch plan."""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping
from typing import TYPE_CHECKING, TextIO

from pipeline import reporting
from pipeline.errors import ServeError
from pipeline.serve.commands.common import Say, load
from pipeline.settings import Settings

if TYPE_CHECKING:
    from pipeline.serve.plan import Plan


def plan_command(
    settings: Settings,
    config_path: str | None,
    environ: Mapping[str, str],
    *,
    check: bool = False,
    out: TextIO | None = None,
    say: Say = reporting.say,
    node_rank: int | None = None,
) -> Plan:
    """Print the resolved launch plan as JSON; host problems are warnings (errors: ``check``).
    ``node_rank``: plan that node (``doit plan --node-rank 1`` shows a follower's command)."""
    out = out or sys.stdout
    from pipeline.serve.preflight import host_problems

    config, plan = load(settings, config_path, environ, check=check, node_rank=node_rank)
    problems = host_problems(config, plan, environ, models_dir=settings.models_dir)
    out.write(json.dumps(plan.to_display(), indent=2) + "\n")
    out.flush()
    for problem in problems:
        say(f"warning: {problem}")
    if check and problems:
        raise ServeError(problems[0] + (f" (and {len(problems) - 1} more)" if problems[1:] else ""))
    return plan
