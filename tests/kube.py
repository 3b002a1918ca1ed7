"""A Kubernetes API stand-in on loopback: real HTTP, the JSON shapes the official client expects,
objects kept in memory, every request recorded, and namespaces that refuse with 403 or a quota."""

from __future__ import annotations

import http.server
import json
import re
import threading
import urllib.parse
from typing import Any

_PATH = re.compile(r"^/(?:api/v1|apis/(?:batch|apps)/v1)/namespaces/([^/]+)/([a-z]+)(?:/([^/]+))?(?:/(log))?$")
_KINDS = {"jobs": "Job", "services": "Service", "serviceaccounts": "ServiceAccount", "deployments": "Deployment",
          "pods": "Pod"}


class KubeAPI:
    """Objects by (plural, namespace, name); `forbidden` and `quota` namespaces refuse writes."""

    def __init__(self) -> None:
        self.objects: dict[tuple[str, str, str], dict[str, Any]] = {}
        self.logs: dict[tuple[str, str], str] = {}
        self.requests: list[tuple[str, str, Any]] = []
        self._lock = threading.Lock()
        api = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def _reply(self, status: int, body: Any, content_type: str = "application/json") -> None:
                data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _handle(self) -> None:
                url = urllib.parse.urlparse(self.path)
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length)) if length else None
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

    def answer(self, method: str, path: str, query: dict[str, list[str]], body: Any) -> tuple[int, Any]:
        match = _PATH.match(path)
        if not match:
            return self.status(404, "NotFound", f"the server could not find the requested resource {path}")
        namespace, plural, name, log = match.groups()
        if namespace == "forbidden":
            return self.status(403, "Forbidden", f'{plural} is forbidden: User "me" cannot {method} in "forbidden"')
        if namespace == "quota" and method == "POST" and plural == "jobs":
            return self.status(403, "Forbidden", 'exceeded quota: gpu-quota, requested: requests.nvidia.com/gpu=8')
        key = (plural, namespace, name)
        if method == "POST":
            name = body["metadata"]["name"]
            if (plural, namespace, name) in self.objects:
                return self.status(409, "AlreadyExists", f'{plural} "{name}" already exists')
            obj = {**body, "metadata": {**body["metadata"], "uid": f"uid-{len(self.objects)}",
                                        "creationTimestamp": "2026-11-22T10:00:00Z"}}
            obj.setdefault("status", {})
            self.objects[(plural, namespace, name)] = obj
            return 201, obj
        if method == "GET" and log:
            if ("pods", namespace, name) not in self.objects:
                return self.status(404, "NotFound", f'pods "{name}" not found')
            return 200, self.logs.get((namespace, name), "")
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
