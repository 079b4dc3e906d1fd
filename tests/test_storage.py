"""Shared storage over a real S3 API: moto's S3 server on loopback, started and stopped here.

The job reads its Parquet shards from s3://, writes Ray Train's checkpoints and the final model
there, and the test reads them back through the same API (boto3). About two minutes.
"""

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from tests.conftest import ROOT, SAMPLE, free_port, run_job

pytestmark = pytest.mark.ray  # every test here runs the job or starts Ray

BUCKET = "mnist"


@pytest.fixture(scope="module")
def s3():
    """moto's server mode on 127.0.0.1, a bucket, and the env (credentials, endpoint) to reach it."""
    import boto3

    port = free_port()
    server = subprocess.Popen([os.path.join(os.path.dirname(sys.executable), "moto_server"),
                               "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline and server.poll() is None, "moto_server did not start"
                time.sleep(0.2)
        client = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name="us-east-1",
                              aws_access_key_id="testing", aws_secret_access_key="testing")
        client.create_bucket(Bucket=BUCKET)
        yield client, env
    finally:
        server.terminate()
        server.wait(timeout=30)


def keys(client, prefix: str) -> list[str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


def test_job_reads_shards_and_writes_checkpoints_and_model_over_s3(s3, tmp_path):
    client, env = s3
    prepared = subprocess.run([sys.executable, "scripts/prepare_data.py", "--data", str(SAMPLE),
                               "--out", f"s3://{BUCKET}/data/sample"], cwd=ROOT, env={**os.environ, **env},
                              capture_output=True, text=True, timeout=120)
    assert prepared.returncode == 0, prepared.stderr[-2000:]
    assert "data/sample/manifest.json" in keys(client, "data/sample/")

    proc = run_job("--data", f"s3://{BUCKET}/data/sample", "--storage-path", f"s3://{BUCKET}/runs",
                   "--run-name", "s3run", "--num-workers", "2", "--epochs", "2",
                   "--output", str(tmp_path / "out"), env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]

    run_keys = keys(client, "runs/s3run/")
    assert any("/checkpoint_" in k and k.endswith("/state.npz") for k in run_keys), run_keys
    assert not keys(client, "runs/_prepared_data/")  # a Parquet source is read in place, not copied
    published = {k.rsplit("/", 1)[1] for k in keys(client, "runs/s3run/model/")}
    assert {"mnist.keras", "mnist.h5", "metrics.json", "evaluation.json"} <= published
    metrics = json.loads(client.get_object(Bucket=BUCKET, Key="runs/s3run/model/metrics.json")["Body"].read())
    assert metrics["data"]["path"] == f"s3://{BUCKET}/data/sample"

    model_file = tmp_path / "from_s3.keras"  # the published model, loaded as a user would
    model_file.write_bytes(client.get_object(Bucket=BUCKET, Key="runs/s3run/model/mnist.keras")["Body"].read())
    check = subprocess.run([sys.executable, "-c", (
        "import sys, numpy as np, keras\n"
        "d = np.load(sys.argv[2]); m = keras.saving.load_model(sys.argv[1])\n"
        "p = m.predict(d['x_test'].reshape(-1, 784) / 255.0, verbose=0).argmax(1)\n"
        "print((p == d['y_test']).mean())"), str(model_file), str(SAMPLE)],
        capture_output=True, text=True, timeout=120)
    assert check.returncode == 0, check.stderr[-2000:]
    assert abs(float(check.stdout.split()[-1]) - metrics["test_accuracy"]) < 1e-6
