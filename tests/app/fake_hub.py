"""A fake Hugging Face Hub on 127.0.0.1 for the catalogue and download tests, with faults.

Serves the endpoints huggingface_hub uses for listing and downloading (../shared/docs/
app-features.md) from files held in memory. ``fail(repo, path, *faults)`` queues faults for
the next GETs of one file; each request takes the next one:

  stall       send half the body, then go silent for ``stall_seconds``, then close
  drop        send half the body, then close the connection
  wrong_size  serve a body of a different length (Content-Length matching it)
  corrupt     serve the right length with different bytes
  ignore_range  answer a Range request with 200 and the whole body
  trickle     send the body in small pieces with pauses
  401 403 404 answer with that status
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections import defaultdict, deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlparse

LFS_SUFFIXES = (".safetensors", ".bin", ".json.lfs")


class Repo:
    def __init__(self, repo_id: str, files: dict[str, bytes], downloads=0, modified="2026-01-01"):
        self.id, self.files, self.downloads, self.modified = repo_id, files, downloads, modified
        self.sha = hashlib.sha1(repo_id.encode()).hexdigest()
        self.gated = False  # True: its info answers 403 (terms not accepted)

    def is_lfs(self, path: str) -> bool:
        return path.endswith(LFS_SUFFIXES)

    def sibling(self, path: str) -> dict:
        data = self.files[path]
        oid = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
        out = {"rfilename": path, "size": len(data), "blobId": oid}
        if self.is_lfs(path):
            sha = hashlib.sha256(data).hexdigest()
            out["lfs"] = {"size": len(data), "sha256": sha, "pointerSize": 134}
        return out


class FakeHub:
    def __init__(self) -> None:
        self.repos: dict[str, Repo] = {}
        self.faults: dict[tuple[str, str], deque] = defaultdict(deque)
        self.requests: list[tuple[str, str, str | None]] = []  # method, path, Range
        self.stall_seconds = 3.0
        self.list_delays: dict[str, float] = {}  # search term -> seconds before the model list
        self.page_size = 1000
        self.token: str | None = None  # when set, requests without it get 401
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.server.handle_error = lambda *a: None  # clients that hang up are part of the tests
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FakeHub:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def add(self, repo: Repo) -> Repo:
        self.repos[repo.id] = repo
        return repo

    def add_folder(self, repo_id: str, folder: Path, **kw) -> Repo:
        files = {
            p.relative_to(folder).as_posix(): p.read_bytes()
            for p in sorted(folder.rglob("*"))
            if p.is_file() and not p.name.startswith(".")
        }
        return self.add(Repo(repo_id, files, **kw))

    def fail(self, repo: str, path: str, *faults: str) -> None:
        self.faults[(repo, path)].extend(faults)

    def gets(self, path_part: str) -> list[tuple[str, str, str | None]]:
        return [r for r in self.requests if r[0] == "GET" and path_part in r[1]]

    # -- the HTTP side ---------------------------------------------------------------------------
    def _handler(self):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_HEAD(self):
                self._route(head=True)

            def do_GET(self):
                self._route(head=False)

            def _route(self, head: bool):
                url = urlparse(self.path)
                path, query = unquote(url.path), parse_qs(url.query)
                hub.requests.append((self.command, path, self.headers.get("Range")))
                if hub.token and self.headers.get("Authorization") != f"Bearer {hub.token}":
                    return self._json({"error": "Unauthorized"}, 401)
                if path == "/api/models":
                    return self._list(query)
                if path == "/api/whoami-v2":
                    return self._json({"name": "tester", "type": "user"})
                if path.startswith("/api/models/"):
                    return self._info(path.removeprefix("/api/models/"))
                parts = path.strip("/").split("/")
                if len(parts) >= 5 and parts[2] == "resolve":
                    repo = hub.repos.get(f"{parts[0]}/{parts[1]}")
                    file = "/".join(parts[4:])
                    if repo is None or file not in repo.files:
                        return self._json({"error": "Entry not found"}, 404)
                    return self._file(repo, file, head)
                self._json({"error": "not found"}, 404)

            def _json(self, data, status=200, headers=None):
                body = json.dumps(data).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                if status >= 400:
                    self.send_header("X-Error-Message", data.get("error", ""))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                if self.command != "HEAD":  # HTTP: a HEAD answer has no body
                    self.wfile.write(body)

            def _list(self, query):
                search = query.get("search", [""])[0].lower()
                time.sleep(hub.list_delays.get(search, 0.0))
                rows = [r for r in hub.repos.values() if search in r.id.lower()]
                author = query.get("author", [""])[0]
                rows = [r for r in rows if not author or r.id.startswith(author + "/")]
                key = query.get("sort", ["downloads"])[0]
                rows.sort(
                    key=(lambda r: r.downloads) if key == "downloads" else (lambda r: r.modified),
                    reverse=True,
                )
                start = int(query.get("cursor", ["0"])[0])
                page = rows[start : start + hub.page_size]
                data = [
                    {
                        "id": r.id,
                        "modelId": r.id,
                        "downloads": r.downloads,
                        "likes": 0,
                        "lastModified": r.modified + "T00:00:00.000Z",
                    }
                    for r in page
                ]
                headers = {}
                if start + hub.page_size < len(rows):
                    q = "&".join(f"{k}={v[0]}" for k, v in query.items() if k != "cursor")
                    nxt = f"{hub.url}/api/models?{q}&cursor={start + hub.page_size}"
                    headers["Link"] = f'<{nxt}>; rel="next"'
                self._json(data, headers=headers)

            def _info(self, rest: str):
                parts = rest.split("/")
                repo = hub.repos.get("/".join(parts[:2]))
                if repo is None:
                    return self._json({"error": "Repository not found"}, 404)
                if repo.gated:
                    return self._json({"error": "Access to this model is restricted"}, 403)
                if len(parts) >= 4 and parts[2] == "tree":
                    tree = []
                    for p in repo.files:
                        s = repo.sibling(p)
                        item = {"type": "file", "path": p, "size": s["size"], "oid": s["blobId"]}
                        if "lfs" in s:
                            item["lfs"] = {"oid": s["lfs"]["sha256"], "size": s["size"]}
                        tree.append(item)
                    return self._json(tree)
                self._json(
                    {
                        "id": repo.id,
                        "modelId": repo.id,
                        "sha": repo.sha,
                        "siblings": [repo.sibling(p) for p in repo.files],
                    }
                )

            def _file(self, repo: Repo, path: str, head: bool):
                data = repo.files[path]
                s = repo.sibling(path)
                etag = s["lfs"]["sha256"] if "lfs" in s else s["blobId"]
                fault = None
                if not head and hub.faults[(repo.id, path)]:
                    fault = hub.faults[(repo.id, path)].popleft()
                if fault in ("401", "403", "404"):
                    return self._json({"error": f"fault {fault}"}, int(fault))
                if fault == "wrong_size":
                    data = data + b"x" * 1000
                if fault == "corrupt":
                    data = bytes(b ^ 0xFF for b in data)
                start, status = 0, 200
                rng = self.headers.get("Range")
                if rng and fault != "ignore_range":
                    start = int(rng.removeprefix("bytes=").split("-")[0])
                    status = 206
                body = data[start:]
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("ETag", f'"{etag}"')
                self.send_header("X-Repo-Commit", repo.sha)
                self.send_header("Accept-Ranges", "bytes")
                if status == 206:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.end_headers()
                if head:
                    return
                half = len(body) // 2
                if fault in ("stall", "drop"):
                    self.wfile.write(body[:half])
                    self.wfile.flush()
                    if fault == "stall":
                        time.sleep(hub.stall_seconds)
                    self.close_connection = True
                    return
                if fault == "trickle":
                    step = max(1, len(body) // 20)
                    for i in range(0, len(body), step):
                        self.wfile.write(body[i : i + step])
                        self.wfile.flush()
                        time.sleep(0.05)
                    return
                self.wfile.write(body)

        return Handler
