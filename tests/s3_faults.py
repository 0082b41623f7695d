"""A small threaded HTTP proxy that injects S3 faults between boto3 and a real S3 endpoint.

boto3 talks to the proxy (AWS_ENDPOINT_URL) over real HTTP; the proxy forwards to the upstream
(moto's server) and, on a seeded fraction of requests, fails instead:

    "500"       500 InternalError, request not forwarded
    "503"       503 ServiceUnavailable, request not forwarded
    "slowdown"  503 SlowDown (throttling: botocore backs off ~1 s; not in the default kinds)
    "reset"     the request is read, then the TCP connection is reset (RST), no response
    "truncate"  GetObject only: forwarded, full Content-Length sent, body cut in half, RST
    "short"     ranged GetObject only: forwarded, body cut in half with a Content-Length that
                matches it (only a client that checks the length against its Range notices)

Faults are deterministic: the n-th time a request (method, path without the bucket, query
without upload ids, Range) is seen, it fails iff hash(seed, request, n) < fraction, so the same
test fails the same requests however its threads interleave. A request fails at most
`max_faults_per_request` times in a row, so retrying clients always get through.
"""

from __future__ import annotations

import hashlib
import http.client
import socket
import struct
import threading
import time
import urllib.parse
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

DEFAULT_KINDS = ("500", "503", "reset", "truncate", "short")
_BODY_KINDS = {"truncate", "short"}
_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "proxy-connection", "expect"}


@dataclass
class Logged:
    method: str
    path: str  # without query
    query: str
    range: str | None
    fault: str | None
    status: int | None


class FaultProxy:
    def __init__(self, upstream: str, *, fraction: float = 0.0, seed: int = 0,
                 kinds: tuple[str, ...] = DEFAULT_KINDS, max_faults_per_request: int = 2, latency_s: float = 0.0):
        up = urllib.parse.urlsplit(upstream)
        self.upstream = (up.hostname, up.port)
        self.fraction, self.seed, self.kinds = fraction, seed, tuple(kinds)
        self.max_faults_per_request = max_faults_per_request
        self.latency_s = latency_s  # added to every request: makes parallelism measurable
        self.log: list[Logged] = []
        self._seen: Counter = Counter()
        self._streak: Counter = Counter()
        self._lock = threading.Lock()
        self._paused = 0
        proxy = self

        class Handler(_Handler):
            owner = proxy

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def start(self) -> FaultProxy:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def configure(self, *, fraction: float | None = None, seed: int | None = None,
                  kinds: tuple[str, ...] | None = None, max_faults_per_request: int | None = None,
                  latency_s: float | None = None) -> None:
        with self._lock:
            if fraction is not None:
                self.fraction = fraction
            if seed is not None:
                self.seed = seed
            if kinds is not None:
                self.kinds = tuple(kinds)
            if max_faults_per_request is not None:
                self.max_faults_per_request = max_faults_per_request
            if latency_s is not None:
                self.latency_s = latency_s

    def reset(self, *, fraction: float = 0.0, seed: int = 0, kinds: tuple[str, ...] = DEFAULT_KINDS,
              max_faults_per_request: int = 2, latency_s: float = 0.0) -> None:
        """Fresh settings, log and counters: a reused proxy then decides exactly as a new one would."""
        with self._lock:
            self.log.clear()
            self._seen.clear()
            self._streak.clear()
            self._paused = 0
        self.configure(fraction=fraction, seed=seed, kinds=kinds, max_faults_per_request=max_faults_per_request,
                       latency_s=latency_s)

    @contextmanager
    def paused(self):
        """No faults inside the block (for test setup through the proxy)."""
        with self._lock:
            self._paused += 1
        try:
            yield self
        finally:
            with self._lock:
                self._paused -= 1

    # --- what happened ------------------------------------------------------------------------

    @property
    def injected(self) -> int:
        """How many faults were injected so far."""
        return sum(1 for e in self.log if e.fault)

    def faults(self) -> Counter:
        return Counter(e.fault for e in self.log if e.fault)

    def requests(self, method: str | None = None, key_contains: str = "") -> list[Logged]:
        return [e for e in self.log if (method is None or e.method == method) and key_contains in e.path]

    def clear_log(self) -> None:
        with self._lock:
            self.log.clear()

    # --- the decision -------------------------------------------------------------------------

    def _decide(self, method: str, path: str, query: str, rng: str | None) -> str | None:
        bucketless = "/".join(path.split("/")[2:])  # "/bucket/key" -> "key": same across runs
        q = sorted((k, "" if k == "uploadId" else v) for k, v in urllib.parse.parse_qsl(query, keep_blank_values=True))
        request = f"{method} {bucketless} {q} {rng}"
        is_get_object = method == "GET" and bucketless and not any(k.startswith("list") for k, _ in q)
        with self._lock:
            if self._paused or self.fraction <= 0:
                return None
            n = self._seen[request]
            self._seen[request] += 1
            if self._streak[request] >= self.max_faults_per_request:
                self._streak[request] = 0
                return None
            h = hashlib.sha256(f"{self.seed}|{request}|{n}".encode()).digest()
            if int.from_bytes(h[:8], "big") / 2**64 >= self.fraction:
                self._streak[request] = 0
                return None
            kinds = [k for k in self.kinds
                     if k not in _BODY_KINDS or (is_get_object and (k == "truncate" or rng))] or ["500"]
            self._streak[request] += 1
            return kinds[h[8] % len(kinds)]


class _Handler(BaseHTTPRequestHandler):
    owner: FaultProxy
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # quiet
        pass

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _handle(self) -> None:
        body = self._read_body()
        if self.owner.latency_s:
            time.sleep(self.owner.latency_s)
        path, _, query = self.path.partition("?")
        rng = self.headers.get("Range")
        fault = self.owner._decide(self.command, path, query, rng)
        entry = Logged(self.command, path, query, rng, fault, None)
        with self.owner._lock:
            self.owner.log.append(entry)
        if fault == "reset":
            self._reset()
            return
        if fault in ("500", "503", "slowdown"):
            code = {"500": "InternalError", "503": "ServiceUnavailable", "slowdown": "SlowDown"}[fault]
            entry.status = 500 if fault == "500" else 503
            self._send(entry.status, [("Content-Type", "application/xml")],
                       f"<Error><Code>{code}</Code><Message>injected</Message></Error>".encode())
            return
        status, headers, data = self._forward(body)
        entry.status = status
        if fault == "truncate" and len(data) > 1:
            self._send(status, headers, data[: len(data) // 2], content_length=len(data))
            self._reset()
        elif fault == "short" and len(data) > 1:
            self._send(status, headers, data[: len(data) // 2])
        else:
            self._send(status, headers, data)

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

    def _forward(self, body: bytes) -> tuple[int, list[tuple[str, str]], bytes]:
        conn = http.client.HTTPConnection(*self.owner.upstream, timeout=60)
        try:
            conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
            for k, v in self.headers.items():
                if k.lower() not in _HOP_BY_HOP:
                    conn.putheader(k, v)
            conn.putheader("Content-Length", str(len(body)))
            conn.endheaders(body)
            resp = conn.getresponse()
            data = resp.read()
            headers = [(k, v) for k, v in resp.getheaders() if k.lower() not in _HOP_BY_HOP]
            if self.command == "HEAD":  # no body, but the real length is the answer
                headers.append(("Content-Length", resp.getheader("Content-Length", "0")))
            return resp.status, headers, data
        finally:
            conn.close()

    def _send(self, status: int, headers, data: bytes, content_length: int | None = None) -> None:
        self.send_response_only(status)
        for k, v in headers:
            self.send_header(k, v)
        if self.command != "HEAD":
            self.send_header("Content-Length", str(len(data) if content_length is None else content_length))
            self.end_headers()
            self.wfile.write(data)
        else:
            self.end_headers()
        self.wfile.flush()

    def _reset(self) -> None:
        """Close with RST (SO_LINGER 0), the way a dropped connection looks to the client."""
        self.wfile.flush()
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.connection.close()
        self.close_connection = True
