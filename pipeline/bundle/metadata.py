"""The bundle's two metadata files, both directions: ``pixi-pack.json`` and our extras file
as models, their bytes as the writer puts them in the tar.

Apart from :mod:`pipeline.bundle.format` (names and constants only) so the doit task
definitions, which every `doit` command loads, need no pydantic.
"""

from __future__ import annotations

import json

from pydantic import BaseModel, ConfigDict, Field

from pipeline.bundle.format import EXTRAS_FORMAT, FORMAT_VERSION, PIXI_PACK_COMPAT_VERSION


class PixiPackMetadata(BaseModel):
    """``pixi-pack.json``; unknown keys are kept so newer pixi-pack files still read."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)

    version: str
    pixi_pack_version: str | None = Field(None, alias="pixi-pack-version")
    platform: str


class BundleExtras(BaseModel):
    """``infer-vllm-bundle.json``: what pixi-pack's metadata does not say."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    format: int = EXTRAS_FORMAT
    tool: str = "infer-vllm-pipeline"
    tool_version: str
    environment: str
    platform: str
    lock_sha256: str
    pixi_toml: str
    pixi_lock: str
    conda_packages: int
    pypi_packages: int
    package_bytes: int
    # PyPI source distributions left out by PIPELINE_SKIP_SDISTS ("name==version"); the
    # installed environment lacks them.
    skipped_sdists: tuple[str, ...] = ()
    # The lock's own name of the packed platform when it is not the subdir (pixi's `p1` for
    # a platform with system requirements; two lock platforms may share one subdir). Older
    # bundles lack it: the install then selects the lock platform by ``platform``.
    lock_platform: str | None = None


def pixi_pack_json(platform: str) -> bytes:
    """``pixi-pack.json`` as pixi-pack writes it (serde pretty JSON, no trailing newline)."""
    metadata = PixiPackMetadata(
        version=FORMAT_VERSION, pixi_pack_version=PIXI_PACK_COMPAT_VERSION, platform=platform
    )
    return json.dumps(metadata.model_dump(by_alias=True), indent=2).encode()


def extras_json(extras: BundleExtras) -> bytes:
    """``infer-vllm-bundle.json``: the extras model as pretty JSON, fields in model order."""
    return (json.dumps(extras.model_dump(mode="json"), indent=2) + "\n").encode()
