"""The serve TOML: load, merge, validate. Pure: no process, socket or environment variable.

Contract (docs/serve-config.md is the reference; docs/serve-config.schema.json is generated from
the models here by :func:`json_schema`)::

    [master]                 shared: enable, pixi_project_dir, pixi_environment, env_prefix, …
    [instance.control]       defaults for every instance: how the process runs
    [instance.server]        defaults for every instance: what vLLM is told
    [instance.<name>.control] / [instance.<name>.server]   one instance; overrides the defaults
    [instance.<name>.cluster]  one instance across several nodes (vLLM's multi-node runtime)
    [gateway]                one port in front of every instance, routing by model name
    [gateway.aliases]        <instance> = ["more", "names"]: extra model names of an instance

Merge order: built-in defaults < ``[instance.control]`` / ``[instance.server]`` <
``[instance.<name>.*]``, all after ``AUTO_INFER_VLLM_OVERRIDES`` (a JSON object) has been
deep-merged into the document (tables merge key by key; lists and scalars replace). With no named
instance, the defaults are one instance called ``default``.

Every problem raises :class:`~pipeline.errors.ConfigError` with one line naming the file, the
dotted key and the instance, and what is allowed.
"""

from __future__ import annotations

import difflib
import json
import os
import re
import tomllib
from collections.abc import Callable, Iterable, Mapping
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from pipeline.errors import ConfigError

_M = TypeVar("_M", bound=BaseModel)
RESERVED_NAMES = ("control", "server")
DEFAULT_INSTANCE = "default"
# The gateway is supervised, stopped and logged under this name: no instance may take it.
GATEWAY_NAME = "gateway"
# vLLM's own default when --gpu-memory-utilization is not given; used for the shared-GPU sum.
VLLM_DEFAULT_GPU_MEMORY_UTILIZATION = 0.9
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
# Flags the launcher sets from typed keys; repeating them in extra_args would contradict them.
MANAGED_FLAGS = {
    "--model": "server.model",
    "--host": "server.host",
    "--port": "server.port",
    "--served-model-name": "server.served_model_name",
    "--dtype": "server.dtype",
    "--tensor-parallel-size": "server.tensor_parallel_size",
    "-tp": "server.tensor_parallel_size",
    "--max-model-len": "server.max_model_len",
    "--gpu-memory-utilization": "server.gpu_memory_utilization",
    "--api-key": "server.api_key or server.api_key_env (kept out of argv)",
}


class Launcher(StrEnum):
    """Which environment runs vLLM.

    ``auto``: ``env_prefix`` when set, else the installed pixi project's ``.pixi/envs/<env>``
    prefix activated directly (never ``pixi run``, whatever pixi is on PATH), else ``python`` on
    PATH (only when ``pixi_project_dir`` is not set: a set one must be installed). ``pixi``:
    opt-in ``pixi run --frozen``, refused when that pixi cannot read the lock's version. The
    other values force one of those.
    """

    AUTO = "auto"
    PIXI = "pixi"
    PREFIX = "prefix"
    PATH = "path"


class RestartPolicy(StrEnum):
    NO = "no"
    ON_FAILURE = "on-failure"


class _Strict(BaseModel):
    # strict: TOML has real booleans, integers and strings, so `enable = "yes"`, `port = "8000"`
    # or `gpu_ids = [true]` are mistakes to report, not values to coerce. Paths and enums opt
    # out (Field(strict=False)): they are written as strings.
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True, strict=True)

    @field_validator("*", mode="after")
    @classmethod
    def _expand_home(cls, value: Any) -> Any:
        # `~` in a path key means the home of whoever runs `doit serve`.
        if isinstance(value, Path) and str(value).startswith("~"):
            return value.expanduser()
        return value


class Master(_Strict):
    """What all instances share."""

    enable: bool = Field(True, description="`false`: `doit serve` starts nothing and says so.")
    pixi_project_dir: Path | None = Field(
        None,
        strict=False,
        description=(
            "Installed pixi project whose environment runs vLLM "
            "(default: `AUTO_INFER_VLLM_PIXI_PROJECT_DIR`)."
        ),
    )
    pixi_environment: str = Field("default", description="Environment of that project.")
    env_prefix: Path | None = Field(
        None,
        strict=False,
        description="A conda prefix or venv to run vLLM from instead of the pixi project.",
    )
    launcher: Launcher = Field(
        Launcher.AUTO,
        strict=False,
        description=(
            "`auto`, `pixi`, `prefix` or `path`: how vLLM is started "
            "(see the reference for what `auto` picks)."
        ),
    )


class Control(_Strict):
    """How one instance's process runs."""

    enabled: bool = Field(True, description="`false`: the instance is planned but not started.")
    background: bool = Field(
        True,
        description=(
            "`true`: `doit serve` returns once all instances are ready and a detached "
            "supervisor keeps them running; `false`: it blocks in the foreground."
        ),
    )
    log_dir: Path = Field(
        Path("/tmp/vllm-logs"),
        strict=False,
        description="Logs go to `<log_dir>/<name>.log`; relative: to the config file's folder.",
    )
    gpu_ids: list[int] = Field(
        [0],
        description=(
            "GPUs of the instance (`CUDA_VISIBLE_DEVICES`); `[]` means no GPU "
            "(the CPU build of vLLM): no pinning, no tensor-parallel check."
        ),
    )
    env: dict[str, str] = Field(
        {}, description="Extra environment variables for the instance (a table)."
    )
    ready_timeout: float = Field(
        900.0, gt=0, description="Seconds to wait for `/health` to answer 200 after a start."
    )
    stop_grace: float = Field(
        30.0,
        gt=0,
        description=(
            "Seconds between SIGTERM and SIGKILL when stopping; must exceed vLLM's "
            "`--shutdown-timeout` if you set one."
        ),
    )
    restart: RestartPolicy = Field(
        RestartPolicy.ON_FAILURE,
        strict=False,
        description="`on-failure` (restart a crashed or failed start) or `no`.",
    )
    max_restarts: int = Field(3, ge=0, description="Restarts before the instance is marked failed.")
    backoff_initial: float = Field(
        2.0, gt=0, description="Seconds before the first restart; doubles each time."
    )
    backoff_max: float = Field(60.0, gt=0, description="Upper bound of the restart delay.")

    @field_validator("gpu_ids")
    @classmethod
    def _gpu_ids(cls, value: list[int]) -> list[int]:
        if any(i < 0 for i in value):
            raise ValueError("GPU ids are indices >= 0")
        if len(set(value)) != len(value):
            raise ValueError(f"lists a GPU twice: {value}")
        return value

    @field_validator("env")
    @classmethod
    def _env_names(cls, value: dict[str, str]) -> dict[str, str]:
        for key in value:
            if not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", key):
                raise ValueError(f"{key!r} is not a valid environment variable name")
            if key in ("VLLM_API_KEY", "CUDA_VISIBLE_DEVICES"):
                where = "server.api_key_env" if key == "VLLM_API_KEY" else "control.gpu_ids"
                raise ValueError(f"{key} is set by the launcher: use {where}")
        return value


Dtype = Literal["auto", "half", "float16", "bfloat16", "float", "float32"]


class Server(_Strict):
    """What vLLM is told."""

    model: str = Field(
        ..., min_length=1, description="Model directory (or hub id, with a populated cache)."
    )
    host: str = Field("0.0.0.0", description="Address vLLM binds.")
    port: int = Field(8000, ge=1, le=65535, description="HTTP port of the instance.")
    served_model_name: str | None = Field(
        None,
        description=(
            "Name clients use in `model` (default: vLLM's, the model path). "
            "No `/` if Claude Code is a client."
        ),
    )
    dtype: Dtype = Field("auto", description="Weights and activations dtype.")
    tensor_parallel_size: int = Field(
        1, ge=1, description="GPUs per instance; must equal the number of `gpu_ids`."
    )
    max_model_len: int | None = Field(
        None, ge=16, description="Context length (default: the model's)."
    )
    gpu_memory_utilization: float | None = Field(
        None, gt=0, le=1, description="Fraction of each GPU's memory vLLM may use (vLLM: 0.9)."
    )
    api_key: str | None = Field(
        None,
        min_length=1,
        description="Key clients must send; reaches vLLM as `VLLM_API_KEY`, never argv.",
    )
    api_key_env: str | None = Field(
        None,
        pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
        description="Name of an environment variable holding the key (keeps it out of the file).",
    )
    extra_args: list[str] = Field([], description="More vLLM flags, passed as given.")

    @field_validator("api_key")
    @classmethod
    def _key(cls, value: str | None) -> str | None:
        # It becomes a header (VLLM_API_KEY; the gateway's Authorization to the instance): a CR
        # or LF would inject headers. The value is a secret: the message must not show it.
        if value is not None and not key_is_header_safe(value):
            raise ValueError(
                "holds spaces, control characters (CR, LF, ...) or non-ASCII characters; a key "
                "is visible ASCII (the value is not shown)"
            )
        return value

    @field_validator("extra_args")
    @classmethod
    def _no_managed_flags(cls, value: list[str]) -> list[str]:
        for arg in value:
            flag = arg.split("=", 1)[0]
            if flag in MANAGED_FLAGS:
                raise ValueError(f"{flag} is set from {MANAGED_FLAGS[flag]}; remove it here")
        return value

    @field_validator("model")
    @classmethod
    def _model_home(cls, value: str) -> str:
        return str(Path(value).expanduser()) if value.startswith("~/") else value

    @property
    def model_names(self) -> tuple[str, ...]:
        """The names clients may use for this instance's model."""
        return (self.served_model_name or self.model,)


def _visible_ascii(value: str) -> bool:
    return bool(value) and all("!" <= c <= "~" for c in value)


def key_is_header_safe(value: str) -> bool:
    """True when a key can travel in an HTTP header: visible ASCII, no CR, LF or space."""
    return _visible_ascii(value)


class Gateway(_Strict):
    """One port in front of every instance, routing requests by their body's ``model``."""

    enable: bool = Field(
        False,
        description=(
            "`true`: start the gateway with the instances; instances then bind 127.0.0.1 on "
            "their own ports and only the gateway is exposed. `false`: the table has no effect."
        ),
    )
    host: str = Field("0.0.0.0", description="Address the gateway binds.")
    port: int = Field(
        8000, ge=1, le=65535, description="The one exposed port (container 8000, host 11981)."
    )
    api_keys: list[str] = Field(
        [],
        description=(
            "Keys clients must send to the gateway (`Authorization: Bearer` or `x-api-key`). "
            "With neither this nor `api_keys_env`, the gateway asks for no key."
        ),
    )
    api_keys_env: list[str] = Field(
        [],
        description=(
            "Names of environment variables holding more gateway keys (keeps them out of "
            "the file); each must be set when `doit serve` runs."
        ),
    )
    aliases: dict[str, list[str]] = Field(
        {},
        description=(
            "A table: instance name = list of extra model names routed to it (they also "
            "become extra `--served-model-name`s, so the body reaches vLLM unchanged)."
        ),
    )
    log_dir: Path | None = Field(
        None,
        strict=False,
        description="The log is `<log_dir>/gateway.log` (default: `[instance.control]`'s).",
    )
    access_log: bool = Field(
        False,
        description="One log line per request (method, path, model, status, time; never keys).",
    )
    header_timeout: float = Field(
        60.0,
        gt=0,
        description=(
            "Seconds a client has to send a request head, from accept (or, on a kept-alive "
            "connection, from its first byte); then 408 and close (nginx's "
            "`client_header_timeout`)."
        ),
    )
    body_timeout: float = Field(
        60.0,
        gt=0,
        description=(
            "Seconds allowed between two reads of a request body; then 408 and close "
            "(nginx's `client_body_timeout`)."
        ),
    )
    max_body_mib: int = Field(
        64,
        ge=1,
        le=4096,
        description=(
            "Largest request body, in MiB (413 beyond). 64: above OpenAI's 50 MB and "
            "Anthropic's 32 MB request limits, so base64 images pass; nginx's 1 MB would not."
        ),
    )
    max_connections: int = Field(
        4096,
        ge=1,
        description=(
            "Open client connections; past it only /health and /metrics are answered (16 "
            "more), then 503. Lowered to fit the open-files limit."
        ),
    )

    @field_validator("api_keys")
    @classmethod
    def _keys(cls, value: list[str]) -> list[str]:
        for index, key in enumerate(value):
            # The value is a secret: the message must not show it.
            if not _visible_ascii(key):
                raise ValueError(
                    f"key #{index + 1} is empty or holds spaces or non-ASCII characters "
                    "(the value is not shown)"
                )
        return value

    @field_validator("api_keys_env")
    @classmethod
    def _key_vars(cls, value: list[str]) -> list[str]:
        for name in value:
            if not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", name):
                raise ValueError(f"{name!r} is not a valid environment variable name")
        return value

    @field_validator("aliases")
    @classmethod
    def _alias_names(cls, value: dict[str, list[str]]) -> dict[str, list[str]]:
        for instance, names in value.items():
            for name in names:
                if not _visible_ascii(name) or len(name) > 256:
                    raise ValueError(
                        f"alias {name!r} of {instance!r}: aliases are 1 to 256 visible ASCII "
                        "characters, no spaces"
                    )
            if len(set(names)) != len(names):
                raise ValueError(f"{instance!r} lists an alias twice: {names}")
        return value


_ENV_NAME = r"^[A-Za-z_][A-Za-z0-9_]*$"
# Flags the launcher sets from [instance.<name>.cluster] on a multi-node instance.
CLUSTER_FLAGS = {
    "--nnodes": "cluster.nodes",
    "-n": "cluster.nodes",
    "--node-rank": "cluster.rank (or doit serve --node-rank)",
    "-r": "cluster.rank (or doit serve --node-rank)",
    "--master-addr": "cluster.leader",
    "--master-port": "cluster.master_port",
    "--headless": "the node rank (ranks above 0 run headless)",
    "--data-parallel-size": "cluster.data_parallel",
    "-dp": "cluster.data_parallel",
    "--data-parallel-address": "cluster.leader",
    "-dpa": "cluster.leader",
}


class Cluster(_Strict):
    """One instance across several nodes on vLLM's own multi-node runtime (``mp`` executor).

    Every node reads the same TOML; each runs one member of the instance (its node rank). Rank 0
    runs the leader member (the HTTP port); the others run ``--headless`` members.
    """

    nodes: int = Field(..., ge=2, description="Number of nodes the instance spans (>= 2).")
    leader: str = Field(
        "auto",
        min_length=1,
        pattern=r"^[^\s]+$",
        description=(
            "Address of rank 0, or `auto`: `LWS_LEADER_ADDRESS`, then the first host of "
            "`SLURM_JOB_NODELIST`, then the first line of `SKYPILOT_NODE_IPS`."
        ),
    )
    rank: int | Literal["auto"] = Field(
        "auto",
        description=(
            "This node's rank, or `auto`: `doit serve --node-rank N`, then `LWS_WORKER_INDEX`, "
            "`SLURM_NODEID`, `SKYPILOT_NODE_RANK`."
        ),
    )
    interface: str | None = Field(
        None,
        min_length=1,
        pattern=r"^[A-Za-z0-9_.:@-]{1,15}$",
        description=(
            "Network interface between the nodes: sets `GLOO_SOCKET_IFNAME` and "
            "`NCCL_SOCKET_IFNAME`, and `VLLM_HOST_IP` from its IPv4 address."
        ),
    )
    master_port: int = Field(
        29501,
        ge=1,
        le=65534 - 100,
        description=(
            "Port of the leader's rendezvous (`--master-port`); on bare nodes the leader's "
            "supervisor serves the gang's control endpoint on `master_port + 100`."
        ),
    )
    data_parallel: int = Field(
        1, ge=1, description="Data-parallel ranks over all nodes (`--data-parallel-size`)."
    )
    token_env: str | None = Field(
        None,
        pattern=_ENV_NAME,
        description=(
            "Name of the variable holding the shared control token of the gang (bare nodes: "
            "the leader's supervisor and the followers' authenticate with it)."
        ),
    )

    @field_validator("rank")
    @classmethod
    def _rank(cls, value: int | str) -> int | str:
        if isinstance(value, int) and value < 0:
            raise ValueError(f'a node rank is >= 0 or "auto" (got {value})')
        return value


def pipeline_parallel_size(extra_args: Iterable[str]) -> int:
    """``--pipeline-parallel-size`` / ``-pp`` from extra_args (last one wins), else 1.

    A value that is not a positive integer counts as 1: vLLM refuses it at start with its own
    message.
    """
    size = 1
    args = list(extra_args)
    for i, arg in enumerate(args):
        flag, eq, value = arg.partition("=")
        if flag not in ("--pipeline-parallel-size", "-pp"):
            continue
        if not eq:
            value = args[i + 1] if i + 1 < len(args) else ""
        if value.isdigit() and int(value) >= 1:
            size = int(value)
    return size


def executor_backend(extra_args: Iterable[str]) -> str | None:
    """``--distributed-executor-backend`` from extra_args (last one wins), else None."""
    backend = None
    args = list(extra_args)
    for i, arg in enumerate(args):
        flag, eq, value = arg.partition("=")
        if flag != "--distributed-executor-backend":
            continue
        if not eq:
            value = args[i + 1] if i + 1 < len(args) else ""
        backend = value
    return backend


class Instance(BaseModel):
    """One resolved instance: defaults merged with its own tables."""

    model_config = ConfigDict(frozen=True)

    name: str
    control: Control
    server: Server
    cluster: Cluster | None = None

    @property
    def nodes(self) -> int:
        """Nodes the instance spans: 1 without a cluster table."""
        return self.cluster.nodes if self.cluster is not None else 1


class ServeConfig(BaseModel):
    """A validated serve config: the instances sorted by name."""

    model_config = ConfigDict(frozen=True)

    source: str
    master: Master
    instances: tuple[Instance, ...]
    gateway: Gateway = Gateway()

    @property
    def enabled(self) -> tuple[Instance, ...]:
        return tuple(i for i in self.instances if i.control.enabled)

    def aliases(self, name: str) -> tuple[str, ...]:
        """Extra model names of instance ``name``: its gateway aliases, when the gateway is on."""
        if not self.gateway.enable:
            return ()
        return tuple(self.gateway.aliases.get(name, ()))

    def model_names(self, inst: Instance) -> tuple[str, ...]:
        """Every name clients may use for ``inst``'s model: its served name, then its aliases."""
        return (*inst.server.model_names, *self.aliases(inst.name))

    def instance(self, name: str) -> Instance:
        for inst in self.instances:
            if inst.name == name:
                return inst
        raise ConfigError(
            f"{self.source}: no instance named {name!r} "
            f"(instances: {', '.join(i.name for i in self.instances)})"
        )


# ---------------------------------------------------------------------------------------------
# Loading


def load_config(path: Path, overrides: str | None = None) -> ServeConfig:
    """Read, merge and validate the serve TOML at ``path``.

    ``overrides`` is the raw ``AUTO_INFER_VLLM_OVERRIDES`` text (a JSON object) or None.
    Raises ConfigError for a missing file, bad TOML, bad overrides or an invalid value.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(
            f"{path}: serve config not found; pass --config or set AUTO_INFER_VLLM_CONFIG"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read the serve config: {exc}") from None
    return parse_config(
        text,
        source=str(path),
        overrides=overrides,
        base_dir=Path(os.path.normpath(path.absolute())).parent,
    )


def parse_config(
    text: str,
    *,
    source: str = "<config>",
    overrides: str | None = None,
    base_dir: Path | None = None,
) -> ServeConfig:
    """Like :func:`load_config`, from TOML text; ``source`` names it in errors.

    ``base_dir`` anchors relative paths (see :func:`build_config`); :func:`load_config` passes
    the config file's folder.
    """
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: invalid TOML: {exc}") from None
    patch = parse_overrides(overrides) if overrides else {}
    document = deep_merge(document, patch)
    return build_config(document, source=source, overridden=_paths(patch), base_dir=base_dir)


def parse_overrides(text: str) -> dict[str, Any]:
    """Parse ``AUTO_INFER_VLLM_OVERRIDES``: a JSON object, or ConfigError."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(
            f"AUTO_INFER_VLLM_OVERRIDES: invalid JSON at line {exc.lineno} column {exc.colno}: "
            f"{exc.msg}"
        ) from None
    if not isinstance(value, dict):
        raise ConfigError(
            "AUTO_INFER_VLLM_OVERRIDES: must be a JSON object such as "
            '{"instance": {"server": {"port": 8001}}}, got ' + type(value).__name__
        )
    return value


def deep_merge(base: Mapping[str, Any], patch: Mapping[str, Any]) -> dict[str, Any]:
    """Tables merge key by key; lists and scalars in ``patch`` replace. Inputs are not changed."""
    merged: dict[str, Any] = dict(base)
    for key, value in patch.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _paths(tree: Mapping[str, Any], prefix: str = "") -> frozenset[str]:
    out: set[str] = set()
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        out.add(dotted)
        if isinstance(value, Mapping):
            out |= _paths(value, dotted + ".")
    return frozenset(out)


class _Located:
    """Builds error messages that name the file, the dotted key and the instance."""

    def __init__(self, source: str, overridden: frozenset[str]) -> None:
        self.source = source
        self.overridden = overridden
        # instance name -> section -> function from key to the dotted key the user wrote
        self.origins: dict[str, dict[str, Callable[[str], str]]] = {}

    def key(self, instance: str, section: str, key: str) -> str:
        """Where ``instance``'s ``section.key`` was written (defaults table or its own)."""
        origin = self.origins.get(instance, {}).get(section)
        return origin(key) if origin else f"instance.{instance}.{section}.{key}"

    def error(self, key: str, message: str, instance: str | None = None) -> ConfigError:
        where = f"{self.source}: {key}"
        own = f"instance.{instance}"
        if instance is not None and key != own and not key.startswith(own + "."):
            where += f" (instance {instance!r})"
        if key in self.overridden:
            where += " (set by AUTO_INFER_VLLM_OVERRIDES)"
        return ConfigError(f"{where}: {message}")


def _check_table(value: Any, key: str, loc: _Located, instance: str | None = None) -> dict:
    if not isinstance(value, Mapping):
        raise loc.error(key, f"must be a table, got {_type_name(value)}", instance)
    return dict(value)


def _check_keys(
    table: Mapping[str, Any],
    allowed: Iterable[str],
    prefix: str,
    loc: _Located,
    instance: str | None = None,
) -> None:
    allowed = list(allowed)
    for key in table:
        if key not in allowed:
            hint = difflib.get_close_matches(key, allowed, n=1)
            did_you_mean = f"; did you mean {hint[0]!r}?" if hint else ""
            raise loc.error(
                f"{prefix}{key}",
                f"unknown key{did_you_mean} (allowed: {', '.join(allowed)})",
                instance,
            )


def build_config(
    document: Mapping[str, Any],
    *,
    source: str = "<config>",
    overridden: frozenset[str] = frozenset(),
    base_dir: Path | None = None,
) -> ServeConfig:
    """Validate a parsed (and already overridden) document into a :class:`ServeConfig`.

    With ``base_dir`` (an absolute folder: the config file's), every relative path key
    (``log_dir``, ``pixi_project_dir``, ``env_prefix``, and ``server.model`` when it starts with
    ``./`` or ``../``) is made absolute against it, here and only here: the background
    supervisor runs in ``/``, and ``doit logs`` must find what it wrote. Without it, relative
    paths stay as written.
    """
    loc = _Located(source, overridden)
    _check_keys(document, ("master", "instance", "gateway"), "", loc)
    master_raw = _check_table(document.get("master", {}), "master", loc)
    _check_keys(master_raw, Master.model_fields, "master.", loc)
    master = _anchor(_validate(Master, master_raw, "master.", loc), base_dir)
    gateway_raw = _check_table(document.get("gateway", {}), "gateway", loc)
    _check_keys(gateway_raw, Gateway.model_fields, "gateway.", loc)
    if "aliases" in gateway_raw:
        _check_table(gateway_raw["aliases"], "gateway.aliases", loc)
    gateway = _anchor(_validate(Gateway, gateway_raw, "gateway.", loc), base_dir)

    instance_root = _check_table(document.get("instance", {}), "instance", loc)
    default_control = _check_table(instance_root.get("control", {}), "instance.control", loc)
    default_server = _check_table(instance_root.get("server", {}), "instance.server", loc)
    for section, table in (("control", default_control), ("server", default_server)):
        for key, value in table.items():
            if key in RESERVED_NAMES and isinstance(value, Mapping):
                raise loc.error(
                    f"instance.{section}.{key}",
                    f"{section!r} cannot be an instance name: [instance.control] and "
                    "[instance.server] hold the defaults; rename the instance",
                )
    _check_keys(default_control, Control.model_fields, "instance.control.", loc)
    _check_keys(default_server, Server.model_fields, "instance.server.", loc)

    names = sorted(k for k in instance_root if k not in RESERVED_NAMES)
    if not names:
        names = [DEFAULT_INSTANCE]
    instances = []
    for name in names:
        own = _check_table(instance_root.get(name, {}), f"instance.{name}", loc, name)
        if name == GATEWAY_NAME:
            raise loc.error(
                f"instance.{name}",
                f"{name!r} is reserved for the gateway process (`doit stop {name}`, "
                f"`doit logs {name}`); rename the instance",
                name,
            )
        if not _NAME_RE.match(name):
            raise loc.error(
                f"instance.{name}",
                "instance names use letters, digits, '.', '_' and '-' (at most 63), "
                "starting with a letter or digit",
                name,
            )
        _check_keys(own, (*RESERVED_NAMES, "cluster"), f"instance.{name}.", loc, name)
        own_control = _check_table(own.get("control", {}), f"instance.{name}.control", loc, name)
        own_server = _check_table(own.get("server", {}), f"instance.{name}.server", loc, name)
        _check_keys(own_control, Control.model_fields, f"instance.{name}.control.", loc, name)
        _check_keys(own_server, Server.model_fields, f"instance.{name}.server.", loc, name)
        cluster = None
        if "cluster" in own:
            own_cluster = _check_table(own["cluster"], f"instance.{name}.cluster", loc, name)
            _check_keys(own_cluster, Cluster.model_fields, f"instance.{name}.cluster.", loc, name)
            cluster = _validate(Cluster, own_cluster, f"instance.{name}.cluster.", loc, name)

        implicit = name not in instance_root
        origin_of = {
            section: _origin(name, section, own_table, default_table, implicit)
            for section, own_table, default_table in (
                ("control", own_control, default_control),
                ("server", own_server, default_server),
            )
        }
        loc.origins[name] = origin_of

        control = _validate(
            Control,
            deep_merge(default_control, own_control),
            "",
            loc,
            name,
            origin_of["control"],
        )
        server = _validate(
            Server,
            deep_merge(default_server, own_server),
            "",
            loc,
            name,
            origin_of["server"],
        )
        instances.append(
            Instance(
                name=name,
                control=_anchor(control, base_dir),
                server=_anchor(server, base_dir),
                cluster=cluster,
            )
        )

    if gateway.log_dir is None:
        # Beside the instances' logs: the defaults table's log_dir (validated with them).
        default_log_dir = Control.model_fields["log_dir"].default
        written = default_control.get("log_dir")
        log_dir = Path(written).expanduser() if isinstance(written, str) else default_log_dir
        if base_dir is not None and not log_dir.is_absolute():
            log_dir = base_dir / log_dir
        gateway = gateway.model_copy(update={"log_dir": log_dir})
    config = ServeConfig(source=source, master=master, instances=tuple(instances), gateway=gateway)
    check_instances(config, loc)
    check_gateway(config, loc)
    return config


def _anchor(model: _M, base_dir: Path | None) -> _M:
    """``model`` with its relative paths made absolute against ``base_dir`` (None: unchanged)."""
    if base_dir is None:
        return model
    update: dict[str, Any] = {}
    for name in type(model).model_fields:
        value = getattr(model, name)
        if isinstance(value, Path) and not value.is_absolute():
            update[name] = base_dir / value
        elif name == "model" and isinstance(value, str) and value.startswith(("./", "../")):
            # Only an explicit relative path: `org/name` is a hub id, not a folder.
            update[name] = str(base_dir / value)
    return model.model_copy(update=update) if update else model


def _origin(
    name: str, section: str, own: Mapping[str, Any], defaults: Mapping[str, Any], implicit: bool
) -> Callable[[str], str]:
    """Maps a key of a merged instance table to the dotted key where the user wrote it."""

    def where(key: str) -> str:
        if key in own:
            return f"instance.{name}.{section}.{key}"
        if key in defaults or implicit:
            return f"instance.{section}.{key}"
        return f"instance.{name}.{section}.{key}"

    return where


def _validate(
    model: type[BaseModel],
    data: Mapping[str, Any],
    prefix: str,
    loc: _Located,
    instance: str | None = None,
    origin: Callable[[str], str] | None = None,
) -> Any:
    try:
        return model.model_validate(dict(data))
    except ValidationError as exc:
        err = exc.errors()[0]
        parts = [str(p) for p in err["loc"]]
        top = parts[0] if parts else ""
        key = origin(top) if origin is not None else f"{prefix}{top}"
        key = ".".join([key, *parts[1:]])
        if err["type"] == "missing" and model is Cluster:
            raise loc.error(key, "required in a cluster table", instance) from None
        if err["type"] == "missing":
            section = "server" if model is Server else "control"
            raise loc.error(
                key,
                f"required; set it in [instance.{section}] or [instance.{instance}.{section}]",
                instance,
            ) from None
        message = _describe(err, model, top)
        raise loc.error(key, message, instance) from None


# Keys whose values are secrets (api_key, api_keys, an env var such as HF_TOKEN): an error
# about them says what is wrong, never what was written. `*_env` keys hold variable names.
_SECRET_KEY = re.compile(r"key|token|secret|passw|credential", re.IGNORECASE)


def is_secret_key(loc: Iterable[Any]) -> bool:
    """True when any part of a dotted key path names a secret (and is not a ``*_env`` name)."""
    return any(
        isinstance(part, str) and _SECRET_KEY.search(part) and not part.endswith("_env")
        for part in loc
    )


def _describe(err: Mapping[str, Any], model: type[BaseModel], field: str) -> str:
    message = str(err["msg"])
    message = message.removeprefix("Value error, ")
    got = err.get("input")
    shown = "the value is not shown" if is_secret_key(err["loc"]) else f"got {got!r}"
    if err["type"] in ("literal_error", "enum"):
        return f"{message} ({shown})"
    if not isinstance(got, Mapping) and err["type"] != "value_error":
        message += f" ({shown})"
    info = model.model_fields.get(field)
    if info is not None and info.description and err["type"].endswith("_type"):
        message += f"; {info.description}"
    return message


def _type_name(value: Any) -> str:
    return {
        str: "a string",
        int: "an integer",
        float: "a number",
        bool: "a boolean",
        list: "an array",
    }.get(type(value), type(value).__name__)


def check_instances(config: ServeConfig, loc: _Located | None = None) -> None:
    """Cross-instance rules: ports and names unique, GPUs consistent, one run mode."""
    loc = loc or _Located(config.source, frozenset())
    enabled = config.enabled
    seen_ports: dict[int, str] = {}
    seen_names: dict[str, str] = {}
    for inst in enabled:
        srv, ctl = inst.server, inst.control
        other = seen_ports.get(srv.port)
        if other is not None:
            raise loc.error(
                loc.key(inst.name, "server", "port"),
                f"port {srv.port} is also used by instance {other!r}; give each instance its own",
                inst.name,
            )
        seen_ports[srv.port] = inst.name
        for model_name in srv.model_names:
            other = seen_names.get(model_name)
            if other is not None:
                raise loc.error(
                    loc.key(inst.name, "server", "served_model_name"),
                    f"model name {model_name!r} is also served by instance {other!r}; "
                    "set a distinct served_model_name",
                    inst.name,
                )
            seen_names[model_name] = inst.name
        if srv.api_key and srv.api_key_env:
            raise loc.error(
                loc.key(inst.name, "server", "api_key_env"),
                "set either api_key or api_key_env, not both",
                inst.name,
            )
        if inst.cluster is not None:
            check_cluster(inst, loc)
        elif ctl.gpu_ids and srv.tensor_parallel_size != len(ctl.gpu_ids):
            raise loc.error(
                loc.key(inst.name, "server", "tensor_parallel_size"),
                f"is {srv.tensor_parallel_size} but gpu_ids {ctl.gpu_ids} lists "
                f"{len(ctl.gpu_ids)} GPU(s); they must match",
                inst.name,
            )
        if ctl.backoff_max < ctl.backoff_initial:
            raise loc.error(
                loc.key(inst.name, "control", "backoff_max"),
                f"must be >= backoff_initial ({ctl.backoff_initial})",
                inst.name,
            )

    usage: dict[int, list[tuple[str, float]]] = {}
    for inst in enabled:
        share = inst.server.gpu_memory_utilization or VLLM_DEFAULT_GPU_MEMORY_UTILIZATION
        for gpu in inst.control.gpu_ids:
            usage.setdefault(gpu, []).append((inst.name, share))
    for gpu, users in sorted(usage.items()):
        total = sum(share for _, share in users)
        if len(users) > 1 and total > 1.0 + 1e-9:
            detail = ", ".join(f"{name}={share:g}" for name, share in users)
            raise loc.error(
                loc.key(users[-1][0], "server", "gpu_memory_utilization"),
                f"GPU {gpu} is shared ({detail}; unset means {VLLM_DEFAULT_GPU_MEMORY_UTILIZATION})"
                f" and the sum {total:g} exceeds 1; lower gpu_memory_utilization",
                users[-1][0],
            )

    modes = {inst.control.background for inst in enabled}
    if len(modes) > 1:
        fg = [i.name for i in enabled if not i.control.background]
        raise loc.error(
            loc.key(fg[0], "control", "background"),
            "all enabled instances must agree on background (one supervisor runs them all); "
            "set it in [instance.control]",
            fg[0],
        )


_LOOPBACK = re.compile(r"^(127\.|::1$|localhost$|0\.0\.0\.0$)")


def check_cluster(inst: Instance, loc: _Located) -> None:
    """The static rules of a multi-node instance (rank and platform: :mod:`pipeline.serve.cluster`).

    The parallel sizes fill the nodes: ``tensor_parallel_size * data_parallel *
    pipeline_parallel_size`` equals ``nodes * len(gpu_ids)``; with ``gpu_ids = []`` (the CPU
    build) the per-node count is that product divided by ``nodes``, a whole number. vLLM's
    multi-node mode needs its ``mp`` executor with multiprocessing and a routable host address.
    """
    cluster, srv, ctl = inst.cluster, inst.server, inst.control
    assert cluster is not None
    tp, dp = srv.tensor_parallel_size, cluster.data_parallel
    pp = pipeline_parallel_size(srv.extra_args)
    total = tp * dp * pp
    sizes = f"tensor_parallel_size {tp} * data_parallel {dp}" + (
        f" * pipeline_parallel_size {pp}" if pp != 1 else ""
    )
    if ctl.gpu_ids and total != cluster.nodes * len(ctl.gpu_ids):
        raise loc.error(
            loc.key(inst.name, "server", "tensor_parallel_size"),
            f"{sizes} = {total} must equal cluster.nodes {cluster.nodes} * {len(ctl.gpu_ids)} "
            f"GPU(s) per node (gpu_ids {ctl.gpu_ids}) = {cluster.nodes * len(ctl.gpu_ids)}",
            inst.name,
        )
    if not ctl.gpu_ids and total % cluster.nodes:
        raise loc.error(
            loc.key(inst.name, "server", "tensor_parallel_size"),
            f"{sizes} = {total} does not divide over cluster.nodes {cluster.nodes} "
            "(gpu_ids = []: each node runs the product / nodes workers)",
            inst.name,
        )
    for arg in srv.extra_args:
        flag = arg.split("=", 1)[0]
        if flag in CLUSTER_FLAGS:
            raise loc.error(
                loc.key(inst.name, "server", "extra_args"),
                f"{flag} is set from {CLUSTER_FLAGS[flag]} on a multi-node instance; remove it",
                inst.name,
            )
    if executor_backend(srv.extra_args) == "uni":
        raise loc.error(
            loc.key(inst.name, "server", "extra_args"),
            "--distributed-executor-backend uni runs one process; a multi-node instance needs "
            "mp (the default here) or ray",
            inst.name,
        )
    if ctl.env.get("VLLM_ENABLE_V1_MULTIPROCESSING") == "0":
        raise loc.error(
            loc.key(inst.name, "control", "env") + ".VLLM_ENABLE_V1_MULTIPROCESSING",
            "0 turns off the engine processes a multi-node instance needs; remove it",
            inst.name,
        )
    host_ip = ctl.env.get("VLLM_HOST_IP")
    if host_ip is not None and _LOOPBACK.match(host_ip):
        raise loc.error(
            loc.key(inst.name, "control", "env") + ".VLLM_HOST_IP",
            f"{host_ip!r} is not reachable from the other nodes; set cluster.interface or the "
            "node's own address",
            inst.name,
        )
    if isinstance(cluster.rank, int) and cluster.rank >= cluster.nodes:
        raise loc.error(
            f"instance.{inst.name}.cluster.rank",
            f"rank {cluster.rank} is out of range for nodes = {cluster.nodes} "
            f"(0 to {cluster.nodes - 1})",
            inst.name,
        )


def check_gateway(config: ServeConfig, loc: _Located | None = None) -> None:
    """The gateway against the instances: aliases name instances, and with the gateway on,
    every model name and alias routes to one instance and no instance takes its port."""
    loc = loc or _Located(config.source, frozenset())
    gateway = config.gateway
    known = [i.name for i in config.instances]
    for name in gateway.aliases:
        if name not in known:
            hint = difflib.get_close_matches(name, known, n=1)
            did_you_mean = f"did you mean {hint[0]!r}? " if hint else ""
            raise loc.error(
                f"gateway.aliases.{name}",
                f"no instance named {name!r} ({did_you_mean}instances: {', '.join(known)})",
            )
    if not gateway.enable:
        return
    owner: dict[str, str] = {}
    for inst in config.enabled:
        for model_name in inst.server.model_names:
            owner[model_name] = inst.name
    for inst in config.enabled:
        for alias in config.aliases(inst.name):
            other = owner.get(alias)
            if other is not None:
                what = "is also an alias of" if alias in config.aliases(other) else "is served by"
                raise loc.error(
                    f"gateway.aliases.{inst.name}",
                    f"alias {alias!r} {what} instance {other!r}; a model name routes to one "
                    "instance",
                    inst.name,
                )
            owner[alias] = inst.name
        if inst.server.port == gateway.port:
            raise loc.error(
                loc.key(inst.name, "server", "port"),
                f"port {gateway.port} is the gateway's (gateway.port); with the gateway on, "
                "instances listen on 127.0.0.1 on ports of their own: move the instance or "
                "the gateway",
                inst.name,
            )


def json_schema() -> dict[str, Any]:
    """JSON schema of the serve TOML, generated from the models (docs/serve-config.schema.json)."""
    control = Control.model_json_schema()
    server = Server.model_json_schema()
    master = Master.model_json_schema()
    gateway = Gateway.model_json_schema()
    cluster = Cluster.model_json_schema()
    defs: dict[str, Any] = {}
    for schema in (control, server, master, gateway, cluster):
        defs.update(schema.pop("$defs", {}))
    # Defaults tables may leave out `model`: only the merged instance must have it.
    server_defaults = dict(server)
    server_defaults.pop("required", None)
    server_defaults["title"] = "ServerDefaults"
    instance = {
        "type": "object",
        "title": "Instance",
        "additionalProperties": False,
        "properties": {
            "control": {"$ref": "#/$defs/Control"},
            "server": {"$ref": "#/$defs/ServerDefaults"},
            "cluster": {"$ref": "#/$defs/Cluster"},
        },
    }
    defs.update(
        {
            "Control": control,
            "Server": server,
            "ServerDefaults": server_defaults,
            "Master": master,
            "Gateway": gateway,
            "Cluster": cluster,
            "Instance": instance,
        }
    )
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": "https://infer-vllm.local/serve-config.schema.json",
        "title": "vLLM serve config",
        "description": (
            "[instance.control]/[instance.server] are defaults for every instance; "
            "[instance.<name>.control]/[instance.<name>.server] override them. "
            "Each resolved instance needs server.model. [gateway] puts one port in front "
            "of them all."
        ),
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "master": {"$ref": "#/$defs/Master"},
            "gateway": {"$ref": "#/$defs/Gateway"},
            "instance": {
                "type": "object",
                "properties": {
                    "control": {"$ref": "#/$defs/Control"},
                    "server": {"$ref": "#/$defs/ServerDefaults"},
                },
                "propertyNames": {
                    "pattern": _NAME_RE.pattern,
                    "not": {"const": GATEWAY_NAME},
                },
                "additionalProperties": {"$ref": "#/$defs/Instance"},
            },
        },
        "$defs": dict(sorted(defs.items())),
    }
