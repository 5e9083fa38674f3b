"""Kubernetes: one multi-node instance of the serve TOML as a LeaderWorkerSet manifest. Pure.

:func:`manifest` turns the TOML (its text and the config validated as the pods will read it)
plus the name of an instance with a ``[instance.<name>.cluster]`` table into a ``v1 List`` of
three objects, in this order:

- a ConfigMap holding the TOML unchanged (the same file on every node);
- a LeaderWorkerSet (``leaderworkerset.x-k8s.io/v1``, kubernetes-sigs/lws) with ``size =
  cluster.nodes``, ``restartPolicy: RecreateGroupOnPodRestart`` and ``startupPolicy:
  LeaderCreated`` (``LeaderReady`` deadlocks vLLM: its leader is ready only once the workers
  have joined it);
- a ClusterIP Service in front of the leader pods (the group's headless Service, which LWS
  names after the set, is for the members' rendezvous).

Each pod: an init container runs ``doit install`` from the bundle into an emptyDir that the
main container shares; the main container runs ``doit serve --foreground NAME`` as PID 1 (its
log copied to stdout: :func:`serve_command`), with ``VLLM_HOST_IP`` from ``status.podIP``;
rank and leader come from the ``LWS_WORKER_INDEX`` and ``LWS_LEADER_ADDRESS`` that LWS puts
in every container (so ``cluster.rank`` and ``cluster.leader`` must be ``"auto"``).
``/dev/shm`` is a memory emptyDir. Keys come from a Secret as ``secretKeyRef`` variables (the
leader's ``api_key_env``), never from the TOML. The leader has a readiness probe on vLLM's
``/health``; workers have a startup and a liveness probe that connect to the leader's
rendezvous port (``cluster.master_port``: the TCP store of the leader's first worker, up for
as long as the gang is).

Everything else in the TOML keeps its meaning, with two changes made in the pods through
``AUTO_INFER_VLLM_OVERRIDES``: every other instance is disabled, and so is the gateway (the
Service is the pods' one way in).

Every refusal is one :class:`~pipeline.errors.ConfigError` line naming the file, the key and
the instance. The output is JSON: kubectl, kustomize and Helm read it as YAML, and it needs no
YAML library in the runtime dependencies.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import shlex
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from pipeline.bundle.format import DEFAULT_POD_BUNDLE
from pipeline.errors import ConfigError, PipelineError
from pipeline.serve.config import Instance, Launcher, ServeConfig, parse_config

LWS_API_VERSION = "leaderworkerset.x-k8s.io/v1"
# Label keys of LWS v0.10.0 (api/leaderworkerset/v1/leaderworkerset_types.go).
LWS_NAME_LABEL = "leaderworkerset.sigs.k8s.io/name"
LWS_WORKER_INDEX_LABEL = "leaderworkerset.sigs.k8s.io/worker-index"
# Where the pods find things. The pipeline's home is container/Dockerfile's; the workspace is
# container/vllm/common.sh's INFER_WORKSPACE_ROOT, so the default pixi_project_dir lies in it.
PIPELINE_HOME = "/soft/app/infer-vllm-pipeline"
WORKSPACE = "/hard/volume/workspace"
DEFAULT_PROJECT_DIR = f"{WORKSPACE}/vllm-pixi-offline"
CONFIG_DIR = "/etc/infer-vllm"
CONFIG_KEY = "serve.toml"
CONFIG_FILE = f"{CONFIG_DIR}/{CONFIG_KEY}"
DEFAULT_BUNDLE = DEFAULT_POD_BUNDLE
# pods and StatefulSets append `-<group>-<index>`, and the StatefulSet's
# controller-revision-hash label (`<statefulset>-<10 characters>`) must fit in 63.
MAX_NAME = 45
_DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS1123 = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_PROBE_PERIOD = 10
# The leader's install may end after this pod's: the workers' startup probe waits that long
# beyond the instance's ready_timeout.
_INSTALL_SLACK = 300.0


@dataclass(frozen=True)
class K8sOptions:
    """What the TOML does not say about the cluster.

    ``image``: runs both containers; holds the pipeline at ``pipeline_home`` (as
    container/Dockerfile builds it). ``bundle``: the bundle tar's path in the pod (its
    ``.sha256`` beside it). ``volumes``: ``(claim, mount path)`` pairs, PersistentVolumeClaims
    mounted read-only in both containers (the bundle's folder, the models). ``secret``: holds
    the keys, one entry per variable name (default ``<name>-keys``). ``name``: of the
    LeaderWorkerSet (default: the instance's, lower-cased, ``_`` and ``.`` as ``-``).
    """

    image: str
    bundle: str = DEFAULT_BUNDLE
    volumes: tuple[tuple[str, str], ...] = ()
    namespace: str | None = None
    secret: str | None = None
    replicas: int = 1
    name: str | None = None
    pipeline_home: str = PIPELINE_HOME


def parse_volume(text: str) -> tuple[str, str]:
    """``CLAIM:/mount/path`` -> ``(claim, path)``, or PipelineError saying what is allowed."""
    claim, sep, path = text.partition(":")
    if not sep or not _DNS1123.match(claim) or len(claim) > 253 or not path.startswith("/"):
        raise PipelineError(
            f"--volume {text!r}: expected CLAIM:/absolute/path (a PersistentVolumeClaim name, "
            "mounted read-only there)"
        )
    return claim, path


@dataclass(frozen=True)
class PodConfig:
    """The TOML as the pods read it: its ``text`` (the ConfigMap), the ``overrides`` the pods
    get as ``AUTO_INFER_VLLM_OVERRIDES`` and the ``config`` validated with them."""

    text: str
    overrides: dict[str, Any]
    config: ServeConfig


def pod_config(text: str, source: str, instance: str) -> PodConfig:
    """Validate the TOML as the pods read it: at :data:`CONFIG_FILE` (relative paths resolve
    there) with :func:`pod_overrides` applied. Raises ConfigError."""
    plain = parse_config(text, source=source, base_dir=Path(CONFIG_DIR))
    overrides = pod_overrides(plain, instance)
    config = parse_config(
        text,
        source=source,
        overrides=json.dumps(overrides) if overrides else None,
        base_dir=Path(CONFIG_DIR),
    )
    return PodConfig(text=text, overrides=overrides, config=config)


def pod_overrides(config: ServeConfig, instance: str) -> dict[str, Any]:
    """What the pods change in the TOML: every other enabled instance off, the gateway off."""
    patch: dict[str, Any] = {}
    others = {
        i.name: {"control": {"enabled": False}}
        for i in config.instances
        if i.name != instance and i.control.enabled
    }
    if others:
        patch["instance"] = others
    if config.gateway.enable:
        patch["gateway"] = {"enable": False}
    return patch


def default_name(instance: str) -> str:
    return instance.lower().replace("_", "-").replace(".", "-")


def lws_name(options: K8sOptions, instance: str) -> str:
    """The LeaderWorkerSet's name: ``options.name``, else from the instance's."""
    return options.name or default_name(instance)


def secret_entries(config: ServeConfig, instance: str) -> tuple[str, ...]:
    """The Secret's entries the pods read: the instance's ``api_key_env`` (leader only)."""
    key = config.instance(instance).server.api_key_env
    return (key,) if key else ()


def manifest(pod: PodConfig, instance: str, options: K8sOptions) -> dict[str, Any]:
    """The ``v1 List`` (ConfigMap, LeaderWorkerSet, Service) for ``instance``; see the module.

    Pure; raises ConfigError (the TOML) or PipelineError (the options), one line each.
    """
    config, text, overrides = pod.config, pod.text, pod.overrides
    inst = config.instance(instance)
    _check_instance(config, inst)
    cluster = inst.cluster
    assert cluster is not None
    src, srv, ctl = config.source, inst.server, inst.control
    project_dir = str(config.master.pixi_project_dir or DEFAULT_PROJECT_DIR)
    workspace = str(PurePosixPath(project_dir).parent)
    name = _check_options(options, inst.name, workspace)
    secret = options.secret or f"{name}-keys"
    overrides_text = json.dumps(overrides, sort_keys=True, separators=(",", ":"))
    digest = hashlib.sha256((text + "\0" + overrides_text).encode()).hexdigest()
    labels = {
        "app.kubernetes.io/name": "infer-vllm",
        "app.kubernetes.io/instance": name,
        "app.kubernetes.io/managed-by": "doit-k8s",
    }
    home = options.pipeline_home.rstrip("/")
    doit = [f"{home}/.venv/bin/doit", "-f", f"{home}/dodo.py"]
    python = f"{home}/.venv/bin/python"

    mounts = [
        {"name": "workspace", "mountPath": workspace},
        *(
            {"name": f"volume-{i}", "mountPath": path, "readOnly": True}
            for i, (_, path) in enumerate(options.volumes)
        ),
    ]
    shared_env = [
        _env("PIPELINE_ROLE", "runtime"),
        _env("PIPELINE_STATE_DIR", f"{workspace}/.pipeline-state"),
        _env("AUTO_INFER_VLLM_PIXI_PROJECT_DIR", project_dir),
    ]
    install = {
        "name": "install",
        "image": options.image,
        "command": [*doit, "install"],
        "env": [
            *shared_env,
            _env("AUTO_INFER_VLLM_BUNDLE_PATH", options.bundle),
            # Beside the environment, on the same volume: the install hardlinks from it.
            _env("PIXI_CACHE_DIR", f"{workspace}/.cache/rattler"),
        ],
        "volumeMounts": mounts,
    }
    serve_env = [
        *shared_env,
        _env("AUTO_INFER_VLLM_CONFIG", CONFIG_FILE),
        *([_env("AUTO_INFER_VLLM_OVERRIDES", overrides_text)] if overrides else []),
        {"name": "VLLM_HOST_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
    ]
    keys = [_secret_env(srv.api_key_env, secret)] if srv.api_key_env else []
    serve_mounts = [
        *mounts,
        {"name": "serve-config", "mountPath": CONFIG_DIR, "readOnly": True},
        {"name": "dshm", "mountPath": "/dev/shm"},
    ]

    def serve_container(leader: bool) -> dict[str, Any]:
        container: dict[str, Any] = {
            "name": "serve",
            "image": options.image,
            "command": serve_command(doit, inst.name, f"{ctl.log_dir}/{inst.name}.log"),
            # Headless members have no HTTP port, so no key; cluster.token_env is for bare
            # nodes (under LWS the platform restarts the group: no control endpoint).
            "env": [*serve_env, *(keys if leader else [])],
            "volumeMounts": serve_mounts,
        }
        ports = [{"name": "rendezvous", "containerPort": cluster.master_port, "protocol": "TCP"}]
        if leader:
            ports.insert(0, {"name": "http", "containerPort": srv.port, "protocol": "TCP"})
            container["ports"] = ports
            container["readinessProbe"] = {
                "httpGet": {"path": "/health", "port": srv.port},
                "periodSeconds": _PROBE_PERIOD,
                "timeoutSeconds": 5,
                "failureThreshold": 3,
            }
        else:
            probe = {
                "exec": {"command": [python, "-c", leader_probe_code(cluster.master_port)]},
                "periodSeconds": _PROBE_PERIOD,
                "timeoutSeconds": 5,
            }
            startup = math.ceil((ctl.ready_timeout + _INSTALL_SLACK) / _PROBE_PERIOD)
            container["startupProbe"] = {**probe, "failureThreshold": startup}
            container["livenessProbe"] = {**probe, "failureThreshold": 3}
        if ctl.gpu_ids:
            gpus = len(ctl.gpu_ids)
            container["resources"] = {"limits": {"nvidia.com/gpu": gpus}}
        return container

    volumes: list[dict[str, Any]] = [
        {"name": "workspace", "emptyDir": {}},
        {"name": "dshm", "emptyDir": {"medium": "Memory"}},
        {"name": "serve-config", "configMap": {"name": f"{name}-config"}},
        *(
            {"name": f"volume-{i}", "persistentVolumeClaim": {"claimName": claim, "readOnly": True}}
            for i, (claim, _) in enumerate(options.volumes)
        ),
    ]

    def template(leader: bool) -> dict[str, Any]:
        return {
            "metadata": {
                "labels": dict(labels),
                # A changed TOML rolls the groups on `kubectl apply` (a ConfigMap edit alone
                # does not restart pods).
                "annotations": {"infer-vllm/config-sha256": digest},
            },
            "spec": {
                "initContainers": [install],
                "containers": [serve_container(leader)],
                "volumes": volumes,
                # Past doit serve's own stop (SIGTERM, stop_grace, SIGKILL to the group).
                "terminationGracePeriodSeconds": math.ceil(ctl.stop_grace) + 15,
            },
        }

    namespace = {"namespace": options.namespace} if options.namespace else {}
    configmap = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": f"{name}-config", **namespace, "labels": dict(labels)},
        "data": {CONFIG_KEY: text},
    }
    lws = {
        "apiVersion": LWS_API_VERSION,
        "kind": "LeaderWorkerSet",
        "metadata": {
            "name": name,
            **namespace,
            "labels": dict(labels),
            "annotations": {"infer-vllm/source": f"{src} instance {inst.name}"},
        },
        "spec": {
            "replicas": options.replicas,
            "startupPolicy": "LeaderCreated",
            "leaderWorkerTemplate": {
                "size": cluster.nodes,
                "restartPolicy": "RecreateGroupOnPodRestart",
                "leaderTemplate": template(leader=True),
                "workerTemplate": template(leader=False),
            },
        },
    }
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": f"{name}-api", **namespace, "labels": dict(labels)},
        "spec": {
            "type": "ClusterIP",
            "selector": {LWS_NAME_LABEL: name, LWS_WORKER_INDEX_LABEL: "0"},
            "ports": [{"name": "http", "port": srv.port, "targetPort": "http", "protocol": "TCP"}],
        },
    }
    document = {"apiVersion": "v1", "kind": "List", "items": [configmap, lws, service]}
    # No shared sub-objects (deepcopy would keep them shared): a caller may edit one
    # container without changing the others.
    return json.loads(json.dumps(document))


def serve_command(doit: list[str], instance: str, log_file: str) -> list[str]:
    """The main container's command: ``doit serve --foreground NAME`` as PID 1 (``exec``), with
    the member's log copied to the container's stdout.

    The supervisor writes vLLM's output to ``log_file``, never a pipe; under
    ``RecreateGroupOnPodRestart`` a failed pod is deleted with its files, so the container log
    (``kubectl logs``, the cluster's log collector) is where the first failure's lines survive.
    ``tail -F`` waits for the file and follows its rotation; it stays a child of PID 1 and ends
    with the container.
    """
    serve = shlex.join([*doit, "serve", "--foreground", instance])
    tail = f"tail -n +1 -F {shlex.quote(log_file)} 2>/dev/null &"
    return ["/bin/sh", "-c", f"{tail} exec {serve}"]


def leader_probe_code(port: int) -> str:
    """Python for the workers' probes: connect to the leader's rendezvous port (exit 1 if not).

    That port is the TCP store of the leader's first worker process: it answers while the
    leader's engine lives, and is gone when the leader or its network is.
    """
    return (
        "import os,socket;"
        f"socket.create_connection((os.environ['LWS_LEADER_ADDRESS'],{port}),timeout=4).close()"
    )


def to_json(document: dict[str, Any]) -> str:
    """The manifest as kubectl reads it (JSON is YAML): stable key order, one trailing newline."""
    return json.dumps(document, indent=2) + "\n"


def _env(name: str, value: str) -> dict[str, Any]:
    return {"name": name, "value": value}


def _secret_env(name: str, secret: str) -> dict[str, Any]:
    return {"name": name, "valueFrom": {"secretKeyRef": {"name": secret, "key": name}}}


def _check_instance(config: ServeConfig, inst: Instance) -> None:
    src, name = config.source, inst.name
    own = f"instance.{name}"

    def fail(key: str, message: str) -> ConfigError:
        return ConfigError(f"{src}: {key}: {message}")

    if inst.cluster is None:
        raise fail(
            own,
            f"has no [{own}.cluster] table; doit k8s writes a LeaderWorkerSet for an instance "
            "that spans nodes (a one-node instance runs in one container: container/)",
        )
    cluster, ctl, srv = inst.cluster, inst.control, inst.server
    if not ctl.enabled:
        raise fail(f"{own}.control.enabled", "is false; enable the instance to deploy it")
    for key, value, platform in (
        ("leader", cluster.leader, "LWS_LEADER_ADDRESS"),
        ("rank", cluster.rank, "LWS_WORKER_INDEX"),
    ):
        if value != "auto":
            raise fail(
                f"{own}.cluster.{key}",
                f'is {value!r}; under a LeaderWorkerSet it must be "auto" (each pod reads '
                f"{platform})",
            )
    if "VLLM_HOST_IP" in ctl.env:
        raise fail(
            f"{own}.control.env.VLLM_HOST_IP",
            "would be the same on every pod; doit k8s sets it per pod from status.podIP: remove it",
        )
    if srv.host.startswith("127.") or srv.host in ("::1", "localhost"):
        raise fail(
            f"{own}.server.host",
            f"is {srv.host}; the Service reaches the leader on the pod's address: use 0.0.0.0",
        )
    if ctl.gpu_ids and list(ctl.gpu_ids) != list(range(len(ctl.gpu_ids))):
        raise fail(
            f"{own}.control.gpu_ids",
            f"is {list(ctl.gpu_ids)}; a pod sees the GPUs it is given as 0..n-1: use "
            f"{list(range(len(ctl.gpu_ids)))}",
        )
    master = config.master
    if master.env_prefix is not None or master.launcher in (Launcher.PATH, Launcher.PREFIX):
        raise fail(
            "master.env_prefix" if master.env_prefix is not None else "master.launcher",
            "points away from the environment the init container installs from the bundle; "
            'unset it (launcher "auto" or "pixi")',
        )
    for inst_ in config.instances:
        if inst_.server.api_key is not None:
            raise fail(
                f"instance.{inst_.name}.server.api_key",
                "is written in the TOML, which becomes a ConfigMap anyone with read access "
                "sees; use server.api_key_env and put the key in the Secret",
            )
    if config.gateway.api_keys:
        raise fail(
            "gateway.api_keys",
            "are written in the TOML, which becomes a ConfigMap; use gateway.api_keys_env",
        )
    for key, value in (
        (f"{own}.control.log_dir", str(ctl.log_dir)),
        (f"{own}.server.model", srv.model),
        ("master.pixi_project_dir", str(master.pixi_project_dir or "")),
    ):
        if value == CONFIG_DIR or value.startswith(CONFIG_DIR + "/"):
            raise fail(
                key,
                f"is a relative path: in the pod it resolves in {CONFIG_DIR} (the ConfigMap, "
                "read-only); write the pod's absolute path",
            )


def _check_options(options: K8sOptions, instance: str, workspace: str) -> str:
    """The LeaderWorkerSet's name, once the options are known to be usable."""
    if not options.image.strip():
        raise PipelineError("--image is required: the image holding the pipeline (container/)")
    name = lws_name(options, instance)
    if not _DNS1035.match(name) or len(name) > MAX_NAME:
        via = "--name" if options.name else f"from instance {instance!r}"
        raise PipelineError(
            f"LeaderWorkerSet name {name!r} ({via}) must be lower-case letters, digits and "
            f"'-', starting with a letter, at most {MAX_NAME} characters; pass --name"
        )
    if options.namespace is not None and not (
        _DNS1123_LABEL.match(options.namespace) and len(options.namespace) <= 63
    ):
        raise PipelineError(f"--namespace {options.namespace!r} is not a namespace name")
    if options.replicas < 1:
        raise PipelineError(f"--replicas {options.replicas}: at least 1 group")
    if not options.bundle.startswith("/"):
        raise PipelineError(f"--bundle {options.bundle!r}: the tar's absolute path in the pod")
    taken = {"/dev/shm", CONFIG_DIR, workspace}
    for claim, path in options.volumes:
        if path.rstrip("/") in taken or path == "/":
            raise PipelineError(f"--volume {claim}:{path}: that path is taken in the pod")
        taken.add(path.rstrip("/"))
    return name
