"""Every measured figure the README shows is rendered from a committed results file: rendering it again from
that file changes nothing."""

from __future__ import annotations

import json
import os

from bench import image_sizes as sizes
from bench import sigterm
from bench.common import ROOT, readme_block


def test_the_readmes_image_sizes_are_rendered_from_bench_image_sizes_json():
    with open(sizes.RESULTS) as f:
        results = json.load(f)
    assert readme_block(sizes.BEGIN, sizes.END) == sizes.render(results)
    gpu, cpu = results["flavours"]["gpu"], results["flavours"]["cpu"]
    # The flavours share every layer but the dependencies', and the code's layer is the small one a change ships.
    assert [layer["layer"] for layer in gpu["layers"]] == [layer["layer"] for layer in cpu["layers"]]
    assert gpu["layers"][-1]["compressed"] < 1e6 and gpu["layers"][-2]["compressed"] > 1e9


def test_the_readmes_spot_grace_table_is_rendered_from_bench_results_json():
    with open(os.path.join(ROOT, "bench", "results.json")) as f:
        measured = json.load(f)["sigterm"]
    assert readme_block(sigterm.BEGIN, sigterm.END) == sigterm.table(measured)
    # Every preset, measured with the grace `submit --spot` gives the trainer, and each fit in it.
    assert set(measured["presets"]) == set(sigterm.PRESETS) and measured["grace_seconds"] == sigterm.GRACE
    assert all(p["max"] < measured["grace_seconds"] for p in measured["presets"].values())


def test_the_readmes_control_plane_figures_are_rendered_from_bench_cluster_json():
    from bench import cluster

    with open(cluster.RESULTS) as f:
        measured = json.load(f)
    assert readme_block(cluster.BEGIN, cluster.END) == cluster.render(measured)
    assert measured["cold_build_seconds"] > measured["start_seconds"] > 0 and measured["binaries_bytes"] > 0
