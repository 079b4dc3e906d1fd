"""Warm-start retraining against cold training, on full MNIST: what --init-from saves.

    python scripts/warm_vs_cold.py --data ../shared/data/mnist        # about 4 minutes on 2 cores

The situation scheduled retraining meets: a current model trained on the first 50,000 training images,
and now all 60,000. Three runs of the real job (default flags otherwise, every epoch's checkpoint kept):
  base  cold, 5 epochs on the first 50,000 (the "current version")
  cold  cold, 5 epochs on all 60,000 (what retraining does without --warm-start)
  warm  --init-from base's mnist.keras, on all 60,000
Every epoch's checkpoint of cold and warm is scored on the 10,000 test images, then the script prints,
for each, the test accuracy after each epoch with the training seconds so far, and how many epochs
and seconds each needs to reach cold's final accuracy; then it runs warm for just that many epochs,
start-up included, as a --warm-start retraining cycle would.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np

from trainer.common.cli import script_parser

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
JOB = os.path.join(ROOT, "jobs", "train_mnist.py")
BASE_ROWS = 50_000


def run_job(out: str, name: str, *args: str) -> tuple[dict, float]:
    """One job run into <out>/<name> (every epoch's checkpoint kept); its metrics and wall seconds."""
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, JOB, *args, "--output", os.path.join(out, name), "--run-name", name,
                           "--storage-path", os.path.join(out, "runs"), "--keep-checkpoints", "10"],
                          cwd=ROOT, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"error: the {name} run failed:\n{proc.stderr[-3000:]}")
    with open(os.path.join(out, name, "metrics.json")) as f:
        return json.load(f), time.perf_counter() - started


def per_epoch_accuracy(out: str, name: str, mnist) -> dict[int, float]:
    """Test accuracy of each epoch's checkpoint of run `name`."""
    from trainer.config import Config
    from trainer.model.network import build_model, evaluate
    from trainer.train import checkpoint

    run_dir, scores = os.path.join(out, "runs", name), {}
    for entry in sorted(os.listdir(run_dir)):
        directory = os.path.join(run_dir, entry)
        if not entry.startswith("checkpoint_") or not os.path.isfile(os.path.join(directory, checkpoint.META)):
            continue
        with open(os.path.join(directory, checkpoint.META)) as f:
            model = build_model(Config.from_dict(json.load(f)["config"]))
        model.optimizer.build(model.trainable_variables)
        meta = checkpoint.load(directory, model)
        scores[meta["epochs_done"]] = evaluate(model, mnist.x_test, mnist.y_test)[1]
    return scores


def reach(scores: dict[int, float], history: list[dict], target: float) -> tuple[int | None, float | None]:
    """(epochs, training seconds) until the test accuracy first reaches `target`, or (None, None)."""
    seconds = np.cumsum([h["seconds"] for h in history])
    for epoch in sorted(scores):
        if scores[epoch] >= target:
            return epoch, float(seconds[epoch - 1])
    return None, None


def main(argv: list[str] | None = None) -> int:
    parser = script_parser(__doc__)
    parser.add_argument("--data", default=os.environ.get("MNIST_DATA"), help="full MNIST (default: $MNIST_DATA)")
    parser.add_argument("--out", default="/tmp/warm-vs-cold", help="a scratch folder (emptied first)")
    parser.add_argument("--epochs", type=int, default=5, help="epochs of each run")
    args = parser.parse_args(argv)
    from trainer.common import quiet
    from trainer.data import shards

    if not args.data:
        return parser.error("give --data (full MNIST) or set MNIST_DATA")
    mnist = shards.load(shards.resolve_source(args.data))
    if len(mnist.x_train) <= BASE_ROWS:
        return parser.error(f"--data has {len(mnist.x_train)} training images; this needs more than {BASE_ROWS}")
    subprocess.run(["rm", "-rf", args.out], check=True)
    os.makedirs(args.out)
    base_npz = os.path.join(args.out, "mnist-50k.npz")
    np.savez(base_npz, x_train=mnist.x_train[:BASE_ROWS], y_train=mnist.y_train[:BASE_ROWS],
             x_test=mnist.x_test, y_test=mnist.y_test)

    epochs = ("--epochs", str(args.epochs))
    base, base_wall = run_job(args.out, "base", "--data", base_npz, *epochs)
    cold, cold_wall = run_job(args.out, "cold", "--data", args.data, *epochs)
    warm, warm_wall = run_job(args.out, "warm", "--data", args.data, *epochs,
                              "--init-from", os.path.join(args.out, "base", "mnist.keras"))
    quiet.import_tensorflow()
    scores = {name: per_epoch_accuracy(args.out, name, mnist) for name in ("cold", "warm")}
    history = {"cold": cold["epochs"], "warm": warm["epochs"]}

    print(f"base: {BASE_ROWS} training images, {args.epochs} epochs: test accuracy {base['test_accuracy']:.4f} "
          f"({base_wall:.0f} s wall)")
    print("epoch  cold: test acc  training s  |  warm: test acc  training s")
    for epoch in range(1, args.epochs + 1):
        row = [f"{epoch:>5}"]
        for name in ("cold", "warm"):
            seconds = sum(h["seconds"] for h in history[name][:epoch])
            row.append(f"{scores[name].get(epoch, float('nan')):>14.4f}  {seconds:>10.1f}")
        print("  ".join(row[:2]) + "  |  " + row[2])
    target = scores["cold"][args.epochs]
    needed = {}
    for name, wall in (("cold", cold_wall), ("warm", warm_wall)):
        needed[name], seconds = reach(scores[name], history[name], target)
        said = (f"{needed[name]} epoch(s), {seconds:.1f} s of training" if needed[name]
                else f"not within {args.epochs} epochs")
        print(f"{name}: reaches cold's final {target:.4f} after {said}; its {args.epochs}-epoch run took {wall:.0f} s wall")
    if needed["warm"]:  # what a warm cycle of just those epochs costs, start-up included
        short, short_wall = run_job(args.out, "warm-short", "--data", args.data, "--epochs", str(needed["warm"]),
                                    "--init-from", os.path.join(args.out, "base", "mnist.keras"))
        print(f"warm, {needed['warm']} epoch(s) only: test accuracy {short['test_accuracy']:.4f}, {short_wall:.0f} s wall "
              f"(cold, {args.epochs} epochs: {cold['test_accuracy']:.4f}, {cold_wall:.0f} s wall)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
