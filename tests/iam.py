"""The IAM permission each Cloud Storage request needs, and the roles the docs grant, both as Google's
documentation gives them: the method table of "IAM permissions for JSON methods" (and the XML API's), and the
role lists of "Cloud Storage roles and permissions" (cloud.google.com/iam/docs/roles-permissions/storage).
The emulators allow everything, so this is where a request outside the granted role shows up."""

from __future__ import annotations

import re
import urllib.parse

from gcs import Request

# roles/storage.objectUser, which the trainer's ServiceAccount is granted on the bucket.
OBJECT_USER = frozenset({
    "orgpolicy.policy.get",
    "resourcemanager.projects.get", "resourcemanager.projects.list",
    "storage.folders.create", "storage.folders.delete", "storage.folders.get", "storage.folders.list",
    "storage.folders.rename",
    "storage.managedFolders.create", "storage.managedFolders.delete", "storage.managedFolders.get",
    "storage.managedFolders.list",
    "storage.multipartUploads.abort", "storage.multipartUploads.create", "storage.multipartUploads.list",
    "storage.multipartUploads.listParts",
    "storage.objects.create", "storage.objects.delete", "storage.objects.get", "storage.objects.list",
    "storage.objects.restore", "storage.objects.update",
})
# roles/storage.objectViewer, which TensorBoard's ServiceAccount is granted on the bucket.
OBJECT_VIEWER = frozenset({
    "resourcemanager.projects.get", "resourcemanager.projects.list",
    "storage.folders.get", "storage.folders.list", "storage.managedFolders.get", "storage.managedFolders.list",
    "storage.objects.get", "storage.objects.list",
})

_OBJECT = r"/b/[^/]+/o/[^/]+"
# Writes count as replacing an existing object, the stricter reading: that also needs storage.objects.delete.
_WRITE = frozenset({"storage.objects.create", "storage.objects.delete"})
_JSON_API = (  # (method, path under /storage/v1 (or the emulators' /download and /upload prefixes), permissions)
    ("GET", r"/b/[^/]+", {"storage.buckets.get"}),
    ("PATCH", r"/b/[^/]+", {"storage.buckets.update"}),
    ("GET", r"/b/[^/]+/o", {"storage.objects.list"}),
    ("GET", _OBJECT, {"storage.objects.get"}),  # metadata, or the bytes with alt=media
    ("PATCH", _OBJECT, {"storage.objects.update"}),
    ("PUT", _OBJECT, {"storage.objects.update"}),
    ("DELETE", _OBJECT, {"storage.objects.delete"}),
    ("POST", r"/b/[^/]+/o", _WRITE),  # insert: simple, multipart or the start of a resumable upload
    ("PUT", r"/b/[^/]+/o", _WRITE),  # the bytes of a resumable upload
    ("POST", _OBJECT + r"/compose", _WRITE | {"storage.objects.get"}),
    ("POST", _OBJECT + r"/(rewriteTo|copyTo)" + _OBJECT, _WRITE | {"storage.objects.get"}),
)
_PREFIXES = ("/download/storage/v1", "/upload/storage/v1", "/storage/v1")


class Unmapped(AssertionError):
    """A request this table does not know: add it from Google's documentation, never guess."""


def permissions(request: Request) -> frozenset[str]:
    """The IAM permissions Google's documentation lists for one request."""
    path = urllib.parse.urlsplit(request.path).path
    for prefix in _PREFIXES:
        if path.startswith(prefix + "/"):
            rest = path[len(prefix):]
            for method, pattern, needed in _JSON_API:
                if method == request.method and re.fullmatch(pattern, rest):
                    return frozenset(needed)
            raise Unmapped(f"no JSON API method for {request}")
    # The XML API (storage.googleapis.com/BUCKET/OBJECT): GET Object reads its bytes.
    if request.method in ("GET", "HEAD") and re.fullmatch(r"/[^/]+/.+", path):
        return frozenset({"storage.objects.get"})
    raise Unmapped(f"no Cloud Storage method for {request}")


def outside(requests: list[Request], role: frozenset[str]) -> list[str]:
    """`REQUEST needs PERMISSION` for every request that needs a permission the role lacks."""
    return [f"{request} needs {', '.join(sorted(permissions(request) - role))}"
            for request in requests if permissions(request) - role]
