"""``doit k8s``: the LeaderWorkerSet manifest of a multi-node instance."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from pipeline import reporting
from pipeline.errors import ConfigError
from pipeline.serve.commands.common import Say
from pipeline.settings import Settings

if TYPE_CHECKING:
    from pipeline.serve.k8s import K8sOptions


def k8s_command(
    settings: Settings,
    config_path: str | None,
    instance: str,
    options: K8sOptions,
    *,
    output: str | None = None,
    out: TextIO | None = None,
    say: Say = reporting.say,
) -> None:
    """Write the LeaderWorkerSet manifest of ``instance`` (JSON) to ``output`` or stdout, and
    say which Secret entries it reads. Nothing is applied; raises ConfigError/PipelineError."""
    from pipeline.fsutil import atomic_write_text
    from pipeline.serve import k8s
    from pipeline.serve.config.loader import read_config_text

    path = Path(config_path) if config_path else settings.serve_config
    if path is None:
        raise ConfigError("no serve config: pass --config FILE or set AUTO_INFER_VLLM_CONFIG")
    if not instance:
        raise ConfigError("which instance? pass --instance NAME (one with a cluster table)")
    if settings.serve_overrides:
        raise ConfigError(
            "AUTO_INFER_VLLM_OVERRIDES is set, but the pods read only the TOML (a ConfigMap); "
            "write the change into the TOML, or unset the variable"
        )
    text = read_config_text(path)  # a regular file, or ConfigError (a FIFO would block)
    pod = k8s.pod_config(text, str(path), instance)
    document = k8s.manifest(pod, instance, options)
    body = k8s.to_json(document)
    if output:
        atomic_write_text(Path(output), body)
        say(f"k8s: wrote {output}; apply it with: kubectl apply -f {output}")
    else:
        (out or sys.stdout).write(body)
        (out or sys.stdout).flush()
    needed = k8s.secret_entries(pod.config, instance)
    if needed:
        secret = options.secret or f"{k8s.lws_name(options, instance)}-keys"
        literals = " ".join(f"--from-literal={n}=..." for n in needed)
        say(
            f"k8s: the pods read {', '.join(needed)} from Secret {secret}: "
            f"kubectl create secret generic {secret} {literals}"
        )
