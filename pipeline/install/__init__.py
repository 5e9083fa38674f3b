"""The container side: extract -> patch-channels -> frozen-install, offline.

- :mod:`~pipeline.install.extract`: check the bundle (sha256, members, platform), extract it
- :mod:`~pipeline.install.contents`: what an extracted bundle holds, checked against its lock
- :mod:`~pipeline.install.patch`: point ``pixi.toml`` and ``pixi.lock`` at the local channel
- :mod:`~pipeline.install.frozen`: install exactly the locked packages, verify, switch atomically
- :mod:`~pipeline.install.verify`: the runtime verify of a new generation (task, import check)
- :mod:`~pipeline.install.layout`: the project dir's paths, the records between the stages, the
  install lock
- :mod:`~pipeline.install.host`: the host's facts (glibc, CUDA driver) against the lock's needs
"""
