"""The console's lines (trainer/train/console.py), from the events Ray Train's controller sees."""

from trainer.train.console import Lines, progress_line
from trainer.train.elastic import GREW, RERUN


def record(epoch: int, world: int = 2, seconds: float = 2.0, **extra) -> dict:
    return {"epoch": epoch, "world_size": world, "loss": 0.12345, "accuracy": 0.9612,
            "samples_per_second": 12000.4, "seconds": seconds, **extra}


def test_progress_line_estimates_the_time_left_from_the_median_epoch():
    assert progress_line(record(3, world=1, seconds=2.5), 5, [9.0, 2.0, 2.5]) == (
        "epoch 3/5  1 worker  loss 0.1235  accuracy 0.9612  12,000 samples/s  2.5s  ~5s left")
    assert progress_line(record(3, world=3), 5, [2.0]).startswith("epoch 3/5  3 workers  loss")


def test_a_restart_then_a_shrink_is_one_restart_line_and_the_size_on_the_next_epoch():
    lines = Lines(epochs=5)
    shown = lines.epoch(record(1)) + lines.epoch(record(2))
    shown += lines.restart("heartbeat timeout on rank 1", 3, 1, 3)
    shown += lines.epoch(record(3, world=1, resized_from=2)) + lines.epoch(record(4, world=1))
    assert [line.split("  ")[0] for line in shown] == [
        "epoch 1/5", "epoch 2/5",
        "restarted after a worker failure (heartbeat timeout on rank 1): continuing from epoch 3, restart 1 of 3",
        "epoch 3/5", "epoch 4/5"]
    assert shown[3].endswith("s left  (resized from 2)") and shown[3].split("  ")[1] == "1 worker"
    assert not shown[4].endswith(")")


def test_a_resize_without_a_failure_gets_a_line_of_its_own():
    grown = Lines(epochs=5)
    shown = grown.epoch(record(1)) + grown.epoch(record(2, world=3, resized_from=2))
    assert shown[1] == f"resized from 2 to 3 workers after epoch 1 ({GREW}); continuing from its checkpoint"
    rerun = Lines(epochs=5)  # a new launch: its first epoch is the rerun's, at another --num-workers
    assert rerun.epoch(record(3, world=1, resized_from=2))[0].startswith(f"resized from 2 to 1 workers after epoch 2 ({RERUN})")
    assert Lines(epochs=5).restart("x", 1, 2, -1) == [
        "restarted after a worker failure (x): continuing from epoch 1, restart 2 of unlimited"]
