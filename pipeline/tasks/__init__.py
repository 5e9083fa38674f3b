"""The doit task definitions, and only those: every action calls a function of a stage module.

``dodo.py`` does ``globals().update(dodo_namespace())``. Which tasks exist depends on
``PIPELINE_ROLE``: the runtime side (the container) has no task that produces a bundle, so a
container with a fresh doit database never tries to lock or pack.

- :mod:`pipeline.tasks.build`: lock, verify, pack (pack:tar, pack:sha256, pack:parts,
  pack:delta), sha256, check-cache, pack-model
- :mod:`pipeline.tasks.runtime`: extract, patch-channels, frozen-install, install,
  install-model, join-parts, rebuild-bundle
- :mod:`pipeline.tasks.sbom`: sbom (both roles)
- :mod:`pipeline.tasks.serve`: plan, serve, status, stop, logs, clients, k8s
- :mod:`pipeline.tasks.stamps`: the build tasks' stamp files (what stands for the tar)
"""

from __future__ import annotations

from typing import Any

from pipeline.settings import Role
from pipeline.tasks.common import SETTINGS, doit_config


def dodo_namespace() -> dict[str, Any]:
    """The task functions ``dodo.py`` exposes, by ``PIPELINE_ROLE``, plus ``DOIT_CONFIG``."""
    from pipeline.tasks import build, runtime, sbom, serve

    namespace: dict[str, Any] = {"DOIT_CONFIG": doit_config(SETTINGS), **sbom.TASKS}
    if SETTINGS.role in (Role.ALL, Role.BUILD):
        namespace.update(build.TASKS)
    if SETTINGS.role in (Role.ALL, Role.RUNTIME):
        namespace.update(runtime.TASKS)
        namespace.update(serve.TASKS)
    return namespace
