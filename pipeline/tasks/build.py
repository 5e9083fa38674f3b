"""doit tasks of the build host: lock -> verify -> pack -> sha256, and check-cache.

=================  ===================================  ==========================================
task               file_dep -> target                   notes
=================  ===================================  ==========================================
``lock``           pixi.toml -> pixi.lock                ``pixi lock``, else a py-rattler solve; an
                                                         up-to-date lock is kept; never cleaned
``verify``         pixi.toml, pixi.lock -> verify stamp  the project's ``verify`` task in the env
``pack``           (group)                               what users run: ``pack:tar`` then
                                                         ``pack:sha256``
``pack:tar``       pixi.toml, pixi.lock -> bundle tar    + pack stamp; task_dep ``verify``; values
                   (+ pack stamp)                        ``{"downloaded", "reused", "bytes", ...}``
``pack:sha256``    pack stamp -> ``<tar>.sha256``        ``sha256sum`` format, from the stamp
``sha256``         (alias)                               runs ``pack:sha256``
``check-cache``    getargs pack:tar's values             fails when the last pack downloaded
                                                         anything; always runs
``pack:parts``     pack stamp -> ``<tar>.parts.json``    only with ``PIPELINE_PART_SIZE``: the parts
``pack:delta``     pack stamp -> ``PIPELINE_DELTA``      only with ``PIPELINE_BASE_BUNDLE``: the
                   (+ .sha256, .sig)                     files the base lacks (a delta)
``pack-model``     the model's files -> model bundle     a stamp of the source files' fingerprints;
                   (+ .sha256, parts)                    a hub id is fetched first
=================  ===================================  ==========================================

``doit pack`` runs the whole chain: ``pack`` is a group of ``pack:tar`` and ``pack:sha256``;
``pack:tar`` depends on ``verify`` (task_dep) and, through its ``pixi.lock`` file_dep, on
``lock``. Each stage is skipped when its inputs did not change. ``doit forget pack`` forgets
both subtasks, so the next ``doit pack`` rebuilds the tar (from the warm pack cache:
``doit pack check-cache`` then passes). "Run the builder twice and assert the second run hits
the cache" is ``doit forget pack && doit pack check-cache``.

``pack:tar``'s values: ``downloaded`` and ``reused`` (package files), ``bytes`` (bytes
downloaded this time), and for information ``package_bytes``, ``bundle_bytes``, ``sha256``,
``conda_packages``, ``pypi_packages``. When ``pack:tar`` is up to date doit hands out the
values of its last real run, which is what ``check-cache`` judges.

Skipping verify: ``PIPELINE_SKIP_VERIFY=1 doit pack`` drops the ``verify`` prerequisite (a
quick pack, or a bundle for another platform than this host's, which cannot be run here).
The bundle's bytes do not depend on it, so switching it on or off does not repack.

The multi-GB tar is in no ``file_dep`` list (doit would md5 it again for each dependent task
whenever its mtime moves). ``pack:tar`` writes a small stamp, a second target
(``<state>/stamps/pack-<tar name>-<hash>.json``: sha256 computed while writing, size, mtime);
``pack:sha256`` depends on that stamp, and ``pack:tar``'s ``uptodate`` compares the tar's
``stat`` with it, so a replaced or truncated tar is rebuilt while a no-op ``doit pack`` reads
nothing but metadata. ``config_changed`` covers the settings that shape the bundle
(environment, platform, skip-sdists, tool and format versions).

Every action calls a stage module (:mod:`pipeline.build.lock`, :mod:`pipeline.build.verify`,
:mod:`pipeline.build.pack`) and writes its stamp with :mod:`pipeline.tasks.stamps`; the stage
modules are imported inside the actions so ``doit list`` and no-op runs stay fast.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from doit.tools import config_changed

from pipeline import __version__, reporting
from pipeline.bundle.format import (
    DELTA_FORMAT,
    EXTRAS_FORMAT,
    INDEX_FORMAT,
    PIXI_PACK_COMPAT_VERSION,
    checksum_path,
    default_delta_path,
    model_bundle_name,
)
from pipeline.errors import BundleError
from pipeline.settings import REPO_ROOT, Settings
from pipeline.tasks.common import SETTINGS, TaskDict

MANIFEST_NAME = "pixi.toml"
LOCK_NAME = "pixi.lock"


# ---- paths ----------------------------------------------------------------------------------


def project_dir(settings: Settings) -> Path:
    return settings.project.absolute()


def bundle_path(settings: Settings) -> Path:
    return settings.bundle.absolute()


def _key(path: Path) -> str:
    """A short, stable tag of an absolute path: stamps of two projects never collide."""
    return hashlib.sha256(str(path).encode()).hexdigest()[:10]


def verify_stamp(settings: Settings) -> Path:
    """``<state>/stamps/verify-<env>-<project hash>.json``: the target of ``verify``."""
    project = project_dir(settings)
    return settings.state_dir / "stamps" / f"verify-{settings.environment}-{_key(project)}.json"


def lock_log(settings: Settings) -> Path:
    """``<state>/logs/lock-<project hash>.log``: the output of ``pixi lock`` or the solve."""
    return settings.state_dir / "logs" / f"lock-{_key(project_dir(settings))}.log"


def verify_log(settings: Settings) -> Path:
    project = project_dir(settings)
    return settings.state_dir / "logs" / f"verify-{settings.environment}-{_key(project)}.log"


def pack_stamp(settings: Settings) -> Path:
    """``<state>/stamps/pack-<tar name>-<tar path hash>.json``: written with the tar."""
    bundle = bundle_path(settings)
    return settings.state_dir / "stamps" / f"pack-{bundle.name}-{_key(bundle)}.json"


def rattler_packages(settings: Settings) -> Path:
    """py-rattler's package cache, where pixi keeps it: ``<PIXI_CACHE_DIR>/pkgs``."""
    return settings.rattler_cache / "pkgs"


def rattler_repodata(settings: Settings) -> Path:
    """py-rattler's repodata cache, where pixi keeps it: ``<PIXI_CACHE_DIR>/repodata``."""
    return settings.rattler_cache / "repodata"


# ---- tasks ----------------------------------------------------------------------------------


def task_lock() -> TaskDict:
    """Lock pixi.toml into pixi.lock (pixi when found, else py-rattler; conda-only then)."""
    settings = SETTINGS
    manifest = project_dir(settings) / MANIFEST_NAME

    @reporting.action(interrupt="run `doit lock` again")
    def run() -> None:
        from pipeline.build.lock import find_pixi, lock

        result = lock(
            project_dir(settings),
            pixi=find_pixi(settings),
            cache_dir=rattler_repodata(settings),
            log=lock_log(settings),
        )
        reporting.say(result.summary())

    exists = manifest.is_file()
    return {
        "actions": [run],
        # A missing pixi.toml is reported by lock() in one line, not by doit's dep checker.
        "file_dep": [str(manifest)] if exists else [],
        "targets": [str(project_dir(settings) / LOCK_NAME)],
        "uptodate": [] if exists else [False],
        "verbosity": 2,
    }


def task_verify() -> TaskDict:
    """Run the project's `verify` task in the locked environment (pixi, else a rattler install)."""
    settings = SETTINGS
    project = project_dir(settings)
    stamp = verify_stamp(settings)

    @reporting.action(interrupt="nothing was recorded as verified; run it again")
    def run() -> None:
        from pipeline.build.lock import find_pixi
        from pipeline.build.verify import log_tail, verify
        from pipeline.tasks.stamps import write_verify_stamp

        result = verify(
            project,
            settings.environment,
            pixi=find_pixi(settings),
            cache_dir=rattler_packages(settings),
            log_path=verify_log(settings),
            platform=settings.platform,
            skip_sdists=settings.skip_sdists,
        )
        tail = log_tail(result.log, 10)
        if tail:
            reporting.say(tail)
        write_verify_stamp(result, stamp)
        reporting.say(result.summary())

    return {
        "actions": [run],
        "file_dep": [str(project / MANIFEST_NAME), str(project / LOCK_NAME)],
        "targets": [str(stamp)],
        "uptodate": [
            config_changed(
                {
                    "environment": settings.environment,
                    "platform": settings.platform,
                    "skip_sdists": settings.skip_sdists,
                }
            )
        ],
        "verbosity": 2,
    }


def task_pack() -> Any:
    """Build the offline bundle: lock, verify, pack the tar, write its .sha256."""
    settings = SETTINGS
    project = project_dir(settings)
    bundle = bundle_path(settings)
    stamp = pack_stamp(settings)

    yield {
        "name": None,
        "doc": "Build the offline bundle: lock -> verify -> pack:tar -> pack:sha256.",
    }

    @reporting.action(interrupt="the bundle is replaced only when complete; run `doit pack` again")
    def tar() -> dict[str, Any]:
        from pipeline.build.pack import pack
        from pipeline.tasks.stamps import write_pack_stamp

        result = pack(
            project,
            bundle,
            settings.pack_cache,
            environment=settings.environment,
            platform=settings.platform,
            skip_sdists=settings.skip_sdists,
            signing_key=settings.signing_key,
        )
        write_pack_stamp(result, stamp)
        reporting.say(result.summary())
        return result.values()

    def tar_intact() -> bool:
        from pipeline.tasks.stamps import bundle_unchanged

        return bundle_unchanged(stamp, bundle)

    yield {
        "name": "tar",
        "doc": "Fetch the locked packages into the pack cache and write the bundle tar.",
        "actions": [tar],
        "file_dep": [str(project / MANIFEST_NAME), str(project / LOCK_NAME)],
        "targets": [str(bundle), str(stamp)],
        "task_dep": [] if settings.skip_verify else ["verify"],
        "uptodate": [
            config_changed(
                {
                    "environment": settings.environment,
                    "platform": settings.platform,
                    "skip_sdists": settings.skip_sdists,
                    "tool_version": __version__,
                    "pixi_pack_version": PIXI_PACK_COMPAT_VERSION,
                    "extras_format": EXTRAS_FORMAT,
                    "index_format": INDEX_FORMAT,
                    "signing_key": str(settings.signing_key or ""),
                }
            ),
            tar_intact,
        ],
        "verbosity": 2,
    }

    @reporting.action
    def checksum() -> None:
        from pipeline.tasks.stamps import write_checksum

        out = write_checksum(stamp, bundle)
        reporting.say(f"wrote {out}")

    yield {
        "name": "sha256",
        "doc": "Write <bundle>.sha256 (sha256sum format) from the pack stamp.",
        "actions": [checksum],
        "file_dep": [str(stamp)],
        "targets": [str(checksum_path(bundle))],
        "verbosity": 2,
    }

    if settings.part_size:
        part_size = settings.part_size

        @reporting.action(interrupt="each part is replaced only when complete; run again")
        def parts() -> None:
            from pipeline.bundle.parts import write_parts
            from pipeline.tasks.stamps import read_pack_sha256

            written = write_parts(
                bundle,
                read_pack_sha256(stamp, bundle),
                part_size,
                signing_key=settings.signing_key,
            )
            reporting.say(f"{len(written.parts)} parts of {bundle.name} beside it")

        yield {
            "name": "parts",
            "doc": "Cut the bundle into parts of PIPELINE_PART_SIZE, with <bundle>.parts.json.",
            "actions": [parts],
            "file_dep": [str(stamp)],
            "targets": [str(bundle.with_name(bundle.name + ".parts.json"))],
            "uptodate": [
                config_changed(
                    {"part_size": part_size, "signing_key": str(settings.signing_key or "")}
                )
            ],
            "verbosity": 2,
        }

    if settings.base_bundle:
        base = settings.base_bundle.absolute()
        delta = delta_path(settings)

        @reporting.action(interrupt="the delta is replaced only when complete; run again")
        def write() -> None:
            from pipeline.bundle.delta import write_delta
            from pipeline.tasks.stamps import read_pack_sha256

            result = write_delta(bundle, read_pack_sha256(stamp, bundle), base, delta)
            reporting.say(result.summary())

        yield {
            "name": "delta",
            "doc": "Write PIPELINE_DELTA: the package files PIPELINE_BASE_BUNDLE lacks.",
            "actions": [write],
            "file_dep": [str(stamp)],
            "targets": [str(delta), str(checksum_path(delta))],
            "uptodate": [
                config_changed(
                    {
                        "base": str(base),
                        "base_file": _file_facts(base),
                        "delta_format": DELTA_FORMAT,
                    }
                )
            ],
            "verbosity": 2,
        }


def delta_path(settings: Settings) -> Path:
    """``PIPELINE_DELTA``, else ``<bundle stem>.delta.tar`` beside the bundle."""
    return (settings.delta or default_delta_path(bundle_path(settings))).absolute()


def _file_facts(path: Path) -> str:
    """A file's (size, mtime, inode) for ``config_changed``: a base replaced at the same path
    writes the delta again, and nothing is read to know it."""
    try:
        st = path.stat()
    except OSError:
        return "missing"
    return f"{st.st_size}:{st.st_mtime_ns}:{st.st_ino}"


def model_source(settings: Settings) -> str:
    """``PIPELINE_MODEL_SOURCE``, required by ``pack-model``."""
    if not settings.model_source:
        raise BundleError(
            "PIPELINE_MODEL_SOURCE is not set; set it to a model directory (what `hf download` "
            "wrote) or a hub id (org/name)"
        )
    return settings.model_source


def model_names(settings: Settings) -> tuple[str, Path]:
    """The model's name and its bundle's path (``PIPELINE_MODEL_NAME``,
    ``PIPELINE_MODEL_BUNDLE``, else derived from the source)."""
    from pipeline.build.model import check_model_name, default_model_name

    name = check_model_name(settings.model_name or default_model_name(model_source(settings)))
    bundle = settings.model_bundle or REPO_ROOT / "bundles" / model_bundle_name(name)
    return name, bundle.absolute()


def task_pack_model() -> TaskDict:
    """Pack a model's weights (PIPELINE_MODEL_SOURCE) into a model bundle, checked file by file."""
    settings = SETTINGS

    def stamp_of(bundle: Path) -> Path:
        return settings.state_dir / "stamps" / f"pack-model-{bundle.name}-{_key(bundle)}.json"

    def current() -> bool:
        from pipeline.build.model import is_hub_id, model_pack_is_current

        if not settings.model_source or is_hub_id(settings.model_source):
            return False  # a hub id: its revision may have moved; the action decides
        try:
            name, bundle = model_names(settings)
        except BundleError:
            return False
        return model_pack_is_current(
            stamp_of(bundle),
            Path(settings.model_source),
            name,
            bundle,
            settings.model_allow_pickle,
            settings.part_size,
            settings.signing_key,
        )

    @reporting.action(interrupt="the bundle is replaced only when complete; run again")
    def run() -> None:
        from pipeline.build.model import (
            download_model,
            is_hub_id,
            model_pack_is_current,
            pack_model,
            write_model_stamp,
        )

        text = model_source(settings)
        name, bundle = model_names(settings)
        origin: dict[str, str] = {}
        if is_hub_id(text):
            reporting.say(f"fetching {text}@{settings.model_revision or 'main'} (huggingface_hub)")
            source = download_model(
                text,
                settings.model_revision,
                settings.pack_cache / "huggingface",
                endpoint=settings.hf_endpoint,
                token=settings.hf_token,
            )
            origin = {"repo": text, "revision": source.name}
        else:
            source = Path(text)
        stamp = stamp_of(bundle)
        allow, part_size, key = (
            settings.model_allow_pickle,
            settings.part_size,
            settings.signing_key,
        )
        if model_pack_is_current(stamp, source, name, bundle, allow, part_size, key):
            reporting.say(f"{bundle.name} is up to date with {source}")
            return
        result = pack_model(
            source,
            name,
            bundle,
            allow_pickle=allow,
            part_size=part_size,
            origin=origin,
            signing_key=key,
        )
        write_model_stamp(stamp, result, source, name, allow, part_size, key)
        reporting.say(result.summary())

    return {
        "basename": "pack-model",
        "actions": [run],
        "uptodate": [current],
        "verbosity": 2,
    }


def task_sha256() -> TaskDict:
    """Write <bundle>.sha256 (runs pack:sha256, packing first when needed)."""
    return {"actions": None, "task_dep": ["pack:sha256"]}


def task_check_cache() -> TaskDict:
    """Fail when the last pack downloaded anything (run after a second `doit pack`)."""
    settings = SETTINGS

    @reporting.action
    def run(values: dict[str, Any]) -> None:
        check_cache(values, settings)

    return {
        "basename": "check-cache",
        "actions": [run],
        "getargs": {"values": ("pack:tar", None)},
        "uptodate": [False],
        "verbosity": 2,
    }


def check_cache(values: dict[str, Any], settings: Settings) -> None:
    """Raise BundleError when pack's ``values`` say it downloaded anything; else say so."""
    from pipeline.progress import human_bytes

    downloaded = int(values.get("downloaded", 0) or 0)
    reused = int(values.get("reused", 0) or 0)
    if downloaded:
        raise BundleError(
            f"check-cache: the last pack downloaded {downloaded} package files "
            f"({human_bytes(int(values.get('bytes', 0) or 0))}) and reused {reused} from "
            f"{settings.pack_cache}; on a rebuild everything should come from the cache: keep "
            "PIPELINE_PACK_CACHE on a persistent disk, then `doit forget pack && doit pack "
            "check-cache`"
        )
    reporting.say(
        f"check-cache: the last pack reused all {reused} package files from the pack cache"
    )


TASKS: dict[str, Callable[[], Any]] = {
    "task_lock": task_lock,
    "task_verify": task_verify,
    "task_pack": task_pack,
    "task_sha256": task_sha256,
    "task_check_cache": task_check_cache,
    "task_pack_model": task_pack_model,
}
