"""Where a model came from: the code's commit, and the Ray job that ran it."""

from __future__ import annotations

import json
import os
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the checkout


def git_commit() -> str | None:
    """$MNIST_GIT_COMMIT (set by scripts/submit_retrain.sh: a submitted working dir has no .git),
    else this checkout's HEAD, with -dirty when tracked files differ from it."""
    if os.environ.get("MNIST_GIT_COMMIT"):
        return os.environ["MNIST_GIT_COMMIT"]
    try:
        head = subprocess.run(["git", "-C", ROOT, "rev-parse", "HEAD"], capture_output=True,
                              text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", ROOT, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if head.returncode:
        return None
    return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def job_tags() -> dict[str, str]:
    """The Ray job's ids, on the driver after Ray is up: the submission id of `ray job submit`
    (from the job config Ray hands the entrypoint) and Ray's own job id."""
    import ray

    tags = {"ray.job_id": ray.get_runtime_context().get_job_id()}
    try:
        metadata = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")).get("metadata") or {}
    except ValueError:
        metadata = {}
    if metadata.get("job_submission_id"):
        tags["ray.submission_id"] = metadata["job_submission_id"]
    return tags
