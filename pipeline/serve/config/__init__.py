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

The package: :mod:`.models` (the pydantic models, their per-field rules and the JSON schema),
:mod:`.loader` (TOML and overrides in, merged and validated out; every message located) and
:mod:`.checks` (the rules across keys and instances: ports, replicas, GPUs, multi-node
sizes, gateway aliases) and :mod:`.vllm_args` (how vLLM reads ``extra_args``: prefixes, ``_``
for ``-``, against vLLM's own list of options). Import from here.
"""

from pipeline.serve.config.checks import executor_backend, pipeline_parallel_size
from pipeline.serve.config.loader import (
    build_config,
    deep_merge,
    load_config,
    parse_config,
    parse_overrides,
)
from pipeline.serve.config.models import (
    DEFAULT_INSTANCE,
    GATEWAY_NAME,
    Cluster,
    Control,
    Gateway,
    Instance,
    Launcher,
    Master,
    RestartPolicy,
    ServeConfig,
    Server,
    json_schema,
    key_is_header_safe,
)

__all__ = [
    "DEFAULT_INSTANCE",
    "GATEWAY_NAME",
    "Cluster",
    "Control",
    "Gateway",
    "Instance",
    "Launcher",
    "Master",
    "RestartPolicy",
    "ServeConfig",
    "Server",
    "build_config",
    "deep_merge",
    "executor_backend",
    "json_schema",
    "key_is_header_safe",
    "load_config",
    "parse_config",
    "parse_overrides",
    "pipeline_parallel_size",
]
