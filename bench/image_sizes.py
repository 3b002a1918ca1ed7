"""`make image-sizes`: the size of each flavour of the image and of each of its layers, compressed (gzip, as a
registry stores and a node pulls it) and uncompressed (on the node's disk); written to bench/image_sizes.json and
rendered into docs/image.md.

python -m bench.image_sizes IMAGE:TAG ... measures the images in buildah's store (BUILDAH: its command);
python -m bench.image_sizes --render rewrites that table from the JSON alone."""

from __future__ import annotations

import datetime
import json
import os
import shlex
import subprocess
import sys
import tempfile
import zlib

from bench import docs
from bench.common import ROOT

RESULTS = os.path.join(ROOT, "bench", "image_sizes.json")
# What docker/Dockerfile's steps put in the image's last layers, in order; every layer before them is the base's.
BASE = "the base (Debian bookworm)"
LAYERS = ("Debian's Python 3.11", "MNIST and Fashion-MNIST", "setup.py and the constraints",
          "Python dependencies (TensorFlow; gpu: the CUDA wheels)", "the code")


def _uncompressed(blob: str) -> int:
    """Bytes of a gzip blob once unpacked (streamed: a layer can hold gigabytes)."""
    inflate, size = zlib.decompressobj(16 + zlib.MAX_WBITS), 0
    with open(blob, "rb") as f:
        while chunk := f.read(1 << 22):
            size += len(inflate.decompress(chunk))
    return size + len(inflate.flush())


def measure(buildah: list[str], image: str) -> dict:
    """Each non-empty layer of `image`: what made it, its gzip size and its unpacked size."""
    with tempfile.TemporaryDirectory(dir=os.path.join(ROOT, "build")) as out:
        subprocess.run([*buildah, "push", "--quiet", "--compression-format", "gzip", image,
                        f"oci:{out}"], check=True, capture_output=True)
        with open(os.path.join(out, "index.json")) as f:
            manifest_digest = json.load(f)["manifests"][0]["digest"]

        def blob(digest: str) -> str:
            return os.path.join(out, "blobs", *digest.split(":"))

        with open(blob(manifest_digest)) as f:
            manifest = json.load(f)
        blobs = manifest["layers"]
        names = [BASE] * (len(blobs) - len(LAYERS)) + list(LAYERS)
        layers = [{"layer": name, "compressed": layer["size"], "uncompressed": _uncompressed(blob(layer["digest"]))}
                  for name, layer in zip(names, blobs)]
    return {"image": image, "layers": layers, "compressed": sum(x["compressed"] for x in layers),
            "uncompressed": sum(x["uncompressed"] for x in layers)}


def _mb(size: int) -> str:
    return f"{size / 1e9:.2f} GB" if size >= 1e9 else f"{size / 1e6:.1f} MB" if size >= 1e5 else f"{size / 1e3:.0f} kB"


def render(results: dict) -> str:
    """The docs' table: one column pair per flavour, one row per layer, then the totals."""
    flavours = list(results["flavours"])
    lines = [f"Measured on {results['date']}, on the tests' stand-in base; compressed: gzip, as a registry serves a "
             "layer to a node.",
             "", "| layer | " + " | ".join(f"{f}: compressed | {f}: on disk" for f in flavours) + " |",
             "|---|" + "---:|---:|" * len(flavours)]
    rows = zip(*(results["flavours"][flavour]["layers"] for flavour in flavours))  # one layer of each flavour
    for row in rows:
        cells = [_mb(size) for layer in row for size in (layer["compressed"], layer["uncompressed"])]
        lines.append(f"| {row[0]['layer']} | " + " | ".join(cells) + " |")
    totals = [cell for f in flavours for cell in (_mb(results["flavours"][f]["compressed"]),
                                                   _mb(results["flavours"][f]["uncompressed"]))]
    lines.append("| **the image** | " + " | ".join(f"**{cell}**" for cell in totals) + " |")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    """Measure the images named in argv (flavour=IMAGE:TAG), or only re-render with --render."""
    results = None
    if argv != ["--render"]:
        buildah = shlex.split(os.environ.get("BUILDAH", "buildah"))
        flavours = {flavour: measure(buildah, image) for flavour, _, image in (i.partition("=") for i in argv)}
        results = {"date": datetime.date.today().isoformat(), "flavours": flavours}
    docs.publish("image sizes", RESULTS, results)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
