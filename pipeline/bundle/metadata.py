"""The bundle's two metadata files, both directions: ``pixi-pack.json`` and our extras file
as models, their bytes as the writer puts them in the tar, and their checks when read back
(:func:`check_metadata`: format version and platform; :func:`check_extras`: the lock's sha256
and the platform), each refusal a one-line :class:`~pipeline.errors.BundleError`.

Apart from :mod:`pipeline.bundle.format` (names and constants only) so the doit task
definitions, which every `doit` command loads, need no pydantic.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pipeline.bundle.format import (
    EXTRAS_FILE,
    EXTRAS_FORMAT,
    FORMAT_VERSION,
    METADATA_FILE,
    PIXI_PACK_COMPAT_VERSION,
)
from pipeline.errors import BundleError


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


def _first_error(exc: ValidationError) -> str:
    """``<what> at <where>`` of the first error of ``exc`` (``top``: the whole document)."""
    first = exc.errors()[0]
    return f"{first['msg']} at {'.'.join(str(p) for p in first['loc']) or 'top'}"


def check_metadata(data: bytes, bundle: Path, host: str) -> PixiPackMetadata:
    """Parse ``pixi-pack.json`` and require format version 1 and this host's platform."""
    try:
        metadata = PixiPackMetadata.model_validate_json(data)
    except ValidationError as exc:
        raise BundleError(
            f"bundle {bundle}: {METADATA_FILE} is not valid ({_first_error(exc)}); "
            "the bundle is corrupt"
        ) from None
    if metadata.version != FORMAT_VERSION:
        raise BundleError(
            f"bundle {bundle}: {METADATA_FILE} has format version {metadata.version!r}, and "
            f"this tool reads version {FORMAT_VERSION!r} only; pack it with a matching pixi-pack "
            "or pipeline version"
        )
    if metadata.platform != host:
        raise BundleError(
            f"bundle {bundle} is for platform {metadata.platform}, this host is {host}; pack the "
            f"environment for {host} (PIPELINE_PLATFORM={host})"
        )
    return metadata


def check_extras(data: bytes, bundle: Path, metadata: PixiPackMetadata) -> BundleExtras:
    """Parse ``infer-vllm-bundle.json`` and require its pixi.lock to have the recorded sha256
    and its platform to be ``pixi-pack.json``'s."""
    try:
        extras = BundleExtras.model_validate_json(data)
    except ValidationError as exc:
        raise BundleError(
            f"bundle {bundle}: {EXTRAS_FILE} is not valid ({_first_error(exc)}); pack it again"
        ) from None
    if hashlib.sha256(extras.pixi_lock.encode("utf-8")).hexdigest() != extras.lock_sha256:
        raise BundleError(
            f"bundle {bundle}: the pixi.lock inside {EXTRAS_FILE} does not have its recorded "
            "sha256; the bundle is corrupt: pack it again"
        )
    if extras.platform != metadata.platform:
        raise BundleError(
            f"bundle {bundle}: {EXTRAS_FILE} says platform {extras.platform} but "
            f"{METADATA_FILE} says {metadata.platform}; pack it again"
        )
    return extras


__all__ = [
    "BundleExtras",
    "PixiPackMetadata",
    "check_extras",
    "check_metadata",
    "extras_json",
    "pixi_pack_json",
]
