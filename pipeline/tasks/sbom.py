"""``doit sbom``: the summary of a bundle's CycloneDX SBOM (both roles)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pipeline import reporting
from pipeline.tasks.common import SETTINGS, TaskDict


def task_sbom() -> TaskDict:
    """Summarize the bundle's SBOM: package counts, licenses found, packages with none."""
    settings = SETTINGS

    @reporting.action
    def run() -> None:
        import json

        from pipeline.bundle.sbom import read_bundle_sbom, summary

        bundle = settings.install_bundle
        document, where = read_bundle_sbom(bundle)
        print(f"SBOM of {bundle.name} ({where})")
        for line in summary(json.loads(document)):
            print(line)

    return {"actions": [run], "uptodate": [False], "verbosity": 2}


TASKS: dict[str, Callable[[], Any]] = {"task_sbom": task_sbom}
