"""The distributed step: TensorFlow and the strategy started, the model built under it, one traced
tf.function of strategy.run steps whose loss is averaged over the global batch, and a sum over all
workers.

Keras 3's `Model.fit` breaks under MultiWorkerMirroredStrategy (keras-team/keras#20585, then
tensorflow#72388), so the step is ours: `strategy.run` of a tape step whose loss is averaged over
the *global* batch with `tf.nn.compute_average_loss`, applied with the compiled model's optimizer.
Each worker feeds its own shard at the per-worker batch (global batch / workers); the optimizer
all-reduces (sums) the gradients, so every replica takes the same step. With more than one worker
the gradients cross in --allreduce-dtype (bfloat16: half the bytes), and the optimizer's update
casts them back to the weights' float32 (Keras's `update_step` does, for every optimizer)."""

from __future__ import annotations

import os
import time

import numpy as np

from trainer.common import quiet
from trainer.config import Config
from trainer.train import tf_internals


def pin_to_cores(local_rank: int, local_world: int, cpus: int) -> list[int] | None:
    """This worker process, every thread it has (TensorFlow's pools, its collectives' gRPC threads)
    and every one they start later, on the `local_rank`-th group of `cpus` cores of those it may use.
    Two workers of one core each stepped 1.4x faster pinned than left to the scheduler, whose
    migrations of the all-reduce's threads between the cores cost more than the sharing
    (docs/performance.md). None, pinning nothing, where the node's cores are fewer than its workers ask."""
    if not hasattr(os, "sched_setaffinity"):
        return None  # not Linux
    available = sorted(os.sched_getaffinity(0))
    if local_world * cpus > len(available):
        return None
    cores = available[local_rank * cpus:(local_rank + 1) * cpus]
    for thread in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(thread), cores)
        except OSError:  # a thread that ended meanwhile
            pass
    return cores


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


def build(strategy, cfg: Config, steps: int):
    """The compiled model with its optimizer's slots made, under the strategy (`steps` per epoch
    time the learning-rate warm-up)."""
    from trainer.model.network import build_model

    with strategy.scope():
        model = build_model(cfg, steps_per_epoch=steps)
        model.optimizer.build(model.trainable_variables)
    return model


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


def make_train_steps(tf, strategy, model, global_batch_size: int, allreduce_dtype: str = "float32"):
    """A tf.function running one distributed step per batch it is given (uint8 images, labels);
    returns this worker's (loss sum, correct, seen). Traced once: the signature fixes the types.
    The gradients are all-reduced in `allreduce_dtype` when there is more than one worker."""
    from trainer.model.network import preprocess

    per_example_loss = model.loss.call  # the compiled loss, unreduced
    reduce_as = tf.as_dtype(allreduce_dtype) if strategy.num_replicas_in_sync > 1 else tf.float32

    def step(x, y):
        with tf.GradientTape() as tape:
            probs = model(x, training=True)
            losses = per_example_loss(y, probs)
            loss = tf.nn.compute_average_loss(losses, global_batch_size=global_batch_size)
            if model.losses:
                loss += tf.nn.scale_regularization_loss(tf.add_n(model.losses))
        grads = [tf.cast(g, reduce_as) for g in tape.gradient(loss, model.trainable_variables)]
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


def make_validation(tf, model, images: np.ndarray, labels: np.ndarray, rank: int, world: int, all_reduce_sum):
    """A function scoring the model on the held-out rows (a search's validation split, never the
    test split): each rank its own every world-th row, the sums all-reduced, so every rank gets the
    whole split's {"val_loss", "val_accuracy"} and none waits on another's share."""
    from trainer.model.network import preprocess

    x, y = preprocess(images[rank::world], labels[rank::world])
    forward = tf.function(lambda batch: model(batch, training=False), reduce_retracing=True)

    def score() -> dict:
        sums = np.zeros(3)
        for start in range(0, len(x), 1000):
            probs, truth = forward(x[start:start + 1000]).numpy(), y[start:start + 1000]
            sums += ((probs.argmax(1) == truth.argmax(1)).sum(),
                     -np.log(np.clip((probs * truth).sum(1), 1e-7, 1.0)).sum(), len(truth))
        correct, loss, rows = all_reduce_sum(sums)
        return {"val_loss": float(loss / rows), "val_accuracy": float(correct / rows)}

    return score
