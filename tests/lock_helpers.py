"""Shared by the lock tests: the local channel served over HTTP, a rattler cache, the solve.

The fixtures come to every test module through ``conftest.py`` (module-scoped: one channel per
module, as before); a module that needs another channel (one with wheels) defines its own.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from pipeline.build.lock import lock
from pipeline.demo.channel import LocalChannel, build_channel, serve_directory
from pipeline.pixi.lockfile import read_environment
from pipeline.pixi.locktext import patch_lock_text


@pytest.fixture(scope="module")
def channel(tmp_path_factory: pytest.TempPathFactory) -> LocalChannel:
    return build_channel(tmp_path_factory.mktemp("channel"))


@pytest.fixture(scope="module")
def channel_url(channel: LocalChannel) -> Iterator[str]:
    with serve_directory(channel.root) as url:
        yield url


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("rattler-cache")


def solve(project: Path, cache_dir: Path) -> Path:
    """The lock py-rattler solves for ``project`` (no pixi); fails the test unless solved."""
    result = lock(project, pixi=None, cache_dir=cache_dir)
    assert result.outcome == "solved", result
    return result.lock_path


def patched(lock_path: Path, channel_dir: Path, platforms: Sequence[str] = ("linux-64",)) -> Path:
    """The lock as ``patch-channels`` leaves it: every URL an absolute path in ``channel_dir``.

    Written beside ``lock_path`` as ``patched.lock``; the conda URLs of the ``default``
    environment on ``platforms`` (lock platform names) are the ones moved.
    """
    text = lock_path.read_text(encoding="utf-8")
    conda_urls: dict[str, str] = {}
    for platform in platforms:
        for p in read_environment(lock_path, "default", platform).conda:
            conda_urls[f"{p.subdir}/{p.filename}"] = str(channel_dir / p.subdir / p.filename)
    out = lock_path.with_name("patched.lock")
    out.write_text(patch_lock_text(text, conda_urls, {}, str(channel_dir)), encoding="utf-8")
    assert out.read_text(encoding="utf-8") != text
    return out
