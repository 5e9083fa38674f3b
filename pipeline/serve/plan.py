"""From a validated config to a launch plan. Pure: config and runtime in, plan out.

A plan says, per instance, exactly what will run: argv, the environment it adds (secrets kept
apart, masked when shown), working directory, log file, port, GPUs, health URL and start order.
``doit plan`` prints it as JSON; the supervisor only executes it.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, SecretStr

from pipeline.envs import Runtime
from pipeline.errors import ConfigError
from pipeline.serve.config import Instance, RestartPolicy, ServeConfig

VLLM_MODULE = "vllm.entrypoints.openai.api_server"
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

    def display_env(self) -> dict[str, str]:
        """The added environment as shown to people: secrets masked."""
        shown = {
            key: (MASK if _SECRET_NAME.search(key) else value) for key, value in self.env.items()
        }
        shown.update(dict.fromkeys(self.secret_env, MASK))
        shown.update({key: f"<unset: ${name}>" for key, name in self.missing_secrets.items()})
        return dict(sorted(shown.items()))

    def child_env(self, base: Mapping[str, str]) -> dict[str, str]:
        """The full environment of the child: ``base`` plus this plan's variables and secrets."""
        env = dict(base)
        # A key in the supervisor's own environment must not leak into an instance that has
        # none (or a different one).
        env.pop("VLLM_API_KEY", None)
        env.update(self.env)
        env.update({key: value.get_secret_value() for key, value in self.secret_env.items()})
        return env


class Plan(BaseModel):
    """The launch plan of every enabled instance, in start order."""

    model_config = ConfigDict(frozen=True)

    source: str
    enable: bool
    background: bool
    runtime: str
    instances: tuple[InstancePlan, ...]
    disabled: tuple[str, ...]

    def instance(self, name: str) -> InstancePlan:
        for inst in self.instances:
            if inst.name == name:
                return inst
        known = ", ".join(i.name for i in self.instances) or "none"
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
        for order, inst in enumerate(self.instances):
            item = inst.model_dump(
                mode="json",
                exclude={"secret_env", "missing_secrets", "env"},
            )
            item["env"] = inst.display_env()
            item["start_order"] = order
            out["instances"].append(item)
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
        return json.dumps(data)


def _connect_host(host: str) -> str:
    if host in ("0.0.0.0", ""):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


def _vllm_args(inst: Instance) -> list[str]:
    srv = inst.server
    args = [
        "-m",
        VLLM_MODULE,
        "--model",
        srv.model,
        "--host",
        srv.host,
        "--port",
        str(srv.port),
    ]
    if srv.served_model_name:
        args += ["--served-model-name", srv.served_model_name]
    args += ["--dtype", srv.dtype, "--tensor-parallel-size", str(srv.tensor_parallel_size)]
    if srv.max_model_len is not None:
        args += ["--max-model-len", str(srv.max_model_len)]
    if srv.gpu_memory_utilization is not None:
        args += ["--gpu-memory-utilization", f"{srv.gpu_memory_utilization:g}"]
    return [*args, *srv.extra_args]


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


def build_plan(
    config: ServeConfig,
    runtime: Runtime,
    environ: Mapping[str, str],
) -> Plan:
    """The launch plan. Pure: reads ``environ`` only for ``api_key_env`` values.

    Secrets reach vLLM through ``VLLM_API_KEY`` in its environment, never argv (``ps`` shows
    argv to every user) and never the plan's display.
    """
    enabled = config.enabled
    # Instances come sorted by name and a chain always waits for an earlier name, so this
    # order is also a valid start order.
    after = start_order(enabled)
    instances = []
    for inst in enabled:
        ctl, srv = inst.control, inst.server
        env: dict[str, str] = dict(runtime.env)
        if ctl.gpu_ids:
            env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
            env["CUDA_VISIBLE_DEVICES"] = ",".join(str(g) for g in ctl.gpu_ids)
        env.update(ctl.env)
        secret_env: dict[str, SecretStr] = {}
        missing: dict[str, str] = {}
        if srv.api_key is not None:
            secret_env["VLLM_API_KEY"] = SecretStr(srv.api_key)
        elif srv.api_key_env is not None:
            value = environ.get(srv.api_key_env)
            if value:
                secret_env["VLLM_API_KEY"] = SecretStr(value)
            else:
                missing["VLLM_API_KEY"] = srv.api_key_env
        connect = _connect_host(srv.host)
        log_dir = Path(ctl.log_dir)
        instances.append(
            InstancePlan(
                name=inst.name,
                argv=runtime.command(*_vllm_args(inst)),
                env=env,
                secret_env=secret_env,
                missing_secrets=missing,
                cwd=str(log_dir),
                log_file=str(log_dir / f"{inst.name}.log"),
                host=srv.host,
                port=srv.port,
                health_url=f"http://{connect}:{srv.port}/health",
                base_url=f"http://{connect}:{srv.port}",
                gpu_ids=tuple(ctl.gpu_ids),
                model_names=srv.model_names,
                start_after=after[inst.name],
                ready_timeout=ctl.ready_timeout,
                stop_grace=ctl.stop_grace,
                restart=ctl.restart,
                max_restarts=ctl.max_restarts,
                backoff_initial=ctl.backoff_initial,
                backoff_max=ctl.backoff_max,
            )
        )
    background = all(i.control.background for i in enabled) if enabled else True
    return Plan(
        source=config.source,
        enable=config.master.enable,
        background=background,
        runtime=runtime.description,
        instances=tuple(instances),
        disabled=tuple(i.name for i in config.instances if not i.control.enabled),
    )
