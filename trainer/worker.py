"""What runs on each Ray Train worker: a Keras 3 model under MultiWorkerMirroredStrategy.

Keras 3's `Model.fit` breaks under MultiWorkerMirroredStrategy (keras-team/keras#20585, then
tensorflow#72388), so the step is ours: `strategy.run` of a tape step whose loss is averaged over
the *global* batch with `tf.nn.compute_average_loss`, applied with the compiled model's optimizer.
Each worker feeds its own shard at the per-worker batch (global batch / workers); the optimizer
all-reduces (sums) the gradients, so every replica takes the same step.
"""

from __future__ import annotations

import hashlib
import os
import resource
import sys
import tempfile
import time

import numpy as np
import ray.train

from trainer import checkpoint
from trainer.config import Config
from trainer.data import images_from_column
from trainer.tensorboard import EpochWriter


def train_loop_per_worker(loop_config: dict) -> None:
    os.environ.pop("TF_USE_LEGACY_KERAS", None)  # Ray's TF backend sets it; this job is Keras 3
    cfg = Config.from_dict(loop_config["config"])
    tf, strategy = _start_tensorflow(cfg)
    from trainer.model import build_model

    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    images, labels, index = read_shard(ray.train.get_dataset_shard("train"))
    shard = _shard_report(strategy, rank, index, loop_config["train_rows"])
    steps = len(images) // cfg.per_worker_batch
    with strategy.scope():
        model = build_model(cfg, steps_per_epoch=steps)
        model.optimizer.build(model.trainable_variables)
    epochs_done, history = _restore(model)  # restores optimizer.iterations, which drives the LR warm-up
    train_steps = make_train_steps(tf, strategy, model, cfg.batch_size)
    board = EpochWriter(cfg.tensorboard_dir) if rank == 0 and cfg.tensorboard_dir else None  # rank 0 only

    for epoch in range(epochs_done, cfg.epochs):
        started, first_step_unix = time.perf_counter(), time.time()
        batches = iter(_batches(tf, images, labels, cfg.per_worker_batch, seed=(cfg.seed, rank, epoch)))
        totals = np.zeros(3)  # loss sum, correct, examples on this worker
        for done in range(0, steps, cfg.steps_per_call):
            totals += [t.numpy() for t in train_steps(batches, tf.constant(min(cfg.steps_per_call, steps - done)))]
        memory = _peak_rss_mb(rank, ctx.get_world_size())  # this rank's slot; the sum lists every rank
        loss_sum, correct, seen, *rss_mb = all_reduce_sum(tf, strategy, np.concatenate([totals, memory]))
        seconds = time.perf_counter() - started
        record = {"epoch": epoch + 1, "loss": loss_sum / seen, "accuracy": correct / seen,
                  "seconds": seconds, "samples_per_second": seen / seconds,
                  "restarted": bool(epoch == epochs_done and epoch > 0),
                  "learning_rate": float(tf.convert_to_tensor(model.optimizer.learning_rate)),  # at the end
                  "peak_rss_mb": max(rss_mb), "first_step_unix": first_step_unix}
        history.append(record)
        if rank == 0:  # sys.stdout, not print: Ray Train's print patch would log it twice
            sys.stdout.write(_progress_line(record, cfg.epochs, history) + "\n")
            sys.stdout.flush()
            if board:
                board.write(record, model.optimizer)
        with tempfile.TemporaryDirectory() as tmp:  # every rank adds its own file; Ray merges them
            checkpoint.write_worker_info(tmp, rank, shard)
            if rank == 0:
                checkpoint.save(tmp, model, epoch + 1, cfg.to_dict(), history)
            ray.train.report({**record, "global_rows_seen": shard["global_rows_seen"],
                              "global_rows_duplicated": shard["global_rows_duplicated"]},
                             checkpoint=ray.train.Checkpoint.from_directory(tmp))
    if board:
        board.close()


def _peak_rss_mb(rank: int, world_size: int) -> np.ndarray:
    """This process's peak resident memory (MB) at index `rank` of a zero vector."""
    memory = np.zeros(world_size)
    memory[rank] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
    return memory


def _start_tensorflow(cfg: Config):
    """Thread counts and the strategy must be set before TensorFlow runs anything."""
    import tensorflow as tf

    tf.get_logger().setLevel("WARNING")
    tf.config.threading.set_intra_op_parallelism_threads(cfg.cpus_per_worker)
    tf.config.threading.set_inter_op_parallelism_threads(cfg.cpus_per_worker)
    options = tf.distribute.experimental.CommunicationOptions(
        implementation=tf.distribute.experimental.CommunicationImplementation.RING,
        timeout_seconds=cfg.collective_timeout_s)  # a dead peer fails the step; Ray restarts the group
    return tf, tf.distribute.MultiWorkerMirroredStrategy(communication_options=options)


def read_shard(shard) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Materialize this worker's Ray Data shard once, in memory: (images, labels, row indices)."""
    parts = list(shard.iter_batches(batch_size=10_000, batch_format="numpy"))
    if not parts:
        raise RuntimeError("this worker's data shard is empty; use fewer workers or more data")
    images = np.concatenate([images_from_column(p["image"]) for p in parts])
    labels = np.concatenate([p["label"] for p in parts]).astype(np.uint8)
    index = np.concatenate([p["index"] for p in parts]).astype(np.int64)
    return images, labels, index


def _batches(tf, images, labels, batch_size: int, seed: tuple):
    """One epoch of shuffled (pixels in [0,1], one-hot labels) batches; the last partial batch is
    dropped so every worker runs the same number of steps. Shuffled and cut into batches in numpy,
    so tf.data handles one element per batch, not one per image (its per-element cost halved the
    pipeline's time)."""
    def to_model_input(x, y):
        return tf.reshape(tf.cast(x, tf.float32) / 255.0, (-1, 784)), tf.one_hot(tf.cast(y, tf.int32), 10)

    steps = len(images) // batch_size
    order = np.random.default_rng(seed).permutation(len(images))[:steps * batch_size]
    return (tf.data.Dataset.from_tensor_slices((images[order].reshape(steps, batch_size, *images.shape[1:]),
                                                labels[order].reshape(steps, batch_size)))
            .map(to_model_input, num_parallel_calls=tf.data.AUTOTUNE)
            .prefetch(tf.data.AUTOTUNE))


def make_train_steps(tf, strategy, model, global_batch_size: int):
    """A tf.function running `n` distributed steps; returns this worker's (loss sum, correct, seen)."""
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

    @tf.function
    def train_steps(iterator, n):
        totals = (tf.constant(0.0), tf.constant(0.0), tf.constant(0.0))
        for _ in tf.range(n):
            results = strategy.run(step, args=next(iterator))
            totals = tuple(t + strategy.experimental_local_results(r)[0] for t, r in zip(totals, results))
        return totals

    return train_steps


def all_reduce_sum(tf, strategy, values) -> np.ndarray:
    """Sum a float vector over all workers (a collective every worker must join)."""
    @tf.function
    def reduce(local):
        return strategy.reduce(tf.distribute.ReduceOp.SUM, strategy.run(tf.identity, args=(local,)), axis=None)

    return reduce(tf.constant(np.asarray(values, dtype=np.float32))).numpy().astype(np.float64)


def _shard_report(strategy, rank: int, index: np.ndarray, train_rows: int) -> dict:
    """What this worker trains on, plus a global check that shards are disjoint and cover the data."""
    import tensorflow as tf

    counts = all_reduce_sum(tf, strategy, np.bincount(index, minlength=train_rows)[:train_rows])
    return {
        "rank": rank, "node_id": ray.get_runtime_context().get_node_id(), "pid": os.getpid(),
        "rows": int(len(index)), "index_sha256": hashlib.sha256(np.sort(index).tobytes()).hexdigest(),
        "global_rows_seen": int((counts > 0).sum()), "global_rows_duplicated": int((counts > 1).sum()),
    }


def _restore(model) -> tuple[int, list[dict]]:
    """Continue from Ray's latest checkpoint, if the run has one (a restart or a resumed run)."""
    latest = ray.train.get_checkpoint()
    if latest is None:
        return 0, []
    with latest.as_directory() as directory:
        meta = checkpoint.load(directory, model)
    return meta["epochs_done"], meta["history"]


def _progress_line(record: dict, epochs: int, history: list[dict]) -> str:
    per_epoch = float(np.median([h["seconds"] for h in history]))
    left = per_epoch * (epochs - record["epoch"])
    return (f"epoch {record['epoch']}/{epochs}  loss {record['loss']:.4f}  "
            f"accuracy {record['accuracy']:.4f}  {record['samples_per_second']:,.0f} samples/s  "
            f"{record['seconds']:.1f}s  ~{left:.0f}s left")
