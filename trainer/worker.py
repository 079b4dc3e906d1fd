"""What runs on each Ray Train worker: a Keras 3 model under MultiWorkerMirroredStrategy.

Keras 3's `Model.fit` breaks under MultiWorkerMirroredStrategy (keras-team/keras#20585, then
tensorflow#72388), so the step is ours: `strategy.run` of a tape step whose loss is averaged over
the *global* batch with `tf.nn.compute_average_loss`, applied with the compiled model's optimizer.
Each worker feeds its own shard at the per-worker batch (global batch / workers); the optimizer
all-reduces (sums) the gradients, so every replica takes the same step.

TensorFlow is imported inside the loop, not at the top of this module: the worker starts pulling
its Ray Data shard first, and the import (seconds) overlaps with it.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sys
import tempfile
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import ray.train

from trainer import checkpoint, quiet, stream, tf_internals, warm
from trainer.config import Config, rank_batch, steps_per_epoch
from trainer.data import images_from_column
from trainer.elastic import resizes
from trainer.failures import WorkerFailure, summarize
from trainer.tensorboard import EpochWriter  # imports TensorFlow only when a writer is made
from trainer.timeline import peak_rss_mb, process_start_time


def train_loop_per_worker(loop_config: dict) -> None:
    cfg = Config.from_dict(loop_config["config"])
    if not cfg.verbose:
        quiet.quiet_ray_train_console()
    try:
        _train(cfg, loop_config)
    except Exception as exc:  # crosses to the controller and driver as a plain, short exception
        log = quiet.log_file()
        with open(log, "a") as f:
            traceback.print_exc(file=f)
        raise WorkerFailure(summarize(exc, log)) from None


def _train(cfg: Config, loop_config: dict) -> None:
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    marks = {"worker_started": process_start_time(), "loop_started": time.time()}
    streamed = loop_config.get("stream")  # the streaming path's Parquet files; else Ray Data's shard
    shard = None if streamed else ray.train.get_dataset_shard("train")
    with ThreadPoolExecutor(1) as pool:  # the shard is read (or planned) while TensorFlow imports
        opening = pool.submit(open_share, cfg, streamed or shard, world, rank)
        tf, strategy, internals = start_tensorflow(cfg)
        marks["tensorflow_imported"] = time.time()
        index, epoch_data = opening.result()
    marks["shard_in_memory"] = time.time()
    # The global batch is the same at every world size; this rank's share, and the steps all ranks run:
    batch, steps = rank_batch(cfg.batch_size, world, rank), steps_per_epoch(len(index), cfg.batch_size, world)
    model = build(strategy, cfg, steps)
    if loop_config.get("init"):  # --init-from: a trained model's weights; a checkpoint, if any, overrides
        warm.apply(model, **loop_config["init"])
    epochs_done, history = _restore(model)  # restores optimizer.iterations, which drives the LR warm-up
    train_steps, all_reduce_sum = make_train_steps(tf, strategy, model, cfg.batch_size), make_all_reduce_sum(tf, strategy)
    board = EpochWriter(cfg.tensorboard_dir) if cfg.tensorboard_dir and rank == 0 else None
    previous_world = history[-1].get("world_size", world) if history else world  # != world: a resize
    launched = [h["first_step_unix"] for h in history if h.get("launch") == loop_config["launch"]]
    if launched:  # a restart within this launch: its first step was an earlier group's
        marks["first_step"] = min(launched)
    watchdog = Watchdog(cfg.stall_timeout_s, internals.abort_collectives)
    try:
        info = {**shard_info(all_reduce_sum, index, loop_config["train_rows"]), "rank": rank, "pid": os.getpid(),
                "node_id": ray.get_runtime_context().get_node_id(), "batch": batch}
        marks["collectives_ready"] = time.time()
        for epoch in range(epochs_done, cfg.epochs):
            with epoch_data(batch, steps, seed=(cfg.seed, rank, epoch)) as chunks:
                record = run_epoch(train_steps, all_reduce_sum, chunks, batch, steps, progress=watchdog.beat)
            record.update(epoch=epoch + 1, restarted=epoch == epochs_done and epoch > 0, world_size=world,
                          launch=loop_config["launch"],
                          learning_rate=float(tf.convert_to_tensor(model.optimizer.learning_rate)),
                          **{k: info[k] for k in ("global_rows_seen", "global_rows_duplicated")})
            if epoch == epochs_done and previous_world != world:
                record["resized_from"] = previous_world
            history.append(record)
            marks.setdefault("first_step", record["first_step_unix"])
            marks["last_step"] = record["first_step_unix"] + record["seconds"]
            if rank == 0:
                _announce(record, cfg.epochs, history, board, model)
            with watchdog.paused():  # a slow checkpoint upload is no stall of a peer
                _report(model, cfg, epoch, history, {**info, "timeline": marks, "peak_rss_mb": peak_rss_mb()}, rank)
    finally:
        watchdog.stop()
        if board:
            board.close()


def start_tensorflow(cfg: Config):
    """Import TensorFlow and make the strategy: thread counts and the coordination service's
    heartbeat timeout (--stall-timeout-s) first, before TensorFlow runs anything."""
    tf = quiet.import_tensorflow(cfg.verbose)
    internals = tf_internals.resolve(tf)  # fails now, not when a peer is gone, if an upgrade moved them
    if not cfg.use_gpu:  # a CPU worker on a GPU machine leaves the GPUs to whoever reserved them
        tf.config.set_visible_devices([], "GPU")
    tf.config.threading.set_intra_op_parallelism_threads(cfg.cpus_per_worker)
    tf.config.threading.set_inter_op_parallelism_threads(cfg.cpus_per_worker)
    # MultiWorkerMirroredStrategy would configure it with TensorFlow's 10 s heartbeat timeout: a worker
    # frozen for 10 s (measured: a SIGSTOP of 10 s) then aborted every worker's collectives.
    internals.configure_coordination(cfg.stall_timeout_s)
    # No timeout_seconds here: TensorFlow times each collective with a thread that sleeps the whole
    # timeout, about 4 a step; at 300 s the threads grew by ~390/s and a long run aborted (measured,
    # docs/design.md). Watchdog bounds the wait instead, with one thread.
    options = tf.distribute.experimental.CommunicationOptions(
        implementation=tf.distribute.experimental.CommunicationImplementation.RING)
    return tf, tf.distribute.MultiWorkerMirroredStrategy(communication_options=options), internals


class Watchdog:
    """Aborts this worker's collectives when nothing has progressed for `timeout_s` (a peer that is
    gone, or frozen past --stall-timeout-s, leaves them waiting for ever), so the step fails and Ray
    Train restarts the group. One thread, whatever the number of steps; `abort` is the call
    TensorFlow's own peer health check makes (trainer/tf_internals.py)."""

    def __init__(self, timeout_s: float, abort):
        self.timeout_s, self.abort, self._stopped = timeout_s, abort, threading.Event()
        self.last: float | None = time.monotonic()  # None: paused
        threading.Thread(target=self._watch, name="collective-watchdog", daemon=True).start()

    def stop(self) -> None:
        self._stopped.set()

    def beat(self) -> None:
        """Progress: a training call or a collective finished."""
        self.last = time.monotonic()

    @contextlib.contextmanager
    def paused(self):
        """No collective runs in the block (a checkpoint upload): no clock; it restarts after."""
        self.last = None
        try:
            yield
        finally:
            self.beat()

    def _watch(self) -> None:
        while not self._stopped.wait(min(self.timeout_s / 10, 5.0)):
            last = self.last
            if last is not None and time.monotonic() - last > self.timeout_s:
                self.abort(f"no progress for {self.timeout_s:g}s: a peer is gone or stalled (--stall-timeout-s)")
                return


def build(strategy, cfg: Config, steps: int):
    """The compiled model with its optimizer's slots made, under the strategy (`steps` per epoch
    time the learning-rate warm-up)."""
    from trainer.model import build_model

    with strategy.scope():
        model = build_model(cfg, steps_per_epoch=steps)
        model.optimizer.build(model.trainable_variables)
    return model


def open_share(cfg: Config, source, world: int, rank: int):
    """This worker's data: (its rows' indices in the split, epoch_data(batch, steps, seed): a context
    manager giving one epoch's (steps, batch) chunks, at most --steps-per-call steps each).
    `source` is Ray Data's shard (the in-memory path: read once, kept) or the streaming path's
    {"path", "files"} (trainer/stream.py: read every epoch, a shuffle buffer at a time)."""
    if not isinstance(source, dict):
        images, labels, index = read_shard(source)
        return index, lambda batch, steps, seed: contextlib.nullcontext(
            chunked(images, labels, batch, seed, steps, cfg.steps_per_call))
    segments = stream.plan_share([f["rows"] for f in source["files"]], world, rank)
    read = stream.ShareReader(source["path"], source["files"])
    return stream.share_index(segments), lambda batch, steps, seed: stream.Prefetch(
        stream.epoch_chunks(read, segments, batch, steps, cfg.steps_per_call, seed))


def chunked(images, labels, batch: int, seed: tuple, steps: int, steps_per_call: int):
    """epoch_batches' arrays, made when the epoch starts (its clock includes the shuffle), in chunks
    of at most steps_per_call steps (views)."""
    xs, ys = epoch_batches(images, labels, batch, seed, steps)
    for i in range(0, len(xs), steps_per_call):
        yield xs[i:i + steps_per_call], ys[i:i + steps_per_call]


def read_shard(shard) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Materialize this worker's Ray Data shard once, in memory: (images, labels, row indices)."""
    parts = list(shard.iter_batches(batch_size=10_000, batch_format="numpy"))
    if not parts:
        raise RuntimeError("this worker's data shard is empty; use fewer workers or more data")
    images = np.concatenate([images_from_column(p["image"]) for p in parts])
    labels = np.concatenate([p["label"] for p in parts]).astype(np.uint8)
    index = np.concatenate([p["index"] for p in parts]).astype(np.int64)
    return images, labels, index


def run_epoch(train_steps, all_reduce_sum, chunks, batch: int, steps: int, progress=lambda: None) -> dict:
    """One pass over this worker's `chunks` (open_share's); loss, accuracy and examples summed over
    every worker, and the global batch (the ranks' batches summed) that each of the epoch's `steps`
    steps used. `progress` is called after each training call (the watchdog's beat)."""
    started, first_step = time.perf_counter(), time.time()
    totals = np.zeros(4)  # loss sum, correct, examples on this worker; then its batch
    for xs, ys in chunks:
        totals[:3] += [t.numpy() for t in train_steps(xs, ys)]
        progress()
    totals[3] = batch
    loss_sum, correct, seen, global_batch = all_reduce_sum(totals)
    seconds = time.perf_counter() - started
    return {"loss": loss_sum / seen, "accuracy": correct / seen, "seconds": seconds,
            "samples_per_second": seen / seconds, "first_step_unix": first_step,
            "steps": steps, "global_batch": int(global_batch), "examples": int(seen)}


def epoch_batches(images: np.ndarray, labels: np.ndarray, batch_size: int, seed: tuple, steps: int | None = None):
    """One epoch, shuffled by `seed` and cut into (steps, batch, 28, 28) images and (steps, batch)
    labels, uint8; `steps` (default: as many as fit) is what every worker runs, the rest is dropped.
    No tf.data: under MultiWorkerMirroredStrategy deleting a tf.data iterator took about 2 s at each
    epoch's end (measured on 2 cores), so the steps take their batches straight from these arrays."""
    steps = len(images) // batch_size if steps is None else steps
    order = np.random.default_rng(seed).permutation(len(images))[:steps * batch_size]
    return images[order].reshape(steps, batch_size, *images.shape[1:]), labels[order].reshape(steps, batch_size)


def make_train_steps(tf, strategy, model, global_batch_size: int):
    """A tf.function running one distributed step per batch it is given (uint8 images, labels);
    returns this worker's (loss sum, correct, seen). Traced once: the signature fixes the types."""
    from trainer.model import preprocess

    per_example_loss = model.loss.call  # the compiled loss, unreduced

    def step(x, y):
        with tf.GradientTape() as tape:
            probs = model(x, training=True)
            losses = per_example_loss(y, probs)
            loss = tf.nn.compute_average_loss(losses, global_batch_size=global_batch_size)
            if model.losses:
                loss += tf.nn.scale_regularization_loss(tf.add_n(model.losses))
        grads = tape.gradient(loss, model.trainable_variables)
        model.optimizer.apply_gradients(zip(grads, model.trainable_variables))
        correct = tf.reduce_sum(tf.cast(tf.equal(tf.argmax(probs, 1), tf.argmax(y, 1)), tf.float32))
        return tf.reduce_sum(losses), correct, tf.cast(tf.shape(x)[0], tf.float32)

    @tf.function(input_signature=[tf.TensorSpec((None, None, 28, 28), tf.uint8),
                                  tf.TensorSpec((None, None), tf.uint8)])
    def train_steps(images, labels):
        totals = (tf.constant(0.0), tf.constant(0.0), tf.constant(0.0))
        for i in tf.range(tf.shape(images)[0]):
            results = strategy.run(step, args=preprocess(images[i], labels[i]))
            totals = tuple(t + strategy.experimental_local_results(r)[0] for t, r in zip(totals, results))
        return totals

    return train_steps


def make_all_reduce_sum(tf, strategy):
    """A function summing a float vector over all workers (a collective every worker must join).
    Traced once per vector length, so calling it every epoch re-traces nothing."""
    @tf.function(reduce_retracing=True)
    def reduce(local):
        return strategy.reduce(tf.distribute.ReduceOp.SUM, strategy.run(tf.identity, args=(local,)), axis=None)

    return lambda values: reduce(tf.constant(np.asarray(values, dtype=np.float32))).numpy().astype(np.float64)


def shard_info(all_reduce_sum, index: np.ndarray, train_rows: int) -> dict:
    """What this worker trains on, plus a global check that shards are disjoint and cover the data."""
    counts = all_reduce_sum(np.bincount(index, minlength=train_rows)[:train_rows])
    return {"rows": int(len(index)), "index_sha256": hashlib.sha256(np.sort(index).tobytes()).hexdigest(),
            "global_rows_seen": int((counts > 0).sum()), "global_rows_duplicated": int((counts > 1).sum())}


def _restore(model) -> tuple[int, list[dict]]:
    """Continue from Ray's latest checkpoint, if the run has one (a restart or a resumed run)."""
    latest = ray.train.get_checkpoint()
    if latest is None:
        return 0, []
    with latest.as_directory() as directory:
        meta = checkpoint.load(directory, model)
    return meta["epochs_done"], meta["history"]


def _report(model, cfg: Config, epoch: int, history: list[dict], info: dict, rank: int) -> None:
    """Every rank adds its own worker file to the epoch's checkpoint (Ray merges them); rank 0 the state."""
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint.write_worker_info(tmp, rank, info)
        if rank == 0:
            checkpoint.save(tmp, model, epoch + 1, cfg.to_dict(), history)
        ray.train.report({**history[-1], "global_rows_seen": info["global_rows_seen"],
                          "global_rows_duplicated": info["global_rows_duplicated"]},
                         checkpoint=ray.train.Checkpoint.from_directory(tmp))


def _announce(record: dict, epochs: int, history: list[dict], board, model) -> None:
    """Rank 0's epoch line (sys.stdout, not print: Ray Train's print patch would log it twice)."""
    if "resized_from" in record:
        (resize,) = resizes([history[-2], record])
        sys.stdout.write(f"resized from {resize['from']} to {resize['to']} workers after epoch "
                         f"{resize['after_epoch']} ({resize['reason']}); continuing from its checkpoint\n")
    sys.stdout.write(progress_line(record, epochs, history) + "\n")
    sys.stdout.flush()
    if board:
        board.write(record, model.optimizer)


def progress_line(record: dict, epochs: int, history: list[dict]) -> str:
    per_epoch = float(np.median([h["seconds"] for h in history]))
    left = per_epoch * (epochs - record["epoch"])
    workers = record.get("world_size", 1)
    return (f"epoch {record['epoch']}/{epochs}  {workers} worker{'s' if workers > 1 else ''}  loss {record['loss']:.4f}  "
            f"accuracy {record['accuracy']:.4f}  {record['samples_per_second']:,.0f} samples/s  "
            f"{record['seconds']:.1f}s  ~{left:.0f}s left")
