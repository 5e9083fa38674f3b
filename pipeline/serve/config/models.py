"""The serve TOML's tables as pydantic models: types, defaults, per-field rules, and the JSON
schema generated from them (docs/serve-config.schema.json). Pure."""

from __future__ import annotations

import re
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from pipeline.errors import ConfigError
from pipeline.serve.config.vllm_args import overriding, refusal

RESERVED_NAMES = ("control", "server")
DEFAULT_INSTANCE = "default"
# The gateway is supervised, stopped and logged under this name: no instance may take it.
GATEWAY_NAME = "gateway"
# vLLM's own default when --gpu-memory-utilization is not given; used for the shared-GPU sum.
VLLM_DEFAULT_GPU_MEMORY_UTILIZATION = 0.9
INSTANCE_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
# vLLM's options (by dest: every name of one) that the launcher sets from typed keys; in
# extra_args, under any spelling vLLM accepts, they would contradict them (a later one wins).
MANAGED_OPTIONS = {
    "model": "server.model",
    "host": "server.host",
    "port": "server.port",
    "served_model_name": "server.served_model_name",
    "dtype": "server.dtype",
    "tensor_parallel_size": "server.tensor_parallel_size",
    "max_model_len": "server.max_model_len",
    "gpu_memory_utilization": "server.gpu_memory_utilization",
    "api_key": "server.api_key or server.api_key_env (kept out of argv)",
    # A Unix socket instead of host:port: the supervisor and the gateway would never reach it.
    "uds": "server.host and server.port (vLLM is reached over TCP)",
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


class StartPolicy(StrEnum):
    """``boot``: started by `doit serve`. ``on-demand``: started on the first request for its
    model (through the gateway), and put away when idle."""

    BOOT = "boot"
    ON_DEMAND = "on-demand"


class UnloadPolicy(StrEnum):
    """How an idle instance is put away: ``sleep`` (vLLM's sleep mode, level 1, where the
    platform has it; a stop where it does not) or ``stop`` (the process ends)."""

    SLEEP = "sleep"
    STOP = "stop"


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
    health_interval: float = Field(
        10.0,
        ge=0.1,
        le=3600,
        description=(
            "Seconds between two `/health` probes once the instance is ready (none while it "
            "starts); a probe times out after this long, at most 5 s and at least 1 s."
        ),
    )
    health_failures: int = Field(
        3,
        ge=1,
        le=100,
        description=(
            "Failed `/health` probes in a row after which a ready instance counts as hung and "
            "is restarted like a crashed one (`restart`, `max_restarts`, backoff)."
        ),
    )
    start: StartPolicy = Field(
        StartPolicy.BOOT,
        strict=False,
        description=(
            "`boot` (started by `doit serve`) or `on-demand` (started on the first request "
            "for its model; needs `[gateway] enable = true`)."
        ),
    )
    idle_timeout: float = Field(
        0.0,
        ge=0,
        description=(
            "Seconds with no request in flight after which the instance is put away "
            "(`unload`); `0`: never. Needs the gateway, which counts the requests."
        ),
    )
    unload: UnloadPolicy = Field(
        UnloadPolicy.SLEEP,
        strict=False,
        description=(
            "How an idle or evicted instance is put away: `sleep` (vLLM's sleep mode level 1 "
            "on a GPU; a stop on the CPU build or when sleeping fails) or `stop`."
        ),
    )

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
            "No `/` if Claude Code is a client. Instances with the same name (and model) "
            "are replicas."
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
        # Read as vLLM reads them: `--hos`, `--api_key=...` and `--por` are --host, --api-key
        # and --port to it. The message names the flag, never a value (it may be a key).
        for reading, option, where in overriding(value, MANAGED_OPTIONS):
            raise ValueError(refusal(reading, option, where))
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
            "connection, from its first byte); a body not proxied (one for `/health`, say) "
            "must come within it too. Then 408 and close (nginx's `client_header_timeout`). "
            "Also how long a connection none of whose requests had a key may stay idle."
        ),
    )
    body_timeout: float = Field(
        60.0,
        gt=0,
        description=(
            "Seconds allowed between two reads of a proxied request's body (its key was "
            "checked on its head); then 408 and close (nginx's `client_body_timeout`)."
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
    upstream_timeout: float = Field(
        600.0,
        gt=0,
        le=86400,
        description=(
            "Seconds an instance has to send the head of its answer once a request is sent "
            "(a long prompt, or a whole answer when not streaming, must fit); then 504 and "
            "the instance is suspect: its replicas get the requests until it answers again. "
            "A stream's body is never cut."
        ),
    )
    max_queued: int = Field(
        256,
        ge=0,
        description=(
            "Requests held per model while its on-demand instance starts or wakes; beyond "
            "it, 503 with `Retry-After`."
        ),
    )
    queue_timeout: float = Field(
        600.0,
        gt=0,
        description=(
            "Seconds a held request waits for its model to start or wake (a large model's "
            "cold start takes minutes); then 503 with `Retry-After`."
        ),
    )
    max_connections: int = Field(
        4096,
        ge=1,
        description=(
            "Open client connections; at it, an idle keep-alive connection is closed for a new "
            "one (those whose requests had no key first); past it only /health and /metrics "
            "are answered (16 more), then 503. Lowered to fit the open-files limit."
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


class Pool(_Strict):
    """A group of instances of which at most ``max_awake`` hold their memory at once."""

    instances: list[str] = Field(
        ..., min_length=1, description="Instance names in the pool (each in one pool at most)."
    )
    max_awake: int = Field(
        1, ge=1, description="How many of them may be awake (starting, running) at once."
    )

    @field_validator("instances")
    @classmethod
    def _unique(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError(f"lists an instance twice: {value}")
        return value


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

    @property
    def on_demand(self) -> bool:
        return self.control.start is StartPolicy.ON_DEMAND


class ServeConfig(BaseModel):
    """A validated serve config: the instances sorted by name."""

    model_config = ConfigDict(frozen=True)

    source: str
    master: Master
    instances: tuple[Instance, ...]
    gateway: Gateway = Gateway()
    pools: dict[str, Pool] = {}

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

    def pool_of(self, name: str) -> str | None:
        """The pool that lists instance ``name`` (None: in none)."""
        for group, pool in self.pools.items():
            if name in pool.instances:
                return group
        return None

    def managed(self, inst: Instance) -> bool:
        """Whether the instance may be put away and brought back on demand: on-demand, with
        an idle timeout, or in a pool."""
        return (
            inst.on_demand or inst.control.idle_timeout > 0 or self.pool_of(inst.name) is not None
        )

    def instance(self, name: str) -> Instance:
        for inst in self.instances:
            if inst.name == name:
                return inst
        raise ConfigError(
            f"{self.source}: no instance named {name!r} "
            f"(instances: {', '.join(i.name for i in self.instances)})"
        )


def json_schema() -> dict[str, Any]:
    """JSON schema of the serve TOML, generated from the models (docs/serve-config.schema.json)."""
    control = Control.model_json_schema()
    server = Server.model_json_schema()
    master = Master.model_json_schema()
    gateway = Gateway.model_json_schema()
    cluster = Cluster.model_json_schema()
    pool = Pool.model_json_schema()
    defs: dict[str, Any] = {}
    for schema in (control, server, master, gateway, cluster, pool):
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
            "Pool": pool,
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
            "pool": {
                "type": "object",
                "propertyNames": {"pattern": INSTANCE_NAME_RE.pattern},
                "additionalProperties": {"$ref": "#/$defs/Pool"},
            },
            "instance": {
                "type": "object",
                "properties": {
                    "control": {"$ref": "#/$defs/Control"},
                    "server": {"$ref": "#/$defs/ServerDefaults"},
                },
                "propertyNames": {
                    "pattern": INSTANCE_NAME_RE.pattern,
                    "not": {"const": GATEWAY_NAME},
                },
                "additionalProperties": {"$ref": "#/$defs/Instance"},
            },
        },
        "$defs": dict(sorted(defs.items())),
    }
