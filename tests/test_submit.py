"""The job the way clusters run it: a real `ray start --head` on loopback (scripts/start_cluster.sh,
token auth on), a real `ray job submit` with jobs/runtime_env.yaml, stopped by scripts/stop_cluster.sh.

The cluster tests take about 2 minutes on 2 cores (one 2-epoch job on the committed sample).
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
import zipfile
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT, MlflowServer, free_port
from trainer.common.atomic import MODEL_FILES as OUTPUT_MODEL_FILES

RAY = Path(sys.executable).parent / "ray"  # the venv's ray, beside the interpreter running pytest
RUNTIME_ENV = ROOT / "jobs" / "runtime_env.yaml"
START, STOP = ROOT / "scripts" / "start_cluster.sh", ROOT / "scripts" / "stop_cluster.sh"
MODEL_FILES = (*OUTPUT_MODEL_FILES, "metrics.json")


def cluster_pids(temp_dir: str) -> list[int]:
    """Processes that inherited this cluster's marker from start_cluster.sh."""
    marker = f"MNIST_RAY_CLUSTER={temp_dir}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and marker in (entry / "environ").read_bytes().split(b"\0"):
                pids.append(int(entry.name))
        except OSError:  # gone, or not ours to read
            pass
    return pids


def script_env(temp_dir: str) -> dict:
    """Env for the scripts and clients: the venv's ray, a token file of this test's own."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN")}
    env.update(RAY=str(RAY), RAY_AUTH_TOKEN_PATH=os.path.join(temp_dir, "auth_token"),
               PATH=f"{RAY.parent}{os.pathsep}{env.get('PATH', '')}")
    return env


@pytest.fixture(scope="module")
def cluster():
    """A real head node on 127.0.0.1 with unique ports; always stopped, and checked to be gone."""
    temp_dir = tempfile.mkdtemp(prefix="mnray-", dir="/tmp")  # short: Ray's socket paths live under it
    env = script_env(temp_dir)
    dashboard_port = free_port()
    try:
        started = subprocess.run(
            ["bash", str(START), "--port", str(free_port()), "--dashboard-port", str(dashboard_port),
             "--num-cpus", "3", "--temp-dir", temp_dir, "--timeout", "150"],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
        assert started.returncode == 0, started.stdout + started.stderr
        assert f"export RAY_ADDRESS=http://127.0.0.1:{dashboard_port}" in started.stdout
        assert "export RAY_AUTH_MODE=token" in started.stdout
        yield {"temp_dir": temp_dir, "address": f"http://127.0.0.1:{dashboard_port}",
               "env": {**env, "RAY_AUTH_MODE": "token"}}
    finally:
        if os.path.exists(os.path.join(temp_dir, "cluster.env")):
            stopped = subprocess.run(["bash", str(STOP), "--temp-dir", temp_dir, "--grace", "20"],
                                     cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
            assert stopped.returncode == 0, stopped.stdout + stopped.stderr
        left = cluster_pids(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)
        assert not left, f"stop_cluster.sh left processes of this cluster running: {left}"


def ray_cli(cluster, *args: str, timeout: float = 60, env: dict | None = None):
    return subprocess.run([str(RAY), *args], cwd=ROOT, env=env or cluster["env"],
                          capture_output=True, text=True, timeout=timeout)


def submit(cluster, job_args: list[str], timeout: float = 600):
    """`ray job submit` exactly as the README has it; returns (submission id, result, seconds)."""
    submission_id = f"mnist-test-{uuid.uuid4().hex[:8]}"
    started = time.monotonic()
    result = ray_cli(cluster, "job", "submit", "--address", cluster["address"], "--working-dir", ".",
                     "--runtime-env", str(RUNTIME_ENV.relative_to(ROOT)), "--submission-id",
                     submission_id, "--", "python", "jobs/train_mnist.py", *job_args, timeout=timeout)
    return submission_id, result, time.monotonic() - started


def job_status(cluster, submission_id: str) -> str:
    """The JobStatus name (SUCCEEDED, FAILED, ...) from Ray's job SDK, in a client process."""
    code = ("import sys; from ray.job_submission import JobSubmissionClient; "
            "print(JobSubmissionClient(sys.argv[1]).get_job_status(sys.argv[2]).name)")
    out = subprocess.run([sys.executable, "-c", code, cluster["address"], submission_id], cwd=ROOT,
                         env=cluster["env"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.strip().splitlines()[-1]


def job_logs(cluster, submission_id: str) -> list[str]:
    """`ray job logs` lines, without the CLI's colours and its own log-line prefix."""
    out = ray_cli(cluster, "job", "logs", "--address", cluster["address"], submission_id)
    assert out.returncode == 0, out.stderr
    text = re.sub(r"\x1b\[[0-9;]*m", "", out.stdout)
    lines = [re.sub(r"^\S+ \S+\s+INFO cli\.py:\d+ -- ", "", line) for line in text.splitlines()]
    return [line for line in lines if line.strip() and "Job submission server address" not in line]


def poll_mlflow(mlflow_client, job, every_s: float = 0.3) -> list[tuple[int, bool]]:
    """(epochs logged, test metrics logged) of the run in experiment mnist, each time the server is
    asked, until `job` (a future) is done."""
    seen = []
    while not job.done():
        experiment = mlflow_client.get_experiment_by_name("mnist")
        for run in mlflow_client.search_runs([experiment.experiment_id]) if experiment else []:
            seen.append((len(mlflow_client.get_metric_history(run.info.run_id, "loss")),
                         bool(mlflow_client.get_metric_history(run.info.run_id, "test_accuracy"))))
        time.sleep(every_s)
    return seen


# ---- the cluster: token auth, loopback ---------------------------------------------------------

@pytest.mark.timeout(300)
def test_cluster_requires_the_token_and_listens_on_loopback_only(cluster):
    token = Path(cluster["env"]["RAY_AUTH_TOKEN_PATH"])
    assert token.stat().st_mode & 0o777 == 0o600
    no_token = {k: v for k, v in cluster["env"].items()
                if k not in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH")}
    refused = ray_cli(cluster, "job", "list", "--address", cluster["address"], env=no_token)
    assert refused.returncode != 0
    assert "Missing authentication token" in refused.stdout + refused.stderr
    assert ray_cli(cluster, "job", "list", "--address", cluster["address"]).returncode == 0

    listening = listening_addresses(cluster_pids(cluster["temp_dir"]))
    assert listening, "found no listening sockets of the cluster"
    beyond = [addr for addr in listening if addr not in ("127.0.0.1", "::ffff:127.0.0.1", "::1")]
    assert not beyond, f"cluster sockets listening beyond loopback: {sorted(set(beyond))}"


def listening_addresses(pids: list[int]) -> list[str]:
    """IP addresses the given processes listen on over TCP, read from /proc (Linux)."""
    inodes = set()
    for pid in pids:
        try:
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
        except OSError:  # the process ended meanwhile
            pass
    found = []
    for table, ipv6 in (("/proc/net/tcp", False), ("/proc/net/tcp6", True)):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] != "0A" or fields[9] not in inodes:  # 0A: LISTEN
                continue
            raw = bytes.fromhex(fields[1].split(":")[0])
            words = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))  # host-order words
            found.append(socket.inet_ntop(socket.AF_INET6 if ipv6 else socket.AF_INET, words))
    return found


# ---- submitted jobs ----------------------------------------------------------------------------

@pytest.mark.timeout(700)
def test_submitted_job_succeeds_and_publishes_the_model_to_the_storage_path(cluster, tmp_path):
    """...and tracks itself in a real `mlflow server` on loopback, which the test polls while the job runs."""
    from concurrent.futures import ThreadPoolExecutor

    from mlflow import MlflowClient

    storage = tmp_path / "runs"  # absolute: the job runs in the unpacked working dir, not here
    server = MlflowServer(tmp_path).start()
    try:
        with ThreadPoolExecutor(1) as pool:
            # --data is relative: it resolves inside the uploaded working dir, which keeps the sample.
            job = pool.submit(submit, cluster, [
                "--data", "tests/data/mnist_sample.npz", "--num-workers", "2", "--epochs", "2",
                "--storage-path", str(storage), "--run-name", "submitted", "--tracking-uri", server.uri])
            seen = poll_mlflow(MlflowClient(server.uri), job)
            submission_id, result, seconds = job.result()
        mlflow_client = MlflowClient(server.uri)
        experiment = mlflow_client.get_experiment_by_name("mnist")
        runs = mlflow_client.search_runs([experiment.experiment_id]) if experiment else []
        losses = [[m.step for m in mlflow_client.get_metric_history(r.info.run_id, "loss")] for r in runs]
    finally:
        server.stop()
    print(f"submitted job end to end: {seconds:.1f} s")
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    assert job_status(cluster, submission_id) == "SUCCEEDED"

    model_dir = storage / "submitted" / "model"
    for name in MODEL_FILES:
        assert (model_dir / name).is_file(), f"{name} missing from {model_dir}"
    metrics = yaml.safe_load((model_dir / "metrics.json").read_text())  # JSON is YAML
    assert metrics["num_workers"] == 2 and len(metrics["epochs"]) == 2
    assert metrics["test_accuracy"] > 0.8  # 2 epochs on 3,000 digits; a broken model sits at 0.1

    last = job_logs(cluster, submission_id)[-3:]
    accuracy = [line for line in last if line.startswith("test accuracy: ")]
    assert accuracy, f"no test accuracy in the last log lines: {last}"
    assert float(accuracy[0].split(": ")[1]) == pytest.approx(metrics["test_accuracy"], abs=1e-4)
    assert any(str(model_dir) in line for line in last), \
        f"the last log lines do not say the model is in {model_dir}: {last}"

    # MLflow: the epochs reached the server while the job ran, before the test metrics of its end.
    assert any(epochs >= 1 and not tested for epochs, tested in seen), seen
    (run,) = runs
    assert run.info.status == "FINISHED" and run.info.run_name == "submitted" and losses == [[1, 2]]
    assert run.data.tags["ray.submission_id"] == submission_id and run.data.tags["world_sizes"] == "2,2"
    assert run.data.params["num_workers"] == "2" and metrics["tracking"]["run_id"] == run.info.run_id
    token = Path(cluster["env"]["RAY_AUTH_TOKEN_PATH"]).read_text().strip()
    assert len(token) >= 16 and not [k for k, v in [*run.data.params.items(), *run.data.tags.items()]
                                     if token in k or token in v]  # the cluster's token is logged nowhere


@pytest.mark.timeout(300)
def test_submitted_job_with_bad_arguments_fails_with_a_one_line_error(cluster, tmp_path):
    submission_id, result, _ = submit(cluster, [
        "--data", "tests/data/mnist_sample.npz", "--batch-size", "1", "--num-workers", "2",
        "--storage-path", str(tmp_path / "runs")], timeout=240)
    assert result.returncode != 0
    assert job_status(cluster, submission_id) == "FAILED"
    logs = job_logs(cluster, submission_id)
    errors = [line for line in logs if line.startswith("error: ")]
    assert errors == ["error: batch_size 1 is smaller than num_workers 2: "
                      "every worker needs at least one example per step"], logs[-10:]
    assert not any("Traceback" in line for line in logs)


@pytest.mark.timeout(700)
def test_a_retrain_slot_submitted_twice_trains_once(cluster, tmp_path):
    """scripts/submit_retrain.sh for the same slot twice: Ray itself refuses the second submission
    id, the script calls that "already done", and the first one promotes a version."""
    slot = f"2026-11-28T02-{uuid.uuid4().hex[:6]}"
    env = {**cluster["env"], "RAY_ADDRESS": cluster["address"], "MNIST_STORE": str(tmp_path / "store"),
           "MNIST_DATA": "tests/data/mnist_sample.npz", "MNIST_RETRAIN_SLOT": slot,
           "MNIST_RETRAIN_LOG_DIR": str(tmp_path / "logs")}
    flags = ["--epochs", "2", "--min-accuracy", "0.5"]
    first = subprocess.run(["bash", "scripts/submit_retrain.sh", *flags], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=240)
    assert first.returncode == 0, first.stdout + first.stderr
    again = subprocess.run(["bash", "scripts/submit_retrain.sh", *flags], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=240)
    assert again.returncode == 0 and "already done" in again.stdout, again.stdout + again.stderr

    submission_id, deadline = f"mnist-retrain-{slot}", time.monotonic() + 600
    while (status := job_status(cluster, submission_id)) in ("PENDING", "RUNNING"):
        assert time.monotonic() < deadline, "the retraining job did not finish"
        time.sleep(3)
    assert status == "SUCCEEDED", job_logs(cluster, submission_id)[-20:]
    assert any(line.startswith("promoted ") for line in job_logs(cluster, submission_id))
    assert (tmp_path / "store" / "current.json").is_file()


# ---- the runtime environment (no cluster) ------------------------------------------------------

def runtime_env() -> dict:
    env = yaml.safe_load(RUNTIME_ENV.read_text())
    from ray.runtime_env import RuntimeEnv

    RuntimeEnv(**env)  # Ray's own validation of the fields
    return env


def package(directory: Path, target: Path, excludes: list[str], include_gitignore: bool) -> list[str]:
    """Zip `directory` the way `ray job submit --working-dir` does; return the member names."""
    from ray._private.runtime_env.packaging import create_package

    create_package(str(directory), target, include_gitignore=include_gitignore, excludes=excludes)
    return sorted(n for n in zipfile.ZipFile(target).namelist() if not n.endswith("/"))


def test_runtime_env_excludes_alone_keep_data_venvs_and_outputs_out(tmp_path):
    """Even with Ray's defaults and .gitignore off, the YAML's excludes keep the upload to code."""
    env = runtime_env()
    assert env["env_vars"]["PYTHONUNBUFFERED"] == "1"
    assert "working_dir" not in env  # given by --working-dir, which would override it (with a warning)
    tree = tmp_path / "checkout"
    kept = ["jobs/train_mnist.py", "trainer/train/driver.py", "tests/data/mnist_sample.npz", "README.md"]
    dropped = [".git/objects/ab/cdef", ".venv/lib/python3.11/site-packages/tf.so", "venv/bin/python",
               ".venv-mlflow/bin/mlflow", "mlflow.db", "mlartifacts/1/model.keras",
               "models/mnist.keras", "ray_results/run/checkpoint.pkl", "data/mnist/train.parquet",
               "trainer/__pycache__/driver.cpython-311.pyc", ".pytest_cache/v/cache/lastfailed",
               "mnist.npz", "tests/data/other.npz", "out/mnist.h5", "mnist_project.egg-info/PKG-INFO"]
    for name in kept + dropped:
        (tree / name).parent.mkdir(parents=True, exist_ok=True)
        (tree / name).write_bytes(b"x")
    assert package(tree, tmp_path / "pkg.zip", env["excludes"], include_gitignore=False) == sorted(kept)


def test_upload_of_this_checkout_is_small_and_has_the_code():
    from ray._private import ray_constants
    from ray._private.runtime_env.packaging import GCS_STORAGE_MAX_SIZE

    excludes = ray_constants.get_runtime_env_default_excludes() + runtime_env()["excludes"]
    with tempfile.TemporaryDirectory() as tmp:
        target = Path(tmp) / "pkg.zip"
        names = package(ROOT, target, excludes, include_gitignore=True)  # as `ray job submit` does
        size = target.stat().st_size
    assert {"jobs/train_mnist.py", "trainer/train/driver.py", "trainer/train/worker.py",
            "tests/data/mnist_sample.npz"} <= set(names)
    assert not [n for n in names if n.startswith((".git/", ".venv/", ".venv-mlflow/")) or "__pycache__" in n]
    assert size < 5 * 2**20 < GCS_STORAGE_MAX_SIZE, f"upload is {size / 2**20:.1f} MiB"


# ---- the scripts' own input checks (no cluster) ------------------------------------------------

def test_cluster_scripts_reject_bad_input_in_one_line(tmp_path):
    env = script_env(str(tmp_path))
    bad = subprocess.run(["bash", str(START), "--num-cpus", "two", "--temp-dir", str(tmp_path)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2 and bad.stderr == "error: expected a whole number, got 'two'\n"
    unknown = subprocess.run(["bash", str(START), "--cpus", "2"], cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=30)
    assert unknown.returncode == 2 and unknown.stderr.startswith("error: unknown flag --cpus")
    missing = subprocess.run(["bash", str(START), "--port"], cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=30)
    assert missing.returncode == 2 and missing.stderr == "error: --port needs a value\n"
    nothing = subprocess.run(["bash", str(STOP), "--temp-dir", str(tmp_path)], cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=30)
    assert nothing.returncode == 1
    assert nothing.stderr == f"error: no cluster recorded at {tmp_path}/cluster.env " \
                             "(nothing started by scripts/start_cluster.sh there)\n"


def test_start_cluster_refuses_a_token_file_others_can_read(tmp_path):
    """A token file with group or other bits (Ray's own ~/.ray/auth_token is written with the umask,
    0644 here) may already be in other hands: refused in one line before anything starts, and left
    as it was; an owner-only one, or none, goes on (a new one is made owner-only)."""
    env = script_env(str(tmp_path))
    token = Path(env["RAY_AUTH_TOKEN_PATH"])
    token.write_text("a" * 64)
    for mode in (0o644, 0o640, 0o604):
        token.chmod(mode)
        refused = subprocess.run(["bash", str(START), "--temp-dir", str(tmp_path)], cwd=ROOT, env=env,
                                 capture_output=True, text=True, timeout=30)
        assert refused.returncode == 2 and refused.stdout == "", refused.stdout + refused.stderr
        assert refused.stderr == (f"error: {token} can be read by others (mode {mode:o}), so anyone on this machine "
                                  "may hold the cluster's token: remove it (a new one is made), or chmod 600 it "
                                  "if you are sure nobody read it, and start again\n")
        assert token.stat().st_mode & 0o777 == mode and token.read_text() == "a" * 64
        assert not (tmp_path / "cluster.env").exists()
