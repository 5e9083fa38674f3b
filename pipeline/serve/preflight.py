"""Checks of the host that serving needs and planning does not: run before anything starts.

``doit plan`` works on any machine (configs get checked on laptops and build hosts) and only
reports these as warnings; ``doit serve`` refuses to start anything when one fails.
Whether the installed environment can run on this host at all (glibc, CUDA driver) is checked
at install time by :mod:`pipeline.install.host`.
"""

from __future__ import annotations

import contextlib
import os
import socket
import stat
from collections.abc import Callable, Mapping
from pathlib import Path

from pipeline.procs import nvidia_smi
from pipeline.serve.config import ServeConfig, key_is_header_safe
from pipeline.serve.plan import Plan


def count_gpus(environ: Mapping[str, str]) -> int | None:
    """NVIDIA GPUs this host shows: ``nvidia-smi -L`` when present, else ``/proc``; None when
    neither exists (no driver)."""
    listing = nvidia_smi(["-L"], environ)
    if listing is not None:
        return sum(1 for line in listing.splitlines() if line.startswith("GPU "))
    proc = Path("/proc/driver/nvidia/gpus")
    if proc.is_dir():
        return sum(1 for _ in proc.iterdir())
    return None


def port_in_use(host: str, port: int) -> bool:
    """True when something accepts connections on ``port`` or it cannot be bound on ``host``."""
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
        return True
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        # SO_REUSEADDR as vLLM's server sets it: a TIME_WAIT leftover is not "in use".
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False


def log_dir_problem(directory: Path) -> str | None:
    """Why ``directory`` cannot hold logs, as the end of a sentence that starts with its key
    (``control.log_dir``); None when it is a writable directory or can be made one.

    It cannot when it, or the nearest of its parents that exists, is not a directory (a
    regular file in the way), or that one is not writable: ``doit serve`` makes the missing
    folders (``mkdir -p``) and appends to ``<log_dir>/<name>.log``."""
    path = directory
    while True:
        try:
            mode = path.stat().st_mode
        except (FileNotFoundError, NotADirectoryError):
            # Missing, or under a file: `mkdir -p` would make it, unless a parent is in the way.
            if path.parent == path:
                return None
            path = path.parent
            continue
        except OSError as exc:
            return f"{directory} cannot be checked: {exc.strerror or exc}"
        kind = "a regular file" if stat.S_ISREG(mode) else "not a directory"
        if path == directory:
            if not stat.S_ISDIR(mode):
                return f"{directory} is {kind}; set log_dir to a directory"
            if not os.access(path, os.W_OK | os.X_OK):
                return f"{directory} is not writable by this user; set log_dir elsewhere"
            return None
        if not stat.S_ISDIR(mode):
            return f"{directory} cannot be created: {path} is {kind}; set log_dir elsewhere"
        if not os.access(path, os.W_OK | os.X_OK):
            return (
                f"{directory} cannot be created: {path} is not writable by this user; "
                "set log_dir elsewhere"
            )
        return None


def looks_like_path(model: str) -> bool:
    return model.startswith(("/", "./", "../", "~"))


def _missing_model(where: str, model: str, models_dir: Path | None) -> str:
    """The line for a model path that does not exist: below the models dir it names the
    model bundle to install."""
    path = Path(model).expanduser()
    if models_dir is not None and path.parent == models_dir:
        bundle = f"{path.name}.model.tar"
        return (
            f"{where}: server.model {model} is not installed: install its model bundle "
            f"({bundle}, made by `doit pack-model`) with AUTO_INFER_VLLM_MODEL_BUNDLES=<path>/"
            f"{bundle} doit install-model"
        )
    return f"{where}: server.model {model} does not exist on this host"


def host_problems(
    config: ServeConfig,
    plan: Plan,
    environ: Mapping[str, str],
    *,
    gpus: Callable[[Mapping[str, str]], int | None] = count_gpus,
    in_use: Callable[[str, int], bool] = port_in_use,
    models_dir: Path | None = None,
) -> list[str]:
    """Every reason the plan cannot start here, one line each (empty: go). ``models_dir``
    (``AUTO_INFER_VLLM_MODELS_DIR``): a model path below it that is missing is a model
    bundle not installed, and the line says which bundle to install."""
    problems: list[str] = []
    src = config.source
    by_name = {i.name: i for i in config.instances}
    log_dirs: set[Path] = set()  # each folder is checked (and reported) once
    needed = sorted({g for inst in plan.instances for g in inst.gpu_ids})
    available = gpus(environ) if needed else None
    for inst in plan.instances:
        cfg = by_name[inst.name]
        where = f"{src}: instance {inst.name!r}"
        for var, name in inst.missing_secrets.items():
            problems.append(
                f"{where}: server.api_key_env names {name}, which is not set; export it or "
                f"use server.api_key (it reaches vLLM as {var})"
            )
        key = inst.secret_env.get("VLLM_API_KEY")
        if cfg.server.api_key_env and key and not key_is_header_safe(key.get_secret_value()):
            # server.api_key is checked with the config; a variable's value only here.
            problems.append(
                f"{where}: the key in {cfg.server.api_key_env} (server.api_key_env) holds spaces, "
                "control characters (CR, LF, ...) or non-ASCII characters; it becomes an HTTP "
                "header (the value is not shown)"
            )
        model = cfg.server.model
        if looks_like_path(model) and not Path(model).expanduser().exists():
            problems.append(_missing_model(where, model, models_dir))
        if inst.gpu_ids:
            if available is None:
                problems.append(
                    f"{where}: control.gpu_ids {list(inst.gpu_ids)} but no NVIDIA driver is "
                    "visible (no nvidia-smi, no /proc/driver/nvidia); set gpu_ids = [] for "
                    "the CPU build of vLLM"
                )
            elif max(inst.gpu_ids) >= available:
                problems.append(
                    f"{where}: control.gpu_ids {list(inst.gpu_ids)} but this host shows "
                    f"{available} GPU(s) (ids 0..{available - 1})"
                )
        if inst.port and in_use(inst.host, inst.port):
            problems.append(
                f"{where}: port {inst.port} is already in use on {inst.host}; stop what holds "
                "it or change server.port"
            )
        python = inst.argv[0]
        if python.startswith("/") and not Path(python).exists():
            problems.append(f"{where}: {python} does not exist; run `doit install`")
        log_dir = Path(inst.log_file).parent
        if log_dir not in log_dirs:
            log_dirs.add(log_dir)
            why = log_dir_problem(log_dir)
            if why:
                problems.append(f"{where}: control.log_dir {why}")
    gateway = plan.gateway
    if gateway is not None:
        where = f"{src}: gateway"
        log_dir = Path(gateway.log_file).parent
        why = log_dir_problem(log_dir) if log_dir not in log_dirs else None
        if why:
            problems.append(f"{where}: gateway.log_dir {why}")
        for name in gateway.missing_keys:
            problems.append(
                f"{where}: gateway.api_keys_env names {name}, which is not set; export it or "
                "use gateway.api_keys (the gateway would otherwise accept fewer keys)"
            )
        if in_use(gateway.host, gateway.port):
            problems.append(
                f"{where}: port {gateway.port} is already in use on {gateway.host}; stop what "
                "holds it or change gateway.port"
            )
    return problems
