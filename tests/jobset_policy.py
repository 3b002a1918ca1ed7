"""What the Kubernetes Job controller and the JobSet controller do with a failed worker pod, read from
the manifest itself: the worker Job's podFailurePolicy gives the Job's failure reason and message, and
the JobSet's failurePolicy rules (first match, RE2-style unanchored patterns) pick the action.

Kept only for tests/group.py, the group runner of the process trials: there real trainer processes end, which
no pod of the local control plane can run (KWOK runs nothing). tests/test_cluster.py checks that every verdict
here is what the real Job and JobSet controllers do."""

from __future__ import annotations

import re


def job_failure(jobset: dict, exit_code: int | None = None, disrupted: bool = False) -> tuple[str, str]:
    """(reason, message) the Job controller gives the worker Job when one pod fails this way."""
    job = jobset["spec"]["replicatedJobs"][0]["template"]["spec"]
    for index, rule in enumerate(job["podFailurePolicy"]["rules"]):
        on_codes = rule.get("onExitCodes")
        if disrupted and rule.get("onPodConditions"):
            match = "Pod default/p has condition DisruptionTarget"
        elif on_codes and not disrupted and exit_code in on_codes["values"]:
            match = f"Container trainer for pod default/p failed with exit code {exit_code}"
        else:
            continue
        assert rule["action"] == "FailJob"  # every failure ends the worker Job; the JobSet decides
        return "PodFailurePolicy", f"{match} matching FailJob rule at index {index}"
    assert job["backoffLimit"] == 0
    return "BackoffLimitExceeded", "Job has reached the specified backoff limit"


def jobset_action(jobset: dict, reason: str, message: str) -> str:
    """The JobSet controller's choice: the first rule whose reasons and message patterns match."""
    for rule in jobset["spec"]["failurePolicy"]["rules"]:
        if reason in rule.get("onJobFailureReasons", [reason]) and (
                not rule.get("onJobFailureMessagePatterns")
                or any(re.search(p, message) for p in rule["onJobFailureMessagePatterns"])):
            return rule["action"]
    return "RestartJobSet"
