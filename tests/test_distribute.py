"""Strategies: TF_CONFIG from the launcher's environment, and real worker processes on 127.0.0.1 (one group of two
restarted as its JobSet would, each worker reaching the store through its own recording proxy)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import tensorflow as tf
from google.api_core.exceptions import NotFound
from google.cloud import storage

from conftest import ROOT, wait_until
from gcs import Proxy, free_port
from group import Group
from trainer.config import ConfigError, RuntimeConfig
from trainer.cluster import INDEX_ENV, WORKERS_ENV, configure_cluster, tf_config
from trainer.distribute import lost_workers, make_strategy


def test_tf_config_from_the_launchers_environment(monkeypatch):
    monkeypatch.setenv("TF_CONFIG", "")  # restored (removed) after the test
    env = {WORKERS_ENV: "r-0.r:2222,r-1.r:2222,r-2.r:2222", INDEX_ENV: "2"}
    config = configure_cluster(env)
    assert config == {"cluster": {"worker": ["r-0.r:2222", "r-1.r:2222", "r-2.r:2222"]},
                      "task": {"type": "worker", "index": 2}}
    assert json.loads(os.environ["TF_CONFIG"]) == config
    assert configure_cluster({}) is None


@pytest.mark.parametrize("workers, index, message", [
    (["a:1"], 0, "at least 2 workers"),
    (["a:1", "b:2"], 2, "outside 0..1"),
    (["a:1", "b:2"], -1, "outside 0..1"),
    (["a:1", "a:1"], 0, "duplicate"),
    (["a:1", "b"], 0, "bad worker address 'b'"),
    (["a:1", "b:99999"], 0, "bad worker address"),
    (["a:1", "http://b:2"], 0, "bad worker address"),
])
def test_bad_clusters_are_refused(workers, index, message):
    with pytest.raises(ConfigError, match=message):
        tf_config(workers, index)


def test_index_must_be_set_with_workers():
    with pytest.raises(ConfigError, match="JOB_COMPLETION_INDEX"):
        configure_cluster({WORKERS_ENV: "a:1,b:2"})


def test_mirrored_strategy_on_logical_cpus():
    strategy = make_strategy(RuntimeConfig(cpu_replicas=2))
    assert isinstance(strategy, tf.distribute.MirroredStrategy) and strategy.num_replicas_in_sync == 2
    assert make_strategy(RuntimeConfig(cpu_replicas=1)).num_replicas_in_sync == 1


def _variables(prefix: str) -> dict[str, np.ndarray]:
    reader = tf.train.load_checkpoint(prefix)
    return {name: reader.get_tensor(name) for name in reader.get_variable_to_shape_map()
            if not name.startswith("_CHECKPOINTABLE_OBJECT_GRAPH")}


WRITES = ("POST", "PUT", "PATCH", "DELETE")  # every other request the JSON API takes only reads


def test_only_worker_0_writes_the_run_and_holds_its_lease_also_after_the_group_restarts(concurrent_bucket, fake_gcs,
                                                                                          data_dir, tmp_path):
    """Two worker processes, each reaching the store through its own recording proxy, so that every request is
    told apart by worker; worker 1 is killed once a checkpoint is shipped, and the group restarts (as its JobSet
    would) and finishes. Worker 1 reads the run (to restore it) but never writes or deletes an object of it; a
    watcher reading the lease all along only ever finds worker 0's process of the attempt under way."""
    proxies = [Proxy(fake_gcs.port) for _ in range(2)]
    output, run = f"gs://{concurrent_bucket}/runs", "mw"
    args = ["--model", "mlp300", "--epochs", "2", "--batch-size", "200", "--steps-per-loop", "25",
            "--checkpoint-every", "50", "--ship-every", "0.5", "--output-dir", output, "--run", run, "--data-dir",
            data_dir, "--data-source", "idx", "--peer-timeout", "10", "--startup-timeout", "120",
            "--grace-seconds", "10", "--lease-seconds", "6"]
    group = Group(2, args, str(tmp_path / "pods"), env={},
                  worker_env={i: {"STORAGE_EMULATOR_HOST": proxy.url} for i, proxy in enumerate(proxies)})
    bucket = storage.Client().bucket(concurrent_bucket)
    pointer = bucket.blob(f"runs/{run}/checkpoints/checkpoint")
    pids: dict[int, set[int]] = {0: set(), 1: set()}
    holders: set[int] = set()
    restarted: dict[str, int] = {}
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            for index, process in enumerate(group.processes):
                pids[index].add(process.pid)
            try:
                # A new Blob each time: one that has read an object asks for that generation again.
                record = json.loads(bucket.blob(f"runs/{run}/lease.json").download_as_bytes())
                holders.add(int(re.fullmatch(r".* pid (\d+)", record["holder"]).group(1)))
            except NotFound:
                pass
            time.sleep(0.05)

    def kill_worker_1(g: Group) -> None:
        assert wait_until(lambda: pointer.exists() or len(g.alive()) < 2, 300) and len(g.alive()) == 2
        g.signal(1, signal.SIGKILL)
        g.processes[1].wait()
        restarted["at"] = len(proxies[1].requests)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        final = group.run(timeout=900, first=kill_worker_1)
    finally:
        done.set()
        watcher.join(10)
        for proxy in proxies:
            proxy.stop()
    assert final == "Succeeded" and [a.action for a in group.attempts] == ["RestartJobSet", "Succeeded"], \
        [(e.index, e.code, e.stderr[-1500:]) for a in group.attempts for e in a.exits]
    metrics = json.loads(bucket.blob(f"runs/{run}/metrics.json").download_as_bytes())
    assert metrics["strategy"] == "MultiWorkerMirroredStrategy" and metrics["replicas"] == 2
    assert metrics["steps"] == 600 and metrics["resumed_from_step"] > 0 and metrics["test_accuracy"] > 0.9
    # Told apart by worker: worker 0 wrote the run in both attempts (the lease, checkpoints, metrics), worker 1
    # read it in both (the second restored the checkpoint) and wrote nothing.
    chief, worker = proxies[0].requests, proxies[1].requests
    written = {r.object for r in chief if r.method in WRITES}
    assert {f"runs/{run}/lease.json", f"runs/{run}/metrics.json", f"runs/{run}/checkpoints/checkpoint"} <= written
    assert any(r.object.startswith(f"runs/{run}/model/") for r in chief if r.method in WRITES)
    assert 0 < restarted["at"] < len(worker)
    assert any(r.object.startswith(f"runs/{run}/checkpoints/ckpt-") for r in worker[restarted["at"]:])
    assert [str(r) for r in worker if r.method in WRITES] == []
    # The lease only ever named worker 0 (of either attempt); both attempts' worker 0 held it.
    assert len(pids[0]) == len(pids[1]) == 2 and holders == pids[0], (pids, holders)
    # Both workers ended with the same weights; only the chief wrote TensorBoard logs, even in scratch.
    last = group._pod_path(1, 0), group._pod_path(1, 1)
    chief_vars, worker_vars = (_variables(os.path.join(p, run, "checkpoints", "ckpt-600")) for p in last)
    assert chief_vars.keys() == worker_vars.keys()
    assert chief_vars["optimizer/_trainable_variables/0/.ATTRIBUTES/VARIABLE_VALUE"].shape == (784, 300)  # weights
    for name in chief_vars:
        np.testing.assert_array_equal(chief_vars[name], worker_vars[name], err_msg=name)
    assert os.path.isdir(os.path.join(last[0], run, "logs", "train"))
    assert not os.path.exists(os.path.join(last[1], run, "logs", "train"))


_RELAYED = ('Collective ops is aborted by: x\nAdditional GRPC error information from remote target '
            '/job:worker/replica:0/task:2 while calling /tensorflow.WorkerService/RecvBuf:\n:UNKNOWN:Error received '
            'from peer  {grpc_status:14, grpc_message:"Collective ops is aborted by: Socket closed\\nAdditional GRPC '
            'error information from remote target /job:worker/replica:0/task:1 while calling '
            '/tensorflow.WorkerService/RecvBuf:\\n:UNKNOWN:Error"}')


@pytest.mark.parametrize("me, message, lost", [
    (0, "Additional GRPC error information from remote target /job:worker/replica:0/task:2 while calling", 2),
    (0, _RELAYED, 1),  # worker 2 relays worker 1's death: the origin is the most deeply quoted
    (2, "The following tasks are unhealthy (stopped sending heartbeats):\n/job:worker/replica:0/task:1\nThe", 1),
    (1, "Deadline Exceeded\n\nRPC: /tensorflow.CoordinationService/Heartbeat", 0),  # the service's host froze
    (0, "Error reported from /job:worker/task:2: something", 2),
    (1, "Error reported from /job:worker/task:0: worker 0: lost worker 2 (c:3); the group must restart", 2),  # told
    (0, "Socket closed", None),
])
def test_the_lost_peer_is_named_from_tensorflows_error(me, message, lost):
    cluster = {"cluster": {"worker": ["a:1", "b:2", "c:3"]}, "task": {"type": "worker", "index": me}}
    assert lost_workers(message, cluster) == ([] if lost is None else [lost])


def test_the_probe_decides_between_the_peers_an_error_names():
    cluster = {"cluster": {"worker": ["a:1", "b:2", "c:3"]}, "task": {"type": "worker", "index": 1}}
    relayed = _RELAYED.replace("task:1 while", "task:0 while").replace("task:2 while", "task:2 while")
    assert lost_workers(relayed, cluster, unreachable=[0, 2]) == [0]  # named deepest and unreachable
    # Worker 0 reported the abort (so it was alive); the probe found worker 2 gone.
    assert lost_workers("Error reported from /job:worker/task:0: x", cluster, unreachable=[2]) == [2]
    assert lost_workers("Error reported from /job:worker/task:0: x", cluster) == [0]  # probe found none
    assert lost_workers("Socket closed", cluster, unreachable=[2]) == [2]
    assert lost_workers("Socket closed", cluster, unreachable=[0, 2]) == [0, 2]
    # Worker 0, busy, answered the probe too late; worker 2 refused it: it is the one that died.
    heartbeat = "Error reported from /job:worker/task:0: CoordinationService/Heartbeat failed"
    assert lost_workers(heartbeat, cluster, unreachable=[0, 2], dead=[2]) == [2]
    assert lost_workers(heartbeat, cluster, unreachable=[0, 2]) == [0]  # both silent: the named one
    # Worker 0 reported the abort, then exited before this slower survivor probed: worker 2 is still the lost one
    # (seen once in the group fault trials).
    reported = "Error reported from /job:worker/task:0: Collective ops is aborted by: x"
    assert lost_workers(reported, cluster, unreachable=[0, 2], dead=[0, 2]) == [2]
    assert lost_workers(reported, cluster, unreachable=[0], dead=[0]) == [0]  # none else gone: the named
    # Worker 0 told the group it lost worker 2 and has exited since: what it told outweighs the failed heartbeat.
    told = f"Error reported from /job:worker/task:0: worker 0: lost worker 2 (c:3); the group ... {heartbeat}"
    assert lost_workers(told, cluster, unreachable=[0, 2], dead=[0, 2]) == [2]


def test_a_survivor_that_meets_the_loss_late_still_names_the_lost_worker(tmp_path):
    # Seen in CI: a survivor busy outside the collective that failed noticed only after worker 0 (which had
    # reported the loss) exited; with both gone, it blamed worker 0. Worker 0 now tells the group whom it lost.
    hosts = [f"127.0.0.1:{free_port()}" for _ in range(3)]
    script = os.path.join(os.path.dirname(__file__), "peer_worker.py")
    workers = []
    for i in range(3):
        with open(tmp_path / f"worker{i}.stderr", "w") as stderr:  # the child keeps its own copy
            workers.append(subprocess.Popen([sys.executable, script, str(tmp_path)], cwd=ROOT, text=True,
                                            stdout=subprocess.PIPE, stderr=stderr,
                                            env={**os.environ, WORKERS_ENV: ",".join(hosts), INDEX_ENV: str(i)}))
    try:
        workers[2].wait(timeout=120)
        (tmp_path / "dead").touch()
        first, _ = workers[0].communicate(timeout=60)
        (tmp_path / "go").touch()
        late, _ = workers[1].communicate(timeout=60)
    finally:
        for worker in workers:
            worker.kill()
    logs = {i: (tmp_path / f"worker{i}.stderr").read_text()[-1500:] for i in range(3)}
    assert first.strip() == f"worker 0: lost worker 2 ({hosts[2]}); the group must restart (from the last checkpoint)", \
        logs
    assert late.strip() == f"worker 1: lost worker 2 ({hosts[2]}); the group must restart (from the last checkpoint)", \
        logs
