"""A real Kubernetes control plane on 127.0.0.1, from the binaries `make cluster-bin` builds out of the pinned
modules in tests/cluster/: etcd, kube-apiserver (RBAC, Pod Security admission), kube-controller-manager,
kube-scheduler, KWOK (two simulated GPU nodes; pods run nothing), and the JobSet and Kueue controllers with their
CRDs and webhooks. `python -m tests.cluster.control_plane up|down` (make cluster, make cluster-down).

Every process runs in its own session and is recorded in state.json, so `down` stops them all even after a
failed `up`. Each component must answer its health check before the next starts."""

from __future__ import annotations

import base64
import json
import os
import signal
import ssl
import subprocess
import sys
import time
import urllib.request
from typing import Any, Callable

import yaml

from tests.certs import Authority, private_key_pem
from tests.gcs import free_port

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))

BUILD = os.path.abspath(os.environ.get("CLUSTER_DIR", os.path.join(ROOT, "build", "cluster")))
BIN = os.path.abspath(os.environ.get("CLUSTER_BIN", os.path.join(ROOT, "build", "cluster", "bin")))
LOGS = os.path.join(BUILD, "logs")
STATE = os.path.join(BUILD, "state.json")
KUBECONFIG = os.path.join(BUILD, "kubeconfig")
NAMESPACE = "default"  # enforces the "restricted" Pod Security Standard; has the LocalQueue `default`
QUEUE = "default"
NODES = 2
GPUS_PER_NODE = 4
GPU = "nvidia.com/gpu"
# As GKE labels and taints its L4 nodes (the accelerator label; NVIDIA's device plugin's taint).
GPU_NODE_LABELS = {"cloud.google.com/gke-accelerator": "nvidia-l4", "cloud.google.com/gke-nodepool": "gpus"}
GPU_TAINT = {"key": GPU, "value": "present", "effect": "NoSchedule"}
FAKE_NODE = ("kwok.x-k8s.io/node", "fake")
STAGES = os.path.join(HERE, "stages.yaml")  # ours; KWOK's own are added from its module (KWOK_STAGES)
KWOK_STAGES = ("kustomize/stage/node/fast/node-initialize.yaml", "kustomize/stage/node/heartbeat/node-heartbeat.yaml",
               "kustomize/stage/pod/fast/pod-ready.yaml", "kustomize/stage/pod/chaos/pod-container-running-failed.yaml")
# What `kubectl logs` (and `mnist-launch logs`) shows of any trainer container: KWOK serves this file.
POD_LOG = os.path.join(BUILD, "trainer.log")
POD_LOG_TEXT = "a pod simulated by KWOK: nothing ran here; this is the log KWOK serves for every trainer container\n"
KUEUE_METRICS_CERTS = "/etc/kueue/metrics/certs"  # fixed in Kueue's main.go when it does not manage certificates


class ComponentFailed(Exception):
    """A component did not start or answer its health check: one line naming it and its log."""

    def __init__(self, name: str, detail: str) -> None:
        super().__init__(f"{name} did not become healthy ({detail}); its log: {os.path.join(LOGS, name + '.log')}")


def _module_dir(name: str) -> str:
    """Where `go mod download` put a module the wrappers pin (read from the wrapper's go.mod)."""
    wrapper = {"sigs.k8s.io/jobset": "jobset", "sigs.k8s.io/kueue": "kueue", "sigs.k8s.io/kwok": "kwok"}[name]
    out = subprocess.run(["go", "list", "-m", "-json", name], cwd=os.path.join(HERE, wrapper), check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out)["Dir"]


def can_write_kueue_certs() -> bool:
    """True if this user can write Kueue's fixed metrics-certificate folder (or make it)."""
    folder = KUEUE_METRICS_CERTS
    while not os.path.exists(folder):
        folder = os.path.dirname(folder)
    return os.access(folder, os.W_OK)


class ControlPlane:
    """The processes of one control plane, their ports, certificates and state file."""

    def __init__(self) -> None:
        self.processes: dict[str, int] = {}
        self.ports: dict[str, int] = {}
        self.pki = os.path.join(BUILD, "pki")

    # --- processes ---

    def _save(self) -> None:
        with open(STATE, "w") as f:
            json.dump({"pids": self.processes, "ports": self.ports}, f, indent=2)

    def _start(self, name: str, argv: list[str], healthy: Callable[[], bool], timeout: float = 120) -> None:
        log = open(os.path.join(LOGS, f"{name}.log"), "w")
        process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True, cwd=BUILD)
        self.processes[name] = process.pid
        self._save()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise ComponentFailed(name, f"exited with code {process.returncode}")
            try:
                if healthy():
                    return
            except OSError:
                pass
            time.sleep(0.5)
        raise ComponentFailed(name, f"no healthy answer within {timeout:g} s")

    def _https(self, url: str, client: bool = False, verify: bool = True) -> bool:
        context = ssl.create_default_context(cafile=os.path.join(self.pki, "ca.crt")) if verify else \
            ssl._create_unverified_context()
        if client:
            context.load_cert_chain(os.path.join(self.pki, "admin.crt"), os.path.join(self.pki, "admin.key"))
        with urllib.request.urlopen(url, context=context, timeout=5) as response:
            return response.status == 200

    # --- certificates and configuration ---

    def _certificates(self) -> None:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ec

        authority = Authority(self.pki, "mnist-trainer local cluster CA")
        authority.issue("apiserver", hosts=("127.0.0.1", "localhost", "kubernetes", "kubernetes.default",
                                            "kubernetes.default.svc", "10.0.0.1"))
        authority.issue("admin", organization="system:masters")
        authority.issue("webhooks", hosts=("127.0.0.1",))
        authority.issue("kwok", hosts=("127.0.0.1",))
        key = ec.generate_private_key(ec.SECP256R1())
        with open(os.path.join(self.pki, "sa.key"), "wb") as f:
            f.write(private_key_pem(key))
        with open(os.path.join(self.pki, "sa.pub"), "wb") as f:
            f.write(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                  serialization.PublicFormat.SubjectPublicKeyInfo))
        self._serving_pair(os.path.join(self.pki, "webhook-server"))

    def _serving_pair(self, folder: str) -> None:
        """The webhooks' certificate and key as tls.crt and tls.key in `folder`, where controller-runtime reads them."""
        os.makedirs(folder, exist_ok=True)
        for ours, theirs in (("webhooks.crt", "tls.crt"), ("webhooks.key", "tls.key")):
            with open(os.path.join(self.pki, ours), "rb") as src, open(os.path.join(folder, theirs), "wb") as dst:
                dst.write(src.read())

    def _base64(self, name: str) -> str:
        """A file of the PKI folder, base64-encoded (kubeconfig data, a webhook's caBundle)."""
        with open(os.path.join(self.pki, name), "rb") as f:
            return base64.b64encode(f.read()).decode()

    def _kubeconfig(self) -> None:
        config = {
            "apiVersion": "v1", "kind": "Config", "current-context": "mnist-local",
            "clusters": [{"name": "mnist-local", "cluster": {"server": f"https://127.0.0.1:{self.ports['apiserver']}",
                                                             "certificate-authority-data": self._base64("ca.crt")}}],
            "users": [{"name": "admin", "user": {"client-certificate-data": self._base64("admin.crt"),
                                                 "client-key-data": self._base64("admin.key")}}],
            "contexts": [{"name": "mnist-local", "context": {"cluster": "mnist-local", "user": "admin",
                                                             "namespace": NAMESPACE}}],
        }
        with open(KUBECONFIG, "w") as f:
            yaml.safe_dump(config, f)
        os.chmod(KUBECONFIG, 0o600)

    # --- the components, in order ---

    def up(self) -> None:
        """Start every component, each healthy before the next; leave the queues, nodes and kubeconfig."""
        for folder in (BUILD, LOGS):
            os.makedirs(folder, exist_ok=True)
        missing = [b for b in ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kwok",
                               "jobset", "kueue") if not os.path.exists(os.path.join(BIN, b))]
        if missing:
            raise ComponentFailed(missing[0], f"no binary in {BIN}: run make cluster-bin")
        for name in ("etcd", "etcd-peer", "apiserver", "controller-manager", "scheduler", "kwok", "jobset-webhook",
                     "jobset-probe", "kueue-webhook", "kueue-probe", "kueue-metrics"):
            self.ports[name] = free_port()
        self._certificates()
        self._kubeconfig()
        pki = lambda name: os.path.join(self.pki, name)  # noqa: E731
        etcd = f"http://127.0.0.1:{self.ports['etcd']}"
        data = os.path.join(BUILD, "etcd-data")
        subprocess.run(["rm", "-rf", data], check=True)
        self._start("etcd", [os.path.join(BIN, "etcd"), "--name", "local", "--data-dir", data,
                             "--listen-client-urls", etcd, "--advertise-client-urls", etcd,
                             "--listen-peer-urls", f"http://127.0.0.1:{self.ports['etcd-peer']}",
                             "--initial-advertise-peer-urls", f"http://127.0.0.1:{self.ports['etcd-peer']}",
                             "--initial-cluster", f"local=http://127.0.0.1:{self.ports['etcd-peer']}",
                             "--unsafe-no-fsync", "--quota-backend-bytes", str(2 << 30)],
                    lambda: json.loads(urllib.request.urlopen(f"{etcd}/health", timeout=5).read())["health"] == "true")
        api = f"https://127.0.0.1:{self.ports['apiserver']}"
        self._start("kube-apiserver", [
            os.path.join(BIN, "kube-apiserver"), "--etcd-servers", etcd,
            "--bind-address", "127.0.0.1", "--advertise-address", "127.0.0.1",
            "--secure-port", str(self.ports["apiserver"]),
            "--tls-cert-file", pki("apiserver.crt"), "--tls-private-key-file", pki("apiserver.key"),
            "--client-ca-file", pki("ca.crt"), "--authorization-mode", "Node,RBAC",
            "--service-account-issuer", "https://kubernetes.default.svc.cluster.local",
            "--service-account-key-file", pki("sa.pub"), "--service-account-signing-key-file", pki("sa.key"),
            "--service-cluster-ip-range", "10.0.0.0/24",
            # kubectl logs: the API server asks the node's "kubelet", which KWOK serves.
            "--kubelet-client-certificate", pki("admin.crt"), "--kubelet-client-key", pki("admin.key"),
            "--kubelet-preferred-address-types", "InternalIP",
            "--cert-dir", os.path.join(BUILD, "apiserver")],
            lambda: self._https(f"{api}/readyz", client=True))
        kube = ["--kubeconfig", KUBECONFIG, "--leader-elect=false", "--bind-address", "127.0.0.1"]
        self._start("kube-controller-manager", [
            os.path.join(BIN, "kube-controller-manager"), *kube, "--secure-port", str(self.ports["controller-manager"]),
            "--service-account-private-key-file", pki("sa.key"), "--root-ca-file", pki("ca.crt"),
            "--cert-dir", os.path.join(BUILD, "controller-manager")],
            lambda: self._https(f"https://127.0.0.1:{self.ports['controller-manager']}/healthz", verify=False))
        self._start("kube-scheduler", [
            os.path.join(BIN, "kube-scheduler"), *kube, "--secure-port", str(self.ports["scheduler"]),
            "--cert-dir", os.path.join(BUILD, "scheduler")],
            lambda: self._https(f"https://127.0.0.1:{self.ports['scheduler']}/healthz", verify=False))

        from kubernetes import client, config

        config.load_kube_config(KUBECONFIG)
        self.api = client.ApiClient()
        self._namespaces()
        self._nodes()
        kwok = _module_dir("sigs.k8s.io/kwok")
        settings = os.path.join(BUILD, "kwok-config.yaml")
        with open(POD_LOG, "w") as f:  # as a container runtime writes it (CRI): time, stream, full line, text
            stamp = time.strftime("%Y-%m-%dT%H:%M:%S.000000000Z", time.gmtime())
            f.write("".join(f"{stamp} stderr F {line}\n" for line in POD_LOG_TEXT.splitlines()))
        logs = {"apiVersion": "kwok.x-k8s.io/v1alpha1", "kind": "ClusterLogs", "metadata": {"name": "trainer"},
                "spec": {"selector": {"matchNamespaces": [NAMESPACE]},
                         "logs": [{"containers": ["trainer"], "logsFile": POD_LOG, "previousLogsFile": POD_LOG}]}}
        with open(settings, "w") as out:
            out.write("\n---\n".join([*(open(p).read() for p in [*(os.path.join(kwok, s) for s in KWOK_STAGES),
                                                                    STAGES]), yaml.safe_dump(logs)]))
        self._start("kwok", [
            os.path.join(BIN, "kwok"), "--kubeconfig", KUBECONFIG, "--config", settings,
            "--manage-all-nodes=false", f"--manage-nodes-with-annotation-selector={FAKE_NODE[0]}={FAKE_NODE[1]}",
            "--node-ip", "127.0.0.1", "--node-port", str(self.ports["kwok"]),
            "--server-address", f"127.0.0.1:{self.ports['kwok']}",
            "--tls-cert-file", pki("kwok.crt"), "--tls-private-key-file", pki("kwok.key"),
            "--cidr", "10.244.0.0/16"],
            lambda: self._https(f"https://127.0.0.1:{self.ports['kwok']}/healthz", verify=False) and self._nodes_ready())
        self._jobset()
        self._kueue()

    def _namespaces(self) -> None:
        from kubernetes import client

        core = client.CoreV1Api(self.api)
        core.patch_namespace(NAMESPACE, {"metadata": {"labels": {
            "pod-security.kubernetes.io/enforce": "restricted", "pod-security.kubernetes.io/enforce-version": "latest"}}})
        for name in ("jobset-system", "kueue-system"):
            core.create_namespace({"metadata": {"name": name}})

    def _nodes(self) -> None:
        """The GPU nodes, and one node without GPUs or taints (GKE's default pool: TensorBoard runs there)."""
        from kubernetes import client

        core = client.CoreV1Api(self.api)
        nodes = [(f"gpu-node-{i}", GPU_NODE_LABELS, [GPU_TAINT], {"cpu": "48", "memory": "192Gi",
                                                                  GPU: str(GPUS_PER_NODE)}) for i in range(NODES)]
        nodes.append(("cpu-node-0", {"cloud.google.com/gke-nodepool": "default-pool"}, [],
                      {"cpu": "4", "memory": "16Gi"}))
        for name, labels, taints, resources in nodes:
            core.create_node({"metadata": {
                "name": name, "annotations": {FAKE_NODE[0]: FAKE_NODE[1], "node.alpha.kubernetes.io/ttl": "0"},
                "labels": {**labels, "kubernetes.io/hostname": name, "kubernetes.io/os": "linux",
                           "kubernetes.io/arch": "amd64", "type": "kwok"}},
                "spec": {"taints": taints},
                "status": {"allocatable": {**resources, "pods": "110"}, "capacity": {**resources, "pods": "110"}}})

    def _nodes_ready(self) -> bool:
        from kubernetes import client

        nodes = client.CoreV1Api(self.api).list_node().items
        return len(nodes) == NODES + 1 and all(any(c.type == "Ready" and c.status == "True"
                                               for c in (n.status.conditions or [])) for n in nodes)

    def _webhooks(self, manifest: str, port: int, prefix: str) -> list[dict[str, Any]]:
        """A project's webhook configurations, pointed at its server on 127.0.0.1 and trusting our CA."""
        bundle = self._base64("ca.crt")
        objects = [o for o in yaml.safe_load_all(open(manifest)) if o]
        for obj in objects:
            obj["metadata"]["name"] = prefix + obj["metadata"]["name"]
            for hook in obj["webhooks"]:
                path = hook["clientConfig"]["service"]["path"]
                hook["clientConfig"] = {"url": f"https://127.0.0.1:{port}{path}", "caBundle": bundle}
        return objects

    def _apply(self, objects: list[dict[str, Any]]) -> None:
        from kubernetes import utils

        for obj in objects:
            utils.create_from_dict(self.api, obj)

    def _controller(self, name: str, module: str, crds: list[str], webhooks: str, settings: dict[str, Any],
                    conversion: tuple[str, ...] = ()) -> None:
        """Install a controller's CRDs and webhooks, then start it with `settings` as its configuration file."""
        port = self.ports[f"{name}-webhook"]
        bundle = self._base64("ca.crt")
        definitions = []
        for path in crds:
            crd = yaml.safe_load(open(os.path.join(module, path)))
            if crd["metadata"]["name"].split(".")[0] in conversion:
                crd["spec"]["conversion"] = {"strategy": "Webhook", "webhook": {
                    "clientConfig": {"url": f"https://127.0.0.1:{port}/convert", "caBundle": bundle},
                    "conversionReviewVersions": ["v1"]}}
            definitions.append(crd)
        self._apply(definitions)
        self._established([crd["metadata"]["name"] for crd in definitions], name)
        settings_file = os.path.join(BUILD, f"{name}-config.yaml")
        with open(settings_file, "w") as f:
            yaml.safe_dump(settings, f)
        # The webhooks only once the server answers: before that the API server would refuse what they guard.
        probe = self.ports[f"{name}-probe"]
        self._start(name, [os.path.join(BIN, name), "--config", settings_file, "--kubeconfig", KUBECONFIG],
                    lambda: urllib.request.urlopen(f"http://127.0.0.1:{probe}/readyz", timeout=5).status == 200)
        self._apply(self._webhooks(os.path.join(module, webhooks), port, f"{name}-"))

    def _established(self, names: list[str], owner: str, timeout: float = 60) -> None:
        """Wait until the API server serves every CRD named."""
        from kubernetes import client

        crds = client.ApiextensionsV1Api(self.api)
        deadline = time.monotonic() + timeout
        for name in names:
            while not any(c.type == "Established" and c.status == "True"
                          for c in crds.read_custom_resource_definition(name).status.conditions or []):
                if time.monotonic() > deadline:
                    raise ComponentFailed(owner, f"its CRD {name} was not established within {timeout:g} s")
                time.sleep(0.2)

    def _jobset(self) -> None:
        module = _module_dir("sigs.k8s.io/jobset")
        self._controller("jobset", module, ["config/components/crd/bases/jobset.x-k8s.io_jobsets.yaml"],
                         "config/components/webhook/manifests.yaml", {
                             "apiVersion": "config.jobset.x-k8s.io/v1alpha1", "kind": "Configuration",
                             "leaderElection": {"leaderElect": False},
                             "internalCertManagement": {"enable": False},
                             "webhook": {"port": self.ports["jobset-webhook"], "host": "127.0.0.1",
                                         "certDir": os.path.join(self.pki, "webhook-server")},
                             "metrics": {"bindAddress": "0"},
                             "health": {"healthProbeBindAddress": f"127.0.0.1:{self.ports['jobset-probe']}"}})

    def _kueue(self) -> None:
        module = _module_dir("sigs.k8s.io/kueue")
        bases = sorted(f"config/components/crd/bases/{n}" for n in os.listdir(os.path.join(
            module, "config/components/crd/bases")) if n.endswith(".yaml"))
        # Kueue reads its metrics certificate from a fixed folder when it does not make its own certificates.
        if not can_write_kueue_certs():
            raise ComponentFailed("kueue", f"it reads its metrics certificate from {KUEUE_METRICS_CERTS}, which "
                                           "this user cannot write (run as root)")
        self._serving_pair(KUEUE_METRICS_CERTS)
        self._controller("kueue", module, bases, "config/components/webhook/manifests.yaml", {
            "apiVersion": "config.kueue.x-k8s.io/v1beta2", "kind": "Configuration", "namespace": "kueue-system",
            "manageJobsWithoutQueueName": False,
            "leaderElection": {"leaderElect": False},
            "internalCertManagement": {"enable": False},
            "webhook": {"port": self.ports["kueue-webhook"], "host": "127.0.0.1",
                        "certDir": os.path.join(self.pki, "webhook-server")},
            "metrics": {"bindAddress": f"127.0.0.1:{self.ports['kueue-metrics']}"},
            "health": {"healthProbeBindAddress": f"127.0.0.1:{self.ports['kueue-probe']}"},
            "integrations": {"frameworks": ["batch/job", "jobset.x-k8s.io/jobset"]},
            "featureGates": {"VisibilityOnDemand": False}},
            conversion=("localqueues", "clusterqueues", "cohorts", "workloads", "multikueueclusters"))
        self._queues()

    def _queues(self) -> None:
        from kubernetes import client

        custom = client.CustomObjectsApi(self.api)
        group, version = "kueue.x-k8s.io", "v1beta2"
        custom.create_cluster_custom_object(group, version, "resourceflavors", {
            "apiVersion": f"{group}/{version}", "kind": "ResourceFlavor", "metadata": {"name": "l4"},
            "spec": {"nodeLabels": {"cloud.google.com/gke-accelerator": "nvidia-l4"}}})
        quota = NODES * GPUS_PER_NODE
        custom.create_cluster_custom_object(group, version, "clusterqueues", {
            "apiVersion": f"{group}/{version}", "kind": "ClusterQueue", "metadata": {"name": "gpus"},
            "spec": {"namespaceSelector": {}, "resourceGroups": [{
                "coveredResources": ["cpu", "memory", GPU],
                "flavors": [{"name": "l4", "resources": [{"name": "cpu", "nominalQuota": str(NODES * 48)},
                                                         {"name": "memory", "nominalQuota": f"{NODES * 192}Gi"},
                                                         {"name": GPU, "nominalQuota": str(quota)}]}]}]}})
        custom.create_namespaced_custom_object(group, version, NAMESPACE, "localqueues", {
            "apiVersion": f"{group}/{version}", "kind": "LocalQueue", "metadata": {"name": QUEUE},
            "spec": {"clusterQueue": "gpus"}})


def _alive(pid: int) -> bool:
    """True while the process runs (a zombie, ended but not yet reaped by its parent, does not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def down() -> list[str]:
    """Stop every process the state file names, the last started first (etcd outlives its API server); the
    names of those stopped."""
    if not os.path.exists(STATE):
        return []
    with open(STATE) as f:
        pids = json.load(f)["pids"]
    stopped = []
    for name, pid in reversed(list(pids.items())):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if not f.read().startswith(BIN.encode()):
                    continue  # the pid was reused by another process
            os.killpg(pid, signal.SIGTERM)
        except (FileNotFoundError, ProcessLookupError):
            continue
        deadline = time.monotonic() + 5
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        try:
            os.killpg(pid, signal.SIGKILL)  # whatever is left of its session
        except ProcessLookupError:
            pass
        stopped.append(name)
    os.remove(STATE)
    return stopped


def main(argv: list[str]) -> int:
    """`up` (after stopping any earlier one) or `down`."""
    if argv not in (["up"], ["down"]):
        print("usage: python -m tests.cluster.control_plane up|down", file=sys.stderr)
        return 2
    down()
    if argv == ["down"]:
        return 0
    try:
        ControlPlane().up()
    except ComponentFailed as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"local cluster up: export KUBECONFIG={os.path.relpath(KUBECONFIG, os.getcwd())}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
