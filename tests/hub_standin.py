"""A stand-in for the Hugging Face Hub on 127.0.0.1, speaking the protocol huggingface_hub downloads with.

Point HF_ENDPOINT at `HubStandIn.url` and `from_pretrained("org/name")` downloads from folders on this
machine exactly as it would from huggingface.co: a HEAD on `/{repo}/resolve/{revision}/{file}` for
the commit, ETag and size (`X-Repo-Commit`, `X-Linked-Etag`, `X-Linked-Size` for LFS files, as the Hub
answers), then a GET of the same URL; `/api/models/{repo}[/revision/{rev}]` and `.../tree/{rev}` for the
repository listing. Unknown repositories and files get the Hub's 404s with its `X-Error-Code`, and a
repository marked gated answers 401 to a request without its token, as a gated Hub model does.

What it cannot show: the Hub's Xet storage (it never sends X-Xet-Hash, so clients take the plain HTTP
path, which the Hub still serves), redirects to a CDN, rate limits, and anything of the real network.
"""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

# Files at or above this size are stored in LFS on the Hub: their ETag is the sha256 of the content,
# sent as X-Linked-Etag (huggingface_hub checks it against the download).
LFS_THRESHOLD = 1024 * 1024


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    authorization: str | None


@dataclass
class Repo:
    folder: Path
    token: str | None = None  # gated: only this bearer token gets in

    @property
    def files(self) -> list[str]:
        return sorted(p.relative_to(self.folder).as_posix() for p in self.folder.rglob("*") if p.is_file())

    @property
    def commit(self) -> str:
        digest = hashlib.sha1()
        for name in self.files:
            digest.update(name.encode())
            digest.update(hashlib.sha256((self.folder / name).read_bytes()).digest())
        return digest.hexdigest()


@dataclass
class HubStandIn:
    repos: dict[str, Repo] = field(default_factory=dict)
    requests: list[Request] = field(default_factory=list)
    _server: ThreadingHTTPServer | None = None

    def add(self, repo_id: str, folder: Path, token: str | None = None) -> None:
        self.repos[repo_id] = Repo(folder, token)

    @property
    def url(self) -> str:
        assert self._server is not None, "start() it first"
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def downloads(self, repo_id: str) -> list[str]:
        """The files of `repo_id` that were fetched (GET), in order."""
        prefix = f"/{repo_id}/resolve/"
        return [r.path[len(prefix):].split("/", 1)[1] for r in self.requests if r.method == "GET" and r.path.startswith(prefix)]

    def start(self) -> "HubStandIn":
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_HEAD(self) -> None:  # noqa: N802
                hub._answer(self, body=False)

            def do_GET(self) -> None:  # noqa: N802
                hub._answer(self, body=True)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def __enter__(self) -> "HubStandIn":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- the protocol -----------------------------------------------------------------------------

    def _answer(self, handler: BaseHTTPRequestHandler, body: bool) -> None:
        path = unquote(urlparse(handler.path).path)
        self.requests.append(Request(handler.command, path, handler.headers.get("Authorization")))
        if path.startswith("/api/models/"):
            return self._api(handler, path[len("/api/models/"):], body)
        parts = path.strip("/").split("/")
        if len(parts) >= 5 and parts[2] == "resolve":
            return self._resolve(handler, "/".join(parts[:2]), parts[3], "/".join(parts[4:]), body)
        return self._error(handler, 404, "EntryNotFound", f"no route for {path}")

    def _repo(self, handler: BaseHTTPRequestHandler, repo_id: str) -> Repo | None:
        repo = self.repos.get(repo_id)
        if repo is None:
            # The Hub answers an unknown (or private) repository with 401 and RepoNotFound.
            self._error(handler, 401, "RepoNotFound", f"Repository Not Found for url: {repo_id}.")
            return None
        if repo.token and handler.headers.get("Authorization") != f"Bearer {repo.token}":
            self._error(handler, 401, "GatedRepo", f"Access to model {repo_id} is restricted. You must have access to it.")
            return None
        return repo

    def _resolve(self, handler: BaseHTTPRequestHandler, repo_id: str, revision: str, name: str, body: bool) -> None:
        repo = self._repo(handler, repo_id)
        if repo is None:
            return
        if revision not in ("main", repo.commit):
            return self._error(handler, 404, "RevisionNotFound", f"Invalid rev id: {revision}")
        file = repo.folder / name
        if name not in repo.files:
            return self._error(handler, 404, "EntryNotFound", f"{name} does not exist in {repo_id}", commit=repo.commit)
        data = file.read_bytes()
        handler.send_response(200)
        handler.send_header("X-Repo-Commit", repo.commit)
        if len(data) >= LFS_THRESHOLD:
            etag = hashlib.sha256(data).hexdigest()
            handler.send_header("X-Linked-Etag", f'"{etag}"')
            handler.send_header("X-Linked-Size", str(len(data)))
        else:
            etag = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()  # git's blob id, as the Hub sends
        handler.send_header("ETag", f'"{etag}"')
        handler.send_header("Content-Length", str(len(data)))
        handler.send_header("Content-Type", "application/octet-stream")
        handler.end_headers()
        if body:
            handler.wfile.write(data)

    def _api(self, handler: BaseHTTPRequestHandler, rest: str, body: bool) -> None:
        parts = rest.strip("/").split("/")
        repo_id, tail = "/".join(parts[:2]), parts[2:]
        repo = self._repo(handler, repo_id)
        if repo is None:
            return
        if tail and tail[0] == "tree":  # /tree/{rev}[/{path}]: the files below path
            below = "/".join(tail[2:])
            entries = [
                {"type": "file", "path": name, "size": (repo.folder / name).stat().st_size, "oid": repo.commit}
                for name in repo.files
                if not below or name.startswith(below.rstrip("/") + "/")
            ]
            if below and not entries:
                return self._error(handler, 404, "EntryNotFound", f"{below} does not exist", commit=repo.commit)
            return self._json(handler, entries, body)
        info = {
            "id": repo_id, "modelId": repo_id, "sha": repo.commit, "private": False, "gated": bool(repo.token),
            "siblings": [{"rfilename": name} for name in repo.files], "tags": [], "library_name": "transformers",
        }  # fmt: skip
        return self._json(handler, info, body)

    def _json(self, handler: BaseHTTPRequestHandler, payload: Any, body: bool) -> None:
        data = json.dumps(payload).encode()
        handler.send_response(200)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        if body:
            handler.wfile.write(data)

    def _error(self, handler: BaseHTTPRequestHandler, status: int, code: str, message: str, commit: str | None = None) -> None:
        data = json.dumps({"error": message}).encode()
        handler.send_response(status)
        handler.send_header("X-Error-Code", code)
        handler.send_header("X-Error-Message", message)
        if commit:
            handler.send_header("X-Repo-Commit", commit)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        if handler.command != "HEAD":
            handler.wfile.write(data)
