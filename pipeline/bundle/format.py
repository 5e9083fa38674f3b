"""The bundle format: pixi-pack's, so pixi-unpack reads our bundles and we read theirs.

An uncompressed tar, members sorted, fixed mtime/uid/gid/mode (same inputs, same bytes)::

    pixi-pack.json           {"version": "1", "pixi-pack-version": "...", "platform": "linux-64"}
    environment.yml          channels [./channel, nodefaults]; name=version=build; pip: section
    channel/<subdir>/        package files + repodata.json, only for subdirs that have packages
    pypi/*.whl               wheels, when the lock has PyPI packages
    infer-vllm-bundle.json   our extras (pixi-unpack ignores it): see
                             :class:`pipeline.bundle.metadata.BundleExtras`

Bundles from pixi-pack itself carry no extras file; the install side then takes ``pixi.toml``
and ``pixi.lock`` from the ``vllm-pixi/`` template, or rebuilds what it needs from the channel.
"""

from __future__ import annotations

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
# Top-level names a bundle may hold; the reader skips anything else (never written).
BUNDLE_NAMES = (METADATA_FILE, ENVIRONMENT_FILE, EXTRAS_FILE, CHANNEL_DIR, PYPI_DIR)

# Fixed tar member attributes: the bundle's bytes depend on its content only.
TAR_MTIME = 0
TAR_UID = TAR_GID = 0
TAR_FILE_MODE = 0o644
TAR_DIR_MODE = 0o755


def checksum_path(bundle: Path) -> Path:
    """``<bundle>.sha256`` beside the bundle (``sha256sum`` format): written by the pack side,
    read by the extract side."""
    return bundle.with_name(bundle.name + ".sha256")
