"""A real HTTP file server on 127.0.0.1 for the download tests: Range requests, and ways to misbehave."""
from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class FileServer:
    """Serves `files` ({url path: bytes}) at `self.url`, recording every request as (path, Range header)."""

    def __init__(self, files: dict[str, bytes]):
        self.files = dict(files)
        self.requests: list[tuple[str, str]] = []
        self.cut_responses = 0      # the next N responses send half their body, then close the connection
        self.ignore_range = False   # answer Range requests with the whole file (200), as some servers do
        self.send_length = True     # False: no Content-Length, the body ends when the connection closes
        self.gate = threading.Event()  # bodies wait for it (the concurrency test holds the first download)
        self.gate.set()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._server.daemon_threads = True
        self._server.owner = self
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> "FileServer":
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.gate.set()
        self._server.shutdown()
        self._server.server_close()


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        owner: FileServer = self.server.owner
        requested = self.headers.get("Range")
        owner.requests.append((self.path, requested))
        body = owner.files.get(self.path)
        if body is None:
            self.send_error(404)
            return
        start = 0
        if requested and not owner.ignore_range:
            start = int(requested[len("bytes="):].split("-")[0])
            if start >= len(body):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(body)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        payload = body[start:]
        if owner.send_length:
            self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if owner.cut_responses > 0:
            owner.cut_responses -= 1
            payload = payload[:len(payload) // 2]
            self.close_connection = True
        owner.gate.wait(30)
        self.wfile.write(payload)

    def log_message(self, *args) -> None:  # keep pytest's output clean
        pass
