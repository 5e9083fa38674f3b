"""``doit clients``: how clients reach each instance."""

from __future__ import annotations

import sys
from collections.abc import Mapping
from pathlib import Path
from typing import TextIO

from pipeline import reporting
from pipeline.serve.commands.common import Say, load
from pipeline.settings import Settings


def clients_command(
    settings: Settings,
    config_path: str | None,
    environ: Mapping[str, str],
    *,
    litellm_config: str | None = None,
    env_file: str | None = None,
    out: TextIO | None = None,
    say: Say = reporting.say,
) -> None:
    """Print how clients reach each instance; optionally write a LiteLLM config and an env file."""
    from pipeline.fsutil import atomic_write_text
    from pipeline.serve import clients

    out = out or sys.stdout
    config, plan = load(settings, config_path, environ, check=False)
    out.write(clients.instructions(config, plan))
    out.flush()
    for target, text in ((litellm_config, clients.litellm_config), (env_file, clients.env_file)):
        if target:
            body = text(config, plan) if text is clients.litellm_config else text(plan)
            atomic_write_text(Path(target), body)
            say(f"clients: wrote {target}")
