"""A loopback stand-in for the Hugging Face Hub: one model repo, at one commit, for
``snapshot_download`` pointed at it with ``HF_ENDPOINT``.

It answers exactly what huggingface_hub 2.4.0's ``snapshot_download`` asks of a model repo
(``_snapshot_download.py``, ``hf_api.py``, ``file_download.py``), in this order:

0. ``GET /api/agent-harnesses``, without a token: the first User-Agent it builds looks up
   which AI agents it knows (``utils/_headers.py``, ``utils/_detect_agent.py``; once a day,
   cached in ``HF_HOME``; not with ``HF_HUB_DISABLE_TELEMETRY=1``). An empty list here.
1. ``GET /api/models/<repo>/revision/<rev>``: the repo's info (``HfApi.model_info``); only
   ``sha`` is read, the commit that the revision names (skipped when the revision is a commit).
2. ``GET /api/models/<repo>/tree/<commit>?recursive=...``: the file list
   (``HfApi.list_repo_tree``, not the info's ``siblings``): one entry per file with ``path``,
   ``size``, ``oid`` (its git blob sha1) and, for an LFS file, ``lfs`` (``oid`` = sha256,
   ``size``, ``pointerSize``). No ``Link`` header: one page.
3. ``HEAD /<repo>/resolve/<commit>/<path>`` (``get_hf_file_metadata``): ``X-Repo-Commit``; the
   etag, ``X-Linked-Etag`` (an LFS file's sha256) or else ``ETag`` (a git file's blob sha1),
   which names the file's blob in the cache; the size, ``X-Linked-Size`` or else
   ``Content-Length``. Answered 200 here (the Hub redirects LFS files to a CDN).
4. ``GET`` of the same URL (``http_get``): the bytes; huggingface_hub checks their count
   against the size, not their sha256 against the etag.

No Xet: the tree has no ``xetHash`` and the HEAD answer no ``X-Xet-Hash`` header, so
huggingface_hub takes its plain HTTP path even with ``hf_xet`` installed.

With ``token`` set, every request must carry ``Authorization: Bearer <token>``; any other is
refused with 401 and ``X-Error-Message: Invalid credentials in Authorization header``, as
the Hub refuses a bad token. Every request's method, path and Authorization header is kept in
:attr:`HubServer.requests`. ``damaged={path: bytes}`` serves those bytes for ``path`` while the
tree and the HEAD answer still describe the real file (a download damaged on its way).
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

from conftest import free_port
from model_factory import LFS_SUFFIXES, git_blob_sha1

HUB_COMMIT = "c0ffee00" * 5
# Asked by huggingface_hub's User-Agent (utils/_headers.py, utils/_detect_agent.py).
HARNESSES = "/api/agent-harnesses"


@dataclass(frozen=True)
class Seen:
    """One request the server received."""

    method: str
    path: str
    authorization: str | None


class HubServer:
    """Serves ``files`` (path -> bytes) as the model repo ``repo_id`` at ``commit`` on
    ``http://127.0.0.1:<port>`` (:attr:`endpoint`) until :meth:`close`."""

    def __init__(
        self,
        repo_id: str,
        files: Mapping[str, bytes],
        *,
        commit: str = HUB_COMMIT,
        token: str | None = None,
        damaged: Mapping[str, bytes] | None = None,
    ) -> None:
        self.repo_id, self.files, self.commit, self.token = repo_id, dict(files), commit, token
        self.damaged = dict(damaged or {})
        self.requests: list[Seen] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", free_port()), _handler(self))
        self._httpd.timeout = 0.1  # handle_request returns this often to look at _stop
        self.endpoint = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        self._thread = threading.Thread(target=self._serve, name="hub-server", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            self._httpd.handle_request()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._httpd.server_close()
        if self._thread.is_alive():
            raise RuntimeError("the hub server's thread did not stop within 5 s")

    def __enter__(self) -> HubServer:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def seen(self) -> list[Seen]:
        """The requests so far, in the order they came."""
        with self._lock:
            return list(self.requests)

    # ---- what the Hub holds ------------------------------------------------------------------

    def etag(self, path: str) -> tuple[str, bool]:
        """The file's etag and whether it is an LFS file (sha256) or a git one (blob sha1)."""
        data = self.files[path]
        if path.endswith(LFS_SUFFIXES):
            return hashlib.sha256(data).hexdigest(), True
        return git_blob_sha1(data), False

    def tree(self) -> list[dict[str, object]]:
        entries: list[dict[str, object]] = []
        folders = sorted(
            {"/".join(p.split("/")[:i]) for p in self.files for i in range(1, p.count("/") + 1)}
        )
        for folder in folders:
            entries.append(
                {"type": "directory", "path": folder, "oid": git_blob_sha1(folder.encode())}
            )
        for path, data in sorted(self.files.items()):
            etag, lfs = self.etag(path)
            entry: dict[str, object] = {"type": "file", "path": path, "size": len(data)}
            entry["oid"] = git_blob_sha1(data)  # with LFS, git holds a pointer; any sha1 will do
            if lfs:
                entry["lfs"] = {"oid": etag, "size": len(data), "pointerSize": 134}
            entries.append(entry)
        return entries


def _handler(hub: HubServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as httpx expects; every answer has a length
        timeout = 5  # an idle kept-alive connection is dropped after this

        def log_message(self, *_: object) -> None:
            pass

        def do_HEAD(self) -> None:
            self._answer(body=False)

        def do_GET(self) -> None:
            self._answer(body=True)

        def _send(self, status: int, headers: dict[str, str], data: bytes, body: bool) -> None:
            self.send_response(status)
            headers = {"Content-Length": str(len(data)), "X-Repo-Commit": hub.commit, **headers}
            for name, value in headers.items():
                self.send_header(name, value)
            self.end_headers()
            if body:
                self.wfile.write(data)

        def _json(self, status: int, value: object, body: bool, **headers: str) -> None:
            data = json.dumps(value).encode()
            self._send(status, {"Content-Type": "application/json", **headers}, data, body)

        def _answer(self, body: bool) -> None:
            path = unquote(urlsplit(self.path).path)  # the query (tree: recursive=...) is moot
            auth = self.headers.get("Authorization")
            with hub._lock:
                hub.requests.append(Seen(self.command, path, auth))
            if path == HARNESSES:  # public on the Hub, and asked without a token
                return self._json(200, {"standardEnvVars": [], "harnesses": {}}, body)
            if hub.token is not None and auth != f"Bearer {hub.token}":
                message = "Invalid credentials in Authorization header"
                return self._json(401, {"error": message}, body, **{"X-Error-Message": message})
            revisions = ("main", hub.commit)
            api = path.removeprefix(f"/api/models/{hub.repo_id}/")
            if api != path:
                kind, _, revision = api.partition("/")
                if kind == "revision" and revision in revisions:
                    info = {
                        "id": hub.repo_id,
                        "sha": hub.commit,
                        "private": hub.token is not None,
                        "siblings": [{"rfilename": p} for p in sorted(hub.files)],
                    }
                    return self._json(200, info, body)
                if kind == "tree" and revision in revisions:
                    return self._json(200, hub.tree(), body)
            resolve = path.removeprefix(f"/{hub.repo_id}/resolve/")
            if resolve != path:
                revision, _, name = resolve.partition("/")
                if revision in revisions and name in hub.files:
                    etag, lfs = hub.etag(name)
                    size = str(len(hub.files[name]))
                    headers = {"ETag": f'"{etag}"', "Content-Type": "application/octet-stream"}
                    if lfs:
                        headers |= {"X-Linked-Etag": f'"{etag}"', "X-Linked-Size": size}
                    return self._send(200, headers, hub.damaged.get(name, hub.files[name]), body)
                error = {"X-Error-Code": "EntryNotFound"}
                return self._json(404, {"error": "Entry not found"}, body, **error)
            error = {"X-Error-Code": "RepoNotFound"}
            return self._json(404, {"error": "Repository not found"}, body, **error)

    return Handler
