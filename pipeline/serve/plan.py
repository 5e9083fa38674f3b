"""From a validated config to a launch plan. Pure: config and runtime in, plan out.

A plan says, per instance, exactly what will run: argv, the environment it adds (secrets kept
apart, masked when shown), working directory, log file, port, GPUs, health URL and start order.
``doit plan`` prints it as JSON; the supervisor only executes it.

With ``[gateway] enable = true`` the plan also holds a :class:`GatewayPlan`: one more process
(``python -m pipeline.gateway``) that the supervisor runs like an instance, started at once
with them. Its routing table, the instances' keys and its own keys travel in one secret
environment variable (``PIPELINE_GATEWAY_CONFIG``), and every instance is forced onto 127.0.0.1.

No served process inherits a key meant for another: the variables that hold keys (every
instance's ``api_key_env``, the gateway's ``api_keys_env``, the pipeline's own secret settings)
are listed in each plan's ``env_remove`` and taken out of the inherited environment. An
instance gets its own key as ``VLLM_API_KEY`` only (``trust_remote_code`` model code runs in
that process); the gateway gets every key it needs inside ``PIPELINE_GATEWAY_CONFIG``.

A multi-node instance (``[instance.<name>.cluster]``) is planned per node: the node's rank
(``--node-rank``, else the platform's) and its environment in, this node's member out. Its
members start through vLLM's CLI (``python -m vllm.entrypoints.cli.main serve MODEL``: the
OpenAI module ignores ``--headless``) with ``--nnodes``, ``--node-rank``, ``--master-addr``
and ``--master-port``. Rank 0 runs the leader member (the HTTP port), every one-node
instance and the gateway; a higher rank runs only ``--headless`` members of multi-node
instances: no HTTP port, no API key.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, SecretStr

from pipeline.errors import ConfigError
from pipeline.gateway.config import CONFIG_VAR, GatewayConfig, Upstream
from pipeline.pixi.envs import Runtime
from pipeline.serve.cluster import Member, node_rank, resolve_member
from pipeline.serve.config import (
    GATEWAY_NAME,
    Instance,
    RestartPolicy,
    ServeConfig,
    executor_backend,
    pipeline_parallel_size,
)
from pipeline.serve.config.checks import gpu_share
from pipeline.settings import SECRET_VARIABLES, package_pythonpath

VLLM_MODULE = "vllm.entrypoints.openai.api_server"
# `vllm serve`'s code path: the only one that honours --headless (multi-node members).
VLLM_CLI_MODULE = "vllm.entrypoints.cli.main"
GATEWAY_MODULE = "pipeline.gateway"
LOOPBACK = "127.0.0.1"
# The gateway starts in well under a second and holds no model: short limits, quick restarts.
GATEWAY_READY_TIMEOUT = 30.0
GATEWAY_STOP_GRACE = 10.0
GATEWAY_MAX_RESTARTS = 5
GATEWAY_BACKOFF = (0.5, 10.0)
# The liveness probe of a ready process: every 10 s, restarted after 3 misses in a row.
HEALTH_INTERVAL = 10.0
HEALTH_FAILURES = 3
MASK = "***"
_SECRET_NAME = re.compile(r"(KEY|TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIAL)", re.IGNORECASE)


class InstancePlan(BaseModel):
    """Everything needed to start, watch and stop one instance."""

    model_config = ConfigDict(frozen=True)

    name: str
    argv: tuple[str, ...]
    env: dict[str, str]
    secret_env: dict[str, SecretStr]
    # Secrets named by api_key_env whose variable was not set when planning.
    missing_secrets: dict[str, str]
    cwd: str
    log_file: str
    host: str
    port: int
    health_url: str
    base_url: str
    gpu_ids: tuple[int, ...]
    model_names: tuple[str, ...]
    start_after: str | None
    ready_timeout: float
    stop_grace: float
    restart: RestartPolicy
    max_restarts: int
    backoff_initial: float
    backoff_max: float
    # Liveness once ready: a /health probe every health_interval seconds; health_failures
    # misses in a row restart it (defaults: plans written before these fields existed).
    health_interval: float = HEALTH_INTERVAL
    health_failures: int = HEALTH_FAILURES
    kind: Literal["vllm", "gateway"] = "vllm"
    # What the planner changed from the config, said in `doit plan` (e.g. a forced host).
    notes: tuple[str, ...] = ()
    # Inherited variables the child must not see: other instances' and the gateway's keys.
    env_remove: tuple[str, ...] = ()
    # This node's member of a multi-node instance (None: a one-node instance).
    member: Member | None = None
    # The model pool (docs/serve-config.md, "On-demand models"). managed: the instance may be
    # put away and brought back (on-demand, an idle timeout, or a pool); on_demand: it waits
    # for its first request instead of starting at boot; sleep: it runs with vLLM's sleep
    # mode and is put to sleep (level 1), else it is stopped; pool and max_awake: its pool;
    # gpu_share: the fraction of each of its GPUs it may take, for the run-time memory rule.
    managed: bool = False
    on_demand: bool = False
    idle_timeout: float = 0.0
    sleep: bool = False
    pool: str | None = None
    max_awake: int = 0
    gpu_share: float = 0.0

    def display_env(self) -> dict[str, str]:
        """The added environment as shown to people: secrets masked."""
        shown = {
            key: (MASK if _SECRET_NAME.search(key) else value) for key, value in self.env.items()
        }
        shown.update(dict.fromkeys(self.secret_env, MASK))
        shown.update({key: f"<unset: ${name}>" for key, name in self.missing_secrets.items()})
        return dict(sorted(shown.items()))

    def child_env(self, base: Mapping[str, str]) -> dict[str, str]:
        """The full environment of the child: ``base`` less ``env_remove`` (and any
        ``VLLM_API_KEY``), plus this plan's variables and secrets. Pure."""
        env = dict(base)
        # A key in the supervisor's own environment must not leak into an instance that has
        # none (or a different one).
        env.pop("VLLM_API_KEY", None)
        for name in self.env_remove:
            env.pop(name, None)
        env.update(self.env)
        env.update({key: value.get_secret_value() for key, value in self.secret_env.items()})
        return env


class GatewayPlan(InstancePlan):
    """The gateway process: an :class:`InstancePlan` (so the supervisor runs, probes, restarts
    and stops it like an instance) plus what ``doit plan`` shows of its routing."""

    kind: Literal["vllm", "gateway"] = "gateway"
    # model name or alias -> instance name, for names one instance serves
    routes: dict[str, str]
    # model name or alias -> its replicas (two or more instances), which share its requests
    replicas: dict[str, tuple[str, ...]] = {}
    # How many keys clients may use (0: no auth), and api_keys_env names unset when planning.
    key_count: int
    missing_keys: tuple[str, ...]


class Plan(BaseModel):
    """The launch plan of every enabled instance, in start order, and the gateway if enabled."""

    model_config = ConfigDict(frozen=True)

    source: str
    enable: bool
    background: bool
    runtime: str
    instances: tuple[InstancePlan, ...]
    disabled: tuple[str, ...]
    gateway: GatewayPlan | None = None
    # This node's rank (0 without multi-node instances) and the one-node instances left to
    # rank 0 (planned elsewhere, not here).
    node_rank: int = 0
    elsewhere: tuple[str, ...] = ()

    @property
    def processes(self) -> tuple[InstancePlan, ...]:
        """Everything the supervisor runs: the instances, then the gateway (it waits for none)."""
        return self.instances if self.gateway is None else (*self.instances, self.gateway)

    def instance(self, name: str) -> InstancePlan:
        for inst in self.processes:
            if inst.name == name:
                return inst
        known = ", ".join(i.name for i in self.processes) or "none"
        raise ConfigError(f"{self.source}: no enabled instance named {name!r} (enabled: {known})")

    def to_display(self) -> dict[str, Any]:
        """JSON-ready view for ``doit plan``: secrets masked, start order explicit."""
        out: dict[str, Any] = {
            "source": self.source,
            "enable": self.enable,
            "background": self.background,
            "runtime": self.runtime,
            "disabled": list(self.disabled),
            "instances": [],
        }
        if self.node_rank or self.elsewhere or any(i.member for i in self.instances):
            out["node_rank"] = self.node_rank
            out["on_rank_0"] = list(self.elsewhere)
        for order, inst in enumerate(self.instances):
            item = inst.model_dump(
                mode="json",
                exclude={"secret_env", "missing_secrets", "env", "member"},
            )
            item["env"] = inst.display_env()
            if inst.member is not None:
                member = inst.member.model_dump(mode="json", exclude={"token"})
                member["token"] = MASK if inst.member.token is not None else None
                item.pop("member", None)
                item["member"] = member
            item["start_order"] = order
            out["instances"].append(item)
        if self.gateway is not None:
            gw = self.gateway
            item = gw.model_dump(
                mode="json",
                exclude={"secret_env", "missing_secrets", "env", "gpu_ids", "model_names"},
            )
            item["env"] = gw.display_env()
            item["auth"] = (
                f"{gw.key_count} key(s): Authorization: Bearer or x-api-key"
                if gw.key_count or gw.missing_keys
                else "none (no api_keys set: any client may call)"
            )
            item["start_order"] = 0
            out["gateway"] = item
        return out

    def digest(self) -> str:
        """sha256 of what the plan starts (secrets masked): equal plans, equal digests."""
        text = json.dumps(self.to_display(), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()

    def to_secret_json(self) -> str:
        """The plan with secrets revealed: only for handing to the detached supervisor."""
        data = self.model_dump(mode="json")
        for item, inst in zip(data["instances"], self.instances, strict=True):
            item["secret_env"] = {k: v.get_secret_value() for k, v in inst.secret_env.items()}
            if inst.member is not None and inst.member.token is not None:
                item["member"]["token"] = inst.member.token.get_secret_value()
        if self.gateway is not None:
            data["gateway"]["secret_env"] = {
                k: v.get_secret_value() for k, v in self.gateway.secret_env.items()
            }
        return json.dumps(data)


def _connect_host(host: str) -> str:
    if host in ("0.0.0.0", ""):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


def _vllm_args(inst: Instance, host: str, aliases: tuple[str, ...]) -> list[str]:
    srv = inst.server
    args = [
        "-m",
        VLLM_MODULE,
        "--model",
        srv.model,
        "--host",
        host,
        "--port",
        str(srv.port),
    ]
    if aliases:
        # vLLM answers to every name given; the first stays the one it reports.
        args += ["--served-model-name", *srv.model_names, *aliases]
    elif srv.served_model_name:
        args += ["--served-model-name", srv.served_model_name]
    args += ["--dtype", srv.dtype, "--tensor-parallel-size", str(srv.tensor_parallel_size)]
    if srv.max_model_len is not None:
        args += ["--max-model-len", str(srv.max_model_len)]
    if srv.gpu_memory_utilization is not None:
        args += ["--gpu-memory-utilization", f"{srv.gpu_memory_utilization:g}"]
    return [*args, *srv.extra_args]


def _member_args(inst: Instance, member: Member, host: str, aliases: tuple[str, ...]) -> list[str]:
    """vLLM's CLI arguments for this node's member of a multi-node instance. Pure.

    The leader (rank 0) gets the HTTP side (host, port, names, one API server with data
    parallelism); the others run ``--headless``. ``mp`` is vLLM's multi-node executor, added
    unless extra_args picks one (``ray``, the extra-args recipe).
    """
    srv = inst.server
    cluster = inst.cluster
    assert cluster is not None
    args = ["-m", VLLM_CLI_MODULE, "serve", srv.model]
    if member.is_leader:
        args += ["--host", host, "--port", str(srv.port)]
        if aliases:
            args += ["--served-model-name", *srv.model_names, *aliases]
        elif srv.served_model_name:
            args += ["--served-model-name", srv.served_model_name]
    args += ["--dtype", srv.dtype, "--tensor-parallel-size", str(srv.tensor_parallel_size)]
    if cluster.data_parallel > 1:
        args += ["--data-parallel-size", str(cluster.data_parallel)]
        if member.is_leader and not any(
            a.split("=", 1)[0] == "--api-server-count" for a in srv.extra_args
        ):
            args += ["--api-server-count", "1"]
    if (
        executor_backend(srv.extra_args) is None
        and srv.tensor_parallel_size * pipeline_parallel_size(srv.extra_args) > 1
    ):
        args += ["--distributed-executor-backend", "mp"]
    args += [
        "--nnodes",
        str(member.nodes),
        "--node-rank",
        str(member.rank),
        "--master-addr",
        member.leader,
        "--master-port",
        str(member.master_port),
    ]
    if not member.is_leader:
        args.append("--headless")
    if srv.max_model_len is not None:
        args += ["--max-model-len", str(srv.max_model_len)]
    if srv.gpu_memory_utilization is not None:
        args += ["--gpu-memory-utilization", f"{srv.gpu_memory_utilization:g}"]
    return [*args, *srv.extra_args]


def member_env(inst: Instance, member: Member) -> dict[str, str]:
    """The variables a member needs on its node (before ``control.env``, which wins). Pure.

    ``interface`` names the socket interface for gloo and NCCL; ``VLLM_HOST_IP`` is this
    node's address (unset, vLLM probes 8.8.8.8 and falls back to 0.0.0.0 without a route).
    On the CPU build (``gpu_ids = []``) OpenMP threads are not bound: vLLM's automatic binding
    assumes it owns the cores of the node.
    """
    env: dict[str, str] = {}
    if member.interface is not None:
        env["GLOO_SOCKET_IFNAME"] = member.interface
        env["NCCL_SOCKET_IFNAME"] = member.interface
    if member.host_ip is not None:
        env["VLLM_HOST_IP"] = member.host_ip
    if not inst.control.gpu_ids:
        env["VLLM_CPU_OMP_THREADS_BIND"] = "nobind"
    return env


def start_order(instances: tuple[Instance, ...]) -> dict[str, str | None]:
    """For each instance, the instance it must wait for (``/health`` 200) before starting.

    Instances sharing a GPU start one after another (vLLM profiles free memory at start, so
    two loading at once on one GPU both see the other's memory as taken); instances on
    disjoint GPUs, and CPU instances, start at once. Chains follow name order.
    """
    after: dict[str, str | None] = {}
    last_on_gpu: dict[int, str] = {}
    for inst in instances:
        previous = [last_on_gpu[g] for g in inst.control.gpu_ids if g in last_on_gpu]
        # The latest-planned predecessor: earlier ones are already ahead of it in its chain.
        after[inst.name] = (
            max(previous, key=[i.name for i in instances].index) if previous else None
        )
        for gpu in inst.control.gpu_ids:
            last_on_gpu[gpu] = inst.name
    return after


# What every instance gets unless its config's env says otherwise.
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def key_variables(config: ServeConfig) -> tuple[str, ...]:
    """Every environment variable that may hold a key, sorted: the ``api_key_env`` of each
    instance (disabled ones too), the gateway's ``api_keys_env``, ``VLLM_API_KEY`` and the
    pipeline's secret settings (:data:`~pipeline.settings.SECRET_VARIABLES`). Pure."""
    names = {"VLLM_API_KEY", *SECRET_VARIABLES, *config.gateway.api_keys_env}
    names.update(i.server.api_key_env for i in config.instances if i.server.api_key_env)
    return tuple(sorted(names))


def build_plan(
    config: ServeConfig,
    runtime: Runtime,
    environ: Mapping[str, str],
    *,
    state_file: Path | None = None,
    python: str | None = None,
    node_rank_arg: int | None = None,
    addresses: Mapping[str, str] | None = None,
) -> Plan:
    """The launch plan of this node. Pure: reads ``environ`` only for ``api_key_env`` values,
    the platform's variables and the gang's token (multi-node instances).

    ``node_rank_arg`` is ``--node-rank`` (None: the platform's, else 0); ``addresses`` maps
    this node's interfaces to their IPv4 addresses (for ``cluster.interface``).

    Secrets reach vLLM through ``VLLM_API_KEY`` in its environment, never argv (``ps`` shows
    argv to every user) and never the plan's display.

    With the gateway enabled: ``state_file`` is the supervisor's ``state.json`` the gateway
    follows (None: it treats every instance as running; for tests of the planner), and
    ``python`` runs it (default: this interpreter, which has the pipeline importable).
    """
    rank_here = node_rank(node_rank_arg, environ, source=config.source) or 0
    members: dict[str, Member] = {}
    here: list[Instance] = []
    elsewhere: list[str] = []
    for inst in config.enabled:
        if inst.cluster is not None:
            members[inst.name] = resolve_member(
                inst, node_rank_arg, environ, addresses or {}, source=config.source
            )
            here.append(inst)
        elif rank_here == 0:
            here.append(inst)
        else:
            elsewhere.append(inst.name)
    enabled = tuple(here)
    gateway_on = config.gateway.enable and rank_here == 0
    secret_vars = key_variables(config)
    # Instances come sorted by name and a chain always waits for an earlier name, so this
    # order is also a valid start order.
    # On-demand instances start when asked, one at a time per GPU (the supervisor's rule).
    after = start_order(tuple(i for i in enabled if not i.on_demand))
    instances = []
    for inst in enabled:
        ctl, srv = inst.control, inst.server
        member = members.get(inst.name)
        follower = member is not None and not member.is_leader
        env: dict[str, str] = dict(runtime.env)
        if ctl.gpu_ids:
            env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
            env["CUDA_VISIBLE_DEVICES"] = ",".join(str(g) for g in ctl.gpu_ids)
        if member is not None:
            env.update(member_env(inst, member))
        # The container is offline: huggingface_hub and transformers must not try the hub
        # (a model is a path, /models/<name>). The config's env wins.
        env.update(OFFLINE_ENV)
        env.update(ctl.env)
        secret_env: dict[str, SecretStr] = {}
        missing: dict[str, str] = {}
        if follower:
            pass  # headless: no HTTP port, so no key
        elif srv.api_key is not None:
            secret_env["VLLM_API_KEY"] = SecretStr(srv.api_key)
        elif srv.api_key_env is not None:
            value = environ.get(srv.api_key_env)
            if value:
                secret_env["VLLM_API_KEY"] = SecretStr(value)
            else:
                missing["VLLM_API_KEY"] = srv.api_key_env
        host = LOOPBACK if gateway_on else srv.host
        notes: tuple[str, ...] = ()
        if host != srv.host:
            notes = (
                f"host {srv.host} -> {LOOPBACK}: the gateway "
                f"({config.gateway.host}:{config.gateway.port}) is the only exposed port",
            )
        aliases = config.aliases(inst.name)
        connect = _connect_host(host)
        log_dir = Path(ctl.log_dir)
        restart, max_restarts = ctl.restart, ctl.max_restarts
        if member is None:
            args = _vllm_args(inst, host, aliases)
        else:
            args = _member_args(inst, member, host, aliases)
            if member.platform is not None:
                # The platform restarts the whole group; a member restarted alone could
                # never rejoin the others.
                restart, max_restarts = RestartPolicy.NO, 0
                notes += (
                    f"under {member.platform}: members never restart on their own; the "
                    "platform restarts the group",
                )
        port = 0 if follower else srv.port
        managed = gateway_on and config.managed(inst)
        # vLLM's sleep mode exists on CUDA, ROCm and XPU; the CPU build refuses the flag.
        sleep = managed and ctl.unload == "sleep" and bool(ctl.gpu_ids)
        if managed and ctl.unload == "sleep" and not ctl.gpu_ids:
            notes += ("no GPU (the CPU build has no sleep mode): put away means stopped",)
        if sleep:
            args += ["--enable-sleep-mode"]
            # vLLM serves /sleep and /wake_up only in dev mode; they take no key, so the
            # instance listens on loopback behind the gateway, which never forwards them.
            env["VLLM_SERVER_DEV_MODE"] = "1"
        group = config.pool_of(inst.name) if managed else None
        instances.append(
            InstancePlan(
                name=inst.name,
                argv=runtime.command(*args),
                env=env,
                secret_env=secret_env,
                missing_secrets=missing,
                cwd=str(log_dir),
                log_file=str(log_dir / f"{inst.name}.log"),
                host="" if follower else host,
                port=port,
                health_url="" if follower else f"http://{connect}:{srv.port}/health",
                base_url="" if follower else f"http://{connect}:{srv.port}",
                gpu_ids=tuple(ctl.gpu_ids),
                model_names=() if follower else config.model_names(inst),
                start_after=after.get(inst.name),
                ready_timeout=ctl.ready_timeout,
                stop_grace=ctl.stop_grace,
                restart=restart,
                max_restarts=max_restarts,
                backoff_initial=ctl.backoff_initial,
                backoff_max=ctl.backoff_max,
                health_interval=ctl.health_interval,
                health_failures=ctl.health_failures,
                notes=notes,
                # A variable the instance's own `control.env` sets is its to have.
                env_remove=tuple(v for v in secret_vars if v not in ctl.env),
                member=member,
                managed=managed,
                on_demand=managed and inst.on_demand,
                idle_timeout=ctl.idle_timeout if managed else 0.0,
                sleep=sleep,
                pool=group,
                max_awake=config.pools[group].max_awake if group is not None else 0,
                gpu_share=gpu_share(inst),
            )
        )
    background = all(i.control.background for i in enabled) if enabled else True
    gateway = None
    if gateway_on:
        gateway = gateway_plan(config, tuple(instances), environ, state_file, python)
    return Plan(
        source=config.source,
        enable=config.master.enable,
        background=background,
        runtime=runtime.description,
        instances=tuple(instances),
        disabled=tuple(i.name for i in config.instances if not i.control.enabled),
        gateway=gateway,
        node_rank=rank_here,
        elsewhere=tuple(elsewhere),
    )


def control_socket(state_file: Path) -> Path:
    """The supervisor's control socket (mode 0600) beside its state file: the gateway asks
    it there to start or wake an instance and tells it the requests in flight."""
    return state_file.parent / "control.sock"


def gateway_plan(
    config: ServeConfig,
    instances: tuple[InstancePlan, ...],
    environ: Mapping[str, str],
    state_file: Path | None,
    python: str | None,
) -> GatewayPlan:
    """The gateway process of a plan whose ``instances`` are already planned. Pure.

    Its whole configuration (listen address, routes, the instances' keys, its own keys, the
    state file) is one JSON value in ``PIPELINE_GATEWAY_CONFIG``: a secret, so it is masked in
    every display and never on argv or disk.
    """
    gw = config.gateway
    keys = list(gw.api_keys)
    missing = []
    for var in gw.api_keys_env:
        value = environ.get(var)
        if value:
            keys.append(value)
        else:
            missing.append(var)
    upstreams = []
    served: dict[str, list[str]] = {}
    for inst in instances:
        if inst.member is not None and not inst.member.is_leader:
            continue  # a headless member has no HTTP port
        key = inst.secret_env.get("VLLM_API_KEY")
        upstreams.append(
            Upstream(
                name=inst.name,
                host=LOOPBACK,
                port=inst.port,
                key=key.get_secret_value() if key is not None else None,
                models=inst.model_names,
                managed=inst.managed,
            )
        )
        for model in inst.model_names:
            served.setdefault(model, []).append(inst.name)
    runtime_config = GatewayConfig(
        host=gw.host,
        port=gw.port,
        keys=tuple(keys),
        instances=tuple(upstreams),
        state_file=str(state_file) if state_file is not None else "",
        control_socket=str(control_socket(state_file)) if state_file is not None else "",
        max_queued=gw.max_queued,
        queue_timeout=gw.queue_timeout,
        access_log=gw.access_log,
        header_timeout=gw.header_timeout,
        body_timeout=gw.body_timeout,
        upstream_timeout=gw.upstream_timeout,
        max_body=gw.max_body_mib * 1024 * 1024,
        max_connections=gw.max_connections,
    )
    assert gw.log_dir is not None, "build_config fills gateway.log_dir"
    log_dir = Path(gw.log_dir)
    connect = _connect_host(gw.host)
    return GatewayPlan(
        name=GATEWAY_NAME,
        argv=(python or sys.executable, "-m", GATEWAY_MODULE),
        # The pipeline's own package, importable whatever the working directory.
        env={"PYTHONPATH": package_pythonpath()},
        secret_env={CONFIG_VAR: SecretStr(runtime_config.to_json())},
        missing_secrets={},
        cwd=str(log_dir),
        log_file=str(log_dir / f"{GATEWAY_NAME}.log"),
        host=gw.host,
        port=gw.port,
        health_url=f"http://{connect}:{gw.port}/health",
        base_url=f"http://{connect}:{gw.port}",
        gpu_ids=(),
        model_names=(),
        start_after=None,
        ready_timeout=GATEWAY_READY_TIMEOUT,
        stop_grace=GATEWAY_STOP_GRACE,
        restart=RestartPolicy.ON_FAILURE,
        max_restarts=GATEWAY_MAX_RESTARTS,
        backoff_initial=GATEWAY_BACKOFF[0],
        backoff_max=GATEWAY_BACKOFF[1],
        # Its keys travel in its config; the variables they came from stay behind.
        env_remove=key_variables(config),
        routes={m: names[0] for m, names in sorted(served.items()) if len(names) == 1},
        replicas={m: tuple(names) for m, names in sorted(served.items()) if len(names) > 1},
        key_count=len(keys),
        missing_keys=tuple(missing),
    )
