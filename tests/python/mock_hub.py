"""A stand-in for the Hugging Face hub on 127.0.0.1, with the endpoints hf-hub calls.

- ``GET /api/models/ORG/NAME/revision/REV``: the file list (``siblings``) and the commit (``sha``).
- ``GET /ORG/NAME/resolve/REV/FILE``: the file, with ``X-Repo-Commit``, ``ETag`` and byte ranges
  (hf-hub reads a file's size and commit from a ``Range: bytes=0-0`` request, then resumes a
  partial download with ``Range: bytes=N-``).

Errors carry ``X-Error-Code`` as the hub's do: ``RepoNotFound``, ``RevisionNotFound``,
``EntryNotFound``, and ``GatedRepo`` for a gated repo asked for without its token. Faults can be
armed per file: ``cut[file] = n`` ends the next full download after ``n`` bytes (the connection
drops), ``stall[file] = n`` sends ``n`` bytes and then waits until the server stops.
Every request is logged in ``requests`` as ``(path, range header, authorization header)``.
"""

import hashlib
import http.server
import json
import os
import threading


class Repo:
    def __init__(self, files, commit, gated_token=None):
        self.files = {}
        for name, path in files.items():
            with open(path, "rb") as f:
                self.files[name] = f.read()
        self.commit = commit
        self.gated_token = gated_token


class MockHub:
    def __init__(self):
        self.repos = {}
        self.requests = []
        self.cut = {}
        self.stall = {}
        self.stop_event = threading.Event()
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                hub.requests.append(
                    (self.path, self.headers.get("Range"), self.headers.get("Authorization"))
                )
                try:
                    hub.answer(self)
                except (BrokenPipeError, ConnectionResetError):
                    pass

        class Server(http.server.ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request, client_address):
                pass  # a client that hangs up mid-answer (the resume tests do) is expected

        self.server = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def add(self, repo_id, files, commit="0123456789abcdef0123456789abcdef01234567", gated_token=None):
        """Serves ``files`` (repo path -> local path) as ``repo_id`` at ``main`` = ``commit``."""
        self.repos[repo_id] = Repo(files, commit, gated_token)

    def add_folder(self, repo_id, folder, **kw):
        """Serves every file of ``folder`` as ``repo_id``."""
        self.add(repo_id, {n: os.path.join(folder, n) for n in sorted(os.listdir(folder))}, **kw)

    def start(self):
        self.thread.start()
        return self

    def stop(self):
        self.stop_event.set()
        self.server.shutdown()
        self.server.server_close()

    def downloads(self, name):
        """Requests for the body of ``name`` (not the one-byte metadata probes)."""
        return [r for r in self.requests if r[0].endswith("/" + name) and r[1] != "bytes=0-0"]

    @staticmethod
    def error(h, code, kind, msg):
        body = json.dumps({"error": msg}).encode()
        h.send_response(code)
        h.send_header("X-Error-Code", kind)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)

    def answer(self, h):
        path = h.path.split("?")[0]
        parts = path.strip("/").split("/")
        if parts[:2] == ["api", "models"] and len(parts) >= 6 and parts[4] == "revision":
            repo_id, rev = "/".join(parts[2:4]), parts[5]
            repo = self.repos.get(repo_id)
            if repo is None:
                # As the hub answers a client without a token: 401, not 404.
                return self.error(h, 401, "RepoNotFound", "Repository not found")
            if rev not in ("main", repo.commit):
                return self.error(h, 404, "RevisionNotFound", "Invalid rev id")
            body = json.dumps(
                {
                    "id": repo_id,
                    "sha": repo.commit,
                    "siblings": [
                        {"rfilename": n, "size": len(d), "lfs": {"sha256": hashlib.sha256(d).hexdigest()}}
                        for n, d in repo.files.items()
                    ],
                }
            ).encode()
            h.send_response(200)
            h.send_header("Content-Type", "application/json")
            h.send_header("Content-Length", str(len(body)))
            h.end_headers()
            h.wfile.write(body)
            return
        if len(parts) >= 5 and parts[2] == "resolve":
            repo_id, rev, name = "/".join(parts[:2]), parts[3], "/".join(parts[4:])
            repo = self.repos.get(repo_id)
            if repo is None:
                # As the hub answers a client without a token: 401, not 404.
                return self.error(h, 401, "RepoNotFound", "Repository not found")
            if rev not in ("main", repo.commit):
                return self.error(h, 404, "RevisionNotFound", "Invalid rev id")
            if repo.gated_token and h.headers.get("Authorization") != f"Bearer {repo.gated_token}":
                return self.error(h, 403, "GatedRepo", "Access to this model is restricted")
            data = repo.files.get(name)
            if data is None:
                return self.error(h, 404, "EntryNotFound", "Entry not found")
            start, end = 0, len(data) - 1
            rng = h.headers.get("Range")
            if rng:
                a, _, b = rng.removeprefix("bytes=").partition("-")
                start = int(a)
                end = int(b) if b else len(data) - 1
            body = data[start : end + 1]
            h.send_response(206 if rng else 200)
            h.send_header("X-Repo-Commit", repo.commit)
            h.send_header("ETag", '"%s"' % hashlib.sha256(data).hexdigest())
            h.send_header("Accept-Ranges", "bytes")
            if rng:
                h.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
            h.send_header("Content-Length", str(len(body)))
            h.end_headers()
            if rng != "bytes=0-0" and name in self.cut:
                h.wfile.write(body[: self.cut.pop(name)])
                h.wfile.flush()
                h.close_connection = True
                return
            if rng != "bytes=0-0" and name in self.stall:
                h.wfile.write(body[: self.stall.pop(name)])
                h.wfile.flush()
                self.stop_event.wait(120)
                h.close_connection = True
                return
            h.wfile.write(body)
            return
        self.error(h, 404, "NotFound", "no such endpoint")
