"""A flaky S3 endpoint for the fault-injection tests: an HTTP proxy on 127.0.0.1 in front of the moto server that
fails a share of GET and PUT requests with S3's 500/503 answers or by resetting the connection."""

from __future__ import annotations

import http.client
import random
import socket
import struct
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse

_ERRORS = (
    (500, "InternalError", "We encountered an internal error. Please try again."),
    (503, "SlowDown", "Please reduce your request rate."),
)


class FlakyS3Proxy:
    """Forward every request to ``upstream``; fail ``rate`` of GET/PUT requests (seeded, thread-safe).

    ``counts`` tallies what happened: ``forwarded``, ``http_500``, ``http_503``, ``reset``.
    """

    def __init__(self, upstream: str, *, rate: float = 0.1, seed: int = 0) -> None:
        self.upstream = urlparse(upstream)
        self.rate = rate
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.counts: Counter[str] = Counter()
        self.active = True
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *_: object) -> None:
                return

            def _handle(self) -> None:
                body = self._body()
                fault = proxy._draw(self.command)
                if fault == "reset":
                    # SO_LINGER 0: close() sends a TCP reset, as a dropped connection does.
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    self.close_connection = True
                    self.connection.close()
                    return
                if fault is not None:
                    status, code, message = fault
                    xml = f"<Error><Code>{code}</Code><Message>{message}</Message></Error>".encode()
                    self.send_response(status)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(xml)))
                    self.end_headers()
                    self.wfile.write(xml)
                    return
                conn = http.client.HTTPConnection(proxy.upstream.hostname, proxy.upstream.port, timeout=60)
                hop = ("connection", "transfer-encoding", "content-length", "expect")
                headers = {k: v for k, v in self.headers.items() if k.lower() not in hop}
                conn.request(self.command, self.path, body=body, headers=headers)
                answer = conn.getresponse()
                data = answer.read()
                self.send_response(answer.status)
                for k, v in answer.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()

            def _body(self) -> bytes:
                if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
                    parts = []
                    while (size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)) > 0:
                        parts.append(self.rfile.read(size))
                        self.rfile.readline()
                    self.rfile.readline()
                    return b"".join(parts)
                length = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(length) if length else b""

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def _draw(self, method: str) -> str | tuple[int, str, str] | None:
        with self.lock:
            if not self.active or method not in ("GET", "PUT") or self.rng.random() >= self.rate:
                self.counts["forwarded"] += 1
                return None
            if self.rng.random() < 1 / 3:
                self.counts["reset"] += 1
                return "reset"
            status, code, message = self.rng.choice(_ERRORS)
            self.counts[f"http_{status}"] += 1
            return status, code, message

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> FlakyS3Proxy:
        self.thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.server.shutdown()
        self.server.server_close()
