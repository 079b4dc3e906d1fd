"""Parsing every supported MNIST source from real digits, and a clear error for every bad input."""

import gzip
import json
import struct

import numpy as np
import pytest

from tests.conftest import SAMPLE
from trainer.data import shards
from trainer.data.idx import IDX_NAMES
from trainer.data.shards import DataError


@pytest.fixture(scope="module")
def sample() -> shards.Mnist:
    return shards.load(str(SAMPLE))


def write_idx(path, array, magic=None, gz=True):
    magic = magic if magic is not None else (0x803 if array.ndim == 3 else 0x801)
    raw = struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()
    path.write_bytes(gzip.compress(raw) if gz else raw)


def write_idx_dir(directory, mnist, gz=True):
    directory.mkdir(exist_ok=True)
    for (split, part), stem in IDX_NAMES.items():
        x, y = mnist.split(split)
        write_idx(directory / (stem + (".gz" if gz else "")), x if part == "images" else y, gz=gz)
    return directory


def test_npz_sample_is_valid_mnist(sample):
    assert sample.x_train.shape == (3000, 28, 28) and sample.x_test.shape == (1000, 28, 28)
    assert sample.x_train.dtype == np.uint8 and set(np.unique(sample.y_train)) == set(range(10))


@pytest.mark.parametrize("gz", [True, False])
def test_idx_directory_matches_npz(tmp_path, sample, gz):
    loaded = shards.load(str(write_idx_dir(tmp_path / "idx", sample, gz=gz)))
    assert shards.content_hash(loaded) == shards.content_hash(sample)


def test_parquet_round_trip_with_manifest(tmp_path, sample):
    manifest = shards.write_parquet(sample, str(tmp_path / "pq"), rows_per_file=1000)
    assert manifest.rows("train") == 3000 and len(manifest.files("train")) == 3
    assert manifest.content_sha256 == shards.content_hash(sample)
    assert sum(manifest.splits["test"].label_counts) == 1000
    loaded = shards.load(str(tmp_path / "pq"))
    assert shards.content_hash(loaded) == shards.content_hash(sample)


def test_prepare_writes_shards_once_and_reuses_them(tmp_path, sample):
    first, _, manifest = shards.prepare(str(SAMPLE), str(tmp_path / "cache"))
    mtime = (tmp_path / "cache").stat().st_mtime_ns
    second, _, again = shards.prepare(str(SAMPLE), str(tmp_path / "cache"))
    assert first == second and manifest == again and (tmp_path / "cache").stat().st_mtime_ns == mtime
    assert shards.prepare(first, str(tmp_path / "other"))[0] == first  # a Parquet source is used in place


def test_write_parquet_refuses_to_overwrite(tmp_path, sample):
    shards.write_parquet(sample, str(tmp_path / "pq"))
    with pytest.raises(DataError, match="already exists"):
        shards.write_parquet(sample, str(tmp_path / "pq"))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp left behind


def replace_idx(directory, stem, array=None, raw=None, **kwargs):
    path = directory / (stem + ".gz")
    if raw is not None:
        path.write_bytes(raw)
    else:
        write_idx(path, array, **kwargs)


@pytest.mark.parametrize("case, message", [
    ("image_magic", "IDX magic number 0x00000801, expected 0x00000803"),
    ("label_magic", "expected 0x00000801 for labels"),
    ("image_size", "images are 32x32, expected 28x28"),
    ("truncated", "file truncated or padded"),
    ("bad_gzip", "corrupt or truncated gzip"),
    ("short_header", "too short for an IDX images header"),
    ("count_mismatch", "3000 train images but 2999 labels"),
    ("label_range", "labels must lie in 0..9, found 0..12"),
    ("empty", "the test split is empty"),
    ("missing", "no t10k-labels-idx1-ubyte"),
])
def test_bad_idx_inputs_give_clear_errors(tmp_path, sample, case, message):
    d = write_idx_dir(tmp_path / "idx", sample)
    train_images, train_labels = IDX_NAMES[("train", "images")], IDX_NAMES[("train", "labels")]
    if case == "image_magic":
        replace_idx(d, train_images, sample.x_train, magic=0x801)
    elif case == "label_magic":
        replace_idx(d, train_labels, sample.y_train, magic=0x802)
    elif case == "image_size":
        replace_idx(d, train_images, np.zeros((10, 32, 32), np.uint8))
    elif case == "truncated":
        full = (d / (train_images + ".gz")).read_bytes()
        replace_idx(d, train_images, raw=gzip.compress(gzip.decompress(full)[:-500]))
    elif case == "bad_gzip":
        replace_idx(d, train_images, raw=(d / (train_images + ".gz")).read_bytes()[:1000])
    elif case == "short_header":
        replace_idx(d, train_images, raw=gzip.compress(b"\x00\x00\x08"))
    elif case == "count_mismatch":
        replace_idx(d, train_labels, sample.y_train[:-1])
    elif case == "label_range":
        labels = sample.y_train.copy()
        labels[7] = 12
        replace_idx(d, train_labels, labels)
    elif case == "empty":
        replace_idx(d, IDX_NAMES[("test", "images")], np.zeros((0, 28, 28), np.uint8))
        replace_idx(d, IDX_NAMES[("test", "labels")], np.zeros((0,), np.uint8))
    elif case == "missing":
        (d / (IDX_NAMES[("test", "labels")] + ".gz")).unlink()
    with pytest.raises(DataError, match=message) as info:
        shards.load(str(d))
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("arrays, message", [
    ({"x_train": np.zeros((5, 28, 28), np.float32)}, "train images are float32, expected uint8"),
    ({"x_train": np.zeros((5, 27, 28), np.uint8)}, r"shape \(5, 27, 28\), expected \(n, 28, 28\)"),
    ({"y_test": np.full(1000, -1, np.int64)}, "test labels must lie in 0..9"),
    ({"y_train": np.zeros(5, np.uint8)}, "3000 train images but 5 labels"),
])
def test_bad_npz_arrays_give_clear_errors(tmp_path, sample, arrays, message):
    values = {"x_train": sample.x_train, "y_train": sample.y_train,
              "x_test": sample.x_test, "y_test": sample.y_test, **arrays}
    np.savez(tmp_path / "bad.npz", **values)
    with pytest.raises(DataError, match=message):
        shards.load(str(tmp_path / "bad.npz"))


def test_npz_missing_keys_and_non_npz_files(tmp_path, sample):
    np.savez(tmp_path / "partial.npz", x_train=sample.x_train)
    with pytest.raises(DataError, match="lacks y_train, x_test, y_test"):
        shards.load(str(tmp_path / "partial.npz"))
    (tmp_path / "notes.txt").write_text("not MNIST")
    with pytest.raises(DataError, match="not a readable .npz"):
        shards.load(str(tmp_path / "notes.txt"))
    with pytest.raises(DataError, match="does not exist; pass --data or set MNIST_DATA"):
        shards.load(str(tmp_path / "nowhere"))


def test_tampered_parquet_is_rejected(tmp_path, sample):
    pq_dir = tmp_path / "pq"
    shards.write_parquet(sample, str(pq_dir), rows_per_file=1000)
    manifest = json.loads((pq_dir / "manifest.json").read_text())
    manifest["content_sha256"] = "0" * 64
    (pq_dir / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="content hash does not match"):
        shards.load(str(pq_dir))
    manifest["splits"]["train"]["files"][0]["rows"] = 999
    (pq_dir / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="1000 rows, manifest says 999"):
        shards.load(str(pq_dir))
    (pq_dir / "train" / "part-00001.parquet").write_bytes(b"PAR1 truncated")
    manifest["splits"]["train"]["files"][0]["rows"] = 1000
    (pq_dir / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="part-00001.parquet: unreadable Parquet shard"):
        shards.load(str(pq_dir))


def test_download_failure_names_data_flag_and_env(tmp_path, monkeypatch):
    # A real keras.datasets download, pointed at a closed loopback proxy: no traffic leaves the machine.
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")
    monkeypatch.setenv("https_proxy", "http://127.0.0.1:9")
    monkeypatch.delenv("MNIST_DATA", raising=False)
    with pytest.raises(DataError, match="could not download MNIST.*pass --data PATH or set MNIST_DATA"):
        shards.load(shards.resolve_source(None))


def test_source_resolution_prefers_flag_then_env(monkeypatch):
    monkeypatch.setenv("MNIST_DATA", "/from/env")
    assert shards.resolve_source("/from/flag") == "/from/flag"
    assert shards.resolve_source(None) == "/from/env"
    monkeypatch.delenv("MNIST_DATA")
    assert shards.resolve_source(None) is None


def test_an_unreachable_object_store_is_a_one_line_error(tmp_path):
    """An s3:// path whose endpoint refuses the connection (a closed port on loopback, so no traffic
    leaves this machine): one line naming the path and the cause, exit 1, no traceback."""
    from tests.conftest import run_job

    proc = run_job("--data", "s3://no-such-bucket/mnist", "--output", str(tmp_path), timeout=120,
                   env={"AWS_ENDPOINT_URL": "http://127.0.0.1:9", "AWS_ACCESS_KEY_ID": "testing",
                        "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1"})
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith("error: s3://no-such-bucket/mnist: cannot read it (")
    assert "NETWORK_CONNECTION" in proc.stderr


def test_a_run_that_fails_on_bad_data_leaves_the_callers_environment_as_it_was(tmp_path):
    """driver.run in-process (a notebook, benchmark.py): Ray's settings live only as long as the run."""
    import logging
    import os

    from trainer.config import Config
    from trainer.train import driver

    (tmp_path / "junk.npz").write_bytes(b"junk")
    before, level = dict(os.environ), logging.getLogger("ray.train").level
    with pytest.raises(DataError, match="not a readable .npz"):
        driver.run(Config(data=str(tmp_path / "junk.npz"), output=str(tmp_path / "out")))
    assert dict(os.environ) == before and logging.getLogger("ray.train").level == level


def test_the_ray_settings_are_set_for_the_block_and_never_override_the_users(monkeypatch):
    import os

    from trainer.config import Config
    from trainer.train import cluster

    monkeypatch.setenv("RAY_worker_niceness", "5")
    monkeypatch.delenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", raising=False)
    with cluster.environment(Config()):
        assert os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] == "0.5" and os.environ["RAY_worker_niceness"] == "5"
    assert "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S" not in os.environ and os.environ["RAY_worker_niceness"] == "5"


def test_the_prepare_step_checks_and_plans_a_run_without_ray(tmp_path):
    from trainer.config import Config
    from trainer.train import driver

    plan = driver.prepare(Config(data=str(SAMPLE), output=str(tmp_path / "out"), run_name="r"))
    assert plan.train_rows == 3000 and len(plan.test[1]) == 1000 and not plan.streaming
    assert plan.run_dir == str(tmp_path / "out" / "ray_results" / "r") and shards.is_parquet_dir(plan.parquet_dir)
    with pytest.raises(ValueError, match="3000 training rows split over 2 workers is less than one batch of 2048"):
        driver.prepare(Config(data=str(SAMPLE), output=str(tmp_path / "out"), batch_size=4096))
