"""The bundle format, both directions: a format change touches this folder only (as pixi-pack's
``lib.rs`` is shared by its pack and unpack).

- :mod:`~pipeline.bundle.format`: member names and constants (no pydantic: the doit task
  definitions load it)
- :mod:`~pipeline.bundle.metadata`: ``pixi-pack.json`` and our extras file: models, bytes,
  checks
- :mod:`~pipeline.bundle.index`: the index of every member (name, size, sha256) and the
  bundle's kind (``env``, ``model``), versioned; in every bundle this project writes
- :mod:`~pipeline.bundle.signature`: the index signed with an SSH key and checked against an
  ``allowed_signers`` file, with the host's ``ssh-keygen``
- :mod:`~pipeline.bundle.parts`: bundles in parts (``<bundle>.parts.json``), and
  :class:`~pipeline.bundle.parts.BundleSource`, the one way a reader gets a bundle's bytes
  (one tar, or its parts in order as one stream)
- :mod:`~pipeline.bundle.writer`: the members of a bundle and its generated files
  (``environment.yml``, ``repodata.json``), what pack hands its packages to
- :mod:`~pipeline.bundle.tar`: the deterministic tar writer under it
- :mod:`~pipeline.bundle.reader`: the tar's members, the safety rules, the one hashing pass,
  what extract checks a bundle with
- :mod:`~pipeline.bundle.contents`: an extracted bundle's channel and lock, checked against
  each other; a lock for bundles made by pixi-pack itself

Pack (:mod:`pipeline.build.pack`, :mod:`pipeline.build.model`) decides what goes in; extract
and install-model (:mod:`pipeline.install.extract`, :mod:`pipeline.install.model`) run the
transaction around the reader. This package imports none of them.
"""
