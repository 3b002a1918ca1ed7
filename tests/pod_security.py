"""The Kubernetes Pod Security Standards, "baseline" and "restricted" profiles, as the documentation states them
(kubernetes.io/docs/concepts/security/pod-security-standards, policy version 1.30+), checked on a pod spec."""

from __future__ import annotations

from typing import Any, Iterator

_RESTRICTED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
                       "projected", "secret"}
_SAFE_SYSCTLS = {"kernel.shm_rmid_forced", "net.ipv4.ip_local_port_range", "net.ipv4.ip_unprivileged_port_start",
                 "net.ipv4.tcp_syncookies", "net.ipv4.ping_group_range", "net.ipv4.ip_local_reserved_ports",
                 "net.ipv4.tcp_keepalive_time", "net.ipv4.tcp_fin_timeout", "net.ipv4.tcp_keepalive_intvl",
                 "net.ipv4.tcp_keepalive_probes"}
_SELINUX_TYPES = {"", "container_t", "container_init_t", "container_kvm_t", "container_engine_t"}
_BASELINE_CAPABILITIES = {"AUDIT_WRITE", "CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "KILL", "MKNOD",
                          "NET_BIND_SERVICE", "SETFCAP", "SETGID", "SETPCAP", "SETUID", "SYS_CHROOT"}


def pod_specs(obj: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, pod spec) of every pod template in a workload object (Pod, Job, Deployment, JobSet, ...)."""
    kind = obj.get("kind")
    if kind == "Pod":
        yield "spec", obj["spec"]
    elif kind == "JobSet":
        for job in obj["spec"]["replicatedJobs"]:
            yield f"replicatedJobs[{job['name']}]", job["template"]["spec"]["template"]["spec"]
    elif "template" in obj.get("spec", {}):
        yield "spec.template", obj["spec"]["template"]["spec"]


def violations(pod: dict[str, Any]) -> list[str]:
    """Every rule of the restricted profile (baseline included) that `pod` breaks; [] if it is admitted."""
    found = []
    pod_context = pod.get("securityContext", {})
    containers = [*pod.get("initContainers", []), *pod.get("containers", []), *pod.get("ephemeralContainers", [])]
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(key):
            found.append(f"host namespaces: {key}")
    for volume in pod.get("volumes", []):
        kind = next(k for k in volume if k != "name")
        if kind not in _RESTRICTED_VOLUMES:
            found.append(f"volume types: {volume['name']} is {kind}")
    for sysctl in pod_context.get("sysctls", []):
        if sysctl["name"] not in _SAFE_SYSCTLS:
            found.append(f"sysctls: {sysctl['name']}")

    def level(container: dict[str, Any], key: str) -> Any:
        return container.get("securityContext", {}).get(key, pod_context.get(key))

    for container in containers:
        name, context = container["name"], container.get("securityContext", {})
        if (level(container, "windowsOptions") or {}).get("hostProcess"):
            found.append(f"HostProcess: {name}")
        if context.get("privileged"):
            found.append(f"privileged: {name}")
        if any(port.get("hostPort") for port in container.get("ports", [])):
            found.append(f"host ports: {name}")
        if (level(container, "appArmorProfile") or {}).get("type", "RuntimeDefault") not in (
                "RuntimeDefault", "Localhost"):
            found.append(f"AppArmor: {name}")
        selinux = level(container, "seLinuxOptions") or {}
        if selinux.get("type", "") not in _SELINUX_TYPES or selinux.get("user") or selinux.get("role"):
            found.append(f"SELinux: {name}")
        if context.get("procMount", "Default") != "Default":
            found.append(f"/proc mount type: {name}")
        if context.get("allowPrivilegeEscalation") is not False:
            found.append(f"privilege escalation: {name} must set allowPrivilegeEscalation false")
        if level(container, "runAsNonRoot") is not True:
            found.append(f"running as non-root: {name} (runAsNonRoot true, in the pod or the container)")
        if level(container, "runAsUser") == 0:
            found.append(f"running as non-root user: {name} has runAsUser 0")
        seccomp = (level(container, "seccompProfile") or {}).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            found.append(f"seccomp: {name} has {seccomp or 'no profile'} (RuntimeDefault or Localhost)")
        capabilities = context.get("capabilities", {})
        if "ALL" not in capabilities.get("drop", []):
            found.append(f"capabilities: {name} must drop ALL")
        added = set(capabilities.get("add", []))
        if added - {"NET_BIND_SERVICE"}:
            found.append(f"capabilities: {name} adds {sorted(added - {'NET_BIND_SERVICE'})}")
        if added - _BASELINE_CAPABILITIES:
            found.append(f"capabilities (baseline): {name} adds {sorted(added - _BASELINE_CAPABILITIES)}")
    return found
