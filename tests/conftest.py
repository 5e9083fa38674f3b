"""Shared fixtures: private state dirs, free ports, a stand-in vLLM, and process cleanup."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from pipeline.procs import group_alive
from pipeline.serve.state import StateStore
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


def pid_running(pid: int) -> bool:
    """True while ``pid`` runs (a zombie waiting for its reaper counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


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
        # A supervisor run inside the test process records the test process itself.
        sup = state.supervisor.pid
        if sup and sup != os.getpid() and not state.supervisor.exited:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(sup, signal.SIGKILL)
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
    control: dict[str, object] | None = None,
    server: dict[str, object] | None = None,
) -> str:
    """A serve TOML for stand-in instances: ``instances`` maps name -> {port, env, ...};
    ``control`` / ``server`` add to (or replace) the defaults tables."""
    control_defaults: dict[str, object] = {
        "log_dir": str(log_dir),
        "background": background,
        "gpu_ids": [],
        "ready_timeout": 20,
        "stop_grace": 3,
        "backoff_initial": 0.2,
        "backoff_max": 1,
        **(control or {}),
    }
    server_defaults: dict[str, object] = {
        "model": "standin-model",
        "host": "127.0.0.1",
        **(server or {}),
    }
    lines = ["[master]", f"env_prefix = {_toml(str(prefix))}", "[instance.control]"]
    lines += [f"{k} = {_toml(v)}" for k, v in control_defaults.items()]
    lines.append("[instance.server]")
    lines += [f"{k} = {_toml(v)}" for k, v in server_defaults.items()]
    for name, spec in instances.items():
        lines.append(f"[instance.{name}.server]")
        lines.append(f"port = {spec['port']}")
        lines.append(f"served_model_name = {_toml(spec.get('served', name))}")
        for key in ("api_key", "api_key_env"):
            if key in spec:
                lines.append(f"{key} = {_toml(spec[key])}")
        lines.append(f"[instance.{name}.control]")
        for key, value in spec.get("control", {}).items():
            lines.append(f"{key} = {_toml(value)}")
        if spec.get("env"):
            env = ", ".join(f"{k} = {_toml(v)}" for k, v in spec["env"].items())
            lines.append(f"env = {{ {env} }}")
    return "\n".join(lines) + "\n"


def _toml(value: object) -> str:
    import json

    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return json.dumps(str(value))


def doit_env(state_dir: Path, **extra: str) -> dict[str, str]:
    """The environment of a `doit` subprocess: this one plus a private state dir."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AUTO_INFER_", "PIPELINE_"))}
    env["PIPELINE_STATE_DIR"] = str(state_dir)
    env.update(extra)
    return env


def run_doit(
    args: list[str], env: dict[str, str], timeout: float = 120, prefix: Sequence[str] = ()
) -> subprocess.CompletedProcess[str]:
    """Run `doit ARGS` from the repository as a user would (after ``prefix``, such as
    ``unshare -n``); bounded by ``timeout``."""
    return subprocess.run(
        [*prefix, sys.executable, "-m", "doit", "-f", str(REPO / "dodo.py"), *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


# The lock tests' channel, its URL and a rattler cache (module-scoped).
from lock_helpers import cache_dir, channel, channel_url  # noqa: E402, F401

# Real-vLLM fixtures (session-scoped; only the slow tests ask for them).
from vllm_runtime import tiny_model, vllm_cpu_python, vllm_project  # noqa: E402, F401
