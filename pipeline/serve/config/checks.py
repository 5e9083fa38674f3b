"""The rules across keys and instances, after each table validated on its own: ports, replicas,
GPU shares, run mode, multi-node sizes and flags, gateway aliases. Pure; each refusal is a
ConfigError naming the file, the dotted key and the instance."""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Sequence

from pipeline.errors import ConfigError
from pipeline.serve.config.models import (
    VLLM_DEFAULT_GPU_MEMORY_UTILIZATION,
    Instance,
    ServeConfig,
)
from pipeline.serve.config.vllm_args import option_values, overriding, refusal

# vLLM's options (by dest) that the launcher sets from [instance.<name>.cluster] on a
# multi-node instance; extra_args may not give them under any spelling vLLM accepts.
CLUSTER_OPTIONS = {
    "nnodes": "cluster.nodes",
    "node_rank": "cluster.rank (or doit serve --node-rank)",
    "master_addr": "cluster.leader",
    "master_port": "cluster.master_port",
    "headless": "the node rank (ranks above 0 run headless)",
    "data_parallel_size": "cluster.data_parallel",
    "data_parallel_address": "cluster.leader",
}


def pipeline_parallel_size(extra_args: Sequence[str]) -> int:
    """``--pipeline-parallel-size`` (under any spelling vLLM reads as it: ``-pp``,
    ``--pipeline_parallel_size``, a prefix) from extra_args, the last one; else 1.

    A value that is not a positive integer counts as 1: vLLM refuses it at start with its own
    message.
    """
    size = 1
    for value in option_values(extra_args, "pipeline_parallel_size"):
        if value.isdigit() and int(value) >= 1:
            size = int(value)
    return size


def executor_backend(extra_args: Sequence[str]) -> str | None:
    """``--distributed-executor-backend`` (any spelling vLLM reads as it) from extra_args, the
    last one; else None."""
    values = option_values(extra_args, "distributed_executor_backend")
    return values[-1] if values else None


class Located:
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


def check_instances(config: ServeConfig, loc: Located | None = None) -> None:
    """Cross-instance rules: ports unique, replicas of one name serve one model, GPUs
    consistent, one run mode.

    Instances with the same served name (``served_model_name``, else ``model``) are replicas
    of that model: the gateway spreads its requests over them. They must serve the same
    ``model``: one name answered by different weights would be ambiguous.
    """
    loc = loc or Located(config.source, frozenset())
    enabled = config.enabled
    seen_ports: dict[int, str] = {}
    seen_names: dict[str, Instance] = {}
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
            first = seen_names.setdefault(model_name, inst)
            if first.server.model != srv.model:
                raise loc.error(
                    loc.key(inst.name, "server", "served_model_name"),
                    f"model name {model_name!r} is also served by instance {first.name!r} from "
                    f"model {first.server.model!r}, here from {srv.model!r}; replicas of a "
                    "name serve the same model: set a distinct served_model_name or the same "
                    "model",
                    inst.name,
                )
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

    # Boot instances start together and hold their memory: today's refusal. On-demand ones
    # are placed at run time (check_pools), never beside one they do not fit with.
    usage: dict[int, list[tuple[str, float]]] = {}
    for inst in enabled:
        if inst.on_demand:
            continue
        share = gpu_share(inst)
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


def unknown_instance(name: str, known: list[str]) -> str:
    """``no instance named 'x' (did you mean 'y'? instances: ...)``."""
    hint = difflib.get_close_matches(name, known, n=1)
    did_you_mean = f"did you mean {hint[0]!r}? " if hint else ""
    return f"no instance named {name!r} ({did_you_mean}instances: {', '.join(known)})"


def gpu_share(inst: Instance) -> float:
    """The fraction of each of its GPUs the instance may take (vLLM's default when unset)."""
    return inst.server.gpu_memory_utilization or VLLM_DEFAULT_GPU_MEMORY_UTILIZATION


def check_pools(config: ServeConfig, loc: Located | None = None) -> None:
    """On-demand instances, idle timeouts and pools: what they need and what they may share.

    An instance that may be put away (on-demand, an idle timeout, or in a pool) needs the
    gateway (it counts the requests that make an instance busy or idle, and holds those that
    wait for one), runs on one node, and, when it may sleep, listens on loopback only: vLLM's
    sleep endpoints take no key. A pool names known instances, each in one pool. Instances
    that are never put away hold their memory for good: each on-demand or pooled instance
    must fit beside them on its GPUs, and a pool's boot members must fit its ``max_awake``.
    """
    loc = loc or Located(config.source, frozenset())
    known = [i.name for i in config.instances]
    member_of: dict[str, str] = {}
    for group, pool in config.pools.items():
        for name in pool.instances:
            if name not in known:
                raise loc.error(f"pool.{group}.instances", unknown_instance(name, known))
            if name in member_of:
                raise loc.error(
                    f"pool.{group}.instances",
                    f"instance {name!r} is also in pool {member_of[name]!r}; an instance is in "
                    "one pool at most",
                )
            member_of[name] = group
    enabled = config.enabled
    for inst in enabled:
        if not config.managed(inst):
            continue
        ctl = inst.control
        if inst.on_demand:
            key, what = loc.key(inst.name, "control", "start"), 'start = "on-demand"'
        elif ctl.idle_timeout > 0:
            key, what = loc.key(inst.name, "control", "idle_timeout"), "an idle_timeout"
        else:
            key, what = f"pool.{member_of[inst.name]}.instances", "a pool"
        if not config.gateway.enable:
            raise loc.error(
                key,
                f"{what} needs the gateway, which counts each instance's requests and holds "
                "those that wait for a start: set [gateway] enable = true",
                inst.name,
            )
        if inst.cluster is not None:
            raise loc.error(
                key,
                f"{what} is for one-node instances; a multi-node instance runs for good",
                inst.name,
            )
        if ctl.unload == "sleep" and not _LOOPBACK.match(inst.server.host):
            raise loc.error(
                loc.key(inst.name, "server", "host"),
                f"is {inst.server.host}, but an instance that may sleep serves vLLM's sleep "
                "endpoints, which take no key: it must listen on loopback (the gateway's "
                'default; remove host) or set control.unload = "stop"',
                inst.name,
            )
    # What never goes away: enabled boot instances that are neither idle-timed nor pooled.
    fixed: dict[int, list[tuple[str, float]]] = {}
    for inst in enabled:
        if not config.managed(inst):
            for gpu in inst.control.gpu_ids:
                fixed.setdefault(gpu, []).append((inst.name, gpu_share(inst)))
    for inst in enabled:
        if not config.managed(inst):
            continue
        share = gpu_share(inst)
        for gpu in inst.control.gpu_ids:
            held = fixed.get(gpu, [])
            total = sum(s for _, s in held)
            if held and total + share > 1.0 + 1e-9:
                detail = ", ".join(f"{name}={s:g}" for name, s in held)
                raise loc.error(
                    loc.key(held[-1][0], "server", "gpu_memory_utilization"),
                    f"boot instance(s) on GPU {gpu} ({detail}) hold their memory for good and "
                    f"leave no room for {inst.name!r} ({share:g}), which shares it; lower "
                    "gpu_memory_utilization, or let them be put away (an idle_timeout or a pool)",
                    held[-1][0],
                )
    by_name = {i.name: i for i in enabled}
    for group, pool in config.pools.items():
        boot = [n for n in pool.instances if n in by_name and not by_name[n].on_demand]
        if len(boot) > pool.max_awake:
            raise loc.error(
                f"pool.{group}.max_awake",
                f"is {pool.max_awake}, but {len(boot)} of its instances start at boot "
                f'({", ".join(boot)}); raise max_awake or make some start = "on-demand"',
            )


def check_cluster(inst: Instance, loc: Located) -> None:
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
    for reading, option, where in overriding(srv.extra_args, CLUSTER_OPTIONS):
        raise loc.error(
            loc.key(inst.name, "server", "extra_args"),
            refusal(reading, option, f"{where} on a multi-node instance", "remove it"),
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


def check_gateway(config: ServeConfig, loc: Located | None = None) -> None:
    """The gateway against the instances: aliases name instances, and with the gateway on,
    every model name and alias routes to one instance or to replicas of one served name, and
    no instance takes its port.

    An alias may be shared only by replicas (instances with the same served name): the
    gateway then spreads it over them as it does their served name."""
    loc = loc or Located(config.source, frozenset())
    gateway = config.gateway
    known = [i.name for i in config.instances]
    for name in gateway.aliases:
        if name not in known:
            raise loc.error(f"gateway.aliases.{name}", unknown_instance(name, known))
    if not gateway.enable:
        return
    # model name or alias -> the first instance that has it
    owner: dict[str, Instance] = {}
    for inst in config.enabled:
        for model_name in inst.server.model_names:
            owner.setdefault(model_name, inst)
    for inst in config.enabled:
        for alias in config.aliases(inst.name):
            if alias in inst.server.model_names:
                raise loc.error(
                    f"gateway.aliases.{inst.name}",
                    f"alias {alias!r} is the instance's own served name; remove it",
                    inst.name,
                )
            other = owner.setdefault(alias, inst)
            if other.server.model_names != inst.server.model_names:
                what = (
                    "is also an alias of" if alias in config.aliases(other.name) else "is served by"
                )
                raise loc.error(
                    f"gateway.aliases.{inst.name}",
                    f"alias {alias!r} {what} instance {other.name!r}; a model name routes to "
                    "one instance, or to replicas (instances with the same served_model_name)",
                    inst.name,
                )
        if inst.server.port == gateway.port:
            raise loc.error(
                loc.key(inst.name, "server", "port"),
                f"port {gateway.port} is the gateway's (gateway.port); with the gateway on, "
                "instances listen on 127.0.0.1 on ports of their own: move the instance or "
                "the gateway",
                inst.name,
            )
