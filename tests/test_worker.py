"""The worker's batching and distributed step, without Ray: a one-device MirroredStrategy runs the
same `strategy.run` code path the workers run under MultiWorkerMirroredStrategy."""

import os
import socket
import subprocess
import sys
import threading
import types

import numpy as np
import pytest
import tensorflow as tf

from tests.conftest import SAMPLE
from trainer.config import Config
from trainer.model.network import build_model, preprocess
from trainer.train.share import epoch_batches
from trainer.train.step import make_all_reduce_sum, make_train_steps
from trainer.train.watchdog import Watchdog
from trainer.train.worker import shard_info


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
        probs = plain(x, training=True)
        loss = plain.loss(y, probs)
    plain.optimizer.apply_gradients(zip(tape.gradient(loss, plain.trainable_variables), plain.trainable_variables))
    for a, b in zip(distributed.get_weights(), plain.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    # `correct` counts the digits the step's forward pass (the weights before its update) got right:
    # here, the plain model's predictions on the same batch against the labels as given.
    expected = int(np.sum(np.argmax(np.asarray(probs), axis=1) == labels[:128]))
    assert 0 < expected < 128  # an untrained model gets some right, not all: the count can tell
    assert float(seen) == 128 and float(correct) == expected
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


class _Clock:
    """Stands in for trainer/train/watchdog.py's `time`: monotonic() is what the test sets."""

    def __init__(self, now: float):
        self.now = now

    def monotonic(self) -> float:
        return self.now


def test_the_watchdog_calls_abort_only_after_a_silence_longer_than_its_timeout_and_never_while_paused(monkeypatch):
    """On the test's clock, with each of the watchdog's checks counted (its stop event's waits):
    every step waits for the watchdog to have looked at least once after the clock moved, never for
    time to pass, so a stalled machine only slows it down and a broken watchdog fails it."""
    from trainer.train import watchdog as module

    seen = threading.Condition()
    woke, aborts, threads = [0], [], []

    class CountedEvent(threading.Event):
        def wait(self, timeout=None):
            stopped = super().wait(timeout)
            with seen:
                woke[0] += 1
                seen.notify_all()
            return stopped

    def thread(**kwargs):
        threads.append(threading.Thread(**kwargs))
        return threads[-1]

    def abort(message):
        with seen:
            aborts.append(message)
            seen.notify_all()

    def looked():
        """Until the watchdog has finished a check that began after this call (or has aborted)."""
        with seen:
            after = woke[0]
            assert seen.wait_for(lambda: woke[0] >= after + 2 or aborts, timeout=120), "the watchdog stopped checking"

    clock = _Clock(1000.0)
    monkeypatch.setattr(module, "time", clock)
    monkeypatch.setattr(module, "threading", types.SimpleNamespace(Event=CountedEvent, Thread=thread))
    watchdog = Watchdog(1.0, abort)
    try:
        clock.now = 1001.0  # a silence of exactly the timeout: not longer
        looked()
        assert aborts == []
        watchdog.beat()
        clock.now = 1001.75  # 1.75 s since the start, 0.75 s since the beat
        looked()
        assert aborts == []
        with watchdog.paused():  # a checkpoint upload far slower than the timeout
            clock.now = 1100.0
            looked()
            assert aborts == []
        clock.now = 1101.0  # the clock restarted when the pause ended, not at the beat before it
        looked()
        assert aborts == []
        clock.now = 1101.25  # silence past the timeout
        with seen:
            assert seen.wait_for(lambda: aborts, timeout=120), "no abort after a silence past the timeout"
        (watcher,) = threads
        watcher.join(timeout=120)
        assert not watcher.is_alive()  # one abort, then the watchdog is done
    finally:
        watchdog.stop()
    assert aborts == ["no progress for 1s: a peer is gone or stalled (--stall-timeout-s)"]


def test_the_watchdog_runs_on_the_monotonic_clock():
    """Unpatched, a watchdog nobody beats aborts (no bound on how soon: only that it does)."""
    aborted = threading.Event()
    watchdog = Watchdog(0.2, lambda message: aborted.set())
    try:
        assert aborted.wait(timeout=120)
    finally:
        watchdog.stop()


TF_INTERNALS = """
import json, os, sys
os.environ["TF_CONFIG"] = json.dumps({"cluster": {"worker": ["127.0.0.1:" + sys.argv[1]]},
                                      "task": {"type": "worker", "index": 0}})
import tensorflow as tf
from trainer.train import tf_internals

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


TWO_WORKERS = """
import json, os, sys
ports, rank = sys.argv[1].split(","), int(sys.argv[2])
os.environ["TF_CONFIG"] = json.dumps({"cluster": {"worker": ["127.0.0.1:" + p for p in ports]},
                                      "task": {"type": "worker", "index": rank}})
import numpy as np
import tensorflow as tf
from trainer.config import Config
from trainer.train.step import build, make_train_steps

tf.config.threading.set_inter_op_parallelism_threads(1)
strategy = tf.distribute.MultiWorkerMirroredStrategy()
model = build(strategy, Config(), steps=1)
train_steps = make_train_steps(tf, strategy, model, 128, Config().allreduce_dtype)
with np.load(sys.argv[3]) as npz:
    images, labels = npz["x_train"][:128], npz["y_train"][:128]
half = slice(64 * rank, 64 * (rank + 1))  # each worker its half of the global batch
train_steps(images[None, half], labels[None, half])
graph = train_steps.get_concrete_function().graph.as_graph_def()
ops = [n.op + " " + tf.as_dtype(n.attr["T"].type).name for f in graph.library.function for n in f.node_def
       if n.op.startswith("Collective")]
np.save(sys.argv[4], np.concatenate([w.ravel() for w in model.get_weights()]))
print("collectives", ops)
"""


def test_two_workers_all_reduce_the_gradients_once_a_step_in_bfloat16_and_take_the_same_step(sample, tmp_path):
    """Two real processes under MultiWorkerMirroredStrategy on loopback (the job's step, no Ray): the
    traced step holds one collective, the gradients' all-reduce, in bfloat16 (--allreduce-dtype's
    default); both workers end the step with the same weights, which are those of one plain float32
    step on the same 128 digits, to bfloat16's precision."""
    from tests.conftest import ROOT, SAMPLE, free_port

    ports = f"{free_port()},{free_port()}"
    procs = [subprocess.Popen([sys.executable, "-c", TWO_WORKERS, ports, str(rank), str(SAMPLE),
                               str(tmp_path / f"w{rank}.npy")], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
    outs = [proc.communicate(timeout=240) for proc in procs]
    for proc, (out, err) in zip(procs, outs):
        assert proc.returncode == 0, out + err[-3000:]
        assert out.strip().splitlines()[-1] == "collectives ['CollectiveReduceV2 bfloat16']", out
    first, second = np.load(tmp_path / "w0.npy"), np.load(tmp_path / "w1.npy")
    np.testing.assert_array_equal(first, second)
    images, labels = sample
    x, y = preprocess(images[:128], labels[:128])
    plain = build_model(Config())  # same seed: the same initial weights
    before = np.concatenate([w.ravel() for w in plain.get_weights()])
    with tf.GradientTape() as tape:
        loss = plain.loss(y, plain(x, training=True))
    plain.optimizer.apply_gradients(zip(tape.gradient(loss, plain.trainable_variables), plain.trainable_variables))
    after = np.concatenate([w.ravel() for w in plain.get_weights()])
    moved, plain_moved = first - before, after - before
    largest = np.abs(plain_moved).max()
    assert largest > 1e-3  # the step moved the weights: the comparison can tell
    # bfloat16 keeps 8 bits of each gradient; RMSprop's update divides by the gradient's own size,
    # so it shifts only where a gradient is near RMSprop's epsilon: by at most 5% of the largest
    # update, and in 99% of the weights by no more than 1e-5 (measured: 99.6%).
    np.testing.assert_allclose(moved, plain_moved, atol=0.05 * largest)
    assert np.mean(np.abs(moved - plain_moved) <= 1e-5) >= 0.99


def _ephemeral_range() -> range:
    """The kernel's ephemeral ports: where bind(0), the fallback, takes one."""
    with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
        low, high = map(int, f.read().split())
    return range(low, high + 1)


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def test_the_collective_port_is_free_and_outside_the_ephemeral_range_where_outgoing_connections_take_theirs(
        tmp_path, monkeypatch):
    from trainer.train import backend

    ranges = tmp_path / "ip_local_port_range"
    ranges.write_text("32768\t60999\n")
    monkeypatch.setattr(backend, "EPHEMERAL_RANGE", str(ranges))
    ports = {backend.collective_port() for _ in range(20)}
    assert all(20_000 <= p < 32768 for p in ports) and len(ports) > 1  # two workers on a node differ
    assert all(_bindable(port) for port in ports)  # free when picked


def test_the_collective_port_falls_back_to_the_kernels_choice_where_there_is_no_room_below_its_range(
        tmp_path, monkeypatch):
    """An ephemeral range that leaves no room above Ray's worker ports (10000-...), or too little
    (500 ports: 20500-...), and a system without the file (not Linux) all take bind(0)'s port:
    one of the kernel's own ephemeral range (the real one: the file read is a stand-in), free."""
    from trainer.train import backend

    kernel = _ephemeral_range()
    assert kernel.start > 21_000, "this test tells the fallback's ports by the kernel's range above 21000"
    for name, text in (("none", "10000 60999\n"), ("little", "20500 60999\n"), ("missing", None)):
        path = tmp_path / name
        if text is not None:
            path.write_text(text)
        monkeypatch.setattr(backend, "EPHEMERAL_RANGE", str(path))
        ports = [backend.collective_port() for _ in range(5)]
        assert all(p in kernel and _bindable(p) for p in ports), (name, ports, kernel)


def test_the_collective_port_falls_back_to_the_kernels_choice_when_every_try_below_the_range_is_taken(monkeypatch):
    """A port below the range that is in use is skipped for the next try; when every try finds its
    port in use, the kernel's choice is taken: free, and from its ephemeral range."""
    from trainer.train import backend

    kernel = _ephemeral_range()  # and backend reads the same file
    assert kernel.start > 21_000, "this test needs room below the kernel's ephemeral range"
    asked = []

    class Picks:
        """Stands in for backend._RANDOM: the given ports in turn (the last one again after them)."""

        def __init__(self, *ports):
            self.ports = ports

        def randrange(self, low, high):
            asked.append((low, high))
            return self.ports[min(len(asked), len(self.ports)) - 1]

    held = []  # ports below the range, in use (bound by this test) while collective_port tries them
    try:
        for port in range(20_000, kernel.start):
            s = socket.socket()
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                s.close()
                continue
            held.append(s)
            if len(held) == 4:
                break
        taken = [s.getsockname()[1] for s in held]
        spare = taken.pop()
        held.pop().close()  # the fourth, let go: free

        monkeypatch.setattr(backend, "_RANDOM", Picks(*taken, spare))
        assert backend.collective_port() == spare and _bindable(spare)
        assert asked == [(20_000, kernel.start)] * 4  # three tries in use, then a free one

        asked.clear()
        monkeypatch.setattr(backend, "_RANDOM", Picks(*taken))
        port = backend.collective_port(tries=7)
        assert asked == [(20_000, kernel.start)] * 7  # every try found its port in use,
        assert port in kernel and _bindable(port)  # so the kernel's choice
    finally:
        for s in held:
            s.close()


PINNED = """
import os, threading
from trainer.train.step import pin_to_cores

available = sorted(os.sched_getaffinity(0))
assert pin_to_cores(0, len(available) + 1, 1) is None and sorted(os.sched_getaffinity(0)) == available
started, stop = threading.Event(), threading.Event()
def wait():
    started.set()
    stop.wait()
before = threading.Thread(target=wait)
before.start()
started.wait()
cores = pin_to_cores(1, 2, 1)
after = {}
later = threading.Thread(target=lambda: after.update(cores=sorted(os.sched_getaffinity(0))))
later.start()
later.join()
print(cores == [available[1]], sorted(os.sched_getaffinity(0)) == cores,
      sorted(os.sched_getaffinity(before.native_id)) == cores, after["cores"] == cores)
stop.set()
"""


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2,
                    reason="needs Linux CPU affinity and two cores")
def test_a_pinned_worker_holds_its_own_cores_on_every_thread_and_pins_nothing_when_cores_are_short():
    """--pin-cpus: the second of two 1-core workers gets the second core, for the thread that pins,
    a thread that existed before and one started after; more workers than cores pin nothing. In a
    process of its own: the test process keeps its cores."""
    from tests.conftest import ROOT

    proc = subprocess.run([sys.executable, "-c", PINNED], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.stdout == "True True True True\n", proc.stdout + proc.stderr
