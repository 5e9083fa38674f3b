"""Which pack cache entries were hashed already: stat stamps, so a warm pack reads each once.

A warm ``doit pack`` copies every cached package into the tar. Hashing each against the lock on
every pack doubled the bytes hashed (the tar's own sha256 is the other pass). Instead a file
whose hash was checked (downloaded, or hashed while a tar was written) gets a stamp in
``<cache>/.infer-vllm-verified.json``: its :class:`~pipeline.fsutil.Fingerprint` (size, mtime,
inode, ctime) and the hash it matched. While the file's fingerprint is still that and the lock
still asks for that hash, it is trusted without reading it; any other file is hashed again
while it is copied (the same rule as the install's extraction record; the fingerprint's
docstring says why ctime makes it safe). The file is pixi-pack-compatible clutter at the cache root
(pixi-pack looks files up by path and never lists the root); losing it only costs one hash
pass, so concurrent packs may overwrite each other's updates.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterable
from pathlib import Path

from pipeline.build.fetch import FetchItem
from pipeline.fsutil import Fingerprint, atomic_write_text

STAMPS_FILE = ".infer-vllm-verified.json"
STAMPS_VERSION = 1

Stamp = tuple[int, int, int, int, str, str]  # size, mtime_ns, ino, ctime_ns, algo, hex


class VerifiedStamps:
    """The stamps of one pack cache. :meth:`trusted` reads a ``stat``; :meth:`snapshot`,
    :meth:`record` and :meth:`save` remember files that just passed their hash check. Never
    raises for a missing or unreadable stamps file (it reads as empty)."""

    def __init__(self, cache: Path) -> None:
        self.cache = Path(cache)
        self.path = self.cache / STAMPS_FILE
        self._stamps: dict[str, Stamp] = {}
        self._dirty = False
        with contextlib.suppress(OSError, ValueError, TypeError, KeyError):
            data = json.loads(self.path.read_text(encoding="utf-8"))
            if data.get("version") == STAMPS_VERSION:
                for key, value in data["files"].items():
                    size, mtime, ino, ctime, algo, digest = value
                    self._stamps[str(key)] = (
                        int(size),
                        int(mtime),
                        int(ino),
                        int(ctime),
                        str(algo),
                        str(digest),
                    )

    def _key(self, item: FetchItem) -> str | None:
        try:
            return item.cache_path.relative_to(self.cache).as_posix()
        except ValueError:
            return None

    def trusted(self, item: FetchItem) -> bool:
        """True when ``item``'s file is unchanged since it matched the hash the lock asks for."""
        key, check = self._key(item), item.check
        stamp = self._stamps.get(key) if key is not None else None
        if stamp is None or check is None:
            return False
        found = Fingerprint.read(item.cache_path)
        return found is not None and stamp == (*_fields(found), *check)

    def snapshot(self, items: Iterable[FetchItem]) -> dict[Path, Fingerprint]:
        """The fingerprint of each file now, before it is read and hashed (for :meth:`record`)."""
        found: dict[Path, Fingerprint] = {}
        for item in items:
            now = Fingerprint.read(item.cache_path)
            if now is not None:
                found[item.cache_path] = now
        return found

    def record(self, items: Iterable[FetchItem], before: dict[Path, Fingerprint]) -> None:
        """Stamp ``items``, whose files have just matched their ``check`` when read; only those
        whose stat is still what :meth:`snapshot` saw before the read (a file changed meanwhile
        is hashed again next time)."""
        for item in items:
            key, check = self._key(item), item.check
            seen = before.get(item.cache_path)
            if key is None or check is None or seen is None:
                continue
            if Fingerprint.read(item.cache_path) != seen:
                continue
            stamp = (*_fields(seen), *check)
            if self._stamps.get(key) != stamp:
                self._stamps[key] = stamp
                self._dirty = True

    def save(self) -> None:
        """Write the stamps when they changed; an unwritable cache only costs a hash next time."""
        if not self._dirty:
            return
        document = {"version": STAMPS_VERSION, "files": dict(sorted(self._stamps.items()))}
        with contextlib.suppress(OSError):
            atomic_write_text(self.path, json.dumps(document, separators=(",", ":")) + "\n")
            self._dirty = False


def _fields(found: Fingerprint) -> tuple[int, int, int, int]:
    """A fingerprint as the stamps file stores it (the first four fields of a :data:`Stamp`)."""
    return (found.size, found.mtime_ns, found.ino, found.ctime_ns)


__all__ = ["STAMPS_FILE", "VerifiedStamps"]
