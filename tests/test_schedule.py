"""The schedule files are valid, not just present: cron parses, YAML has the fields, systemd verifies,
and the submit script turns Ray's duplicate-id refusal into "already done"."""

from __future__ import annotations

import configparser
import os
import shlex
import shutil
import subprocess
from datetime import datetime, timezone

import pytest
import yaml
from croniter import croniter

from tests.conftest import ROOT
from trainer.promote import retrain

CRONTAB = ROOT / "scripts" / "retrain.crontab"
SUBMIT = ROOT / "scripts" / "submit_retrain.sh"
UNITS = ROOT / "scripts" / "systemd"
RAYCRONJOB = ROOT / "jobs" / "raycronjob.yaml"
INSTALL_DIR = "/opt/mnist-ray-train"  # where the crontab and units expect the checkout
NIGHT = datetime(2026, 11, 28, 3, 0, tzinfo=timezone.utc)

# Stands in for `ray`: records its arguments and environment, then answers as Ray 2.60 does.
FAKE_RAY = r"""#!/usr/bin/env bash
printf '%s\n' "$@" > "$FAKE_RAY_ARGS"
echo "RAY_AUTH_MODE=$RAY_AUTH_MODE" >> "$FAKE_RAY_ARGS"
case "$FAKE_RAY_MODE" in
  ok) echo "Job '$6' submitted successfully"; exit 0 ;;
  duplicate)  # the tail of the real `ray job submit` traceback for a reused id
    echo "RuntimeError: Request failed with status code 400: Traceback (most recent call last):"
    echo "ValueError: Job with submission_id $6 already exists. Please use a different submission_id."
    exit 1 ;;
  *) echo "ConnectionError: Could not connect to the cluster"; exit 1 ;;
esac
"""


def cron_jobs(path) -> list[tuple[str, str]]:
    """(5-field expression, command) per job line; comments and VAR=value lines skipped."""
    jobs = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" in line.split()[0]:
            continue
        fields = line.split(None, 5)
        assert len(fields) == 6, f"not '<5 fields> <command>': {line!r}"
        jobs.append((" ".join(fields[:5]), fields[5]))
    return jobs


def retrain_args(command: str) -> list[str]:
    """The arguments after `python jobs/retrain.py` in a shell command."""
    words = shlex.split(command)
    start = next(i for i in range(len(words) - 1)
                 if words[i].startswith("python") and words[i + 1] == "jobs/retrain.py")
    args = []
    for word in words[start + 2:]:
        if word in ("&&", ";", "|"):
            break
        args.append(word)
    return args


def test_crontab_is_nightly_and_runs_the_submit_script():
    jobs = cron_jobs(CRONTAB)
    assert len(jobs) == 1
    expression, command = jobs[0]
    assert len(expression.split()) == 5 and croniter.is_valid(expression)
    assert croniter(expression, NIGHT).get_next(datetime) == datetime(2026, 11, 29, 2, 0, tzinfo=timezone.utc)
    assert "%" not in command  # cron would cut the command there
    assert "bash scripts/submit_retrain.sh" in command and f"cd {INSTALL_DIR}" in command


@pytest.fixture
def fake_ray(tmp_path):
    ray = tmp_path / "ray"
    ray.write_text(FAKE_RAY)
    ray.chmod(0o755)
    runtime_env = tmp_path / "runtime_env.yaml"
    runtime_env.write_text("env_vars: {}\n")
    env = {**os.environ, "RAY": str(ray), "FAKE_RAY_ARGS": str(tmp_path / "args"),
           "RAY_ADDRESS": "http://127.0.0.1:8265", "MNIST_STORE": "/srv/mnist store",
           "MNIST_DATA": "/srv/data", "MNIST_RETRAIN_SLOT": "2026-11-28T02",
           "MNIST_RETRAIN_LOG_DIR": str(tmp_path / "logs"), "MNIST_RUNTIME_ENV": str(runtime_env)}
    env.pop("RAY_AUTH_MODE", None)

    def submit(mode: str, *extra: str) -> tuple[subprocess.CompletedProcess, list[str], str]:
        proc = subprocess.run(["bash", str(SUBMIT), *extra], env={**env, "FAKE_RAY_MODE": mode},
                              capture_output=True, text=True, timeout=60)
        args = (tmp_path / "args").read_text().splitlines()
        return proc, args, (tmp_path / "logs" / "submit.log").read_text()

    return submit


def test_submit_script_uses_the_slot_id_token_auth_and_a_valid_retrain_command(fake_ray):
    proc, args, log = fake_ray("ok", "--epochs", "3")
    assert proc.returncode == 0, proc.stderr
    assert args[:9] == ["job", "submit", "--address", "http://127.0.0.1:8265", "--submission-id",
                        "mnist-retrain-2026-11-28T02", "--runtime-env", args[7], "--working-dir"]
    assert args[9:11] == [".", "--no-wait"] and args[11] == "--"
    assert args[-1] == "RAY_AUTH_MODE=token"
    entrypoint = args[12:-1]
    assert entrypoint[0] == "env" and entrypoint[1].startswith("MNIST_GIT_COMMIT=")
    assert entrypoint[2:4] == ["python", "jobs/retrain.py"]
    parsed = retrain.build_parser().parse_args(entrypoint[4:])  # the job would accept these flags
    assert (parsed.store, parsed.data, parsed.epochs) == ("/srv/mnist store", "/srv/data", 3)
    assert "submitted; follow it with: ray job logs" in log and "mnist-retrain-2026-11-28T02" in log


def test_submit_script_treats_a_refused_duplicate_slot_as_already_done(fake_ray):
    proc, _, log = fake_ray("duplicate")
    assert proc.returncode == 0, proc.stderr
    assert "already done" in proc.stdout and "already exists" in log


def test_submit_script_fails_on_other_errors_and_keeps_the_output(fake_ray):
    proc, _, log = fake_ray("down")
    assert proc.returncode == 1
    assert "Could not connect" in proc.stderr and "Could not connect" in log


def test_submit_script_needs_its_settings(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MNIST_STORE")}
    proc = subprocess.run(["bash", str(SUBMIT)], env=env, capture_output=True, text=True, timeout=30)
    assert proc.returncode != 0 and "RAY_ADDRESS" in proc.stderr


def read_unit(path) -> configparser.ConfigParser:
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str  # systemd keys are case-sensitive
    unit.read(path)
    return unit


def test_systemd_units_have_the_required_keys():
    service = read_unit(UNITS / "mnist-retrain.service")
    timer = read_unit(UNITS / "mnist-retrain.timer")
    assert service["Service"]["Type"] == "oneshot"
    assert service["Service"]["ExecStart"].endswith(f"{INSTALL_DIR}/scripts/submit_retrain.sh")
    assert service["Service"]["WorkingDirectory"] == INSTALL_DIR
    assert service["Service"]["EnvironmentFile"] == "/etc/default/mnist-retrain"
    assert timer["Timer"]["Persistent"] == "true"
    assert timer["Timer"]["Unit"] == "mnist-retrain.service"
    assert timer["Install"]["WantedBy"] == "timers.target"
    calendar = timer["Timer"]["OnCalendar"]
    assert calendar == "*-*-* 02:00:00 UTC"
    if shutil.which("systemd-analyze"):
        proc = subprocess.run(["systemd-analyze", "calendar", calendar], capture_output=True, text=True)
        assert proc.returncode == 0 and "Next elapse" in proc.stdout


@pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="systemd-analyze is not installed")
def test_systemd_units_pass_systemd_analyze_verify(tmp_path):
    for name in ("mnist-retrain.service", "mnist-retrain.timer"):  # pointed at this checkout
        text = (UNITS / name).read_text().replace(INSTALL_DIR, str(ROOT))
        (tmp_path / name).write_text(text)
    proc = subprocess.run(["systemd-analyze", "verify", str(tmp_path / "mnist-retrain.service"),
                           str(tmp_path / "mnist-retrain.timer")], capture_output=True, text=True,
                          timeout=60)
    complaints = [line for line in (proc.stdout + proc.stderr).splitlines() if "mnist-retrain" in line]
    assert proc.returncode == 0 and not complaints, proc.stdout + proc.stderr


def test_raycronjob_is_a_nightly_utc_schedule_of_a_retrain_rayjob():
    doc = yaml.safe_load(RAYCRONJOB.read_text())
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayCronJob"
    assert doc["metadata"]["name"]
    spec = doc["spec"]
    assert len(spec["schedule"].split()) == 5 and croniter.is_valid(spec["schedule"])
    assert spec["timeZone"] == "Etc/UTC" and "concurrencyPolicy" not in spec  # no such field in the CRD
    job = spec["jobTemplate"]
    assert job["shutdownAfterJobFinishes"] is True
    parsed = retrain.build_parser().parse_args(retrain_args(job["entrypoint"]))
    cluster = job["rayClusterSpec"]
    assert cluster["authOptions"]["mode"] == "token"
    pods = [cluster["headGroupSpec"]] + cluster["workerGroupSpecs"]
    for pod in pods:  # every pod sees the store at the path the entrypoint names
        for container in pod["template"]["spec"]["containers"]:
            mounts = [m["mountPath"] for m in container["volumeMounts"]]
            assert any(parsed.store.startswith(m + "/") for m in mounts), (parsed.store, mounts)
            assert any(parsed.data.startswith(m + "/") for m in mounts)
    workers = sum(g["replicas"] for g in cluster["workerGroupSpecs"])
    assert workers >= parsed.num_workers
