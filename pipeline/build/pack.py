"""Pack one locked environment into a pixi-pack bundle: plan, fetch, then the bundle writer.

:func:`pack` reads ``<project>/pixi.lock`` for one environment and platform, refuses what cannot
be installed offline (source packages; PyPI sdists unless ``skip_sdists``), fetches every conda
package and wheel into the pack cache (:mod:`pipeline.build.fetch`: hashes checked, cache
reused), and has :func:`pipeline.bundle.writer.write_bundle` write the bundle: its members, the
generated files and how they match pixi-pack's are the writer's (:mod:`pipeline.bundle`).

Determinism and speed come from the tar writer (:mod:`pipeline.bundle.tar`): members sorted,
fixed mtime/uid/gid/mode, files streamed in the kernel while two threads hash the
tar and the cached files; the same lock and pixi.toml give the same bytes. A cached file that
fails its hash makes the tar be discarded; the entry is evicted, fetched again (counted as
downloaded) and the tar written again. A cached file that passed its hash in an earlier pack
and whose ``(size, mtime, inode, ctime)`` has not moved since is not hashed again
(:mod:`pipeline.build.verified`): a warm pack reads each file once, for the tar's sha256.
"""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from pipeline import __version__
from pipeline.build.fetch import Fetcher, FetchItem, FetchStats, conda_item, pypi_item
from pipeline.build.verified import VerifiedStamps
from pipeline.bundle.format import SBOM_FILE, SIG_FILE
from pipeline.bundle.metadata import BundleExtras
from pipeline.bundle.sbom import sbom_path
from pipeline.bundle.signature import sign, write_signature
from pipeline.bundle.tar import MemberMismatch
from pipeline.bundle.writer import PackageFile, conda_member, wheel_member, write_bundle
from pipeline.errors import BundleError
from pipeline.fsutil import atomic_write_bytes
from pipeline.pixi.lockfile import CondaPackage, LockedEnvironment, PypiPackage, read_environment
from pipeline.progress import human_bytes

LOCK_NAME = "pixi.lock"
MANIFEST_NAME = "pixi.toml"


# ---- what goes in -------------------------------------------------------------------------


@dataclass(frozen=True)
class BundlePlan:
    """The packages of one bundle, decided from the lock alone (no I/O).

    ``conda`` and ``wheels`` are what gets packed; ``skipped_sdists`` the PyPI source
    distributions left out (only with ``skip_sdists``).
    """

    locked: LockedEnvironment
    conda: tuple[CondaPackage, ...]
    wheels: tuple[PypiPackage, ...]
    skipped_sdists: tuple[PypiPackage, ...]


def plan_bundle(locked: LockedEnvironment, *, skip_sdists: bool = False) -> BundlePlan:
    """Check that ``locked`` can be packed and split its PyPI files into wheels and sdists.

    Raises BundleError (one line) for source packages, and for sdists unless ``skip_sdists``.
    Pure.
    """
    where = f"environment '{locked.environment}' ({locked.platform}) in {locked.path}"
    if locked.source_packages:
        raise BundleError(
            f"{where} has source packages, which have no archive to pack: "
            f"{', '.join(locked.source_packages)}; publish them as conda packages or wheels "
            "and lock again"
        )
    wheels = tuple(p for p in locked.pypi if p.is_wheel)
    sdists = tuple(p for p in locked.pypi if not p.is_wheel)
    if sdists and not skip_sdists:
        raise BundleError(
            f"{where} has PyPI source distributions, which would have to be built offline: "
            f"{', '.join(p.filename for p in sdists)}; lock wheels only (pixi: "
            "`[pypi-options] no-build = true`), or set PIPELINE_SKIP_SDISTS=1 to leave them out"
        )
    return BundlePlan(locked=locked, conda=locked.conda, wheels=wheels, skipped_sdists=sdists)


def fetch_items(plan: BundlePlan, cache: Path) -> list[FetchItem]:
    """The cache entries the bundle needs: conda packages, then wheels."""
    return [conda_item(p, cache) for p in plan.conda] + [pypi_item(p, cache) for p in plan.wheels]


# ---- the whole pack -------------------------------------------------------------------------


@dataclass(frozen=True)
class PackResult:
    """What :func:`pack` did and wrote.

    ``downloaded``/``reused`` count package files; ``downloaded_bytes`` is what came over the
    network (or from ``file://``) this time; ``package_bytes`` the size of all packed package
    files; ``bundle_bytes`` and ``sha256`` describe the tar.
    """

    bundle: Path
    sha256: str
    bundle_bytes: int
    downloaded: int
    reused: int
    downloaded_bytes: int
    package_bytes: int
    conda_packages: int
    pypi_packages: int
    skipped_sdists: tuple[str, ...]
    lock_sha256: str

    def values(self) -> dict[str, Any]:
        """The doit values of the pack task: ``downloaded``, ``reused``, ``bytes`` (downloaded
        bytes) and, for information, the bundle's sha256 and sizes."""
        return {
            "downloaded": self.downloaded,
            "reused": self.reused,
            "bytes": self.downloaded_bytes,
            "package_bytes": self.package_bytes,
            "bundle_bytes": self.bundle_bytes,
            "sha256": self.sha256,
            "conda_packages": self.conda_packages,
            "pypi_packages": self.pypi_packages,
        }

    def summary(self) -> str:
        """One line for the task output."""
        return (
            f"packed {self.conda_packages} conda packages and {self.pypi_packages} wheels into "
            f"{self.bundle} ({human_bytes(self.bundle_bytes)}): {self.downloaded} downloaded "
            f"({human_bytes(self.downloaded_bytes)}), {self.reused} reused from the pack cache"
        )


def pack(
    project_dir: Path,
    output: Path,
    cache: Path,
    *,
    environment: str = "default",
    platform: str = "linux-64",
    skip_sdists: bool = False,
    fetcher: Fetcher | None = None,
    progress_stream: TextIO | None = None,
    warn: Callable[[str], None] | None = None,
    signing_key: Path | None = None,
) -> PackResult:
    """Pack ``environment`` on ``platform`` of ``project_dir/pixi.lock`` into ``output``.

    Blocks while downloading and writing. Reuses and fills ``cache`` (pixi-pack's cache
    layout). Deterministic: the same lock and pixi.toml give a byte-identical tar whatever the
    cache state. ``output`` is replaced atomically; on failure it is left as it was.

    Cached files are checked by size when fetched and by hash while they are copied into the
    tar; a corrupt one is evicted, fetched again (counted as downloaded) and the tar rewritten.
    ``fetcher`` (default: a :class:`~pipeline.build.fetch.Fetcher` with default retries) does the
    downloads; ``warn`` gets one-line warnings (default: stderr; a given fetcher keeps its own);
    ``progress_stream`` gets the progress lines (default: stderr). ``signing_key`` signs the
    bundle's index (inside, and ``<bundle>.sig`` beside it: :mod:`pipeline.bundle.signature`).

    Raises LockError (unreadable lock, unknown environment or platform: the message lists what
    is available), BundleError (source packages, sdists without ``skip_sdists``, missing
    pixi.toml, write failures) and FetchError (download failures, hash mismatches).
    """
    project_dir = Path(project_dir).absolute()
    lock_path = project_dir / LOCK_NAME
    locked = read_environment(lock_path, environment, platform)
    plan = plan_bundle(locked, skip_sdists=skip_sdists)
    say = warn or _warn_stderr
    for sdist in plan.skipped_sdists:
        say(
            f"leaving PyPI source distribution {sdist.filename} out of the bundle "
            "(PIPELINE_SKIP_SDISTS=1): the installed environment will not have "
            f"{sdist.name} {sdist.version}"
        )
    lock_bytes = lock_path.read_bytes()
    manifest_path = project_dir / MANIFEST_NAME
    try:
        manifest_text = manifest_path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise BundleError(
            f"cannot read {manifest_path} ({exc}); the bundle carries a copy of the project's "
            "pixi.toml: point PIPELINE_PROJECT at the pixi project"
        ) from None

    cache = Path(cache).absolute()
    items = fetch_items(plan, cache)
    fetcher = fetcher or Fetcher(progress_stream=progress_stream, warn=warn)
    # Cached files are hashed while the tar is written (one read less on a warm pack).
    stats: FetchStats = fetcher.fetch_all(
        items, label=f"fetch {len(items)} packages", verify_cached=False
    )
    names = _member_names(plan)
    by_name = dict(zip(names, items, strict=True))
    lock_sha256 = hashlib.sha256(lock_bytes).hexdigest()
    output = Path(output).absolute()
    stamps = VerifiedStamps(cache)
    for attempt in (1, 2):
        # Entries hashed by an earlier pack and unchanged since (stat stamps) are not re-read.
        unverified = {item.cache_path for item in stats.unverified if not stamps.trusted(item)}
        checks = {
            name: item.check
            for name, item in by_name.items()
            if item.cache_path in unverified and item.check is not None
        }
        files = _package_files(names, items)
        package_bytes = sum(f.size for f in files)
        extras = BundleExtras(
            tool_version=__version__,
            environment=environment,
            # pixi-pack.json and the container's host check speak subdirs; the lock's own
            # platform name (p1) travels beside it for the install's lock selection.
            platform=locked.subdir or platform,
            lock_platform=(
                locked.lock_platform if locked.lock_platform not in ("", locked.subdir) else None
            ),
            lock_sha256=lock_sha256,
            pixi_toml=manifest_text,
            pixi_lock=lock_bytes.decode("utf-8"),
            conda_packages=len(plan.conda),
            pypi_packages=len(plan.wheels),
            package_bytes=package_bytes,
            skipped_sdists=tuple(f"{p.name}=={p.version}" for p in plan.skipped_sdists),
        )
        hashed = [by_name[name] for name in checks]
        before = stamps.snapshot(hashed)
        try:
            tar = write_bundle(
                output,
                plan.conda,
                plan.wheels,
                files,
                extras,
                checks=checks,
                progress_stream=progress_stream,
                signer=(lambda data: sign(data, signing_key)) if signing_key else None,
            )
            write_signature(tar.path, tar.generated.get(SIG_FILE))
            atomic_write_bytes(sbom_path(tar.path), tar.generated[SBOM_FILE])
            stamps.record(hashed, before)
            stamps.save()
            break
        except MemberMismatch as exc:
            if attempt == 2:
                raise
            # Corrupt cache entries: evict, fetch again (they count as downloaded), rewrite.
            bad = [by_name[name] for name in sorted(exc.mismatches)]
            for name, (algo, expected, actual) in sorted(exc.mismatches.items()):
                fetcher.evict(by_name[name], f"{algo} {actual}, the lock says {expected}")
            stats = stats.refetched(fetcher.fetch_all(bad, label=f"fetch {len(bad)} again"))
    return PackResult(
        bundle=tar.path,
        sha256=tar.sha256,
        bundle_bytes=tar.size,
        downloaded=stats.downloaded,
        reused=stats.reused,
        downloaded_bytes=stats.bytes,
        package_bytes=package_bytes,
        conda_packages=len(plan.conda),
        pypi_packages=len(plan.wheels),
        skipped_sdists=extras.skipped_sdists,
        lock_sha256=lock_sha256,
    )


def _member_names(plan: BundlePlan) -> list[str]:
    """Tar names of the package files, in the order of :func:`fetch_items`."""
    return [conda_member(p) for p in plan.conda] + [wheel_member(p) for p in plan.wheels]


def _package_files(names: Sequence[str], items: Sequence[FetchItem]) -> list[PackageFile]:
    """The fetched packages as the bundle writer takes them (cache path and size)."""
    files: list[PackageFile] = []
    for name, item in zip(names, items, strict=True):
        try:
            size = item.cache_path.stat().st_size
        except OSError as exc:
            raise BundleError(
                f"pack cache entry {item.cache_path} vanished after the fetch ({exc.strerror}); "
                "is something cleaning the cache? run the pack again"
            ) from None
        # The index's sha256: the lock's (checked while the tar is written), else hashed first.
        check = item.check
        files.append(
            PackageFile(
                name, item.cache_path, size, check[1] if check and check[0] == "sha256" else None
            )
        )
    return files


def _warn_stderr(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


__all__ = [
    "BundlePlan",
    "PackResult",
    "fetch_items",
    "pack",
    "plan_bundle",
]
