"""Reading pixi projects, what every side needs: :mod:`~pipeline.pixi.manifest` (``pixi.toml``),
:mod:`~pipeline.pixi.lockfile` (``pixi.lock``), :mod:`~pipeline.pixi.envs` (which environment
runs a command, and how it is activated)."""
