"""What every task module shares: the settings (read once, at load) and doit's config."""

from __future__ import annotations

import sys
from typing import Any

from pipeline import reporting
from pipeline.errors import PipelineError
from pipeline.settings import Settings, load_settings

TaskDict = dict[str, Any]


def _settings() -> Settings:
    try:
        return load_settings()
    except PipelineError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        raise SystemExit(2) from None


SETTINGS = _settings()
reporting.DEBUG = SETTINGS.debug


def doit_config(settings: Settings) -> dict[str, Any]:
    """DOIT_CONFIG: a portable sqlite3 dep file in the state dir, our reporter, no defaults."""
    try:
        settings.state_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        print(
            f"error: PIPELINE_STATE_DIR {settings.state_dir}: cannot create it ({exc.strerror})",
            file=sys.stderr,
        )
        raise SystemExit(2) from None
    return {
        # sqlite3: readable across Python builds, unlike the default dbm.
        "dep_file": str(settings.doit_db),
        "backend": "sqlite3",
        # Stream actions' output as it comes (progress, server logs), never captured.
        "verbosity": 2,
        "reporter": reporting.Reporter,
        "default_tasks": [],
    }
