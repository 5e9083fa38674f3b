"""Where this node stands in a multi-node instance: rank, leader, platform. Pure.

Every node reads the same TOML; what differs is the environment: ``doit serve --node-rank N``
on bare nodes, or the variables a platform sets on each of its nodes (the table below, from
LeaderWorkerSet, Slurm and SkyPilot). :func:`resolve_member` turns an instance's
``[instance.<name>.cluster]`` table, the node rank given on the command line, the environment
and the IPv4 addresses of this node's interfaces into a :class:`Member`, or raises
:class:`~pipeline.errors.ConfigError` with one line naming the file, the dotted key and the
instance.

=========  ====================  ====================================  ======================
platform   rank                  leader                                size
=========  ====================  ====================================  ======================
LWS        ``LWS_WORKER_INDEX``  ``LWS_LEADER_ADDRESS``                ``LWS_GROUP_SIZE``
Slurm      ``SLURM_NODEID``      first host of ``SLURM_JOB_NODELIST``  ``SLURM_JOB_NUM_NODES``
SkyPilot   ``SKYPILOT_NODE_RANK``  first line of ``SKYPILOT_NODE_IPS``   ``SKYPILOT_NUM_NODES``
=========  ====================  ====================================  ======================
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, SecretStr

from pipeline.errors import ConfigError
from pipeline.serve.config import Instance

# The leader's supervisor serves the gang's control endpoint (bare nodes) on this port above
# cluster.master_port: 29601 by default, clear of vLLM's 29501 (master) and 29550 (DP RPC).
CONTROL_PORT_OFFSET = 100


@dataclass(frozen=True)
class Platform:
    """A platform that placed this node, with what it says about the group."""

    name: str  # "lws", "slurm" or "skypilot"
    rank: int | None
    leader: str | None
    size: int | None
    # The variables the values came from, for messages.
    rank_var: str
    size_var: str


class Member(BaseModel):
    """This node's member of a multi-node instance: what the plan and the supervisor need."""

    model_config = ConfigDict(frozen=True)

    rank: int
    nodes: int
    leader: str
    master_port: int
    control_port: int
    # None: bare nodes (the gang is supervised by the leader's supervisor); else the platform
    # that restarts the whole group (members never restart on their own).
    platform: str | None
    interface: str | None
    host_ip: str | None
    token: SecretStr | None = None

    @property
    def is_leader(self) -> bool:
        return self.rank == 0

    @property
    def control_url(self) -> str:
        host = f"[{self.leader}]" if ":" in self.leader else self.leader
        return f"http://{host}:{self.control_port}"


def _int(value: str | None) -> int | None:
    if value is None or not value.strip().isdigit():
        return None
    return int(value.strip())


def slurm_first_host(nodelist: str) -> str | None:
    """The first host of a Slurm hostlist (``node[01-04,07],gpu5`` -> ``node01``). Pure."""
    text = nodelist.strip()
    if not text:
        return None
    match = re.match(r"^([^,\[]+)(?:\[([^\]]+)\])?", text)
    if match is None:
        return None
    prefix, ranges = match.group(1), match.group(2)
    if not ranges:
        return prefix
    first = ranges.split(",", 1)[0].split("-", 1)[0]
    return prefix + first


def detect_platform(environ: Mapping[str, str]) -> Platform | None:
    """The platform whose variables are set (LWS, then Slurm, then SkyPilot), or None. Pure."""
    if "LWS_LEADER_ADDRESS" in environ or "LWS_WORKER_INDEX" in environ:
        return Platform(
            "lws",
            _int(environ.get("LWS_WORKER_INDEX")),
            environ.get("LWS_LEADER_ADDRESS") or None,
            _int(environ.get("LWS_GROUP_SIZE")),
            "LWS_WORKER_INDEX",
            "LWS_GROUP_SIZE",
        )
    if "SLURM_JOB_NODELIST" in environ or "SLURM_NODEID" in environ:
        return Platform(
            "slurm",
            _int(environ.get("SLURM_NODEID")),
            slurm_first_host(environ.get("SLURM_JOB_NODELIST", "")),
            _int(environ.get("SLURM_JOB_NUM_NODES")),
            "SLURM_NODEID",
            "SLURM_JOB_NUM_NODES",
        )
    if "SKYPILOT_NODE_RANK" in environ or "SKYPILOT_NODE_IPS" in environ:
        ips = [line.strip() for line in environ.get("SKYPILOT_NODE_IPS", "").splitlines()]
        ips = [ip for ip in ips if ip]
        return Platform(
            "skypilot",
            _int(environ.get("SKYPILOT_NODE_RANK")),
            ips[0] if ips else None,
            _int(environ.get("SKYPILOT_NUM_NODES")),
            "SKYPILOT_NODE_RANK",
            "SKYPILOT_NUM_NODES",
        )
    return None


def node_rank(
    node_rank_arg: int | None, environ: Mapping[str, str], *, source: str = "<config>"
) -> int | None:
    """This node's rank for the plan: ``--node-rank``, else the platform's, else None."""
    if node_rank_arg is not None:
        if node_rank_arg < 0:
            raise ConfigError(f"--node-rank {node_rank_arg}: a node rank is >= 0 ({source})")
        return node_rank_arg
    platform = detect_platform(environ)
    return platform.rank if platform is not None else None


_LOOPBACK = re.compile(r"^(127\.|::1$|localhost$|0\.0\.0\.0$)")


def resolve_member(
    inst: Instance,
    node_rank_arg: int | None,
    environ: Mapping[str, str],
    addresses: Mapping[str, str],
    *,
    source: str = "<config>",
) -> Member:
    """This node's :class:`Member` of ``inst`` (which has a cluster table). Pure.

    ``addresses`` maps interface names to this node's IPv4 address on them (the shell reads
    them). Raises ConfigError, one line each: no rank, a rank out of range, a platform size
    that disagrees with ``nodes``, no leader, an interface without an address, a loopback
    ``VLLM_HOST_IP``, a missing control token on bare nodes.
    """
    cluster = inst.cluster
    assert cluster is not None, "resolve_member is for multi-node instances"
    name = inst.name
    own = f"instance.{name}.cluster"

    def error(key: str, message: str) -> ConfigError:
        return ConfigError(f"{source}: {own}.{key}: {message}")

    platform = detect_platform(environ)
    if platform is not None and platform.size is not None and platform.size != cluster.nodes:
        raise error(
            "nodes",
            f"is {cluster.nodes} but {platform.size_var}={platform.size} ({platform.name}): "
            "the group and the instance must have the same number of nodes",
        )
    if isinstance(cluster.rank, int):
        if node_rank_arg is not None and node_rank_arg != cluster.rank:
            raise error("rank", f"is {cluster.rank} but --node-rank {node_rank_arg} was given")
        rank, said = cluster.rank, f"rank {cluster.rank}"
    elif node_rank_arg is not None:
        rank, said = node_rank_arg, f"--node-rank {node_rank_arg}"
    elif platform is not None and platform.rank is not None:
        rank, said = platform.rank, f"{platform.rank_var}={platform.rank}"
    else:
        raise error(
            "rank",
            '"auto" found no rank: pass `doit serve --node-rank N` (0 on the leader), or run '
            "under LWS, Slurm or SkyPilot",
        )
    if not 0 <= rank < cluster.nodes:
        raise error(
            "rank", f"{said} is out of range for nodes = {cluster.nodes} (0 to {cluster.nodes - 1})"
        )

    if cluster.leader != "auto":
        leader = cluster.leader
    elif platform is not None and platform.leader:
        leader = platform.leader
    else:
        raise error(
            "leader",
            '"auto" found no leader address (LWS_LEADER_ADDRESS, SLURM_JOB_NODELIST, '
            "SKYPILOT_NODE_IPS are unset); on bare nodes set the leader's address",
        )

    host_ip: str | None = None
    if cluster.interface is not None:
        host_ip = addresses.get(cluster.interface)
        if host_ip is None:
            raise error(
                "interface",
                f"{cluster.interface!r} has no IPv4 address on this node "
                f"(interfaces with one: {', '.join(sorted(addresses)) or 'none'})",
            )
    else:
        host_ip = inst.control.env.get("VLLM_HOST_IP") or environ.get("VLLM_HOST_IP") or None
    if host_ip is not None and _LOOPBACK.match(host_ip):
        raise ConfigError(
            f"{source}: instance.{name}.control.env.VLLM_HOST_IP (instance {name!r}): "
            f"{host_ip!r} (from the environment) is not reachable from the other nodes; set "
            f"{own}.interface or the node's own address"
        )

    token: SecretStr | None = None
    if platform is None:
        if cluster.token_env is None:
            raise error(
                "token_env",
                "required on bare nodes (no LWS, Slurm or SkyPilot found): name the variable "
                "holding the gang's shared control token",
            )
        value = environ.get(cluster.token_env, "")
        if not value:
            raise error(
                "token_env",
                f"names {cluster.token_env}, which is not set; export the same token on every node",
            )
        token = SecretStr(value)
    return Member(
        rank=rank,
        nodes=cluster.nodes,
        leader=leader,
        master_port=cluster.master_port,
        control_port=cluster.master_port + CONTROL_PORT_OFFSET,
        platform=platform.name if platform is not None else None,
        interface=cluster.interface,
        host_ip=host_ip,
        token=token,
    )
