"""The container side: extract -> patch-channels -> frozen-install, offline.

- :mod:`~pipeline.install.extract`: the extraction transaction (staging, the switch, the
  records) around the bundle reader (:mod:`pipeline.bundle.reader`)
- :mod:`~pipeline.install.patch`: point ``pixi.toml`` and ``pixi.lock`` at the local channel
- :mod:`~pipeline.install.frozen`: install exactly the locked packages, verify, switch atomically
- :mod:`~pipeline.install.verify`: the runtime verify of a new generation (task, import check)
- :mod:`~pipeline.install.layout`: the project dir's paths, the records between the stages, the
  install lock
- :mod:`~pipeline.install.host`: the host's facts (glibc, CUDA driver) against the lock's needs
"""
