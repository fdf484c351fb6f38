"""A fault-injecting HTTP proxy on loopback, in front of one real server (moto's S3, MLflow).

Requests pass through unchanged (method, path, headers, body; HTTP/1.1 keep-alive) unless a
rule matches, and then the proxy does what the rule says:

    error  answer ``status`` with an S3-style XML error body; the upstream never sees it
    delay  wait ``delay_s`` before forwarding (a slow server)
    cut    forward, send the status line, the headers (full Content-Length) and only the first
           ``cut_after_bytes`` of the body, then close the connection (cut mid-object)
    drop   forward (the upstream commits the request), then close without any answer (the
           response is lost: a client that retries sends the request twice)

A rule applies to the first ``times`` requests it matches (None: every one) after letting
``after`` of them through, by method and by a regular expression on the path and query.
``hits`` counts what each rule did. An upstream that refuses the connection gets 502, as
behind a load balancer.
"""

from __future__ import annotations

import http.client
import re
import socket
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Literal
from urllib.parse import urlparse

HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "upgrade", "trailer"}


@dataclass
class FaultRule:
    kind: Literal["error", "delay", "cut", "drop"]
    method: str | None = None
    path: str = ""  # regular expression searched in the path and query
    times: int | None = None  # how many matching requests it applies to; None: all
    after: int = 0  # let this many matching requests through first
    status: int = 503
    code: str = "SlowDown"
    delay_s: float = 0.0
    cut_after_bytes: int = 0
    hits: int = 0

    def take(self, method: str, path: str) -> bool:
        if self.method is not None and method != self.method:
            return False
        if not re.search(self.path, path):
            return False
        if self.after > 0:
            self.after -= 1
            return False
        if self.times is not None and self.hits >= self.times:
            return False
        self.hits += 1
        return True


class FaultProxy:
    """Owns a listening socket and a rule list; forwards everything else to ``upstream``."""

    def __init__(self, upstream: str) -> None:
        parsed = urlparse(upstream)
        self.upstream_host, self.upstream_port = parsed.hostname or "127.0.0.1", parsed.port or 80
        self.rules: list[FaultRule] = []
        self.num_requests = 0
        self.upstream_failures = 0  # requests answered 502: the upstream refused or vanished
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_request(self) -> None:
                proxy._handle(self)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = do_PATCH = do_request

            def log_message(self, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,))
        self._thread.daemon = True
        self._thread.start()
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"

    def add(self, rule: FaultRule) -> FaultRule:
        with self._lock:
            self.rules.append(rule)
        return rule

    def clear(self) -> None:
        with self._lock:
            self.rules.clear()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()

    def _match(self, method: str, path: str) -> FaultRule | None:
        with self._lock:
            self.num_requests += 1
            for rule in self.rules:
                if rule.take(method, path):
                    return rule
        return None

    def _handle(self, handler: BaseHTTPRequestHandler) -> None:
        length = int(handler.headers.get("Content-Length") or 0)
        body = handler.rfile.read(length) if length else b""
        rule = self._match(handler.command, handler.path)
        if rule is not None and rule.kind == "error":
            self._send_error(handler, rule)
            return
        if rule is not None and rule.kind == "delay":
            time.sleep(rule.delay_s)  # the fault itself: a slow server
        try:
            status, reason, headers, payload = self._forward(handler, body)
        except OSError:  # as a load balancer answers for a server that is down
            with self._lock:
                self.upstream_failures += 1
            self._send_error(handler, FaultRule("error", status=502, code="BadGateway"))
            return
        if rule is not None and rule.kind == "drop":
            self._close(handler)
            return
        handler.send_response_only(status, reason)
        for key, value in headers:
            handler.send_header(key, value)
        handler.end_headers()
        if handler.command == "HEAD":
            return
        if rule is not None and rule.kind == "cut":
            handler.wfile.write(payload[: rule.cut_after_bytes])
            handler.wfile.flush()
            self._close(handler)
            return
        handler.wfile.write(payload)

    def _forward(
        self, handler: BaseHTTPRequestHandler, body: bytes
    ) -> tuple[int, str, list[tuple[str, str]], bytes]:
        conn = http.client.HTTPConnection(self.upstream_host, self.upstream_port, timeout=120)
        try:
            headers = {k: v for k, v in handler.headers.items() if k.lower() not in HOP_BY_HOP}
            conn.request(handler.command, handler.path, body=body or None, headers=headers)
            response = conn.getresponse()
            payload = response.read()
            out = [(k, v) for k, v in response.getheaders() if k.lower() not in HOP_BY_HOP]
            out = [(k, v) for k, v in out if k.lower() != "content-length"]
            out.append(("Content-Length", str(len(payload))))
            return response.status, response.reason, out, payload
        finally:
            conn.close()

    @staticmethod
    def _send_error(handler: BaseHTTPRequestHandler, rule: FaultRule) -> None:
        payload = (
            '<?xml version="1.0" encoding="UTF-8"?>\n'
            f"<Error><Code>{rule.code}</Code><Message>injected fault</Message></Error>"
        ).encode()
        handler.send_response_only(rule.status)
        handler.send_header("Content-Type", "application/xml")
        handler.send_header("Content-Length", str(len(payload)))
        handler.end_headers()
        handler.wfile.write(payload)

    @staticmethod
    def _close(handler: BaseHTTPRequestHandler) -> None:
        handler.close_connection = True
        try:
            handler.wfile.flush()
            handler.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
