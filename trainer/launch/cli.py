"""`python -m trainer.launch submit|status|logs|cancel|list|tensorboard`: training jobs on Kubernetes."""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import sys
from typing import Sequence

import yaml

from trainer import cli as trainer_cli
from trainer.config import FIELD_SECTION, ConfigError, build_config
from trainer.launch.client import Cluster, LaunchError
from trainer.launch.manifests import JobSpec, service_account, tensorboard_objects, training_objects

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,48}[a-z0-9])?$")
_SET_BY_LAUNCHER = ("--output-dir", "--run", "--scratch-dir", "--grace-seconds")

class _Dumper(yaml.SafeDumper):
    def ignore_aliases(self, data: object) -> bool:
        return True  # plain YAML, as kubectl users write it


def to_yaml(objects: list[dict]) -> str:
    """Multi-document YAML of the objects, in order."""
    return yaml.dump_all(objects, Dumper=_Dumper, sort_keys=False)


def build_parser() -> argparse.ArgumentParser:
    """The launcher's parser."""
    parser = trainer_cli.Parser(prog="python -m trainer.launch", description="Run trainer jobs on Kubernetes.")
    parser.add_argument("--namespace", default="default")
    parser.add_argument("--context", help="kube context (default: the current one)")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=trainer_cli.Parser)

    submit = commands.add_parser("submit", help="submit a training job; prints the run name",
                                 description="Trainer flags (--model, --epochs, ...) go after `--`.")
    submit.add_argument("--image", required=True, help="trainer image, e.g. REGISTRY/mnist-trainer:TAG")
    submit.add_argument("--output-dir", required=True, help="gs://BUCKET/PREFIX the run is written to")
    submit.add_argument("--run", help="run name (default: generated from model, dataset and time)")
    submit.add_argument("--gpus", type=int, default=1, help="GPUs per worker (MirroredStrategy over them)")
    submit.add_argument("--workers", type=int, default=1, help="nodes; >1 = MultiWorkerMirroredStrategy")
    submit.add_argument("--gpu-type", default="", help="GKE accelerator node label, e.g. nvidia-l4")
    submit.add_argument("--gcp-service-account", default="", help="Google service account for Workload Identity")
    submit.add_argument("--dry-run", action="store_true", help="print the YAML that would be sent; no cluster needed")
    submit.add_argument("trainer_args", nargs=argparse.REMAINDER, help="-- then trainer flags")

    for name, text in (("status", "show a run's Job and pods"), ("cancel", "delete a run's Job and pods")):
        command = commands.add_parser(name, help=text)
        command.add_argument("run")
    logs = commands.add_parser("logs", help="print a run's logs")
    logs.add_argument("run")
    logs.add_argument("--follow", "-f", action="store_true")
    logs.add_argument("--worker", type=int, default=0, help="worker index of a multi-worker run")
    commands.add_parser("list", help="list runs in the namespace")
    render = commands.add_parser("render", help="write the example manifests of k8s/ (no cluster needed)")
    render.add_argument("folder", nargs="?", default="k8s")

    board = commands.add_parser("tensorboard", help="deploy one shared TensorBoard over all runs")
    board.add_argument("--image", required=True)
    board.add_argument("--logdir", required=True, help="gs://BUCKET/PREFIX holding the runs")
    board.add_argument("--dry-run", action="store_true")
    return parser

def job_spec(args: argparse.Namespace) -> JobSpec:
    """Validate the trainer flags without TensorFlow and turn the arguments into a JobSpec."""
    trainer_args = [a for a in args.trainer_args if a != "--"] if args.trainer_args[:1] == ["--"] else args.trainer_args
    for flag in trainer_args:
        if flag.split("=")[0] in _SET_BY_LAUNCHER:
            raise ConfigError(f"{flag.split('=')[0]} is set by the launcher; give it to `submit` instead")
    parsed = trainer_cli.build_parser().parse_args(["train", *trainer_args])
    config = build_config({k: v for k, v in vars(parsed).items() if k in FIELD_SECTION and k != "run"}
                          | {"run": args.run, "output_dir": args.output_dir})
    run = config.run.run
    if not _DNS_LABEL.match(run):
        raise ConfigError(f"--run {run!r} must be a DNS label: lowercase letters, digits and '-', at most 50")
    if args.gpus < 0 or args.workers < 1:
        raise ConfigError("--gpus must be >= 0 and --workers >= 1")
    replicas = args.workers * max(args.gpus, 1)
    if config.run.batch_size % replicas:
        raise ConfigError(f"global --batch-size {config.run.batch_size} is not divisible by {replicas} replicas")
    if args.workers > 1 and not args.output_dir.startswith("gs://"):
        raise ConfigError("multi-worker runs need a shared --output-dir gs://BUCKET/PREFIX")
    return JobSpec(run=run, image=args.image, output_dir=args.output_dir, trainer_args=tuple(trainer_args),
                   gpus=args.gpus, workers=args.workers, gpu_type=args.gpu_type, namespace=args.namespace)

def cmd_submit(args: argparse.Namespace) -> int:
    spec = job_spec(args)
    objects = [service_account(spec.namespace, args.gcp_service_account)] + training_objects(spec)
    if args.dry_run:
        print(to_yaml(objects), end="")
        return 0
    cluster = Cluster(args.context)
    cluster.create(objects[0], exist_ok=True)
    for obj in objects[1:]:
        cluster.create(obj)
    print(spec.run)
    return 0

def cmd_status(args: argparse.Namespace) -> int:
    cluster = Cluster(args.context)
    job = cluster.job(args.namespace, args.run)
    status = job.status
    conditions = [c.type for c in status.conditions or [] if c.status == "True"]
    state = conditions[-1] if conditions else ("Running" if status.active else "Pending")
    print(f"{args.run}: {state} (active {status.active or 0}, succeeded {status.succeeded or 0}, "
          f"failed {status.failed or 0})")
    for condition in status.conditions or []:
        print(f"  {condition.type}={condition.status} {condition.reason or ''} {condition.message or ''}".rstrip())
    for pod in cluster.pods(args.namespace, args.run):
        codes = [s.state.terminated.exit_code for s in pod.status.container_statuses or []
                 if s.state and s.state.terminated]
        exit_code = f" exit {codes[0]}" if codes else ""
        print(f"  pod {pod.metadata.name}: {pod.status.phase}{exit_code}")
    return 0

def cmd_logs(args: argparse.Namespace) -> int:
    cluster = Cluster(args.context)
    pods = [p for p in cluster.pods(args.namespace, args.run)
            if (p.metadata.annotations or {}).get("batch.kubernetes.io/job-completion-index", "0") == str(args.worker)]
    if not pods:
        raise LaunchError(f"not found: no pods of run {args.run} (worker {args.worker}) in {args.namespace}")
    for chunk in cluster.logs(args.namespace, pods[-1].metadata.name, args.follow):
        sys.stdout.write(chunk)
        sys.stdout.flush()
    return 0

def cmd_cancel(args: argparse.Namespace) -> int:
    Cluster(args.context).cancel(args.namespace, args.run)
    print(f"cancelled {args.run}")
    return 0

def cmd_list(args: argparse.Namespace) -> int:
    for job in Cluster(args.context).jobs(args.namespace):
        s = job.status
        state = next((c.type for c in s.conditions or [] if c.status == "True"), "Running" if s.active else "Pending")
        print(f"{job.metadata.name}\t{state}\t{job.metadata.creation_timestamp or ''}")
    return 0

def cmd_tensorboard(args: argparse.Namespace) -> int:
    objects = tensorboard_objects(args.image, args.logdir, args.namespace)
    if args.dry_run:
        print(to_yaml(objects), end="")
        return 0
    cluster = Cluster(args.context)
    for obj in objects:
        cluster.replace(obj)
    name = objects[1]["metadata"]["name"]
    print(f"TensorBoard deployed; open it with: kubectl -n {args.namespace} port-forward svc/{name} 6006:80")
    return 0

# The placeholders users replace (or that `make submit` fills in) in the example manifests of k8s/.
EXAMPLE = dict(image="REGION-docker.pkg.dev/PROJECT/mnist/mnist-trainer:TAG", output_dir="gs://BUCKET/runs",
               gcp_service_account="mnist-trainer@PROJECT.iam.gserviceaccount.com")


def render_examples(folder: str) -> list[str]:
    """Write k8s/*.yaml from the same builders `submit` and `tensorboard` use; return the file names."""
    single = JobSpec(run="cnn-example", image=EXAMPLE["image"], output_dir=EXAMPLE["output_dir"],
                     trainer_args=("--model", "cnn"), gpus=4, gpu_type="nvidia-l4")
    multi = dataclasses.replace(single, run="cnn-multiworker-example", gpus=1, workers=2)
    files = {
        "serviceaccount.yaml": [service_account("default", EXAMPLE["gcp_service_account"])],
        "job-single-node.yaml": training_objects(single),
        "job-multi-worker.yaml": training_objects(multi),
        "tensorboard.yaml": tensorboard_objects(EXAMPLE["image"], EXAMPLE["output_dir"]),
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


COMMANDS = {"render": cmd_render, "submit": cmd_submit, "status": cmd_status, "logs": cmd_logs, "cancel": cmd_cancel,
            "list": cmd_list, "tensorboard": cmd_tensorboard}

def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `python -m trainer.launch`."""
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except ConfigError as error:
        trainer_cli.fail(str(error))
    except LaunchError as error:
        trainer_cli.fail(str(error), error.code)
