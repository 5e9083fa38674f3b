"""Shared fixtures: private state dirs, free ports, a stand-in vLLM, and process cleanup."""

from __future__ import annotations

import contextlib
import itertools
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from pipeline.procs import group_alive
from pipeline.serve.state import StateStore
from pipeline.settings import Settings, load_settings

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
STANDIN = TESTS / "standin_server.py"


# Every process the tests start inherits this variable (the xdist workers get the
# controller's value), so that the session's end can find whatever is still running.
RUN_MARK = "INFER_VLLM_TEST_RUN"
os.environ.setdefault(RUN_MARK, uuid.uuid4().hex)

# Bytecode for what the tests start, kept in one cache outside the environments: this machine
# sets PYTHONDONTWRITEBYTECODE, and a vLLM server's Python then compiles torch, transformers
# and vLLM from source at every start (16 s of CPU to import vLLM, against 7.6 s with bytecode;
# the suite starts vLLM about 25 times on two cores). Python checks each file's bytecode
# against its source, so the cache needs no key.
os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
os.environ.setdefault(
    "PYTHONPYCACHEPREFIX",
    str(
        Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "infer-vllm" / "pycache"
    ),
)

# Ports for the tests' servers: below the kernel's ephemeral range (32768-60999 here), where
# nothing else takes them for an outgoing connection, and one slice per xdist worker, taken in
# turn, so that two workers never pick the same port between its check and its bind.
PORT_BASE, PORT_SLICE = 20000, 1500
_WORKER = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
_worker_index = int(_WORKER[2:]) if _WORKER[2:].isdigit() else 0
_ports = itertools.cycle(
    range(
        PORT_BASE + (_worker_index % 8) * PORT_SLICE,
        PORT_BASE + (_worker_index % 8 + 1) * PORT_SLICE,
    )
)
for _ in range(random.randrange(PORT_SLICE)):  # another run's TIME_WAIT ports come later
    next(_ports)


def free_port() -> int:
    """A loopback port nobody listens on, unique to this worker for its next 1,500 calls."""
    for _ in range(PORT_SLICE):
        port = next(_ports)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in this worker's slice ({_WORKER})")


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
    """Kill what a test's serve state dir knows of: the supervisor holding its lock (even when
    ``state.json`` is gone, as a test that deletes it may fail before it is written again),
    then the recorded supervisor and instance groups."""
    store = StateStore(serve_root)
    owner = store.lock_owner()
    if owner and owner != os.getpid():
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(owner, signal.SIGCONT)  # a test may have stopped it
            os.kill(owner, signal.SIGTERM)  # it stops its instances' groups on the way out
        deadline = time.monotonic() + 15
        while pid_running(owner) and time.monotonic() < deadline:
            time.sleep(0.05)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(owner, signal.SIGKILL)
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
    extra: str = "",
) -> str:
    """A serve TOML for stand-in instances: ``instances`` maps name -> {port, env, ...};
    ``control`` / ``server`` add to (or replace) the defaults tables; ``extra`` is more TOML
    (a [gateway] or [pool.*] table)."""
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
    if extra:
        lines.append(extra)
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


def fresh_python(code: str) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a new interpreter with this repository's pipeline (what a fresh process
    imports, unaffected by this one's modules); bounded."""
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )


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


# ---- the suite as a whole: the heavy tests apart, and nothing left running --------------------


# The real-vLLM modules (``slow``) in two groups, each run whole by one xdist worker, one module
# after the other: the machines that run the suite have two cores, and a vLLM start-up is
# CPU-bound, so no more than two of these modules run at once, and each module's servers (its
# module fixtures) start once. Balanced by their measured time on a 2-core machine (pytest
# --durations): multinode 310 s + gateway 48 s + replicas 39 s against demo 205 s + boot
# hook 63 s + bundle 57 s + serve 43 s. (xdist's own `--dist loadgroup` cannot do this with
# pytest 9: it renames items through an attribute pytest 9 no longer reads.)
HEAVY_GROUPS = {
    "test_multinode_vllm": "real-vllm-1",
    "test_gateway_vllm": "real-vllm-1",
    "test_gateway_vllm_replicas": "real-vllm-1",
    "test_pool_vllm": "real-vllm-1",
    "test_demo": "real-vllm-2",
    "test_container": "real-vllm-2",
    "test_vllm_bundle": "real-vllm-2",
    "test_vllm_delta": "real-vllm-2",
    "test_serve_vllm": "real-vllm-2",
    # vLLM's parser only (20 s): beside the group with less measured time.
    "test_vllm_args_agree": "real-vllm-2",
}


def _module_of(nodeid: str) -> str:
    return nodeid.split("::", 1)[0].rsplit("/", 1)[-1].removesuffix(".py")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """A ``slow`` test outside :data:`HEAVY_GROUPS` would run beside two others: refuse it."""
    strays = sorted({_module_of(i.nodeid) for i in items if i.get_closest_marker("slow")})
    strays = [m for m in strays if m not in HEAVY_GROUPS]
    if strays:
        raise pytest.UsageError(
            f"tests/conftest.py: slow test modules {', '.join(strays)} are in no HEAVY_GROUPS "
            "group; add them to the group with less measured time"
        )


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> object:
    """xdist's per-test distribution, except that each :data:`HEAVY_GROUPS` group is one unit
    of work: one worker runs it whole, in collection order. The larger units go out first, so
    the two groups (the run's longest path) start at once."""
    from xdist.scheduler import LoadScopeScheduling

    class HeavyGroups(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return HEAVY_GROUPS.get(_module_of(nodeid), nodeid)

    return HeavyGroups(config, log)


def _interrupted(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def pytest_configure(config: pytest.Config) -> None:
    """SIGTERM ends the run as Ctrl-C does: pytest stops its workers, tears its fixtures down
    and runs the session-end check below, which kills what the tests left running. Without
    this a `kill` of pytest left the detached supervisors and servers of its tests alive."""
    if not hasattr(config, "workerinput") and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _interrupted)


def _proc_state(pid: int) -> tuple[str, int] | None:
    """(state letter, parent pid) of ``pid``, or None when it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return fields[0], int(fields[1])


def leftover_processes(mark: str, basetemp: str | None) -> dict[int, str]:
    """pid -> command line of every live process this test run started: those that inherited
    ``RUN_MARK=mark``, or whose command line names the run's temporary root (a child started
    with an environment of its own). This process is not counted; zombies are gone."""
    me = os.getpid()
    marker = f"{RUN_MARK}={mark}".encode()
    found: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        pid = int(entry.name)
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
            argv = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        state = _proc_state(pid)
        if state is None or state[0] == "Z":
            continue
        if marker in environ or (basetemp and basetemp in argv):
            found[pid] = argv.strip()[:200]
    return found


@pytest.hookimpl(trylast=True)  # after xdist has shut its workers down
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Fail the run when a process that the tests started outlives them (a fixture's teardown
    should have stopped it); kill those processes so that they outlive nothing else."""
    if hasattr(session.config, "workerinput"):  # an xdist worker: the controller checks
        return
    factory = getattr(session.config, "_tmp_path_factory", None)
    basetemp = None
    with contextlib.suppress(Exception):
        basetemp = str(factory.getbasetemp()) if factory is not None else None
    mark = os.environ[RUN_MARK]
    deadline = time.monotonic() + 10  # what is on its way out (SIGTERM sent) may finish
    left = leftover_processes(mark, basetemp)
    while left and time.monotonic() < deadline:
        time.sleep(0.2)
        left = leftover_processes(mark, basetemp)
    if not left:
        return
    for pid in left:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    lines = [f"error: {len(left)} process(es) started by the tests outlived them (now killed):"]
    lines += [f"  pid {pid}: {argv}" for pid, argv in sorted(left.items())]
    if reporter is not None:
        reporter.write_line("\n".join(lines), red=True)
    else:
        print("\n".join(lines), file=sys.stderr)
    session.exitstatus = pytest.ExitCode.TESTS_FAILED


# The lock tests' channel, its URL and a rattler cache (module-scoped).
from lock_helpers import cache_dir, channel, channel_url  # noqa: E402, F401

# Real-vLLM fixtures (session-scoped; only the slow tests ask for them).
from vllm_runtime import tiny_model, vllm_cpu_python, vllm_project  # noqa: E402, F401


class ProcessSampler:
    """Samples, every few milliseconds in a thread, which instances have a process: a process
    belongs to an instance when its stdout is the instance's log (every process of an
    instance inherits it: vLLM's API server, its engine core, a stand-in). ``both`` counts the
    samples that found more than ``limit`` instances up at once."""

    def __init__(self, logs: dict[str, Path], limit: int = 1) -> None:
        self.logs = {str(path): name for name, path in logs.items()}
        self.limit = limit
        self.both = 0
        self.samples = 0
        self.seen: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def up(self) -> set[str]:
        found = set()
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                target = str((entry / "fd" / "1").readlink())
            except OSError:
                continue
            name = self.logs.get(target)
            if name is not None:
                found.add(name)
        return found

    def _run(self) -> None:
        while not self._stop.is_set():
            up = self.up()
            self.seen |= up
            if len(up) > self.limit:
                self.both += 1
            self.samples += 1
            time.sleep(0.005)

    def __enter__(self) -> ProcessSampler:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(5)
