"""`python -m trainer.launch submit|status|wait|events|logs|cancel|list|tensorboard|render`: training jobs on
Kubernetes."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from typing import Sequence

import yaml

from trainer.config import (EXIT_RUN_FAILED, EXIT_WAIT_TIMEOUT, ConfigError, Parser, TrainerError, add_flags,
                            check_replicas, config_from_args, fail, flag_names)
from trainer.launch.client import JOB_INDEX_ANNOTATION, REQUEST_TIMEOUT, Cluster, LaunchError, event_time, pod_summary
from trainer.launch.manifests import (LAUNCHER_FLAGS, SPOT_GRACE_SECONDS, SPOT_LABEL, TENSORBOARD, JobSpec,
                                      launcher_role, launcher_role_binding, run_name_problem, service_account,
                                      tensorboard_objects, training_objects)


class _Dumper(yaml.SafeDumper):
    def ignore_aliases(self, data: object) -> bool:
        return True  # plain YAML, as kubectl users write it


def to_yaml(objects: list[dict]) -> str:
    """Multi-document YAML of the objects, in order."""
    return yaml.dump_all(objects, Dumper=_Dumper, sort_keys=False)


def _cluster_options(parser: argparse.ArgumentParser, defaults: bool) -> None:
    """--namespace, --context and --request-timeout, accepted before or after the subcommand."""
    keep = {} if defaults else {"default": argparse.SUPPRESS}  # a subcommand's copy must not reset the top's
    parser.add_argument("--namespace", "-n", **({"default": "default"} if defaults else keep),
                        help="Kubernetes namespace (default: default)")
    parser.add_argument("--context", **({"default": None} if defaults else keep),
                        help="kube context (default: the current one)")
    parser.add_argument("--request-timeout", type=float, **({"default": REQUEST_TIMEOUT} if defaults else keep),
                        help=f"seconds each Kubernetes API call may take (default: {REQUEST_TIMEOUT:g})")


def _gcp_service_account(parser: argparse.ArgumentParser | argparse._ArgumentGroup, role: str) -> None:
    parser.add_argument("--gcp-service-account", default="", metavar="EMAIL",
                        help=f"a Google service account (holding {role} on the bucket) that the pods' Kubernetes "
                             "ServiceAccount acts as; only where the cluster's Workload Identity is set up that way "
                             "(default: none: the Kubernetes ServiceAccount is granted the role itself)")


def build_parser() -> argparse.ArgumentParser:
    """The launcher's parser."""
    parser = Parser(prog="python -m trainer.launch", description="Run trainer jobs on Kubernetes.")
    _cluster_options(parser, defaults=True)
    commands = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    def command(name: str, text: str, description: str | None = None, **kwargs: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=text, description=description or text, **kwargs)
        _cluster_options(sub, defaults=False)
        return sub

    submit = command("submit", "submit a training job; prints the run name",
                     "Submit a training run: a Job on one node, a JobSet for --workers > 1. "
                     "Trainer flags (--model, --epochs, ...) go after `--`.",
                     usage="%(prog)s --image IMAGE --output-dir gs://BUCKET/PREFIX [options] [-- TRAINER FLAGS]")
    run = submit.add_argument_group("the run")
    resources = submit.add_argument_group("resources")
    scheduling = submit.add_argument_group("scheduling (Kueue, limits, retries)")
    run.add_argument("--image", required=True, help="trainer image, e.g. REGISTRY/mnist-trainer:TAG (required)")
    run.add_argument("--output-dir", required=True, help="gs://BUCKET/PREFIX the run is written to (required)")
    run.add_argument("--run", help="run name (default: generated from model, dataset and time)")
    resources.add_argument("--gpus", type=int, default=1,
                        help="GPUs per worker (MirroredStrategy over them; default: %(default)s)")
    resources.add_argument("--workers", type=int, default=1,
                        help="nodes; >1 = a JobSet, MultiWorkerMirroredStrategy (default: %(default)s)")
    resources.add_argument("--gpu-type", default="",
                        help="GKE accelerator node label, e.g. nvidia-l4 (default: any GPU node)")
    scheduling.add_argument("--queue", default="",
                        help="Kueue LocalQueue: the job waits until the whole group fits (default: not queued)")
    scheduling.add_argument("--priority", default="", help="Kueue WorkloadPriorityClass of the job (default: none)")
    scheduling.add_argument("--max-runtime", type=int, default=0,
                        help="seconds a run (for --workers > 1: each attempt of the group) may take; 0 = no limit "
                             "(default: %(default)s)")
    scheduling.add_argument("--retries", type=int, default=JobSpec.retries,
                        help="crashes retried before the run fails (preemption and lost peers are not counted; "
                             "default: %(default)s)")
    resources.add_argument("--spot", action="store_true",
                        help=f"run on GKE Spot VMs only (node label and taint {SPOT_LABEL}=true); the pods get the "
                             f"{SPOT_GRACE_SECONDS} s a Spot preemption grants them to save and ship (default: off)")
    _gcp_service_account(run, "roles/storage.objectUser")
    run.add_argument("--dry-run", action="store_true",
                        help="print the YAML that would be sent; no cluster needed (default: off)")

    for name, text in (("status", "show a run's state, restarts and each pod's last exit code"),
                       ("cancel", "delete a run: its JobSet or Job, and their pods"),
                       ("events", "recent Kubernetes events of a run's objects")):
        command(name, text).add_argument("run")
    wait = command("wait", "block until a run ends: exit 0 if it succeeded, 4 if it failed, 5 on --timeout")
    wait.add_argument("run")
    wait.add_argument("--timeout", type=float, default=0, help="seconds to wait; 0 = no limit (default: %(default)g)")
    wait.add_argument("--interval", type=float, default=10, help="seconds between checks (default: %(default)g)")
    logs = command("logs", "print a run's logs")
    logs.add_argument("run")
    logs.add_argument("--follow", "-f", action="store_true",
                      help="keep printing as the logs grow (default: off)")
    logs.add_argument("--worker", type=int, default=0, help="worker index of a multi-worker run (default: %(default)s)")
    logs.add_argument("--previous", action="store_true",
                      help="the previous attempt of that worker, if kept (default: off)")
    command("list", "list runs in the namespace")
    render = command("render", "write the example manifests of k8s/ (no cluster needed)")
    render.add_argument("folder", nargs="?", default="k8s")

    board = command("tensorboard", "deploy one shared TensorBoard over all runs")
    board.add_argument("--image", required=True, help="an image with TensorBoard, e.g. the trainer's (required)")
    board.add_argument("--logdir", required=True, help="gs://BUCKET/PREFIX holding the runs (required)")
    _gcp_service_account(board, "roles/storage.objectViewer")
    board.add_argument("--dry-run", action="store_true",
                       help="print the YAML that would be sent; no cluster needed (default: off)")
    return parser


def parse(argv: Sequence[str]) -> argparse.Namespace:
    """Launcher options before `--`, trainer flags after it; a trainer flag given too early gets a hint."""
    argv = list(argv)
    split = argv.index("--") if "--" in argv else len(argv)
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv[:split])
    trainer_args = argv[split + 1:]
    if unknown:
        early = [a for a in unknown if a.split("=")[0] in flag_names()]
        if args.command == "submit" and early:
            fail(f"{early[0].split('=')[0]} is a trainer flag: put trainer flags after `--`, "
                             f"e.g. submit --image I --output-dir gs://B/P -- {' '.join(unknown)}")
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if trainer_args and args.command != "submit":
        parser.error(f"unrecognized arguments: -- {' '.join(trainer_args)}")
    args.trainer_args = trainer_args
    return args


def job_spec(args: argparse.Namespace) -> JobSpec:
    """Validate the launcher and trainer flags without TensorFlow and turn them into a JobSpec."""
    for given in args.trainer_args:
        if given.split("=")[0] in LAUNCHER_FLAGS:
            raise ConfigError(f"{given.split('=')[0]} is set by the launcher, from submit's own flags (--output-dir, "
                              "--run, --gpus) and the pod it builds")
    if not args.output_dir.startswith("gs://") or len(args.output_dir) <= len("gs://"):
        raise ConfigError(f"--output-dir {args.output_dir!r} is not a bucket: a pod's own disk is gone when the "
                          "pod ends; give gs://BUCKET/PREFIX")
    if args.gpus < 0 or args.workers < 1 or args.max_runtime < 0 or args.retries < 0:
        raise ConfigError("--gpus, --max-runtime and --retries must be >= 0 and --workers >= 1")
    trainer_flags = Parser(prog="trainer flags (after --)")
    add_flags(trainer_flags)
    config = config_from_args(trainer_flags.parse_args(args.trainer_args), run=args.run, output_dir=args.output_dir)
    run = config.run.run
    problem = run_name_problem(run, args.workers)
    if problem:
        raise ConfigError(f"--run {run!r} {problem}")
    check_replicas(config.run.batch_size, args.workers * max(args.gpus, 1))
    return JobSpec(run=run, image=args.image, output_dir=args.output_dir, trainer_args=tuple(args.trainer_args),
                   gpus=args.gpus, workers=args.workers, gpu_type=args.gpu_type, namespace=args.namespace,
                   queue=args.queue, priority=args.priority, max_runtime=args.max_runtime, retries=args.retries,
                   spot=args.spot)


def _cluster(args: argparse.Namespace) -> Cluster:
    return Cluster(args.context, args.request_timeout)


def cmd_submit(args: argparse.Namespace) -> int:
    spec = job_spec(args)
    objects = [service_account(spec.namespace, args.gcp_service_account)] + training_objects(spec)
    if args.dry_run:
        print(to_yaml(objects), end="")
        return 0
    cluster = _cluster(args)
    cluster.require_version()
    if spec.workers > 1:
        cluster.require_jobset()
    if spec.queue:
        cluster.require_queue(spec.namespace, spec.queue)
    _apply_service_account(cluster, objects[0])
    for obj in objects[1:]:
        cluster.create(obj)
    print(spec.run)
    return 0


def _apply_service_account(cluster: Cluster, account: dict) -> None:
    """Create the ServiceAccount; change an existing one only to set the --gcp-service-account annotation (which
    needs the right to patch it), never to drop an annotation someone else set."""
    if account["metadata"].get("annotations"):
        cluster.replace(account)
    else:
        cluster.create(account, exist_ok=True)


def cmd_status(args: argparse.Namespace) -> int:
    cluster = _cluster(args)
    state = cluster.state(args.namespace, args.run)
    what = "group restarts" if state.kind == "JobSet" else "failed pods"
    print(f"{args.run}: {state.state} ({state.kind}; {what} {state.restarts}, {state.counted} counted of "
          f"{state.limit} allowed)")
    if state.reason or state.message:
        print(f"  {state.reason}: {state.message}".rstrip(": "))
    for pod in cluster.pods(args.namespace, args.run):
        print(f"  {pod_summary(pod)}")
    return 0


def cmd_wait(args: argparse.Namespace) -> int:
    cluster = _cluster(args)
    deadline = time.monotonic() + args.timeout if args.timeout > 0 else None
    while True:
        state = cluster.state(args.namespace, args.run)
        if state.finished:
            detail = f" ({state.reason}: {state.message})" if state.reason or state.message else ""
            print(f"{args.run}: {state.state}{detail}")
            return 0 if state.state == "Succeeded" else EXIT_RUN_FAILED
        if deadline is not None and time.monotonic() + args.interval > deadline:
            time.sleep(max(0.0, deadline - time.monotonic()))
            if cluster.state(args.namespace, args.run).finished:
                continue
            print(f"error: {args.run} is still {state.state} after {args.timeout:g} s", file=sys.stderr)
            return EXIT_WAIT_TIMEOUT
        time.sleep(args.interval)


def cmd_events(args: argparse.Namespace) -> int:
    cluster = _cluster(args)
    events = cluster.events(args.namespace, args.run)
    if not events:
        cluster.workload(args.namespace, args.run)  # a one-line "not found" if there is no such run
        print(f"no events for {args.run} (Kubernetes keeps events for about an hour)")
    for event in events:
        involved = event.get("involvedObject") or {}
        count = f" (x{event['count']})" if (event.get("count") or 1) > 1 else ""
        print(f"{event_time(event)}  {event.get('type') or '':7} {involved.get('kind', '')}/{involved.get('name', '')}"
              f"  {event.get('reason') or ''}: {(event.get('message') or '').strip()}{count}")
    return 0


def cmd_logs(args: argparse.Namespace) -> int:
    cluster = _cluster(args)
    pods = [p for p in cluster.pods(args.namespace, args.run)
            if (p["metadata"].get("annotations") or {}).get(JOB_INDEX_ANNOTATION, "0") == str(args.worker)]
    if not pods:
        raise LaunchError(f"not found: no pods of run {args.run} (worker {args.worker}) in {args.namespace}")
    pod, previous = pods[-1], False
    if args.previous:
        restarted = any(c.get("restartCount") for c in (pod.get("status") or {}).get("containerStatuses") or [])
        if restarted:
            previous = True  # the same pod's previous container
        elif len(pods) > 1:
            pod = pods[-2]  # the previous pod of this worker (a Job's retry)
        else:
            raise LaunchError(f"no previous attempt of worker {args.worker} of {args.run} is kept (a group restart "
                              f"deletes the old pods); see `events {args.run}`")
    for chunk in cluster.logs(args.namespace, pod["metadata"]["name"], args.follow and not previous, previous):
        sys.stdout.write(chunk)
        sys.stdout.flush()
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    kind = _cluster(args).cancel(args.namespace, args.run)
    print(f"cancelled {args.run} ({kind} and its pods)")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    for name, state in _cluster(args).runs(args.namespace):
        print(f"{name}\t{state.kind}\t{state.state}\trestarts {state.restarts}\t{state.created}")
    return 0


def cmd_tensorboard(args: argparse.Namespace) -> int:
    objects = [service_account(args.namespace, args.gcp_service_account, TENSORBOARD),
               *tensorboard_objects(args.image, args.logdir, args.namespace)]
    if args.dry_run:
        print(to_yaml(objects), end="")
        return 0
    cluster = _cluster(args)
    _apply_service_account(cluster, objects[0])
    for obj in objects[1:]:
        cluster.replace(obj)
    name = objects[-1]["metadata"]["name"]
    print(f"TensorBoard deployed; open it with: kubectl -n {args.namespace} port-forward svc/{name} 6006:80")
    return 0


# The placeholders users replace (or that `make submit` fills in) in the example manifests of k8s/.
EXAMPLE = dict(image="REGION-docker.pkg.dev/PROJECT/mnist/mnist-trainer:TAG", output_dir="gs://BUCKET/runs")


def render_examples(folder: str) -> list[str]:
    """Write k8s/*.yaml from the same builders `submit` and `tensorboard` use; return the file names."""
    single = JobSpec(run="cnn-example", image=EXAMPLE["image"], output_dir=EXAMPLE["output_dir"],
                     trainer_args=("--model", "cnn"), gpus=4, gpu_type="nvidia-l4")
    multi = dataclasses.replace(single, run="cnn-multiworker-example", gpus=1, workers=2)
    files = {
        # As the GKE steps make them: granted their bucket roles directly by Workload Identity, unannotated.
        "serviceaccount.yaml": [service_account("default"), service_account("default", name=TENSORBOARD)],
        "job-single-node.yaml": training_objects(single),
        "jobset-multi-worker.yaml": training_objects(multi),
        "tensorboard.yaml": tensorboard_objects(EXAMPLE["image"], EXAMPLE["output_dir"]),
        # For a cluster's admin: what the people who run the launcher need in their namespace, and no more.
        "launcher-role.yaml": [launcher_role("default"), launcher_role_binding("default")],
    }
    os.makedirs(folder, exist_ok=True)
    for name, objects in files.items():
        with open(os.path.join(folder, name), "w") as f:
            f.write("# Generated by `make manifests` (python -m trainer.launch render); edit the builders, not this.\n")
            f.write(to_yaml(objects))
    return sorted(files)


def cmd_render(args: argparse.Namespace) -> int:
    for name in render_examples(args.folder):
        print(os.path.join(args.folder, name))
    return 0


COMMANDS = {"render": cmd_render, "submit": cmd_submit, "status": cmd_status, "wait": cmd_wait,
            "events": cmd_events, "logs": cmd_logs, "cancel": cmd_cancel, "list": cmd_list,
            "tensorboard": cmd_tensorboard}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `python -m trainer.launch`."""
    args = parse(sys.argv[1:] if argv is None else argv)
    try:
        return COMMANDS[args.command](args)
    except TrainerError as error:
        fail(str(error), error.exit_code)
