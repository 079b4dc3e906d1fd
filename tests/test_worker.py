"""The worker's batching and distributed step, without Ray: a one-device MirroredStrategy runs the
same `strategy.run` code path the workers run under MultiWorkerMirroredStrategy."""

import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf

from tests.conftest import SAMPLE
from trainer.config import Config
from trainer.model import build_model, preprocess
from trainer.worker import (Watchdog, epoch_batches, make_all_reduce_sum, make_train_steps, progress_line,
                            shard_info)


@pytest.fixture(scope="module")
def sample():
    with np.load(SAMPLE) as npz:
        return npz["x_train"][:1000], npz["y_train"][:1000]


@pytest.fixture(scope="module")
def strategy():
    return tf.distribute.MirroredStrategy(["/cpu:0"])


def test_an_epoch_is_shuffled_by_seed_covers_distinct_digits_and_drops_the_partial_batch(sample):
    images, labels = sample
    xs, ys = epoch_batches(images, labels, 64, seed=(0, 1, 2))
    assert xs.shape == (1000 // 64, 64, 28, 28) and ys.shape == (1000 // 64, 64) and xs.dtype == np.uint8
    flat = xs.reshape(-1, 784)
    assert len({row.tobytes() for row in flat}) == len(flat)  # no digit twice in an epoch
    label_of = {row.tobytes(): label for row, label in zip(images.reshape(-1, 784), labels)}
    assert all(label_of[row.tobytes()] == label for row, label in zip(flat, ys.reshape(-1)))
    again, _ = epoch_batches(images, labels, 64, seed=(0, 1, 2))
    other, _ = epoch_batches(images, labels, 64, seed=(0, 1, 3))
    assert np.array_equal(again, xs) and not np.array_equal(other, xs)


def test_a_distributed_step_is_the_plain_gradient_step_on_the_global_batch(sample, strategy):
    """The loss is averaged over the global batch: one strategy step moves the weights exactly as
    one plain GradientTape step on the same 128 digits does."""
    images, labels = sample
    cfg = Config(num_workers=1)
    with strategy.scope():
        distributed = build_model(cfg)
        distributed.optimizer.build(distributed.trainable_variables)
    train_steps = make_train_steps(tf, strategy, distributed, global_batch_size=128)
    loss_sum, correct, seen = train_steps(images[None, :128], labels[None, :128])
    x, y = preprocess(images[:128], labels[:128])
    plain = build_model(cfg)  # same seed: same initial weights
    with tf.GradientTape() as tape:
        loss = plain.loss(y, plain(x, training=True))
    plain.optimizer.apply_gradients(zip(tape.gradient(loss, plain.trainable_variables), plain.trainable_variables))
    for a, b in zip(distributed.get_weights(), plain.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert float(seen) == 128 and 0 <= float(correct) <= 128
    assert float(loss_sum) / 128 == pytest.approx(float(loss), rel=1e-5)


def test_epochs_of_steps_lower_the_loss_and_trace_once(sample, strategy):
    images, labels = sample
    with strategy.scope():
        model = build_model(Config(num_workers=1))
        model.optimizer.build(model.trainable_variables)
    train_steps = make_train_steps(tf, strategy, model, global_batch_size=100)
    losses = []
    for epoch in range(3):
        xs, ys = epoch_batches(images, labels, 100, (0, 0, epoch))
        parts = [train_steps(xs[i:i + 3], ys[i:i + 3]) for i in range(0, len(xs), 3)]  # 3, 3, 3, 1 steps
        loss_sum, seen = sum(float(p[0]) for p in parts), sum(float(p[2]) for p in parts)
        losses.append(loss_sum / seen)
        assert seen == 1000
    assert losses[2] < losses[0] / 2, losses
    assert train_steps.experimental_get_tracing_count() == 1  # calls of any length reuse one trace


def test_all_reduce_sum_and_the_shard_check(strategy):
    all_reduce_sum = make_all_reduce_sum(tf, strategy)
    np.testing.assert_array_equal(all_reduce_sum([1.0, 2.5, 3.0]), [1.0, 2.5, 3.0])  # one replica
    info = shard_info(all_reduce_sum, np.array([4, 0, 2, 2]), train_rows=6)
    assert info["rows"] == 4 and info["global_rows_seen"] == 3 and info["global_rows_duplicated"] == 1


def test_progress_line_estimates_the_time_left_from_the_median_epoch():
    history = [{"seconds": 9.0}, {"seconds": 2.0}, {"seconds": 2.5}]
    record = {"epoch": 3, "loss": 0.12345, "accuracy": 0.9612, "samples_per_second": 12000.4, "seconds": 2.5}
    assert progress_line(record, 5, history) == (
        "epoch 3/5  1 worker  loss 0.1235  accuracy 0.9612  12,000 samples/s  2.5s  ~5s left")
    assert progress_line({**record, "world_size": 3}, 5, history).startswith("epoch 3/5  3 workers  loss")


def test_the_watchdog_calls_abort_only_after_a_silence_longer_than_its_timeout_and_never_while_paused():
    aborts = []
    watchdog = Watchdog(1.0, aborts.append)
    try:
        for _ in range(15):  # 1.5 s with a beat every 0.1 s
            time.sleep(0.1)
            watchdog.beat()
        with watchdog.paused():  # a checkpoint upload slower than the timeout
            time.sleep(2.0)
        assert aborts == []
        deadline = time.monotonic() + 10
        while not aborts and time.monotonic() < deadline:  # silence past the timeout
            time.sleep(0.1)
    finally:
        watchdog.stop()
    assert aborts == ["no progress for 1s: a peer is gone or stalled (--stall-timeout-s)"]


TF_INTERNALS = """
import json, os, sys
os.environ["TF_CONFIG"] = json.dumps({"cluster": {"worker": ["127.0.0.1:" + sys.argv[1]]},
                                      "task": {"type": "worker", "index": 0}})
import tensorflow as tf
from trainer import tf_internals

internals = tf_internals.resolve(tf)
internals.configure_coordination(77)
strategy = tf.distribute.MultiWorkerMirroredStrategy()
print("heartbeat", tf_internals.heartbeat_timeout_s())

def reduce():  # a one-member collective: runs at once, unless collectives were aborted
    return tf.raw_ops.CollectiveReduceV2(input=tf.constant([1.0]), group_size=tf.constant(1),
        group_key=tf.constant(1), instance_key=tf.constant(1), ordering_token=[], merge_op="Add", final_op="Id")

print("reduced", float(reduce()[0]))
internals.abort_collectives("a peer is gone")
try:
    reduce()
    print("not aborted")
except tf.errors.UnavailableError as exc:
    print("aborted", "a peer is gone" in str(exc))
"""


def test_the_tensorflow_internals_exist_and_do_what_the_worker_needs():
    """Against the installed TensorFlow, in a process of its own: MultiWorkerMirroredStrategy keeps
    the coordination service's heartbeat timeout configured before it (not TensorFlow's 10 s), and
    the abort fails the next collective. An upgrade that moves either fails here."""
    from tests.conftest import ROOT, free_port

    proc = subprocess.run([sys.executable, "-c", TF_INTERNALS, str(free_port())], cwd=ROOT, capture_output=True,
                          text=True, timeout=180)
    assert proc.stdout.split("\n")[-4:] == ["heartbeat 77.0", "reduced 1.0", "aborted True", ""], \
        proc.stdout + proc.stderr[-3000:]


def test_the_collective_port_is_free_and_outside_the_ephemeral_range_where_outgoing_connections_take_theirs(
        tmp_path, monkeypatch):
    import socket

    from trainer import backend

    ranges = tmp_path / "ip_local_port_range"
    ranges.write_text("32768\t60999\n")
    monkeypatch.setattr(backend, "EPHEMERAL_RANGE", str(ranges))
    ports = {backend.free_port() for _ in range(20)}
    assert all(20_000 <= p < 32768 for p in ports) and len(ports) > 1  # two workers on a node differ
    for port in ports:
        with socket.socket() as s:
            s.bind(("", port))  # free when picked
    ranges.write_text("10000 60999\n")  # no room below it: the OS's choice
    assert 10000 <= backend.free_port() <= 65535
    monkeypatch.setattr(backend, "EPHEMERAL_RANGE", str(tmp_path / "missing"))
    assert 0 < backend.free_port() <= 65535
