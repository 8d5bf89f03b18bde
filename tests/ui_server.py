"""The web app of `bsmamba2 ui` serving in a thread on 127.0.0.1, and a small HTTP client for its tests."""
from __future__ import annotations

import http.client
import json
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from urllib.parse import urlencode, urlsplit

from bsmamba2.cli import build_parser

TIMEOUT = 60


@contextmanager
def running_app(*flags):
    """The app of `bsmamba2 ui --port 0 --no-browser FLAGS`, serving in a thread until the block ends."""
    from bsmamba2.ui import server  # needs the ui extra, which the tests check for first

    app = server.App(build_parser().parse_args(["ui", "--port", "0", "--no-browser", *flags]))
    thread = threading.Thread(target=app.serve)
    thread.start()
    try:
        deadline = time.monotonic() + TIMEOUT
        while not app.server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
            time.sleep(0.02)
        yield app
    finally:
        app.server.should_exit = True
        thread.join(TIMEOUT)


@dataclass
class Answer:
    status_code: int
    headers: http.client.HTTPMessage
    content: bytes

    def json(self):
        return json.loads(self.content)


def call(method, url, data=None, params=None, headers=None) -> Answer:
    """One HTTP request; `data` may be bytes, a file or an iterable of bytes (sent chunked)."""
    parts = urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=TIMEOUT)
    try:
        target = parts.path + ("?" + urlencode(params) if params else "")
        chunked = data is not None and not isinstance(data, bytes) and not hasattr(data, "read")
        connection.request(method, target, body=data, headers=headers or {}, encode_chunked=chunked)
        response = connection.getresponse()
        return Answer(response.status, response.headers, response.read())
    finally:
        connection.close()
