"""pipeline.build.fetch against a scripted HTTP server on loopback: hashes, cache reuse, retries.

The server answers each path from a script (``500``, ``slow``, ``cut``, ``404``, then ``ok``),
so retries, timeouts and cut-off bodies run through the real ``requests`` code path.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import io
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pipeline.build.fetch import Fetcher, FetchItem, safe_name
from pipeline.errors import FetchError
from pipeline.progress import Progress, human_bytes

PAYLOAD = bytes(range(256)) * 4096  # 1 MiB, so a body spans several chunks
SHA = hashlib.sha256(PAYLOAD).hexdigest()
MD5 = hashlib.md5(PAYLOAD).hexdigest()


class ScriptedServer:
    """Serves ``files`` on 127.0.0.1; ``script[path]`` lists how the next requests behave."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.script: dict[str, list[str]] = {}
        self.hits: Counter[str] = Counter()
        self.lock = threading.Lock()
        self.url = ""

    def next_action(self, path: str) -> str:
        with self.lock:
            self.hits[path] += 1
            steps = self.script.get(path, [])
            return steps.pop(0) if steps else "ok"


@pytest.fixture
def server() -> Iterator[ScriptedServer]:
    state = ScriptedServer()

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def do_GET(self) -> None:
            action = state.next_action(self.path)
            body = state.files.get(self.path)
            if action == "404" or body is None:
                self.send_error(404)
                return
            if action == "500":
                self.send_error(500)
                return
            if action == "slow":
                time.sleep(1.0)
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if action == "cut":  # promise the whole body, send half, hang up
                self.wfile.write(body[: len(body) // 2])
                self.wfile.flush()
                self.close_connection = True
                return
            with contextlib.suppress(OSError):
                self.wfile.write(body)

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    try:
        yield state
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


class Recorder:
    def __init__(self) -> None:
        self.sleeps: list[float] = []
        self.warnings: list[str] = []


@pytest.fixture
def rec() -> Recorder:
    return Recorder()


def fetcher(rec: Recorder, **kwargs: Any) -> Fetcher:
    options: dict[str, Any] = {
        "attempts": 3,
        "backoff": 0.25,
        "timeout": (2.0, 5.0),
        "workers": 2,
        "sleep": rec.sleeps.append,
        "warn": rec.warnings.append,
        "progress_stream": io.StringIO(),
    }
    options.update(kwargs)
    return Fetcher(**options)


def item(server: ScriptedServer, cache: Path, name: str = "pkg-1.0-h0_0.conda", **kw: Any):
    server.files[f"/linux-64/{name}"] = kw.pop("body", PAYLOAD)
    defaults: dict[str, Any] = {"sha256": SHA, "md5": MD5, "size": len(PAYLOAD)}
    defaults.update(kw)
    return FetchItem(
        name=f"linux-64/{name}",
        url=f"{server.url}/linux-64/{name}",
        cache_path=cache / "linux-64" / name,
        **defaults,
    )


def leftovers(cache: Path) -> list[str]:
    return sorted(str(p.relative_to(cache)) for p in cache.rglob("*") if p.is_file())


# ---- downloads and the cache ----------------------------------------------------------------


def test_download_lands_in_the_pixi_pack_cache_layout_then_is_reused(server, rec, tmp_path):
    cache = tmp_path / "cache"
    items = [item(server, cache), item(server, cache, "other-2.0-h1_0.tar.bz2")]

    first = fetcher(rec).fetch_all(items)
    assert (first.downloaded, first.reused, first.bytes) == (2, 0, 2 * len(PAYLOAD))
    assert leftovers(cache) == ["linux-64/other-2.0-h1_0.tar.bz2", "linux-64/pkg-1.0-h0_0.conda"]
    assert (cache / "linux-64" / "pkg-1.0-h0_0.conda").read_bytes() == PAYLOAD

    again = fetcher(rec).fetch_all(items)
    assert (again.downloaded, again.reused, again.bytes) == (0, 2, 0)
    assert sum(server.hits.values()) == 2, "a verified cache hit makes no request"
    assert rec.warnings == []


@pytest.mark.parametrize("damage", ["flipped byte", "truncated"])
def test_corrupt_cache_entry_is_fetched_again_and_counted_as_downloaded(
    server, rec, tmp_path, damage
):
    cache = tmp_path / "cache"
    one = item(server, cache)
    fetcher(rec).fetch_all([one])
    data = bytearray(PAYLOAD)
    if damage == "flipped byte":
        data[1000] ^= 0xFF  # same size: only the hash can tell
    else:
        del data[-10:]
    one.cache_path.write_bytes(bytes(data))

    stats = fetcher(rec).fetch_all([one])

    assert (stats.downloaded, stats.reused) == (1, 0)
    assert one.cache_path.read_bytes() == PAYLOAD
    assert len(rec.warnings) == 1 and str(one.cache_path) in rec.warnings[0]


def test_same_size_corruption_is_caught_when_the_lock_has_only_md5(server, rec, tmp_path):
    cache = tmp_path / "cache"
    one = item(server, cache, sha256=None)
    assert one.check == ("md5", MD5)
    fetcher(rec).fetch_all([one])
    one.cache_path.write_bytes(b"x" + PAYLOAD[1:])

    assert fetcher(rec).fetch_all([one]).downloaded == 1
    assert "md5" in rec.warnings[0]
    assert one.cache_path.read_bytes() == PAYLOAD


def test_without_verify_cached_hits_are_checked_by_size_and_listed_for_the_caller(
    server, rec, tmp_path
):
    cache = tmp_path / "cache"
    same_size, truncated = item(server, cache), item(server, cache, "b-1.0-h0_0.conda")
    fetcher(rec).fetch_all([same_size, truncated])
    same_size.cache_path.write_bytes(b"x" + PAYLOAD[1:])
    truncated.cache_path.write_bytes(PAYLOAD[:-1])

    stats = fetcher(rec).fetch_all([same_size, truncated], verify_cached=False)

    assert (stats.downloaded, stats.reused) == (1, 1)
    assert stats.unverified == (same_size,), "the caller must hash this one"
    assert truncated.cache_path.read_bytes() == PAYLOAD
    assert "1048575 bytes, the lock says 1048576" in rec.warnings[0]

    # What the tar writer does when its hash disagrees: evict, fetch again, fix the counts.
    fetcher(rec).evict(same_size, "sha256 mismatch")
    again = stats.refetched(fetcher(rec).fetch_all([same_size]))
    assert (again.downloaded, again.reused, again.unverified) == (2, 0, ())
    assert same_size.cache_path.read_bytes() == PAYLOAD


@pytest.mark.parametrize("algo", ["sha256", "md5"])
def test_wrong_hash_fails_naming_package_url_and_both_hashes_and_caches_nothing(
    server, rec, tmp_path, algo
):
    cache = tmp_path / "cache"
    wrong = "0" * (64 if algo == "sha256" else 32)
    kwargs = {"sha256": wrong} if algo == "sha256" else {"sha256": None, "md5": wrong}
    one = item(server, cache, **kwargs)

    with pytest.raises(FetchError) as err:
        fetcher(rec).fetch_all([one])

    message = err.value.message
    actual = SHA if algo == "sha256" else MD5
    assert "linux-64/pkg-1.0-h0_0.conda" in message and one.url in message
    assert f"{algo} expected {wrong}, got {actual}" in message
    assert "\n" not in message
    assert leftovers(cache) == [], "no file and no temp file is left in the cache"
    assert server.hits[f"/linux-64/{one.cache_path.name}"] == 1, "a hash mismatch is not retried"


def test_file_urls_are_copied_and_checked(rec, tmp_path):
    source = tmp_path / "local" / "pkg.whl"
    source.parent.mkdir()
    source.write_bytes(PAYLOAD)
    cache = tmp_path / "cache"
    one = FetchItem("pypi/pkg.whl", source.as_uri(), cache / "pypi" / "pkg.whl", sha256=SHA)

    assert fetcher(rec).fetch_all([one]).downloaded == 1
    assert (cache / "pypi" / "pkg.whl").read_bytes() == PAYLOAD

    gone = FetchItem("pypi/gone.whl", (tmp_path / "gone.whl").as_uri(), cache / "pypi" / "g.whl")
    with pytest.raises(FetchError, match=r"cannot read pypi/gone\.whl at file://.*gone\.whl"):
        fetcher(rec).fetch_all([gone])


# ---- retries --------------------------------------------------------------------------------


def test_http_500_is_retried_with_backoff_then_succeeds(server, rec, tmp_path):
    one = item(server, tmp_path / "cache")
    server.script[f"/linux-64/{one.cache_path.name}"] = ["500", "500"]

    stats = fetcher(rec).fetch_all([one])

    assert stats.downloaded == 1
    assert server.hits[f"/linux-64/{one.cache_path.name}"] == 3
    assert rec.sleeps == [0.25, 0.5]
    assert one.cache_path.read_bytes() == PAYLOAD


def test_persistent_http_500_gives_up_after_the_attempts_naming_the_url(server, rec, tmp_path):
    cache = tmp_path / "cache"
    one = item(server, cache)
    server.script[f"/linux-64/{one.cache_path.name}"] = ["500"] * 10

    with pytest.raises(FetchError) as err:
        fetcher(rec).fetch_all([one])

    assert one.url in err.value.message
    assert "HTTP 500" in err.value.message and "3 attempts" in err.value.message
    assert server.hits[f"/linux-64/{one.cache_path.name}"] == 3
    assert leftovers(cache) == []


def test_read_timeouts_are_retried_then_reported(server, rec, tmp_path):
    cache = tmp_path / "cache"
    one = item(server, cache)
    server.script[f"/linux-64/{one.cache_path.name}"] = ["slow"] * 10

    started = time.monotonic()
    with pytest.raises(FetchError, match="timed out") as err:
        fetcher(rec, attempts=2, timeout=(2.0, 0.2)).fetch_all([one])

    assert time.monotonic() - started < 30  # two 0.2 s read timeouts, not a hang
    assert one.url in err.value.message
    assert server.hits[f"/linux-64/{one.cache_path.name}"] == 2
    assert leftovers(cache) == []


def test_a_cut_off_body_is_retried_and_never_cached_half(server, rec, tmp_path):
    cache = tmp_path / "cache"
    one = item(server, cache)
    server.script[f"/linux-64/{one.cache_path.name}"] = ["cut"]

    assert fetcher(rec).fetch_all([one]).downloaded == 1
    assert server.hits[f"/linux-64/{one.cache_path.name}"] == 2
    assert one.cache_path.read_bytes() == PAYLOAD


def test_http_404_fails_at_once(server, rec, tmp_path):
    cache = tmp_path / "cache"
    one = item(server, cache)
    server.script[f"/linux-64/{one.cache_path.name}"] = ["404"]

    with pytest.raises(FetchError, match=r"HTTP 404 .* from http://127\.0\.0\.1:\d+/linux-64/"):
        fetcher(rec).fetch_all([one])
    assert server.hits[f"/linux-64/{one.cache_path.name}"] == 1
    assert rec.sleeps == []


def test_one_failure_among_many_is_the_error_and_leaves_no_temp_files(server, rec, tmp_path):
    cache = tmp_path / "cache"
    good = [item(server, cache, f"good{i}-1.0-h0_0.conda") for i in range(6)]
    bad = item(server, cache, "bad-1.0-h0_0.conda", sha256="f" * 64)

    with pytest.raises(FetchError, match=r"bad-1\.0-h0_0\.conda"):
        fetcher(rec, workers=3).fetch_all([*good, bad])

    assert not [p for p in cache.rglob("*.part")]
    assert "linux-64/bad-1.0-h0_0.conda" not in leftovers(cache)


def test_unsafe_file_names_are_refused():
    for name in ("..", ".", "", "a/b", "..\\x"):
        with pytest.raises(FetchError, match="unsafe file name"):
            safe_name(name, "PyPI package evil 1.0")
    assert safe_name("ok-1.0-py3-none-any.whl", "x") == "ok-1.0-py3-none-any.whl"


# ---- progress -------------------------------------------------------------------------------


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_on_a_terminal_updates_one_line_then_prints_a_summary():
    now = [0.0]
    stream = FakeTTY()
    progress = Progress("fetch", 4096, stream=stream, clock=lambda: now[0])
    for _ in range(4):
        now[0] += 0.5
        progress.update(1024)
    progress.done("fetch: done")

    text = stream.getvalue()
    assert text.count("\r") >= 4 and "\n" not in text[:-1].replace("fetch: done", "")
    assert "4.0 KiB / 4.0 KiB (100%)" in text and "/s" in text
    assert text.endswith("\r\x1b[Kfetch: done\n")


def test_progress_elsewhere_prints_only_the_summary_line():
    stream = io.StringIO()
    with Progress("write x", 10, stream=stream) as progress:
        progress.update(10)
    assert stream.getvalue().count("\n") == 1
    assert stream.getvalue().startswith("write x: 10 B in ")


def test_human_bytes():
    assert [human_bytes(n) for n in (0, 1023, 1536, 3 * 1024**3)] == [
        "0 B",
        "1023 B",
        "1.5 KiB",
        "3.0 GiB",
    ]
