"""make_strategy(runtime config) -> tf.distribute.Strategy, created once and passed down; which worker is the
chief; decisions all workers take alike; and lost peers (PeerLost, exit 69).

One node: MirroredStrategy over its GPUs (or N logical CPUs). Several nodes: MultiWorkerMirroredStrategy over
the cluster trainer.cluster describes (TF_CONFIG).
"""

from __future__ import annotations

import contextlib
import functools
import re
from typing import Any, Callable, Iterator, Mapping, Sequence

import tensorflow as tf
from tensorflow.compiler.xla.tsl.protobuf import coordination_config_pb2
from tensorflow.python.eager import context as tf_context

from trainer.cluster import configure_cluster
from trainer.config import EXIT_NO_GPU, EXIT_PEER_LOST, ConfigError, RuntimeConfig, TrainerError


class PeerLost(TrainerError):
    """A worker of the group died, froze or never joined; the group must be restarted as a whole."""

    exit_code = EXIT_PEER_LOST


class GpusMissing(TrainerError):
    """TensorFlow sees fewer GPUs than the pod was given: training on the CPU instead would hold the GPUs for
    nothing, at a fraction of the speed."""

    exit_code = EXIT_NO_GPU


def check_gpus(expected: int) -> None:
    """Raise GpusMissing unless TensorFlow sees at least `expected` GPUs."""
    found = len(tf.config.list_physical_devices("GPU"))
    if found < expected:
        # Only a pod that misses its GPUs pays for the check's imports (packaging's requirement parser).
        from trainer.gpus import missing_cause

        raise GpusMissing(f"this pod was given {expected} GPU(s) but TensorFlow sees {found}: "
                          f"{missing_cause(expected)}; not training on the CPU instead")


def _configure_coordination(runtime: RuntimeConfig, workers: int) -> None:
    """Bound TensorFlow's coordination service before the strategy starts it: its heartbeats find a
    dead or frozen peer (no TCP reset needed) and abort every pending collective on the survivors."""
    # MultiWorkerMirroredStrategy keeps a coordination service configured before it, with these limits.
    tf_context.context().configure_coordination_service(
        service_type="standalone",
        service_leader="/job:worker/replica:0/task:0",
        coordinated_jobs=[coordination_config_pb2.CoordinatedJob(name="worker", num_tasks=workers)],
        heartbeat_timeout_in_ms=int(runtime.peer_timeout * 1000),
        cluster_register_timeout_in_ms=int(runtime.startup_timeout * 1000),
        shutdown_barrier_timeout_in_ms=int(runtime.startup_timeout * 1000),
    )
    # Registration as a barrier: the registration timeout then also ends worker 0's wait for missing peers.
    tf_context.context().coordination_service.cluster_register_with_barrier = True


# Where TensorFlow's errors name the peer they lost. A peer that relays the abort wraps the error it got
# (with escaped newlines) into its own, so the origin is the most deeply quoted remote target.
_UNHEALTHY = re.compile(r"unhealthy[^\n]*\n\s*/job:worker/replica:\d+/task:(\d+)")
_REMOTE = re.compile(r"(\\*)n?Additional GRPC error information from remote target /job:worker/replica:\d+/task:(\d+)")
_REPORTER = re.compile(r"reported from /job:worker/(?:replica:\d+/)?task:(\d+)")
_TO_LEADER = "CoordinationService/Heartbeat"
# A survivor tells the group whom it lost (see peer_failures); a slower survivor then reads the verdict in its
# own error, after the teller may have exited.
_TOLD = re.compile(r"(?:lost |, )worker (\d+) \(")
# A live peer under load (the other survivors commit and flush at that moment) can take seconds to answer: with
# 2 s, a busy worker 0 was taken for the lost one on a loaded 2-core machine.
_PROBE_SECONDS = 5.0
_PEER_ERRORS = (tf.errors.UnavailableError, tf.errors.DeadlineExceededError, tf.errors.CancelledError,
                tf.errors.AbortedError, tf.errors.InternalError)


def unreachable_peers(cluster: Mapping[str, Any], timeout: float = _PROBE_SECONDS) -> tuple[list[int], list[int]]:
    """Indexes of the peers that do not answer TensorFlow's collective health probe, asked right after an abort
    while the other survivors are usually still up: (all of them, those that refused at once: dead or restarted;
    the others timed out: frozen, cut off, or only busy)."""
    me, workers = cluster["task"]["index"], cluster["cluster"]["worker"]
    lost, dead = [], []
    for index in range(len(workers)):
        if index != me:
            try:
                tf_context.context().check_collective_ops_peer_health(
                    f"/job:worker/replica:0/task:{index}", timeout_in_ms=int(timeout * 1000))
            except tf.errors.DeadlineExceededError:
                lost.append(index)
            except tf.errors.OpError:
                lost.append(index)
                dead.append(index)
    return lost, dead


def _named(indexes: Sequence[int], cluster: Mapping[str, Any]) -> str:
    """'worker N (host:port), ...' (what _TOLD reads back); 'a peer' for none."""
    workers = cluster["cluster"]["worker"]
    return ", ".join(f"worker {i} ({workers[i]})" for i in indexes) or "a peer"


def lost_workers(message: str, cluster: Mapping[str, Any], unreachable: Sequence[int] = (),
                 dead: Sequence[int] = ()) -> list[int]:
    """The index of the peer that was lost: of the peers the probe found dead, the first that
    TensorFlow's error blames (most specific first), else the dead ones; else the same with those that only did
    not answer in time (a live peer under load can be slow); else the first named; none if nothing tells.
    A peer that only reported the abort was up when it did, so it comes last: by the time of the probe it may
    have exited itself (survivors hold their exit for PEER_LOST_HOLD, but a slow survivor probes later)."""
    me, workers = cluster["task"]["index"], cluster["cluster"]["worker"]
    deepest = sorted(((-len(quoting), int(task)) for quoting, task in _REMOTE.findall(message)), key=lambda m: m[0])
    blamed = [int(i) for i in _TOLD.findall(message)] + [int(i) for i in _UNHEALTHY.findall(message)]
    blamed += [task for _, task in deepest]
    if _TO_LEADER in message:  # our heartbeats to the service on worker 0 went unanswered
        blamed.append(0)
    reporters = [int(i) for i in _REPORTER.findall(message)]
    named = [i for i in blamed + reporters if i != me and i < len(workers)]
    reported_only = set(reporters) - set(blamed)
    lost: list[int] = []
    for found in (dead, unreachable):
        suspects = [i for i in found if i not in reported_only]
        lost = [i for i in named if i in suspects][:1] or suspects or [i for i in named if i in found][:1] \
            or list(found)
        if lost:
            break
    return lost or named[:1]


def _tell_the_group(message: str) -> None:
    """Report a lost peer through the coordination service (on worker 0, which answered the probe): it aborts
    every survivor's collectives with this message at once. A survivor whose collective does not involve the
    lost peer would otherwise wait until worker 0 exits, and then take worker 0 for the lost one."""
    try:
        tf_context.context().report_error_to_cluster(tf.errors.UNAVAILABLE, message)
    except (tf.errors.OpError, ValueError):  # the service already holds an error (another survivor told it)
        pass


def multi_worker(strategy: tf.distribute.Strategy) -> bool:
    """True for a strategy over several worker processes (MultiWorkerMirroredStrategy)."""
    return isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)


def cluster_of(strategy: tf.distribute.Strategy) -> dict[str, Any] | None:
    """The TF_CONFIG-shaped cluster of a multi-worker strategy; None on a single node."""
    if not multi_worker(strategy):
        return None
    resolver = strategy.cluster_resolver
    return {"cluster": {"worker": resolver.cluster_spec().as_dict()["worker"]},
            "task": {"type": resolver.task_type, "index": resolver.task_id}}


@contextlib.contextmanager
def peer_failures(cluster: Mapping[str, Any] | None, what: str = "",
                  on_lost: Callable[[], object] | None = None) -> Iterator[None]:
    """Turn the errors TensorFlow raises when the coordination service or a collective loses a peer
    into one PeerLost naming it (calling `on_lost` first); a no-op on a single node."""
    if cluster is None:
        yield
        return
    try:
        yield
    except _PEER_ERRORS as error:
        me = cluster["task"]["index"]
        message = what
        if not message:
            # Probe before on_lost: the other survivors are still up now, and on_lost may take a while.
            unreachable, dead = unreachable_peers(cluster)
            lost = lost_workers(str(error), cluster, unreachable, dead)
            message = f"worker {me}: lost {_named(lost, cluster)}; the group must restart (from the last checkpoint)"
            if 0 not in unreachable and 0 not in lost:
                _tell_the_group(message)
        if on_lost is not None:
            on_lost()
        raise PeerLost(message) from error


def same_on_all_workers(strategy: tf.distribute.Strategy, value: int) -> bool:
    """True if every worker holds the same `value` (one decision, taken identically everywhere)."""
    if not multi_worker(strategy):
        return True
    local = tf.constant([float(value), float(value) ** 2, 1.0], tf.float64)
    total, squares, workers = (float(x) for x in _all_sum(strategy, local).numpy())
    return workers * squares == total * total  # equality in Cauchy-Schwarz: all values equal


def split_cpu(replicas: int) -> None:
    """Split the physical CPU into `replicas` logical devices (before TensorFlow initialises them)."""
    cpu = tf.config.list_physical_devices("CPU")[0]
    current = tf.config.get_logical_device_configuration(cpu)
    if current is not None and len(current) >= replicas:
        return
    try:
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration() for _ in range(replicas)]
        )
    except RuntimeError as error:  # devices were already initialised with fewer CPUs
        raise ConfigError(f"cannot split the CPU into {replicas} devices after TensorFlow started: {error}")


def make_strategy(runtime: RuntimeConfig) -> tf.distribute.Strategy:
    """MultiWorkerMirroredStrategy in a cluster; else MirroredStrategy over all GPUs, the CPU, or N logical CPUs."""
    check_gpus(runtime.expect_gpus)
    cluster = configure_cluster()
    if cluster is not None:
        if runtime.cpu_replicas > 1:
            raise ConfigError("--cpu-replicas cannot be combined with a multi-worker cluster")
        _configure_coordination(runtime, len(cluster["cluster"]["worker"]))
        missing = (f"worker {cluster['task']['index']}: not every worker joined within --startup-timeout "
                   f"{runtime.startup_timeout:g} s; the group must restart")
        with peer_failures(cluster, missing):
            # Collectives pick NCCL on GPUs and gRPC rings on CPUs by themselves.
            return tf.distribute.MultiWorkerMirroredStrategy()
    if runtime.cpu_replicas:
        split_cpu(runtime.cpu_replicas)
        return _mirrored(tuple(d.name for d in tf.config.list_logical_devices("CPU")[: runtime.cpu_replicas]))
    # With no devices MirroredStrategy takes every visible GPU, or the CPU when there is none.
    return _mirrored(None)


@functools.cache
def _mirrored(devices: tuple[str, ...] | None) -> tf.distribute.MirroredStrategy:
    # One strategy per device set and process: two MirroredStrategy objects over the same devices
    # reuse collective keys, and their all-reduces of differently shaped models collide (TF issue 62790).
    return tf.distribute.MirroredStrategy(devices=list(devices) if devices else None)


def any_worker(strategy: tf.distribute.Strategy, flag: bool) -> bool:
    """True if `flag` is true on any worker, so that all workers take the same branch (e.g. stop)."""
    if not multi_worker(strategy):
        return flag
    local = tf.constant(1 if flag else 0)
    agreed = _all_sum(strategy, local)
    return bool(agreed.numpy())


@tf.function
def _all_sum(strategy: tf.distribute.Strategy, value: tf.Tensor) -> tf.Tensor:
    per_replica = strategy.run(lambda: tf.identity(value))
    return strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None)


def describe(strategy: tf.distribute.Strategy) -> str:
    """Short name such as 'MirroredStrategy' or 'MultiWorkerMirroredStrategy'."""
    if multi_worker(strategy):
        return "MultiWorkerMirroredStrategy"  # the class itself is called CollectiveAllReduceStrategy
    return type(strategy).__name__
