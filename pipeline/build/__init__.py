"""The online build host: lock -> verify -> pack -> sha256.

- :mod:`~pipeline.build.lock`: ``pixi.toml`` -> ``pixi.lock`` (pixi, else a py-rattler solve)
- :mod:`~pipeline.build.lockplan`: what a py-rattler lock solves, and the form pixi gives it
- :mod:`~pipeline.build.lockstale`: whether an existing ``pixi.lock`` is current for ``pixi.toml``
- :mod:`~pipeline.build.pypi`: the PyPI part of a lock, resolved with uv
- :mod:`~pipeline.build.verify`: the project's ``verify`` task in the locked environment
- :mod:`~pipeline.build.fetch`: hash-checked downloads into a reusable cache (requests)
- :mod:`~pipeline.build.pack`: the bundle's plan and packages, handed to the bundle writer
  (:mod:`pipeline.bundle.writer`)
"""
