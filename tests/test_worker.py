"""The worker's batching and distributed step, without Ray: a one-device MirroredStrategy runs the
same `strategy.run` code path the workers run under MultiWorkerMirroredStrategy."""

import numpy as np
import pytest
import tensorflow as tf

from tests.conftest import SAMPLE
from trainer.config import Config
from trainer.model import build_model, preprocess
from trainer.worker import batches_of, make_all_reduce_sum, make_train_steps, progress_line, shard_info


@pytest.fixture(scope="module")
def sample():
    with np.load(SAMPLE) as npz:
        return npz["x_train"][:1000], npz["y_train"][:1000]


@pytest.fixture(scope="module")
def strategy():
    return tf.distribute.MirroredStrategy(["/cpu:0"])


def test_batches_are_shuffled_by_seed_cover_distinct_digits_and_drop_the_partial_batch(sample):
    images, labels = sample
    batches = list(batches_of(tf, images, labels, 64, seed=(0, 1, 2)))
    assert len(batches) == 1000 // 64 and all(x.shape == (64, 784) and y.shape == (64, 10) for x, y in batches)
    pixels = np.concatenate([x.numpy() for x, _ in batches])
    assert len({row.tobytes() for row in pixels}) == len(pixels)  # no digit twice in an epoch
    again = list(batches_of(tf, images, labels, 64, seed=(0, 1, 2)))
    other = list(batches_of(tf, images, labels, 64, seed=(0, 1, 3)))
    assert np.array_equal(again[0][0], batches[0][0]) and not np.array_equal(other[0][0], batches[0][0])
    x, y = map(np.asarray, preprocess(images, labels))
    first = {row.tobytes(): label for row, label in zip(x, y.argmax(1))}
    assert all(first[row.tobytes()] == label for row, label in zip(pixels, batches[0][1].numpy().argmax(1)))


def test_a_distributed_step_is_the_plain_gradient_step_on_the_global_batch(sample, strategy):
    """The loss is averaged over the global batch: one strategy step moves the weights exactly as
    one plain GradientTape step on the same 128 digits does."""
    images, labels = sample
    cfg = Config(num_workers=1)
    x, y = preprocess(images[:128], labels[:128])
    with strategy.scope():
        distributed = build_model(cfg)
        distributed.optimizer.build(distributed.trainable_variables)
    train_steps = make_train_steps(tf, strategy, distributed, global_batch_size=128)
    loss_sum, correct, seen = train_steps(iter(strategy.experimental_distribute_dataset(
        tf.data.Dataset.from_tensors((x, y)))), tf.constant(1))
    plain = build_model(cfg)  # same seed: same initial weights
    with tf.GradientTape() as tape:
        loss = plain.loss(y, plain(x, training=True))
    plain.optimizer.apply_gradients(zip(tape.gradient(loss, plain.trainable_variables), plain.trainable_variables))
    for a, b in zip(distributed.get_weights(), plain.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert float(seen) == 128 and 0 <= float(correct) <= 128
    assert float(loss_sum) / 128 == pytest.approx(float(loss), rel=1e-5)


def test_an_epoch_of_steps_lowers_the_loss(sample, strategy):
    images, labels = sample
    with strategy.scope():
        model = build_model(Config(num_workers=1))
        model.optimizer.build(model.trainable_variables)
    train_steps = make_train_steps(tf, strategy, model, global_batch_size=100)
    losses = []
    for epoch in range(3):
        batches = iter(strategy.experimental_distribute_dataset(batches_of(tf, images, labels, 100, (0, 0, epoch))))
        loss_sum, _, seen = train_steps(batches, tf.constant(10))
        losses.append(float(loss_sum) / float(seen))
        assert float(seen) == 1000
    assert losses[2] < losses[0] / 2, losses


def test_all_reduce_sum_and_the_shard_check(strategy):
    all_reduce_sum = make_all_reduce_sum(tf, strategy)
    np.testing.assert_array_equal(all_reduce_sum([1.0, 2.5, 3.0]), [1.0, 2.5, 3.0])  # one replica
    info = shard_info(all_reduce_sum, np.array([4, 0, 2, 2]), train_rows=6)
    assert info["rows"] == 4 and info["global_rows_seen"] == 3 and info["global_rows_duplicated"] == 1


def test_progress_line_estimates_the_time_left_from_the_median_epoch():
    history = [{"seconds": 9.0}, {"seconds": 2.0}, {"seconds": 2.5}]
    record = {"epoch": 3, "loss": 0.12345, "accuracy": 0.9612, "samples_per_second": 12000.4, "seconds": 2.5}
    assert progress_line(record, 5, history) == (
        "epoch 3/5  loss 0.1235  accuracy 0.9612  12,000 samples/s  2.5s  ~5s left")
