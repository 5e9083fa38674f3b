"""Shared fixtures: private state dirs, free ports, a stand-in vLLM, and process cleanup."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipeline.serve.state import StateStore, group_alive
from pipeline.settings import Settings, load_settings

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
STANDIN = TESTS / "standin_server.py"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(predicate, timeout: float, interval: float = 0.05, what: str = "condition"):
    """Poll ``predicate`` until it returns a truthy value; fail the test after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout}s waiting for {what}")


@pytest.fixture
def state_dir(tmp_path: Path) -> Iterator[Path]:
    """A private PIPELINE_STATE_DIR; every process group recorded there is killed afterwards."""
    root = tmp_path / "state"
    root.mkdir()
    yield root
    kill_recorded_groups(root / "serve")


def kill_recorded_groups(serve_root: Path) -> None:
    store = StateStore(serve_root)
    with contextlib.suppress(Exception):
        state = store.read()
        if state is None:
            return
        if state.supervisor.pid and not state.supervisor.exited:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(state.supervisor.pid, signal.SIGKILL)
        for rec in state.instances.values():
            if rec.pgid and group_alive(rec.pgid):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(rec.pgid, signal.SIGKILL)


@pytest.fixture
def settings(state_dir: Path, tmp_path: Path) -> Settings:
    return load_settings(
        {
            "PIPELINE_STATE_DIR": str(state_dir),
            "XDG_CACHE_HOME": str(tmp_path / "cache"),
            "HOME": str(tmp_path),
            "AUTO_INFER_VLLM_PIXI_PROJECT_DIR": str(tmp_path / "no-project"),
        }
    )


@pytest.fixture
def standin_prefix(tmp_path: Path) -> Path:
    """A fake environment whose ``bin/python`` runs the stand-in server instead of vLLM.

    The launcher treats it like any conda prefix: the plan's argv is the real
    ``python -m vllm.entrypoints.openai.api_server ...``, and the stand-in parses it.
    """
    prefix = tmp_path / "standin-env"
    (prefix / "bin").mkdir(parents=True)
    python = prefix / "bin" / "python"
    python.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{STANDIN}" "$@"\n')
    python.chmod(0o755)
    return prefix


def standin_config(
    prefix: Path,
    log_dir: Path,
    instances: dict[str, dict],
    *,
    background: bool = True,
    defaults: str = "",
) -> str:
    """A serve TOML for stand-in instances: ``instances`` maps name -> {port, env, ...}."""
    lines = [
        "[master]",
        f'env_prefix = "{prefix}"',
        "[instance.control]",
        f'log_dir = "{log_dir}"',
        f"background = {'true' if background else 'false'}",
        "gpu_ids = []",
        "ready_timeout = 20",
        "stop_grace = 3",
        "backoff_initial = 0.2",
        "backoff_max = 1",
        defaults,
        "[instance.server]",
        'model = "standin-model"',
        'host = "127.0.0.1"',
    ]
    for name, spec in instances.items():
        lines.append(f"[instance.{name}.server]")
        lines.append(f"port = {spec['port']}")
        lines.append(f'served_model_name = "{spec.get("served", name)}"')
        for key in ("api_key", "api_key_env"):
            if key in spec:
                lines.append(f'{key} = "{spec[key]}"')
        lines.append(f"[instance.{name}.control]")
        for key, value in spec.get("control", {}).items():
            lines.append(f"{key} = {value}")
        if spec.get("env"):
            env = ", ".join(f'{k} = "{v}"' for k, v in spec["env"].items())
            lines.append(f"env = {{ {env} }}")
    return "\n".join(lines) + "\n"
