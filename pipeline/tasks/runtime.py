"""doit tasks of the container side: extract -> patch-channels -> frozen-install, and `install`;
install-model (the model bundles), join-parts and rebuild-bundle (a delta's full tar).

No task here produces the bundle tar: the container has no pack task, so a fresh doit database
never tries to lock or pack. Each stage has a target inside the project dir and an
``uptodate`` callable that reads the real state (stamps and records, a few ``stat`` calls);
none has the multi-GB tar as a ``file_dep``, so doit never hashes it (its md5 check would,
on every fresh database and every touched tar). The stages are also idempotent themselves and
take the project's install lock, so running them again, or two ``doit install`` at once, is
safe.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path

from pipeline import reporting
from pipeline.install.layout import ProjectPaths
from pipeline.settings import Settings, process_environ
from pipeline.tasks.common import SETTINGS, TaskDict
from pipeline.timing import PhaseClock, summary

# What an interrupted stage leaves (reporting.action's one line): the stages stop their
# children and remove their half-done work on the way out, and only ever switch whole things.
_UNCHANGED = "the installed environment is unchanged; run `doit install` again"
_SWITCHED_WHOLE = (
    "an environment is switched in only once complete, so it is the previous one (or the "
    "finished new one); run `doit install` again"
)


def _paths(settings: Settings) -> ProjectPaths:
    return ProjectPaths.of(settings.pixi_project_dir)


@functools.cache
def _clock() -> PhaseClock:
    """The phase clock of this run's stages (made when the first one runs, which records
    doit's start-up up to then): frozen-install writes them all into its record."""
    clock = PhaseClock()
    clock.add_startup()
    return clock


def task_extract() -> TaskDict:
    """Check the bundle (sha256, members, platform) and extract it into the project dir."""
    settings = SETTINGS
    paths = _paths(settings)
    env = settings.install_env_name

    def current() -> bool:
        from pipeline.install.extract import extract_is_current

        return extract_is_current(
            settings.install_bundle,
            paths.root,
            environment=env,
            configured_sha256=settings.bundle_sha256,
        )

    @reporting.action(interrupt=_UNCHANGED)
    def run() -> None:
        from pipeline.install.extract import extract_bundle

        result = extract_bundle(
            settings.install_bundle,
            paths.root,
            environment=env,
            configured_sha256=settings.bundle_sha256,
            template_dir=settings.project,
            clock=_clock(),
            trusted_signers=settings.trusted_signers,
            base_bundle=settings.base_bundle_path,
        )
        reporting.say(result.summary())

    return {
        "actions": [run],
        "targets": [str(paths.extract_stamp)],
        "uptodate": [current],
        "verbosity": 2,
    }


def task_patch_channels() -> TaskDict:
    """Point pixi.toml channels and pixi.lock package URLs at the extracted channel."""
    settings = SETTINGS
    paths = _paths(settings)
    env = settings.install_env_name

    def current() -> bool:
        from pipeline.install.patch import patch_is_current

        return patch_is_current(paths.root, env)

    @reporting.action(interrupt=_UNCHANGED)
    def run() -> None:
        from pipeline.install.patch import patch_project

        with _clock().phase("patch"):
            result = patch_project(paths.root, env)
        reporting.say(result.summary())

    return {
        "basename": "patch-channels",
        "actions": [run],
        "task_dep": ["extract"],
        "targets": [str(paths.patch_stamp)],
        "uptodate": [current],
        "verbosity": 2,
    }


def task_frozen_install() -> TaskDict:
    """Install exactly the locked environment, offline, verified, switched in atomically."""
    settings = SETTINGS
    paths = _paths(settings)
    env = settings.install_env_name

    def current() -> bool:
        from pipeline.install.frozen import install_is_current

        return install_is_current(paths.root, env)

    @reporting.action(interrupt=_SWITCHED_WHOLE)
    def run() -> None:
        from pipeline.install.frozen import frozen_install
        from pipeline.install.policy import parse_allowed

        result = frozen_install(
            paths.root,
            env,
            cache_dir=settings.rattler_cache / "pkgs",
            verify_command=settings.install_verify,
            override_cuda=settings.conda_override_cuda,
            override_glibc=settings.conda_override_glibc,
            environ=process_environ(),
            clock=_clock(),
            allow_pth=parse_allowed(settings.allow_pth),
        )
        reporting.say(result.summary())
        if result.phases:
            reporting.say(summary(result.phases))

    return {
        "basename": "frozen-install",
        "actions": [run],
        "task_dep": ["patch-channels"],
        "targets": [str(paths.installed_from(env))],
        "uptodate": [current],
        "verbosity": 2,
    }


def task_install() -> TaskDict:
    """Install the environment bundle, and the model bundles when set (offline; idempotent).

    The models are those of AUTO_INFER_VLLM_MODEL_BUNDLES (``install-model``)."""
    stages = ["extract", "patch-channels", "frozen-install"]
    if SETTINGS.model_bundles:
        stages.append("install-model")
    return {"actions": None, "task_dep": stages}


def task_install_model() -> TaskDict:
    """Install the model bundles of AUTO_INFER_VLLM_MODEL_BUNDLES into the models dir."""
    settings = SETTINGS
    bundles = settings.model_bundles
    models_dir = settings.models_dir

    def current() -> bool:
        from pipeline.install.model import models_are_current

        return bool(bundles) and models_are_current(bundles, models_dir)

    @reporting.action(interrupt="each model is switched in only once complete; run it again")
    def run() -> None:
        from pipeline.errors import BundleError
        from pipeline.install.model import install_models

        if not bundles:
            raise BundleError(
                "AUTO_INFER_VLLM_MODEL_BUNDLES is not set; set it to the model bundles to "
                "install (tars or .parts.json files, separated by ':')"
            )
        for result in install_models(bundles, models_dir, trusted_signers=settings.trusted_signers):
            reporting.say(result.summary())

    return {
        "basename": "install-model",
        "actions": [run],
        "uptodate": [current],
        "verbosity": 2,
    }


def task_join_parts() -> TaskDict:
    """Rebuild bundle tars from their parts (for pixi-unpack and other tools that want one)."""
    settings = SETTINGS

    @reporting.action(interrupt="a tar appears only when complete; run it again")
    def run(parts: list[str]) -> None:
        from pipeline.bundle.parts import is_parts_file, join_parts
        from pipeline.errors import BundleError

        chosen = [Path(p) for p in parts] or [
            p for p in (settings.install_bundle, *settings.model_bundles) if is_parts_file(p)
        ]
        if not chosen:
            raise BundleError(
                "no parts file to join: pass `doit join-parts --parts <bundle>.parts.json`, or "
                "point AUTO_INFER_VLLM_BUNDLE_PATH or AUTO_INFER_VLLM_MODEL_BUNDLES at one"
            )
        for path in chosen:
            if not is_parts_file(path):
                raise BundleError(f"{path} is not a parts file (<bundle>.parts.json)")
            joined = join_parts(path)
            reporting.say(f"joined {path.name} into {joined} (and {joined.name}.sha256)")

    return {
        "basename": "join-parts",
        "actions": [run],
        "params": [
            {
                "name": "parts",
                "long": "parts",
                "type": list,
                "default": [],
                "help": "a <bundle>.parts.json to join (repeat for more)",
            }
        ],
        "uptodate": [False],
        "verbosity": 2,
    }


def task_rebuild_bundle() -> TaskDict:
    """Write the full bundle tar that a delta and its base make, byte for byte."""
    settings = SETTINGS

    @reporting.action(interrupt="the tar appears only when complete; run it again")
    def run(delta: str, base: str, output: str) -> None:
        from pipeline.bundle.delta import is_delta, read_manifest, rebuild_bundle
        from pipeline.errors import BundleError
        from pipeline.install.base import open_delta_over_base

        path = Path(delta) if delta else settings.install_bundle
        if not is_delta(path):
            raise BundleError(
                f"{path} is not a delta (a delta tar starts with its delta/ directory): pass "
                "`doit rebuild-bundle --delta <name>.delta.tar`, or point "
                "AUTO_INFER_VLLM_BUNDLE_PATH at one"
            )
        manifest = read_manifest(path)
        target = Path(output) if output else path.parent / manifest.target.name
        source, _ = open_delta_over_base(
            path,
            _paths(settings),
            settings.bundle_sha256,
            Path(base) if base else settings.base_bundle_path,
            lambda message: reporting.say(f"warning: {message}"),
        )
        with source:
            rebuild_bundle(source, target)
        reporting.say(f"rebuilt {target} from {path.name} (and {target.name}.sha256)")

    def param(name: str, help: str) -> dict[str, object]:
        return {"name": name, "long": name, "type": str, "default": "", "help": help}

    return {
        "basename": "rebuild-bundle",
        "actions": [run],
        "params": [
            param("delta", "the delta (default: AUTO_INFER_VLLM_BUNDLE_PATH)"),
            param(
                "base",
                "its base bundle (default: AUTO_INFER_VLLM_BASE_BUNDLE_PATH, else the project "
                "dir's installed extraction)",
            ),
            param("output", "the tar to write (default: the full bundle's name beside the delta)"),
        ],
        "uptodate": [False],
        "verbosity": 2,
    }


TASKS: dict[str, Callable[[], TaskDict]] = {
    "task_extract": task_extract,
    "task_patch_channels": task_patch_channels,
    "task_frozen_install": task_frozen_install,
    "task_install": task_install,
    "task_install_model": task_install_model,
    "task_join_parts": task_join_parts,
    "task_rebuild_bundle": task_rebuild_bundle,
}
