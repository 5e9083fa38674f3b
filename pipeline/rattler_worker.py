"""The rattler worker: ``rattler.install`` of locked records in a child process, and the one
request it reads.

Both sides install conda packages through it: the build host's verify
(:func:`pipeline.build.verify.install_environment`, from the lock's own URLs) and the
container's frozen install (:mod:`pipeline.install.frozen`, from the extracted channel). Each
builds a :class:`RattlerRequest`, and :func:`pipeline.procs.run_rattler_worker` writes it to a
file and runs ``python -m pipeline.rattler_worker REQUEST.json`` (the argv comes from this
module's own name, :func:`command`). The module sits outside build/ and install/ so that
both import it and neither depends on the other.

The child reads the request (:meth:`RattlerRequest.from_json`), builds the records with
:func:`pipeline.pixi.lockfile.rattler_records`, installs them, prints one line and leaves with
``os._exit``: py-rattler 0.28 can crash the interpreter at exit after its async calls. For an
extracted channel, the parent has checked every package file against the lock before
starting it (rattler does not check ``file://`` packages). The child imports only rattler and
the lock reader, not the whole pipeline: keep this module's top-level imports to the standard
library.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class RattlerRequest:
    """What the worker installs: environment ``environment`` of ``platform`` (a lock platform
    name) from the lock at ``lock`` into ``prefix``, with ``cache_dir`` as rattler's package
    cache. ``channel_dir``: an extracted channel the records are pointed at (the container,
    offline), or None to use the lock's own URLs (the build host, downloads)."""

    lock: Path
    environment: str
    platform: str
    prefix: Path
    cache_dir: Path
    channel_dir: Path | None = None

    def to_json(self) -> str:
        return json.dumps(
            {
                "lock": str(self.lock),
                "environment": self.environment,
                "platform": self.platform,
                "prefix": str(self.prefix),
                "cache_dir": str(self.cache_dir),
                "channel_dir": None if self.channel_dir is None else str(self.channel_dir),
            }
        )

    @classmethod
    def from_json(cls, text: str) -> RattlerRequest:
        """The request in ``text`` (what :meth:`to_json` wrote). Raises ValueError naming the
        field that is missing or not a string."""
        document: Any = json.loads(text)
        if not isinstance(document, dict):
            raise ValueError("a rattler request is a JSON object")

        def text_of(key: str) -> str:
            value = document.get(key)
            if not isinstance(value, str) or not value:
                raise ValueError(f"rattler request: {key!r} must be a non-empty string")
            return value

        channel_dir = document.get("channel_dir")
        if channel_dir is not None and not isinstance(channel_dir, str):
            raise ValueError("rattler request: 'channel_dir' must be a string or null")
        return cls(
            lock=Path(text_of("lock")),
            environment=text_of("environment"),
            platform=text_of("platform"),
            prefix=Path(text_of("prefix")),
            cache_dir=Path(text_of("cache_dir")),
            channel_dir=Path(channel_dir) if channel_dir else None,
        )


def command(request_file: Path) -> list[str]:
    """argv of the worker for ``request_file``: this module, run by this Python."""
    return [sys.executable, "-m", __spec__.name if __spec__ else __name__, str(request_file)]


async def _install(request: RattlerRequest) -> int:
    import rattler

    from pipeline.pixi.lockfile import rattler_records, read_environment

    locked = read_environment(request.lock, request.environment, request.platform)
    records = rattler_records(locked, channel_dir=request.channel_dir)
    await rattler.install(
        records,
        target_prefix=request.prefix,
        cache_dir=request.cache_dir,
        show_progress=False,
    )
    return len(records)


def main(argv: Sequence[str] | None = None) -> int:
    """Install what ``argv[0]`` (a request file) asks for; 0 on success, 1 otherwise, with
    one ``error:`` line on stdout (where the parent's log takes the worker's last line)."""
    from pipeline.errors import PipelineError

    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        print("usage: python -m pipeline.rattler_worker REQUEST.json", file=sys.stderr)
        return 2
    try:
        request = RattlerRequest.from_json(Path(args[0]).read_text(encoding="utf-8"))
        count = asyncio.run(_install(request))
        print(f"installed {count} conda packages into {request.prefix}")
        return 0
    except PipelineError as exc:
        message = exc.message
    except Exception as exc:
        message = f"rattler install failed ({type(exc).__name__}: {exc})"
    # Imported here: the reporting module brings doit, which a worker that succeeds never needs.
    from pipeline.reporting import print_error

    print_error(message, file=sys.stdout)
    return 1


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
