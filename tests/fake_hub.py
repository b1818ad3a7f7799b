"""A local stand-in for the Hugging Face Hub, with the URL layout and headers huggingface_hub
relies on (these machines cannot reach the Hub):

  GET  /api/models/{repo}[/revision/{rev}]   the repository: commit sha, files with size,
                                             blobId, lfs.sha256; gated; cardData.license
  HEAD /{repo}/resolve/{rev}/{file}          X-Repo-Commit, ETag, X-Linked-Etag, X-Linked-Size
  GET  /{repo}/resolve/{rev}/{file}          the bytes; `Range: bytes=N-` answered with 206

Errors carry the Hub's X-Error-Code: RepoNotFound (401, as the Hub answers an unknown or
private repository), RevisionNotFound (404), GatedRepo (401 without a token, 403 with a
token that was not granted access).

Faults, to test a client: `cut[file] = n` sends n bytes of the next GET of file and drops the
connection, then answers 503 to the following GET (so a client retrying at once fails and a
later run resumes); `corrupt.add(file)` serves different bytes than the checksum says.
"""
from __future__ import annotations

import hashlib
import json
import re
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator


@dataclass
class Repo:
    files: dict[str, bytes]
    commit: str = "0123456789abcdef0123456789abcdef01234567"
    gated: bool = False
    granted_tokens: set = field(default_factory=set)
    licence: str | None = None

    @staticmethod
    def from_dir(root: Path, **kw) -> "Repo":
        root = Path(root)
        files = {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
        return Repo(files, **kw)


def is_lfs(name: str, data: bytes) -> bool:
    return name.endswith((".safetensors", ".gguf", ".bin")) or len(data) > 10_000


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(f"blob {len(data)}\0".encode() + data).hexdigest()


class FakeHub:
    def __init__(self):
        self.repos: dict[str, Repo] = {}
        self.cut: dict[str, int] = {}
        self.corrupt: set[str] = set()
        self.requests: list[tuple[str, str, dict]] = []     # (method, path, headers)
        self.served: dict[str, int] = {}                     # file -> body bytes sent
        self._refuse_next: set[str] = set()
        self.lock = threading.Lock()

    def info(self, repo_id: str, r: Repo) -> dict:
        siblings = []
        for name, data in r.files.items():
            s = {"rfilename": name, "size": len(data), "blobId": git_blob_sha1(data)}
            if is_lfs(name, data):
                s["lfs"] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest(), "pointerSize": 134}
            siblings.append(s)
        out = {"_id": "x", "id": repo_id, "modelId": repo_id, "sha": r.commit, "private": False,
               "gated": "manual" if r.gated else False, "disabled": False, "siblings": siblings, "tags": []}
        if r.licence:
            out["cardData"] = {"license": r.licence}
        return out


def _handler(hub: FakeHub):
    class H(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *a):
            pass

        def _error(self, status: int, code: str | None, message: str) -> None:
            body = json.dumps({"error": message}).encode()
            self.send_response(status)
            if code:
                self.send_header("X-Error-Code", code)
            self.send_header("X-Error-Message", message)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _route(self) -> None:
            with hub.lock:
                hub.requests.append((self.command, self.path, dict(self.headers)))
            path = self.path.split("?")[0]
            m = re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/([^/]+))?", path)
            if m:
                return self._api(m.group(1), m.group(2))
            m = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
            if m:
                return self._resolve(*m.groups())
            self._error(404, None, "no such endpoint")

        def _repo(self, repo_id: str, rev: str | None) -> Repo | None:
            r = hub.repos.get(repo_id)
            if r is None:
                self._error(401, "RepoNotFound", "Repository not found")
                return None
            if rev not in (None, "main", r.commit):
                self._error(404, "RevisionNotFound", "Invalid rev id: " + rev)
                return None
            return r

        def _api(self, repo_id: str, rev: str | None) -> None:
            r = self._repo(repo_id, rev)
            if r is None:
                return
            body = json.dumps(hub.info(repo_id, r)).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _resolve(self, repo_id: str, rev: str, name: str) -> None:
            r = self._repo(repo_id, rev)
            if r is None:
                return
            if r.gated:
                auth = self.headers.get("Authorization", "")
                token = auth.removeprefix("Bearer ").strip()
                if not token:
                    return self._error(401, "GatedRepo", "Access to model is restricted. You must have access "
                                                         "to it and be authenticated to access it.")
                if token not in r.granted_tokens:
                    return self._error(403, "GatedRepo", "Access to model is restricted and you are not in "
                                                         "the authorized list.")
            if name not in r.files:
                return self._error(404, "EntryNotFound", f"{name} does not exist on \"{rev}\"")
            data = r.files[name]
            lfs = is_lfs(name, data)
            etag = hashlib.sha256(data).hexdigest() if lfs else git_blob_sha1(data)
            if name in hub.corrupt:
                data = bytes(b ^ 0x55 for b in data[:16]) + data[16:]
            if self.command == "GET" and name in hub._refuse_next:
                hub._refuse_next.discard(name)
                return self._error(503, None, "Service unavailable")
            start = 0
            rng = self.headers.get("Range")
            if rng:
                m = re.fullmatch(r"bytes=(\d+)-", rng)
                start = int(m.group(1)) if m else 0
            if start > len(data):
                return self._error(416, None, "Range not satisfiable")
            self.send_response(206 if rng else 200)
            self.send_header("X-Repo-Commit", r.commit)
            self.send_header("ETag", f'"{etag}"')
            if lfs:
                self.send_header("X-Linked-Etag", f'"{etag}"')
                self.send_header("X-Linked-Size", str(len(data)))
            self.send_header("Accept-Ranges", "bytes")
            if rng:
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            self.send_header("Content-Length", str(len(data) - start))
            self.end_headers()
            if self.command == "HEAD":
                return
            body = data[start:]
            cut = hub.cut.pop(name, None)
            if cut is not None:
                self.wfile.write(body[:cut])
                self.wfile.flush()
                with hub.lock:
                    hub.served[name] = hub.served.get(name, 0) + cut
                hub._refuse_next.add(name)
                self.close_connection = True
                self.connection.shutdown(2)
                return
            self.wfile.write(body)
            with hub.lock:
                hub.served[name] = hub.served.get(name, 0) + len(body)

        do_GET = do_HEAD = _route

    return H


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        pass                # a client that hung up (a test's cut, a refused checksum) is expected


@contextmanager
def serving(hub: FakeHub) -> Iterator[str]:
    """The hub on a free loopback port; yields its base URL (set HF_ENDPOINT to it)."""
    server = _Server(("127.0.0.1", 0), _handler(hub))
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
