"""Downloads into the pack cache, checked against the lock's hashes, never half-written.

The pack cache is laid out like ``pixi-pack --use-cache``, so either tool can reuse the other's:
``<cache>/<subdir>/<file>`` for conda packages and ``<cache>/pypi/<file>`` for wheels.

For every :class:`FetchItem` :meth:`Fetcher.fetch_all`:

- **reuses** a cached file only after checking it: its size (when the lock has one) and its
  sha256 (md5 when that is all the lock has). A file that fails the check is deleted, fetched
  again and counted as *downloaded*, with a warning naming it;
- **downloads** anything else with ``requests`` (streaming, ``Accept-Encoding: identity`` so the
  bytes hashed are the bytes served), hashing while writing into a temp file beside the final
  name. Only a file whose hash matches the lock is renamed into place: a mismatch leaves nothing
  in the cache and raises :class:`~pipeline.errors.FetchError` naming the package, the URL and
  both hashes. ``file://`` URLs are copied the same way;
- retries connection errors, timeouts, cut-off bodies, HTTP 429 and 5xx with exponential
  backoff, a bounded number of times, then raises FetchError naming the URL. Other HTTP errors
  (404...) fail at once.

Downloads run on a small thread pool. The first error stops the others at their next chunk (a
worker blocked on the network stops within the read timeout); temp files are always removed.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, BinaryIO, Literal, TextIO
from urllib.parse import unquote, urlsplit
from urllib.request import url2pathname

from pipeline import __version__
from pipeline.errors import FetchError
from pipeline.fsutil import CHUNK, atomic_output, os_error_advice, os_error_text
from pipeline.pixi.lockfile import CondaPackage, PypiPackage
from pipeline.progress import Progress, human_bytes

if TYPE_CHECKING:
    import requests

# requests (and urllib3) are imported where a download happens: a warm pack downloads
# nothing, and importing them is a tenth of its Python start-up.

PYPI_CACHE_DIR = "pypi"  # pixi-pack's PYPI_DIRECTORY_NAME, also its cache folder for wheels
DEFAULT_ATTEMPTS = 4
DEFAULT_BACKOFF = 0.5  # seconds before the 2nd attempt; doubled each time
MAX_BACKOFF = 8.0
DEFAULT_TIMEOUT = (15.0, 120.0)  # (connect, read) seconds
DEFAULT_WORKERS = 4
USER_AGENT = f"infer-vllm-pipeline/{__version__}"
# A file name must be one plain path segment; a subdir a conda platform-like word.
_SAFE_SUBDIR = re.compile(r"^[a-z0-9][a-z0-9_-]*$")

Outcome = Literal["downloaded", "reused"]


@dataclass(frozen=True)
class FetchItem:
    """One file to have in the cache.

    ``name`` is used in messages (``linux-64/foo-1.0-h0_0.conda``); ``url`` is ``http(s)://`` or
    ``file://``; ``cache_path`` the final location. ``sha256``/``md5`` are lowercase hex from the
    lock (``None`` when absent); ``size`` the byte count from the lock, if any.
    """

    name: str
    url: str
    cache_path: Path
    sha256: str | None = None
    md5: str | None = None
    size: int | None = None

    @property
    def check(self) -> tuple[str, str] | None:
        """``("sha256", hex)``, else ``("md5", hex)``, else ``None`` (nothing to check)."""
        if self.sha256:
            return ("sha256", self.sha256.lower())
        if self.md5:
            return ("md5", self.md5.lower())
        return None


@dataclass(frozen=True)
class FetchStats:
    """What a fetch did: files ``downloaded`` (re-fetched corrupt entries included), files
    ``reused`` from the cache, and ``bytes`` downloaded (or copied from ``file://``).

    ``unverified`` lists the reused items whose hash was *not* checked yet (only with
    ``fetch_all(..., verify_cached=False)``): the caller must check them while it reads them.
    """

    downloaded: int = 0
    reused: int = 0
    bytes: int = 0
    unverified: tuple[FetchItem, ...] = ()

    def __add__(self, other: FetchStats) -> FetchStats:
        return FetchStats(
            self.downloaded + other.downloaded,
            self.reused + other.reused,
            self.bytes + other.bytes,
            self.unverified + other.unverified,
        )

    def refetched(self, other: FetchStats) -> FetchStats:
        """These stats after ``other`` re-fetched some of the reused (unverified) entries:
        they move from ``reused`` to ``downloaded``."""
        return FetchStats(
            self.downloaded + other.downloaded,
            self.reused - other.downloaded,
            self.bytes + other.bytes,
        )


def safe_name(name: str, what: str) -> str:
    """Return ``name`` when it is one plain path segment; FetchError otherwise.

    Lock files come from outside: a percent-encoded ``..%2F`` in a URL must not write outside
    the cache or the bundle.
    """
    if not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name:
        raise FetchError(
            f"{what}: unsafe file name {name!r} in the lock; regenerate the lock with `pixi lock`"
        )
    return name


def conda_item(pkg: CondaPackage, cache: Path) -> FetchItem:
    """The fetch of a locked conda package into ``<cache>/<subdir>/<file>``."""
    where = f"conda package {pkg.name} {pkg.version}"
    if not _SAFE_SUBDIR.match(pkg.subdir):
        raise FetchError(f"{where}: unsafe subdir {pkg.subdir!r} in the lock; regenerate it")
    filename = safe_name(pkg.filename, where)
    return FetchItem(
        name=f"{pkg.subdir}/{filename}",
        url=pkg.url,
        cache_path=cache / pkg.subdir / filename,
        sha256=pkg.sha256,
        md5=pkg.md5,
        size=pkg.size,
    )


def pypi_item(pkg: PypiPackage, cache: Path) -> FetchItem:
    """The fetch of a locked PyPI file into ``<cache>/pypi/<file>``."""
    filename = safe_name(pkg.filename, f"PyPI package {pkg.name} {pkg.version}")
    return FetchItem(
        name=f"{PYPI_CACHE_DIR}/{filename}",
        url=pkg.url,
        cache_path=cache / PYPI_CACHE_DIR / filename,
        sha256=pkg.sha256,
    )


class _Retryable(Exception):
    """A failure worth another attempt (network, timeout, 5xx)."""


class _Cancelled(Exception):
    """Another download failed: stop this one."""


class Fetcher:
    """Fetches :class:`FetchItem` lists into the cache. Reusable, one :meth:`fetch_all` at a
    time (it runs its own worker threads).

    Seams (for tests): ``session_factory`` makes one ``requests.Session`` per worker thread;
    ``sleep`` waits between attempts; ``warn`` receives one-line warnings (corrupt cache
    entries); ``progress_stream`` gets the progress line (default stderr).
    """

    def __init__(
        self,
        *,
        attempts: int = DEFAULT_ATTEMPTS,
        backoff: float = DEFAULT_BACKOFF,
        timeout: tuple[float, float] = DEFAULT_TIMEOUT,
        workers: int = DEFAULT_WORKERS,
        session_factory: Callable[[], requests.Session] | None = None,
        sleep: Callable[[float], None] = time.sleep,
        warn: Callable[[str], None] | None = None,
        progress_stream: TextIO | None = None,
    ) -> None:
        if attempts < 1 or workers < 1:
            raise ValueError("attempts and workers must be >= 1")
        self.attempts = attempts
        self.backoff = backoff
        self.timeout = timeout
        self.workers = workers
        self._session_factory = session_factory
        self._sleep = sleep
        self._warn = warn or _warn_stderr
        self._progress_stream = progress_stream
        self._local = threading.local()
        self._sessions: list[requests.Session] = []
        self._sessions_lock = threading.Lock()
        self._stop = threading.Event()

    # ---- public ----------------------------------------------------------------------------

    def fetch_all(
        self, items: Sequence[FetchItem], label: str = "fetch", *, verify_cached: bool = True
    ) -> FetchStats:
        """Make every item present and verified in the cache; return the counts.

        Items sharing a ``cache_path`` are fetched once. Blocks until all are done. Raises
        FetchError for the first failure (the other workers stop; nothing partial is left).
        KeyboardInterrupt stops the workers at their next chunk and propagates.

        ``verify_cached=False`` checks cached files by size only and lists them in
        :attr:`FetchStats.unverified`: for a caller that reads them anyway and can hash them
        at the same time (the tar writer), so a warm pack reads each file once less.
        """
        unique = list({item.cache_path: item for item in items}.values())
        self._stop.clear()
        total = sum(item.size or 0 for item in unique)
        progress = Progress(label, total or None, stream=self._progress_stream)
        stats = FetchStats()
        pool = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="fetch")
        futures: list[Future[tuple[Outcome, int]]] = []
        try:
            futures = [
                pool.submit(self._fetch_one, item, progress, verify_cached) for item in unique
            ]
            done, _pending = wait(futures, return_when=FIRST_EXCEPTION)
            failed = [f for f in done if f.exception() is not None]
            if failed:
                self._stop.set()
                wait(futures)
                raise _first_error(failed)
            for item, future in zip(unique, futures, strict=True):
                outcome, count = future.result()
                if outcome == "downloaded":
                    stats += FetchStats(downloaded=1, bytes=count)
                elif verify_cached or item.check is None:
                    stats += FetchStats(reused=1)
                else:
                    stats += FetchStats(reused=1, unverified=(item,))
        except BaseException:
            self._stop.set()
            for future in futures:
                future.cancel()
            progress.done(None)
            raise
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            self._close_sessions()
        progress.done(
            f"{label}: {len(unique)} files, {stats.downloaded} downloaded "
            f"({human_bytes(stats.bytes)}), {stats.reused} reused from the cache "
            f"({progress.elapsed:.1f} s)"
        )
        return stats

    def fetch(self, item: FetchItem) -> Outcome:
        """Fetch a single item (same rules as :meth:`fetch_all`); ``downloaded`` or ``reused``."""
        stats = self.fetch_all([item])
        return "downloaded" if stats.downloaded else "reused"

    # ---- one item --------------------------------------------------------------------------

    def _fetch_one(
        self, item: FetchItem, progress: Progress, verify_cached: bool
    ) -> tuple[Outcome, int]:
        if self._cached_ok(item, progress, verify_cached):
            if not verify_cached:
                progress.update(item.size or 0)  # its bytes are read later, by the caller
            return "reused", 0
        return "downloaded", self._download(item, progress)

    def _cached_ok(self, item: FetchItem, progress: Progress, verify: bool = True) -> bool:
        """True when the cache holds a file that passes the checks (the hash only when
        ``verify``); a bad one is deleted."""
        path = item.cache_path
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            return False
        except OSError as exc:
            raise FetchError(
                f"cannot read pack cache entry {path} ({exc.strerror}); fix its permissions or "
                "set PIPELINE_PACK_CACHE to another directory"
            ) from None
        problem: str | None = None
        if not path.is_file():
            problem = "it is not a regular file"
        elif item.size is not None and size != item.size:
            problem = f"{size} bytes, the lock says {item.size}"
        elif item.check is not None and verify:
            algo, expected = item.check
            try:
                actual = _hash_file(path, algo, progress, self._stop)
            except OSError as exc:
                raise FetchError(
                    f"cannot read pack cache entry {path} ({exc.strerror}); fix its permissions "
                    "or delete it"
                ) from None
            if actual != expected:
                problem = f"{algo} {actual}, the lock says {expected}"
        if problem is None:
            return True
        self.evict(item, problem)
        return False

    def evict(self, item: FetchItem, problem: str) -> None:
        """Warn that ``item``'s cache entry is corrupt (``problem``) and delete it, so the
        next fetch downloads it again. FetchError when it is a directory."""
        path = item.cache_path
        self._warn(f"pack cache entry {path} is corrupt ({problem}); fetching it again")
        with contextlib.suppress(FileNotFoundError):
            if path.is_dir() and not path.is_symlink():
                raise FetchError(f"pack cache entry {path} is a directory; delete it and run again")
            path.unlink()

    def _download(self, item: FetchItem, progress: Progress) -> int:
        scheme = urlsplit(item.url).scheme.lower()
        if scheme == "file":
            return self._copy_file(item, progress)
        if scheme not in ("http", "https"):
            raise FetchError(
                f"{item.name}: unsupported URL scheme in {item.url}; only http(s) and file "
                "URLs can be packed"
            )
        last = ""
        for attempt in range(1, self.attempts + 1):
            if self._stop.is_set():
                raise _Cancelled()
            try:
                return self._download_once(item, progress)
            except _Retryable as exc:
                last = str(exc)
            if attempt < self.attempts:
                self._sleep(min(self.backoff * 2 ** (attempt - 1), MAX_BACKOFF))
        raise FetchError(
            f"cannot download {item.name} from {item.url}: {last} (gave up after "
            f"{self.attempts} attempts); check the network, proxy or channel and run again"
        )

    def _download_once(self, item: FetchItem, progress: Progress) -> int:
        session = self._session()
        try:
            response = session.get(
                item.url,
                stream=True,
                timeout=self.timeout,
                headers={"Accept-Encoding": "identity", "User-Agent": USER_AGENT},
            )
        except (_requests().ConnectionError, _requests().Timeout) as exc:
            raise _Retryable(_describe(exc)) from None
        except _requests().RequestException as exc:
            raise FetchError(f"cannot download {item.name} from {item.url}: {exc}") from None
        with response:
            status = response.status_code
            if status == 429 or status >= 500:
                raise _Retryable(f"HTTP {status} {response.reason}")
            if status >= 400:
                raise FetchError(
                    f"cannot download {item.name}: HTTP {status} {response.reason} from "
                    f"{item.url}; the file is not there: check the channel URL or re-lock"
                )
            chunks = response.raw.stream(CHUNK, decode_content=False)
            return self._store(item, _network_chunks(chunks), progress)

    def _copy_file(self, item: FetchItem, progress: Progress) -> int:
        source = Path(url2pathname(unquote(urlsplit(item.url).path)))
        try:
            stream = source.open("rb")
        except OSError as exc:
            raise FetchError(
                f"cannot read {item.name} at {item.url} ({exc.strerror}); the lock points at a "
                "local file that is gone: restore it or re-lock"
            ) from None
        with stream:
            return self._store(item, _file_chunks(stream, item), progress)

    def _store(self, item: FetchItem, chunks: Iterator[bytes], progress: Progress) -> int:
        """Write ``chunks`` to the cache through a temp file; rename only when the hash matches.

        Returns the byte count. Read-side failures come out of ``chunks`` already translated
        (_Retryable, FetchError); any OSError here is the cache's disk. Nothing is left behind
        on any error.
        """
        check = item.check
        digest = hashlib.new(check[0]) if check else None
        count = 0
        try:
            with atomic_output(item.cache_path) as out:
                for chunk in chunks:
                    if self._stop.is_set():
                        raise _Cancelled()
                    out.write(chunk)
                    if digest is not None:
                        digest.update(chunk)
                    count += len(chunk)
                    progress.update(len(chunk))
                if check is not None and digest is not None:
                    actual = digest.hexdigest()
                    if actual != check[1]:
                        raise FetchError(
                            f"{item.name} from {item.url} does not match the lock: {check[0]} "
                            f"expected {check[1]}, got {actual}; nothing was cached: the file "
                            "changed on the server (or a proxy altered it): check the channel "
                            "or re-lock"
                        )
                elif item.size is not None and count != item.size:
                    raise FetchError(
                        f"{item.name} from {item.url} has {count} bytes, the lock says "
                        f"{item.size}; nothing was cached: check the channel or re-lock"
                    )
        except OSError as exc:
            raise FetchError(
                f"cannot write {item.cache_path} ({os_error_text(exc, item.cache_path)}); "
                f"{os_error_advice(exc)}, or set PIPELINE_PACK_CACHE to another directory"
            ) from None
        return count

    # ---- sessions --------------------------------------------------------------------------

    def _session(self) -> requests.Session:
        session: requests.Session | None = getattr(self._local, "session", None)
        if session is None:
            session = (self._session_factory or _requests().Session)()
            self._local.session = session
            with self._sessions_lock:
                self._sessions.append(session)
        return session

    def _close_sessions(self) -> None:
        with self._sessions_lock:
            for session in self._sessions:
                with contextlib.suppress(Exception):
                    session.close()
            self._sessions.clear()
        self._local = threading.local()


# ---- helpers -------------------------------------------------------------------------------


def _hash_file(path: Path, algo: str, progress: Progress, stop: threading.Event) -> str:
    digest = hashlib.new(algo)
    with path.open("rb") as stream:
        for chunk in _read_chunks(stream):
            if stop.is_set():
                raise _Cancelled()
            digest.update(chunk)
            progress.update(len(chunk))
    return digest.hexdigest()


def _read_chunks(stream: IO[bytes] | BinaryIO) -> Iterator[bytes]:
    while chunk := stream.read(CHUNK):
        yield chunk


def _network_chunks(chunks: Iterator[bytes]) -> Iterator[bytes]:
    """``chunks`` with network failures turned into _Retryable (cut-off body, read timeout)."""
    import urllib3.exceptions

    try:
        yield from chunks
    except (_requests().RequestException, urllib3.exceptions.HTTPError, OSError) as exc:
        raise _Retryable(_describe(exc)) from None


def _file_chunks(stream: IO[bytes], item: FetchItem) -> Iterator[bytes]:
    """``stream``'s chunks with read failures turned into FetchError naming the URL."""
    try:
        yield from _read_chunks(stream)
    except OSError as exc:
        raise FetchError(f"cannot read {item.name} at {item.url} ({exc.strerror})") from None


def _first_error(failed: Sequence[Future[tuple[Outcome, int]]]) -> BaseException:
    """The error to report: a FetchError before anything else, never a _Cancelled."""
    errors = [f.exception() for f in failed]
    real = [e for e in errors if e is not None and not isinstance(e, _Cancelled)]
    for error in real:
        if isinstance(error, FetchError):
            return error
    return real[0] if real else FetchError("download cancelled")


def _describe(exc: BaseException) -> str:
    """A short, one-line reason for a network failure."""
    import urllib3.exceptions

    if isinstance(exc, _requests().Timeout | urllib3.exceptions.TimeoutError | TimeoutError):
        return "timed out"
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _requests() -> Any:
    """The ``requests`` module, imported on first use."""
    import requests

    return requests


def _warn_stderr(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


__all__ = [
    "PYPI_CACHE_DIR",
    "FetchItem",
    "FetchStats",
    "Fetcher",
    "conda_item",
    "pypi_item",
    "safe_name",
]
