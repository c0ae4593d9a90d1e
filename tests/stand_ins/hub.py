"""A stand-in for the Hugging Face Hub's file API, on loopback: exactly the endpoints that
``huggingface_hub`` (2.x) calls to download a model repository. Nothing here reaches the real
Hub (no network in the tests), so this is a named stand-in, not the Hub.

Endpoints, answered as the Hub answers them (headers from huggingface_hub's file_download.py,
_snapshot_download.py and utils/_http.py):

- ``GET /api/models/{repo}/revision/{revision}``: the model info, ``sha`` (the commit) and
  ``siblings`` (every file, with ``blobId`` and for LFS files ``lfs.sha256``);
- ``GET /api/models/{repo}/tree/{revision}?recursive=…``: the file listing at a commit;
- ``HEAD|GET /{repo}/resolve/{revision}/{path}``: ``X-Repo-Commit``, ``ETag`` (the git blob
  sha1, or for LFS files the sha256, also as ``X-Linked-Etag``/``X-Linked-Size``),
  ``Content-Length`` and, for GET, the bytes.

Errors carry the Hub's ``X-Error-Code``: an unknown repository is ``401 RepoNotFound``
without a token and ``404`` with one; an unknown revision ``404 RevisionNotFound``; a gated
repository's files ``401`` (no token) or ``403`` (a token without access) ``GatedRepo``.
Every request is recorded, so tests can count downloads.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from urllib.parse import unquote, urlparse

from tests.stand_ins.http import loopback

LFS_SUFFIXES = (".safetensors", ".bin", ".h5", ".onnx", ".msgpack", ".pt", ".pth", ".ot")


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data, usedforsecurity=False).hexdigest()


@dataclass
class Repo:
    """A model repository: files per commit, and branch/tag names pointing at commits."""

    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)
    refs: dict[str, str] = field(default_factory=dict)
    gated_for: set[str] | None = None  # tokens that may read a gated repository; None: open

    def push(self, commit: str, files: dict[str, bytes], *branches: str) -> None:
        self.commits[commit] = dict(files)
        for branch in branches or ("main",):
            self.refs[branch] = commit


def folder_files(folder: Path) -> dict[str, bytes]:
    """Every file of a local folder by relative name: what a repository made from it holds."""
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@dataclass
class HubStandIn:
    """Recorded state of the stand-in."""

    endpoint: str = ""
    repos: dict[str, Repo] = field(default_factory=dict)
    requests: list[tuple[str, str]] = field(default_factory=list)  # (method, path)
    tokens: list[str | None] = field(default_factory=list)  # the bearer token of each request

    def downloads(self) -> list[str]:
        """Paths of the file bodies served (GET …/resolve/…)."""
        return [p for m, p in self.requests if m == "GET" and "/resolve/" in p]


def _entry(name: str, data: bytes) -> dict:
    entry: dict = {"rfilename": name, "size": len(data), "blobId": git_blob_sha1(data)}
    if name.endswith(LFS_SUFFIXES):
        sha = hashlib.sha256(data).hexdigest()
        entry["lfs"] = {"sha256": sha, "size": len(data), "pointerSize": 134}
    return entry


def _handler(state: HubStandIn) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:  # quiet
            pass

        def do_GET(self) -> None:
            self._serve(body=True)

        def do_HEAD(self) -> None:
            self._serve(body=False)

        def _send(self, status: int, headers: dict[str, str], payload: bytes, body: bool) -> None:
            self.send_response(status)
            for key, value in headers.items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            if body:
                self.wfile.write(payload)

        def _error(self, status: int, code: str, message: str, body: bool) -> None:
            headers = {"X-Error-Code": code, "X-Error-Message": message}
            payload = json.dumps({"error": message}).encode()
            self._send(status, {**headers, "Content-Type": "application/json"}, payload, body)

        def _json(self, value: object, body: bool) -> None:
            payload = json.dumps(value).encode()
            self._send(200, {"Content-Type": "application/json"}, payload, body)

        def _serve(self, body: bool) -> None:
            path = urlparse(self.path).path
            state.requests.append((self.command, path))
            auth = self.headers.get("Authorization", "")
            token = auth.removeprefix("Bearer ") if auth.startswith("Bearer ") else None
            state.tokens.append(token)
            if path.startswith("/api/models/"):
                rest = path.removeprefix("/api/models/")
                kind = "/revision/" if "/revision/" in rest else "/tree/"
                repo_id, _, tail = rest.partition(kind)
                revision = unquote(tail) if kind == "/revision/" else unquote(tail.split("/")[0])
                self._api(repo_id, revision, kind, token, body)
            elif "/resolve/" in path:
                repo_id, _, tail = path.lstrip("/").partition("/resolve/")
                revision, _, name = tail.partition("/")
                self._file(repo_id, unquote(revision), unquote(name), token, body)
            else:
                self._error(404, "NotFound", "no such endpoint in the stand-in", body)

        def _lookup(self, repo_id: str, revision: str, token: str | None, body: bool):
            repo = state.repos.get(repo_id)
            if repo is None:
                # The Hub answers 401 to anonymous requests for a missing (or private) repo.
                status = 404 if token else 401
                self._error(status, "RepoNotFound", "Repository not found", body)
                return None, None
            commit = repo.refs.get(revision, revision)
            if commit not in repo.commits:
                self._error(404, "RevisionNotFound", "Invalid rev id: " + revision, body)
                return None, None
            return repo, commit

        def _api(self, repo_id: str, revision: str, kind: str, token: str | None, body: bool):
            repo, commit = self._lookup(repo_id, revision, token, body)
            if repo is None or commit is None:
                return
            files = repo.commits[commit]
            entries = [_entry(n, d) for n, d in sorted(files.items())]
            if kind == "/revision/":
                info = {
                    "id": repo_id,
                    "sha": commit,
                    "private": False,
                    "gated": "auto" if repo.gated_for is not None else False,
                    "siblings": entries,
                }
                self._json(info, body)
                return
            tree = []
            for entry in entries:
                item = {
                    "type": "file",
                    "path": entry["rfilename"],
                    "size": entry["size"],
                    "oid": entry["blobId"],
                }
                if "lfs" in entry:
                    lfs = entry["lfs"]
                    item["lfs"] = {"oid": lfs["sha256"], "size": lfs["size"], "pointerSize": 134}
                tree.append(item)
            self._json(tree, body)

        def _file(self, repo_id: str, revision: str, name: str, token: str | None, body: bool):
            repo, commit = self._lookup(repo_id, revision, token, body)
            if repo is None or commit is None:
                return
            if repo.gated_for is not None and token not in repo.gated_for:
                status = 403 if token else 401
                message = f"Access to model {repo_id} is restricted and you are not in the list."
                self._error(status, "GatedRepo", message, body)
                return
            data = repo.commits[commit].get(name)
            if data is None:
                self._error(404, "EntryNotFound", f"{name} does not exist on {revision}", body)
                return
            headers = {"X-Repo-Commit": commit, "Content-Type": "application/octet-stream"}
            if name.endswith(LFS_SUFFIXES):
                sha = hashlib.sha256(data).hexdigest()
                headers.update(
                    {
                        "ETag": f'"{sha}"',
                        "X-Linked-Etag": f'"{sha}"',
                        "X-Linked-Size": str(len(data)),
                    }
                )
            else:
                headers["ETag"] = f'"{git_blob_sha1(data)}"'
            self._send(200, headers, data, body)

    return Handler


@contextmanager
def serve_hub(state: HubStandIn | None = None) -> Iterator[HubStandIn]:
    """Run the stand-in on a free loopback port for the ``with`` block."""
    state = state or HubStandIn()
    with loopback(_handler(state)) as url:
        state.endpoint = url
        yield state
