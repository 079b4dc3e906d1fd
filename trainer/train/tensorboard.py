"""Per-epoch TensorBoard scalars, written by rank 0 only: `tensorboard --logdir DIR` shows them.

Tags: loss, accuracy, learning_rate, samples_per_second; the step is the epoch (1-based), so a
resumed run appends to the same curves in a new event file.
"""

from __future__ import annotations

from trainer.common import errors

TAGS = ("loss", "accuracy", "learning_rate", "samples_per_second")


class EpochWriter:
    """A tf.summary file writer for one run; `write(record, optimizer)` once per epoch."""

    def __init__(self, directory: str):
        import tensorflow as tf

        self._tf = tf
        try:
            tf.io.gfile.makedirs(directory)
            self._writer = tf.summary.create_file_writer(directory)
        except (tf.errors.UnimplementedError, tf.errors.OpError) as exc:
            raise ValueError(f"--tensorboard-dir {directory}: cannot write event files there "
                             f"({errors.first_line(exc.message)})") from None

    def write(self, record: dict, optimizer) -> None:
        """Scalars of one epoch record; the learning rate is the record's, else the optimizer's now."""
        values = {tag: record[tag] for tag in TAGS if tag in record}
        values.setdefault("learning_rate", float(self._tf.convert_to_tensor(optimizer.learning_rate)))
        with self._writer.as_default(step=int(record["epoch"])):
            for tag, value in values.items():
                self._tf.summary.scalar(tag, float(value))
        self._writer.flush()  # visible to a live `tensorboard --logdir` after each epoch

    def close(self) -> None:
        self._writer.close()
