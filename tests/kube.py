"""A Kubernetes API stand-in on loopback, kept only for what the real control plane (tests/cluster/) cannot be
made to show here: an API server of a release older than the ones served as Go modules (`version`), a Kueue
that serves v1beta1 only or is not installed (`installed`), and a server that never answers in time (namespace
`slow`). Real HTTP, the JSON shapes the official client expects, objects kept in memory, requests recorded."""

from __future__ import annotations

import http.server
import json
import re
import threading
import time
import urllib.parse
from typing import Any

_PATH = re.compile(r"^/(?:api/v1|apis/([a-z0-9.-]+)/([a-z0-9]+))/namespaces/([^/]+)/([a-z]+)(?:/([^/]+))?$")
_DISCOVERY = re.compile(r"^/apis/([a-z0-9.-]+)/([a-z0-9]+)$")
_KINDS = {"jobs": "Job", "services": "Service", "serviceaccounts": "ServiceAccount", "deployments": "Deployment",
          "pods": "Pod", "events": "Event", "jobsets": "JobSet", "localqueues": "LocalQueue"}
ADDONS = {"jobset.x-k8s.io/v1alpha2": ["jobsets"], "kueue.x-k8s.io/v1beta2": ["localqueues", "clusterqueues"],
          "kueue.x-k8s.io/v1beta1": ["localqueues", "clusterqueues"]}
BUILTIN = {"batch/v1": ["jobs"], "apps/v1": ["deployments"]}


class KubeAPI:
    """Objects by (plural, namespace, name); add-on APIs in `installed`."""

    def __init__(self, installed: tuple[str, ...] = tuple(ADDONS), hang: float = 5.0, version: str = "1.33.2") -> None:
        self.version = version
        self.objects: dict[tuple[str, str, str], dict[str, Any]] = {}
        self.requests: list[tuple[str, str, Any]] = []
        self.installed = set(installed)
        self.hang = hang
        self._lock = threading.Lock()
        api = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def _reply(self, status: int, body: Any, content_type: str = "application/json") -> None:
                data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", content_type)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    self.close_connection = True  # the client gave up first (as the request-timeout tests make it)

            def _handle(self) -> None:
                url = urllib.parse.urlparse(self.path)
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length)) if length else None
                if "/namespaces/slow/" in url.path:
                    time.sleep(api.hang)  # longer than the client's request timeout
                with api._lock:
                    api.requests.append((self.command, self.path, body))
                    status, reply = api.answer(self.command, url.path, urllib.parse.parse_qs(url.query), body)
                self._reply(status, reply, "text/plain" if isinstance(reply, str) else "application/json")

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _handle

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @staticmethod
    def status(code: int, reason: str, message: str) -> tuple[int, dict[str, Any]]:
        return code, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": code, "reason": reason,
                      "message": message}

    def _served(self, group: str | None, version: str | None) -> bool:
        api = f"{group}/{version}"
        return group is None or api in BUILTIN or api in self.installed

    def answer(self, method: str, path: str, query: dict[str, list[str]], body: Any) -> tuple[int, Any]:
        if path.rstrip("/") == "/version" and method == "GET":
            major, minor, _ = self.version.split(".")
            return 200, {"major": major, "minor": minor, "gitVersion": f"v{self.version}", "gitCommit": "",
                         "gitTreeState": "", "buildDate": "", "goVersion": "", "compiler": "", "platform": ""}
        discovery = _DISCOVERY.match(path)
        if discovery and method == "GET":
            api = "/".join(discovery.groups())
            if not self._served(*discovery.groups()):
                return self.status(404, "NotFound", "the server could not find the requested resource")
            resources = [{"name": p, "singularName": "", "namespaced": True, "kind": _KINDS.get(p, p), "verbs": []}
                         for p in (BUILTIN | ADDONS)[api]]
            return 200, {"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": api, "resources": resources}
        match = _PATH.match(path)
        if not match or not self._served(match.group(1), match.group(2)):
            return self.status(404, "NotFound", f"the server could not find the requested resource {path}")
        _, _, namespace, plural, name = match.groups()
        key = (plural, namespace, name)
        if method == "POST":
            name = body["metadata"]["name"]
            if (plural, namespace, name) in self.objects:
                return self.status(409, "AlreadyExists", f'{plural} "{name}" already exists')
            obj = {**body, "metadata": {**body["metadata"], "uid": f"uid-{len(self.objects)}",
                                        "creationTimestamp": f"2026-11-22T10:00:{len(self.objects):02d}Z"}}
            obj.setdefault("status", {})
            self.objects[(plural, namespace, name)] = obj
            return 201, obj
        if method == "GET" and name is None:
            selector = dict(s.split("=", 1) for s in query.get("labelSelector", [""])[0].split(",") if s)
            items = [o for (p, ns, _), o in self.objects.items() if p == plural and ns == namespace
                     and all(o["metadata"].get("labels", {}).get(k) == v for k, v in selector.items())]
            return 200, {"kind": f"{_KINDS[plural]}List", "apiVersion": "v1", "metadata": {}, "items": items}
        if key not in self.objects:
            return self.status(404, "NotFound", f'{plural} "{name}" not found')
        if method == "GET":
            return 200, self.objects[key]
        if method == "DELETE":
            del self.objects[key]
            return 200, {"kind": "Status", "apiVersion": "v1", "status": "Success"}
        if method == "PATCH":
            self.objects[key] = {**self.objects[key], **body}
            return 200, self.objects[key]
        return self.status(405, "MethodNotAllowed", method)

    def put(self, plural: str, obj: dict[str, Any]) -> None:
        """Store an object as a controller would have made it (pods, events, status)."""
        meta = obj["metadata"]
        with self._lock:
            self.objects[(plural, meta.get("namespace", "default"), meta["name"])] = obj

    def kubeconfig(self) -> str:
        """A kubeconfig whose current context is this server."""
        return json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": "standin",
            "clusters": [{"name": "standin", "cluster": {"server": self.url}}],
            "users": [{"name": "me", "user": {"token": "t"}}],
            "contexts": [{"name": "standin", "context": {"cluster": "standin", "user": "me"}}],
        })

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
