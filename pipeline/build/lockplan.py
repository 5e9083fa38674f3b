"""The plan of a py-rattler lock: what to solve and how the lock names it, from the manifest.

:func:`plan_lock` turns every (environment, platform) of a parsed ``pixi.toml`` into a
:class:`SolveJob` (channel URLs, match specs, virtual packages, the PyPI requirements uv
resolves afterwards) and decides the lock's form the way pixi writes it: the platform names
(the subdir, or ``p1``, ``p2``... for a platform with virtual packages of its own) and the
format version (6 when every workspace platform is a bare subdir, else 7). The plan is plain,
frozen data: :mod:`pipeline.build.lock` sends it to the solver process as JSON, and
:mod:`pipeline.build.lockstale` compares an existing lock with it.

No I/O; the only imports from py-rattler are its synchronous channel and match-spec parsers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from pipeline.errors import LockError
from pipeline.pixi.model import Manifest, PypiOptions, ResolvedEnvironment
from pipeline.pixi.platforms import VirtualPackage, customised


@dataclass(frozen=True)
class SolveJob:
    """One (environment, platform) to solve: what the worker receives.

    ``platform`` is the conda subdir solved for; ``lock_platform`` the name the lock gives it
    (the subdir itself, or ``p1``, ``p2``... for a platform with its own virtual packages).
    """

    environment: str
    platform: str
    lock_platform: str
    channels: tuple[str, ...]  # URLs, highest priority first
    channel_priority: str
    specs: tuple[str, ...]
    virtual_packages: tuple[VirtualPackage, ...]
    # PEP 508 requirements and [pypi-options] of the environment, resolved by uv after the
    # conda solve (the worker ignores them).
    pypi_requirements: tuple[str, ...] = ()
    pypi_options: PypiOptions = field(default_factory=PypiOptions)


@dataclass(frozen=True)
class LockPlan:
    """Everything the worker needs to write a lock, derived from the manifest alone."""

    environments: tuple[tuple[str, tuple[str, ...]], ...]  # (name, channel URLs)
    # (lock name, subdir, virtual packages as pixi writes them), in the lock's order.
    platforms: tuple[tuple[str, str, tuple[str, ...]], ...]
    jobs: tuple[SolveJob, ...]
    lock_version: int = 7


def channel_url(channel: str, project_dir: Path, where: str) -> str:
    """``channel`` (name, URL or path relative to ``project_dir``) as a URL ending in ``/``.

    Names use conda's default alias (``https://conda.anaconda.org/<name>/``), as pixi does.
    """
    from rattler import Channel, ChannelConfig

    try:
        url = Channel(channel, ChannelConfig(root_dir=str(project_dir))).base_url
    except Exception as exc:
        raise LockError(
            f"{where}: channel {channel!r} is not a name, URL or path ({exc}); fix the channel"
        ) from None
    return url if url.endswith("/") else url + "/"


def plan_lock(manifest: Manifest, project_dir: Path) -> LockPlan:
    """The solve jobs for every environment and platform of ``manifest``. No I/O.

    The lock is written the way pixi writes it. Lock platforms are told apart by pixi's
    identity (subdir plus the virtual packages that differ from the subdir defaults): one with
    none is named after its subdir, the others ``p1``, ``p2``... in manifest order (pixi's
    ``shorten_platform_names``), listing the virtual packages in pixi's order and spelling.

    The format is the oldest that can say it all, so that the most pixi releases read it:
    version 6 (pixi >= 0.50 and every later release; no platform list, packages keyed by
    subdir) when every workspace platform is a bare subdir -- what pixi before 0.71 wrote for
    such a manifest, ``[system-requirements]`` included, and what current pixi accepts as
    satisfied -- else version 7 (pixi >= 0.68), the only format with rich platforms.
    """
    jobs: list[SolveJob] = []
    environments: list[tuple[str, tuple[str, ...]]] = []
    names: dict[tuple[str, frozenset[tuple[str, str, str]]], str] = {}
    platforms: list[tuple[str, str, tuple[str, ...]]] = []
    v6 = all(pdef.is_subdir_platform for pdef in manifest.platform_defs)
    ordinal = 0
    # Platform names follow the manifest's platform order, whatever the environment order.
    for platform in manifest.platforms:
        for env in manifest.environment_names:
            if platform not in manifest.platforms_for(env):
                continue
            subdir = manifest.subdir(platform)
            vps = manifest.virtual_packages(env, platform)
            # v6 keys packages by subdir within each environment: one platform per subdir.
            key = (subdir, frozenset() if v6 else customised(vps, subdir))
            if key in names:
                continue
            if v6 or not key[1]:
                name = subdir
            else:
                ordinal += 1
                name = f"p{ordinal}"
            names[key] = name
            platforms.append((name, subdir, () if v6 else tuple(str(vp) for vp in vps)))
    for env in manifest.environment_names:
        urls: tuple[str, ...] | None = None
        for platform in manifest.platforms_for(env):
            resolved = manifest.resolve(env, platform)
            urls = tuple(
                channel_url(c, project_dir, f"{manifest.path}: environment {env!r}")
                for c in resolved.channels
            )
            subdir = manifest.subdir(platform)
            name = names[
                (subdir, frozenset() if v6 else customised(resolved.virtual_packages, subdir))
            ]
            jobs.append(_job(resolved, urls, subdir, name))
        if urls is None:  # an environment without platforms still lists its channels
            urls = tuple(
                channel_url(c.channel, project_dir, str(manifest.path)) for c in manifest.channels
            )
        environments.append((env, urls))
    return LockPlan(
        environments=tuple(environments),
        platforms=tuple(platforms),
        jobs=tuple(jobs),
        lock_version=6 if v6 else 7,
    )


def _job(
    resolved: ResolvedEnvironment, urls: tuple[str, ...], subdir: str, lock_platform: str
) -> SolveJob:
    # A `channel::` spec may name a channel the environment does not list; solve with it too.
    from rattler import MatchSpec

    extra: list[str] = []
    for spec in resolved.match_specs:
        channel = MatchSpec(spec).channel
        if channel is not None:
            url = channel.base_url if channel.base_url.endswith("/") else channel.base_url + "/"
            if url not in urls and url not in extra:
                extra.append(url)
    return SolveJob(
        environment=resolved.environment,
        platform=subdir,
        lock_platform=lock_platform,
        channels=(*urls, *extra),
        channel_priority=resolved.channel_priority,
        specs=resolved.match_specs,
        virtual_packages=resolved.virtual_packages,
        pypi_requirements=resolved.pypi_requirements,
        pypi_options=resolved.pypi_options,
    )
