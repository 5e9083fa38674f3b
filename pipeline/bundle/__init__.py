"""The bundle format both sides read: pixi-pack's ``pixi-pack.json``, ``environment.yml``, the
channel's ``repodata.json`` and our one extras file (:mod:`~pipeline.bundle.format`,
:mod:`~pipeline.bundle.metadata`). Writing a bundle is :mod:`pipeline.build`; reading one is
:mod:`pipeline.install`."""
