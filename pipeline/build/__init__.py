"""The online build host: lock -> verify -> pack -> sha256.

- :mod:`~pipeline.build.lock`: ``pixi.toml`` -> ``pixi.lock`` (pixi, else a py-rattler solve)
- :mod:`~pipeline.build.verify`: the project's ``verify`` task in the locked environment
- :mod:`~pipeline.build.fetch`: hash-checked downloads into a reusable cache (requests)
- :mod:`~pipeline.build.pack`: the bundle's plan and packages, handed to the bundle writer
  (:mod:`pipeline.bundle.writer`)
"""
