"""The doit stamps of the build tasks: small files that stand for big or non-file outputs.

A directory or a multi-GB tar makes a poor ``file_dep`` (doit md5s it again whenever its mtime
moves), so each build task writes a small JSON stamp as a second target, and the tasks
depend on that instead:

- the ``verify`` stamp (:func:`write_verify_stamp`): a passed verify, with the lock's sha256;
- the ``pack`` stamp (:func:`write_pack_stamp`): the bundle's sha256 (computed while writing)
  and its :class:`~pipeline.fsutil.Fingerprint`. ``pack:sha256`` writes ``<bundle>.sha256``
  from it (:func:`write_checksum`) and ``pack:tar``'s ``uptodate`` compares the tar's
  fingerprint with it (:func:`bundle_unchanged`), so the tar is never read again.

The container side keeps its stamps inside the project dir, next to what they describe: they
are records between the install stages, read by the stages themselves
(:mod:`pipeline.install.layout`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline import __version__
from pipeline.bundle.format import checksum_path
from pipeline.errors import BundleError
from pipeline.fsutil import Fingerprint, atomic_write_text

if TYPE_CHECKING:  # the stage modules are imported inside the actions: `doit list` stays fast
    from pipeline.build.pack import PackResult
    from pipeline.build.verify import VerifyResult


def write_verify_stamp(result: VerifyResult, stamp: Path) -> None:
    """Record a passed verify in ``stamp`` (JSON, atomic): the doit target of ``verify``."""
    document: dict[str, Any] = {
        "environment": result.environment,
        "platform": result.platform,
        "via": result.via,
        "commands": list(result.commands),
        "prefix": str(result.prefix) if result.prefix else None,
        "lock_sha256": result.lock_sha256,
        "tool_version": __version__,
        "seconds": round(result.seconds, 1),
    }
    atomic_write_text(stamp, json.dumps(document, indent=2) + "\n")


def write_pack_stamp(result: PackResult, stamp: Path) -> None:
    """Record the bundle's sha256 and fingerprint in ``stamp`` (small JSON, atomic).

    The ``sha256`` task reads the digest from here, so the multi-GB tar is in no ``file_dep``
    list; :func:`bundle_unchanged` compares the tar's fingerprint with it.
    """
    found = Fingerprint.of(result.bundle.stat())
    document = {
        "bundle": str(result.bundle),
        "sha256": result.sha256,
        "size": found.size,
        "mtime_ns": found.mtime_ns,
        "ino": found.ino,
        "ctime_ns": found.ctime_ns,
        "lock_sha256": result.lock_sha256,
    }
    atomic_write_text(stamp, json.dumps(document, indent=2) + "\n")


def read_pack_stamp(stamp: Path) -> dict[str, Any] | None:
    """The pack stamp's content, or None when it is missing or unreadable."""
    try:
        value = json.loads(stamp.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def bundle_unchanged(stamp: Path, bundle: Path) -> bool:
    """True when ``bundle`` still has the fingerprint recorded in ``stamp``.

    Reads only metadata (one ``stat``), never the tar: a no-op ``doit pack`` stays fast with
    a multi-GB bundle, yet a replaced, truncated or rewritten tar is packed again, even one
    whose size and mtime were put back. A stamp from before the inode and ctime were kept
    never matches: that tar is packed once more.
    """
    recorded = read_pack_stamp(stamp)
    found = Fingerprint.read(bundle)
    if recorded is None or found is None:
        return False
    fields = ("size", "mtime_ns", "ino", "ctime_ns")
    return tuple(recorded.get(key) for key in fields) == tuple(getattr(found, k) for k in fields)


def read_pack_sha256(stamp: Path, bundle: Path) -> str:
    """The bundle's sha256 as the pack stamp recorded it (computed while the tar was written).

    Raises BundleError when the stamp is missing or does not describe ``bundle``.
    """
    recorded = read_pack_stamp(stamp)
    digest = recorded.get("sha256") if recorded else None
    if not isinstance(digest, str) or recorded is None or recorded.get("bundle") != str(bundle):
        raise BundleError(
            f"no pack record for {bundle} in {stamp}; run `doit pack` (or `doit forget pack` "
            "first if the bundle was changed by hand)"
        )
    return digest


def write_checksum(stamp: Path, bundle: Path) -> Path:
    """Write ``<bundle>.sha256`` (``<hex>  <file name>``, as ``sha256sum``) from ``stamp``.

    Raises BundleError when the stamp is missing or does not describe ``bundle``.
    """
    digest = read_pack_sha256(stamp, bundle)
    out = checksum_path(bundle)
    atomic_write_text(out, f"{digest}  {bundle.name}\n")
    return out


__all__ = [
    "bundle_unchanged",
    "read_pack_sha256",
    "read_pack_stamp",
    "write_checksum",
    "write_pack_stamp",
    "write_verify_stamp",
]
