"""The one error type users see.

Every error a user can cause is a :class:`PipelineError` whose message is one line: what went
wrong, where (file, dotted key, instance, URL), and what to do. The doit reporter
(:mod:`pipeline.reporting`) prints it as ``error: <message>`` and exits non-zero; a traceback is
shown only when ``PIPELINE_DEBUG=1``.
"""

from __future__ import annotations


class PipelineError(Exception):
    """A user-facing failure with a one-line message."""

    exit_code = 1

    def __init__(self, message: str) -> None:
        # Keep the message on one line whatever the caller passed in.
        super().__init__(" ".join(str(message).split()))

    @property
    def message(self) -> str:
        return str(self.args[0])


class ConfigError(PipelineError):
    """A serve config (TOML file, overrides) that cannot be used."""

    exit_code = 2


class LockError(PipelineError):
    """A pixi.lock that cannot be read or does not hold what was asked for."""


class FetchError(PipelineError):
    """A download that failed or whose bytes do not match the lock."""


class BundleError(PipelineError):
    """A bundle that cannot be written, or is unsafe, corrupt or for another host."""


class InstallError(PipelineError):
    """An offline install that cannot proceed; the previous environment is untouched."""


class ServeError(PipelineError):
    """A vLLM instance that failed to start, stay up or stop."""


def error_line(message: str, program: str = "") -> str:
    """``error: <message>``, on one line whatever ``message`` holds, after ``<program>: ``
    when a program is named (``gateway: error: ...``, for a child whose output is mixed with
    others'). The one format of an error line."""
    text = " ".join(str(message).split())
    return f"{program}: error: {text}" if program else f"error: {text}"
