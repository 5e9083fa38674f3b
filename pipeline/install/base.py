"""The base of a delta bundle in the container (:mod:`pipeline.bundle.delta`): the bundle tar
or parts file that ``AUTO_INFER_VLLM_BASE_BUNDLE_PATH`` names, else the project dir's installed
extraction. Used by ``extract`` and by ``doit rebuild-bundle`` (which imports this module
alone, not the extract stage).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path

from pipeline.bundle import reader
from pipeline.bundle.delta import DeltaSource, InstalledBase, open_delta
from pipeline.bundle.format import checksum_path
from pipeline.install.layout import ProjectPaths, read_extract_record


def open_delta_over_base(
    delta: Path,
    paths: ProjectPaths,
    configured: str | None,
    base_bundle: Path | None,
    warn: Callable[[str], None],
) -> tuple[DeltaSource, str]:
    """The full bundle of ``delta`` over ``base_bundle``, else over the installed extraction
    (only its files unchanged since they were extracted count)."""
    if reader.expected_sha256(delta, configured)[0] is None:
        warn(
            f"no expected sha256 for the delta {delta} (set AUTO_INFER_VLLM_BUNDLE_SHA256 or put "
            f"{checksum_path(delta).name} beside it): the bundle it rebuilds is checked only "
            "against the sha256 the delta itself records"
        )
    installed = None
    record = read_extract_record(paths)
    if base_bundle is None and record is not None:
        files: dict[str, tuple[Path, str]] = {}
        for name, facts in record.files.items():
            with contextlib.suppress(OSError):
                if facts.matches((paths.root / name).lstat()):
                    files[name] = (paths.root / name, facts.sha256)
        installed = InstalledBase(f"the installed extraction in {paths.root}", record.sha256, files)
    return open_delta(delta, configured, base_bundle=base_bundle, installed=installed)


__all__ = ["open_delta_over_base"]
