"""The child process of the frozen install: ``rattler.install`` of the locked records.

``python -m pipeline.install.worker REQUEST.json`` reads the request written by
:func:`pipeline.install.frozen.frozen_install` or
:func:`pipeline.build.verify.install_environment` (lock, environment, platform, target
prefix, package cache, and ``channel_dir``: an extracted channel the records are pointed
at, or null to use the lock's own URLs), builds the records with
:func:`pipeline.pixi.lockfile.rattler_records`, installs them, prints one line and leaves with
``os._exit``: py-rattler 0.28 can crash the interpreter at exit after its async calls. For an
extracted channel, the parent has checked every package file against the lock before
starting it (rattler does not check ``file://`` packages). A module of its own so the child
imports only rattler and the lock reader, not the whole pipeline.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


async def _install(request: Mapping[str, Any]) -> int:
    import rattler

    from pipeline.pixi.lockfile import rattler_records, read_environment

    locked = read_environment(Path(request["lock"]), request["environment"], request["platform"])
    channel_dir = request.get("channel_dir")
    records = rattler_records(locked, channel_dir=Path(channel_dir) if channel_dir else None)
    await rattler.install(
        records,
        target_prefix=Path(request["prefix"]),
        cache_dir=Path(request["cache_dir"]),
        show_progress=False,
    )
    return len(records)


def main(argv: Sequence[str] | None = None) -> int:
    """Install what ``argv[0]`` (a JSON request file) asks for; 0 on success, 1 otherwise."""
    from pipeline.errors import PipelineError

    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        print("usage: python -m pipeline.install.worker REQUEST.json", file=sys.stderr)
        return 2
    try:
        request = json.loads(Path(args[0]).read_text(encoding="utf-8"))
        count = asyncio.run(_install(request))
        print(f"installed {count} conda packages into {request['prefix']}")
        return 0
    except PipelineError as exc:
        print(f"error: {exc.message}")
    except Exception as exc:
        print(f"error: rattler install failed ({type(exc).__name__}: {' '.join(str(exc).split())})")
    return 1


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
