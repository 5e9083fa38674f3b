"""pixi projects, what every side needs.

- :mod:`~pipeline.pixi.manifest`: read ``pixi.toml`` and check its shape (``load_manifest``)
- :mod:`~pipeline.pixi.model`: the frozen objects it is read into; how an environment resolves
- :mod:`~pipeline.pixi.platforms`: a platform's identity (subdir, virtual packages, selectors)
- :mod:`~pipeline.pixi.tasks`: the manifest's ``[tasks]`` and the order pixi runs them in
- :mod:`~pipeline.pixi.lockfile`: read ``pixi.lock`` with py-rattler, one environment and platform
- :mod:`~pipeline.pixi.locktext`: the text of ``pixi.lock``: its version, every line-level edit
- :mod:`~pipeline.pixi.envs`: which environment runs a command, and how it is activated
"""

from pathlib import Path


def pixi_env_prefix(project_dir: Path, environment: str) -> Path:
    """Where pixi (and our frozen install) puts an environment: ``.pixi/envs/<env>``. Here,
    not in :mod:`~pipeline.pixi.envs`: every doit command names this path, and that module
    loads py-rattler."""
    return project_dir / ".pixi" / "envs" / environment
