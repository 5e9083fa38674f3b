"""The bundle format: pixi-pack's, so pixi-unpack reads our bundles and we read theirs.

An uncompressed tar, members sorted, fixed mtime/uid/gid/mode (same inputs, same bytes)::

    pixi-pack.json           {"version": "1", "pixi-pack-version": "...", "platform": "linux-64"}
    environment.yml          channels [./channel, nodefaults]; name=version=build; pip: section
    channel/<subdir>/        package files + repodata.json, only for subdirs that have packages
    pypi/*.whl               wheels, when the lock has PyPI packages
    infer-vllm-bundle.json   our extras (pixi-unpack ignores it): see
                             :class:`pipeline.bundle.metadata.BundleExtras`
    infer-vllm-index.json    every other member's name, size and sha256
                             (:mod:`pipeline.bundle.index`; pixi-unpack ignores it too)

A model bundle (``doit pack-model``) is the index and its sha256, then
``model/<the model's files>``.
A bundle of any kind may travel in parts (:mod:`pipeline.bundle.parts`), and an environment
bundle as a delta from the one before it (:mod:`pipeline.bundle.delta`).

Bundles from pixi-pack itself carry no extras file; the install side then takes ``pixi.toml``
and ``pixi.lock`` from the ``vllm-pixi/`` template, or rebuilds what it needs from the channel.
"""

from __future__ import annotations

import re
from pathlib import Path

# pixi-pack.json
METADATA_FILE = "pixi-pack.json"
FORMAT_VERSION = "1"
# The pixi-pack release whose layout we follow; written as "pixi-pack-version".
PIXI_PACK_COMPAT_VERSION = "0.7.0"
ENVIRONMENT_FILE = "environment.yml"
CHANNEL_DIR = "channel"
PYPI_DIR = "pypi"
REPODATA_FILE = "repodata.json"
EXTRAS_FILE = "infer-vllm-bundle.json"
EXTRAS_FORMAT = 1
# The index of every member (:mod:`pipeline.bundle.index`), in every bundle this project writes.
INDEX_FILE = "infer-vllm-index.json"
INDEX_FORMAT = 1
# The index's own sha256 (``sha256sum`` format), right after it in a model bundle: the index
# is checked before anything it lists is trusted.
INDEX_SUM_FILE = "infer-vllm-index.sha256"
# The SSH signature of the index (:mod:`pipeline.bundle.signature`), when the bundle is signed.
SIG_FILE = "infer-vllm-index.sig"
# The environment bundle's CycloneDX SBOM (:mod:`pipeline.bundle.sbom`).
SBOM_FILE = "infer-vllm-sbom.cdx.json"
# A delta (:mod:`pipeline.bundle.delta`): its manifest, and the folder of what it carries
# (the first member of its tar, which is how a delta is recognized).
DELTA_FILE = "infer-vllm-delta.json"
DELTA_FORMAT = 1
DELTA_DIR = "delta"
ZLIB_SUFFIX = ".zlib"
# A model bundle: the index and its sha256, then the model's files under ``model/``.
MODEL_DIR = "model"
# Top-level names a bundle may hold; the reader skips anything else (never written).
BUNDLE_NAMES = (
    METADATA_FILE,
    ENVIRONMENT_FILE,
    EXTRAS_FILE,
    INDEX_FILE,
    SIG_FILE,
    SBOM_FILE,
    CHANNEL_DIR,
    PYPI_DIR,
)

# Where `doit k8s` manifests expect the bundle inside the pod (``--bundle``'s default).
DEFAULT_POD_BUNDLE = "/bundles/vllm-offline-bundle.tar"

# Fixed tar member attributes: the bundle's bytes depend on its content only.
TAR_MTIME = 0
TAR_UID = TAR_GID = 0
TAR_FILE_MODE = 0o644
TAR_DIR_MODE = 0o755


def model_bundle_name(name: str) -> str:
    """The default file name of the model bundle of ``name``."""
    return f"{name}.model.tar"


def default_delta_path(bundle: Path) -> Path:
    """``PIPELINE_DELTA``'s default: ``bundles/<name>.delta.tar`` for ``bundles/<name>.tar``."""
    stem = bundle.name[: -len(".tar")] if bundle.name.endswith(".tar") else bundle.name
    return bundle.with_name(f"{stem}.delta.tar")


def checksum_path(bundle: Path) -> Path:
    """``<bundle>.sha256`` beside the bundle (``sha256sum`` format): written by the pack side,
    read by the extract side."""
    return bundle.with_name(bundle.name + ".sha256")


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
MIN_PART_SIZE = 1 << 20


def parse_part_size(text: str) -> int:
    """``PIPELINE_PART_SIZE``: bytes, or a number with K, M, G or T (powers of 1024: ``4G``,
    ``700M``, ``1.5GiB``). At least 1M. Raises ValueError saying what is allowed. Pure."""
    match = _SIZE.match(text)
    if not match:
        raise ValueError("expected a size such as 4G, 700M or 1048576 (bytes)")
    size = int(float(match.group(1)) * _UNITS[match.group(2).upper()])
    if size < MIN_PART_SIZE:
        raise ValueError(f"a part must be at least 1M ({MIN_PART_SIZE} bytes)")
    return size
