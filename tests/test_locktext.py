"""pipeline.pixi.locktext: the one reader of a lock's version, from text and from a file."""

from __future__ import annotations

from pipeline.pixi.locktext import lock_version, read_lock_version


def test_lock_version_reads_the_top_level_line_only():
    text = "version: 6\nenvironments: {}\npackages:\n- conda: x\n  version: 1.2\n"
    assert lock_version(text) == 6
    assert lock_version("version: 7\r\nplatforms: []\r\n") == 7
    assert lock_version("packages:\n- pypi: x\n  version: 3\n") is None


def test_read_lock_version_of_a_missing_or_odd_file_is_none(tmp_path):
    lock = tmp_path / "pixi.lock"
    assert read_lock_version(lock) is None
    lock.write_bytes(b"version: 5\n\xff\xfe not utf-8\n")
    assert read_lock_version(lock) == 5
    assert read_lock_version(tmp_path) is None  # a directory: unreadable, not an error
