"""What every task module shares: the settings (read once, at load) and doit's config."""

from __future__ import annotations

import sqlite3
import sys
from pathlib import Path
from typing import Any

from pipeline import reporting
from pipeline.errors import PipelineError
from pipeline.settings import Settings, load_settings

TaskDict = dict[str, Any]


def _settings() -> Settings:
    try:
        return load_settings()
    except PipelineError as exc:
        reporting.print_error(exc.message)
        raise SystemExit(2) from None


SETTINGS = _settings()
reporting.DEBUG = SETTINGS.debug


def doit_config(settings: Settings) -> dict[str, Any]:
    """DOIT_CONFIG: a portable sqlite3 dep file in the state dir, our reporter, no defaults."""
    try:
        settings.state_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        reporting.print_error(
            f"PIPELINE_STATE_DIR {settings.state_dir}: cannot create it ({exc.strerror})"
        )
        raise SystemExit(2) from None
    set_aside_corrupt_db(settings.doit_db)
    return {
        # sqlite3: readable across Python builds, unlike the default dbm.
        "dep_file": str(settings.doit_db),
        "backend": "sqlite3",
        # Stream actions' output as it comes (progress, server logs), never captured.
        "verbosity": 2,
        "reporter": reporting.Reporter,
        "default_tasks": [],
    }


# sqlite's result codes for a file that is not (or no longer) a database.
_SQLITE_CORRUPT, _SQLITE_NOTADB = 11, 26


def set_aside_corrupt_db(path: Path) -> Path | None:
    """Move a corrupt or truncated doit database aside (``<name>.corrupt``), with a one-line
    warning, and return where it went; None when it is fine, absent or merely busy.

    doit opens its dep file before any task runs and fails with a traceback on a damaged one,
    which would block ``doit status`` and ``doit stop`` too. The file holds only up-to-date
    records: without it, tasks check their stamps again (extract, install) or run once more
    from their caches (lock, pack); nothing is lost that a run does not rebuild.
    """
    if not path.is_file():
        return None
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=2.0)
        try:
            rows = conn.execute("PRAGMA quick_check").fetchall()
        finally:
            conn.close()
        why = "" if rows == [("ok",)] else str(rows[0][0] if rows else "no result")
    except sqlite3.DatabaseError as exc:
        if getattr(exc, "sqlite_errorcode", None) not in (_SQLITE_CORRUPT, _SQLITE_NOTADB):
            return None  # locked by another doit, unreadable: doit says so itself
        why = str(exc)
    if not why:
        return None
    aside = path.with_name(path.name + ".corrupt")
    try:
        path.replace(aside)
    except OSError as exc:
        reporting.print_error(
            f"{path}: corrupt doit database ({why}) that cannot be moved aside "
            f"({exc.strerror}); delete it"
        )
        raise SystemExit(2) from None
    print(
        f"warning: {path}: corrupt doit database ({why}); moved to {aside.name}, "
        "up-to-date checks start afresh",
        file=sys.stderr,
    )
    return aside
