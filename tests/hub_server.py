"""A stand-in for the Hugging Face Hub HTTP API, standard library only, for offline upload tests.

It answers exactly what huggingface_hub 2.4.0 calls for `HfApi.create_repo` and `HfApi.upload_folder`:

- POST /api/repos/create                         create a repo (409 if it exists, like the Hub)
- GET  /api/models/{ns}/{name}[/revision/{rev}]  repo info (create_repo's fallback after 401/403, no-op uploads)
- POST /api/validate-yaml                        README.md metadata check (always valid here)
- POST /api/models/{ns}/{name}/preupload/{rev}   upload mode per file: always "regular", so no LFS/Xet transfer
- POST /api/models/{ns}/{name}/commit/{rev}      NDJSON commit with base64-inlined files

Every request must carry `Authorization: Bearer <token>`, else 401 like the Hub. Anything else gets a 404 and is
recorded in `unexpected`.

    with running_hub("hf_test") as hub:
        HfApi(endpoint=hub.url, token="hf_test").create_repo("me/x")
        hub.repos   # {"me/x": {"private": False}}
        hub.files   # {"me/x": {"path": b"bytes"}}
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

USER = "stand-in-user"  # the namespace of repo ids given without one
_REPO = r"/api/models/(?P<repo>[^/]+/[^/]+)"


def git_blob_sha1(content: bytes) -> str:
    """The git blob id the Hub reports as `oid` for a regular file."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


class HubServer:
    """State of the stand-in: what it received, inspectable by tests."""

    def __init__(self, token: str) -> None:
        self.token = token
        self.repos: dict[str, dict] = {}  # repo_id -> {"private": bool}
        self.files: dict[str, dict[str, bytes]] = {}  # repo_id -> path -> content
        self.commits: list[dict] = []  # {"repo_id", "summary", "paths"}
        self.authorizations: list[str | None] = []  # Authorization header of every request, in order
        self.requests: list[tuple[str, str]] = []  # (method, path)
        self.unexpected: list[tuple[str, str]] = []
        self.fail_commits: tuple[int, str] | None = None  # set to (status, message) to refuse commits
        self.lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> HubServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)

    # -- endpoints: each returns (status, JSON body) --------------------------------------------------------------

    def create_repo(self, body: bytes) -> tuple[int, dict]:
        payload = json.loads(body)
        repo_id = f"{payload.get('organization') or USER}/{payload['name']}"
        if payload.get("type", "model") != "model":
            return 400, {"error": "the stand-in only hosts model repos"}
        if repo_id in self.repos:
            return 409, {"error": "You already created this model repo", "url": f"{self.url}/{repo_id}"}
        self.repos[repo_id] = {"private": payload.get("visibility") == "private"}
        self.files[repo_id] = {}
        return 200, {"url": f"{self.url}/{repo_id}", "name": repo_id, "id": repo_id}

    def repo_info(self, repo_id: str) -> tuple[int, dict]:
        files = self.files[repo_id]
        sha = hashlib.sha1(repr(sorted(files.items())).encode()).hexdigest()
        return 200, {
            "id": repo_id,
            "modelId": repo_id,
            "sha": sha,
            "private": self.repos[repo_id]["private"],
            "siblings": [{"rfilename": path} for path in sorted(files)],
        }

    def preupload(self, repo_id: str, body: bytes) -> tuple[int, dict]:
        existing = self.files[repo_id]
        files = [
            {
                "path": f["path"],
                "uploadMode": "regular",
                "shouldIgnore": False,
                "oid": git_blob_sha1(existing[f["path"]]) if f["path"] in existing else None,
            }
            for f in json.loads(body)["files"]
        ]
        return 200, {"files": files, "commitOid": self.repo_info(repo_id)[1]["sha"]}

    def commit(self, repo_id: str, body: bytes) -> tuple[int, dict]:
        if self.fail_commits is not None:
            return self.fail_commits[0], {"error": self.fail_commits[1]}
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        header = next(line["value"] for line in lines if line["key"] == "header")
        changes: dict[str, bytes | None] = {}
        for line in lines:
            key, value = line["key"], line["value"]
            if key == "file" and value.get("encoding") == "base64":
                changes[value["path"]] = base64.b64decode(value["content"])
            elif key == "deletedFile":
                changes[value["path"]] = None
            elif key != "header":
                return 400, {"error": f"the stand-in does not support '{key}' commit operations"}
        for path, content in changes.items():
            if content is None:
                self.files[repo_id].pop(path, None)
            else:
                self.files[repo_id][path] = content
        self.commits.append({"repo_id": repo_id, "summary": header["summary"], "paths": sorted(changes)})
        oid = self.repo_info(repo_id)[1]["sha"]
        return 200, {"commitUrl": f"{self.url}/{repo_id}/commit/{oid}", "commitOid": oid, "pullRequestUrl": None}

    def route(self, method: str, path: str, body: bytes) -> tuple[int, dict]:
        if method == "POST" and path == "/api/repos/create":
            return self.create_repo(body)
        if method == "POST" and path == "/api/validate-yaml":
            return 200, {"errors": [], "warnings": []}
        match = (
            re.fullmatch(_REPO + r"(?:/revision/[^/]+)?", path)
            if method == "GET"
            else re.fullmatch(_REPO + r"/(?P<action>preupload|commit)/[^/]+", path)
        )
        if match is None:
            self.unexpected.append((method, path))
            return 404, {"error": f"{method} {path} is not implemented by the stand-in"}
        repo_id = match["repo"]
        if repo_id not in self.repos:
            return 404, {"error": "Repository not found"}
        if method == "GET":
            return self.repo_info(repo_id)
        return self.preupload(repo_id, body) if match["action"] == "preupload" else self.commit(repo_id, body)


def _handler_for(hub: HubServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def _serve(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            path = self.path.split("?", 1)[0]
            authorization = self.headers.get("Authorization")
            with hub.lock:
                hub.requests.append((self.command, path))
                hub.authorizations.append(authorization)
                if authorization != f"Bearer {hub.token}":
                    status, payload = 401, {"error": "Invalid credentials in Authorization header"}
                else:
                    status, payload = hub.route(self.command, path, body)
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            if status == 404 and payload.get("error") == "Repository not found":
                self.send_header("X-Error-Code", "RepoNotFound")
            if status >= 400:
                self.send_header("X-Error-Message", payload["error"])
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_PUT = do_DELETE = _serve

        def log_message(self, format: str, *args: object) -> None:  # keep test output quiet
            pass

    return Handler


@contextmanager
def running_hub(token: str) -> Iterator[HubServer]:
    """Start a stand-in Hub on 127.0.0.1 (free port) that accepts `token`; stop it on exit."""
    hub = HubServer(token).start()
    try:
        yield hub
    finally:
        hub.stop()
