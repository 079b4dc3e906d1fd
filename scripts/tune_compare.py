"""ASHA against random search run to completion, on the same space, trials and seed; then the ASHA
search's winner against the seed recipe's model, on the same 10,000 test images.

    python scripts/tune_compare.py --data ../shared/data/mnist              # about 15 minutes on 2 cores

Three runs of the real commands, each into <out>/<name>:
  asha    jobs/tune.py (ASHA, the default), its winner retrained and scored on the test split
  random  jobs/tune.py --scheduler fifo: every trial runs its whole budget (winner retrained too)
  seed    jobs/train_mnist.py with the default recipe (the tutorial's, 2 workers)
Prints, for each search: trials, how many ASHA stopped, total trial-epochs, best validation accuracy,
the search's wall seconds and the winner's test accuracy; then McNemar's exact test (the gate's,
trainer/promote/gate.py) of the ASHA winner against the seed recipe's model, and the trial start-up
(trial launched to its first step) against a full-budget trial's wall, from the trials' own records.
Writes <out>/compare.json.
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


def run(out: str, name: str, command: list[str]) -> float:
    """Run a command into <out>/<name>; its wall seconds (its console in <out>/<name>.log)."""
    started = time.perf_counter()
    with open(os.path.join(out, f"{name}.log"), "w") as log:
        code = subprocess.run([sys.executable, *command], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT).returncode
    if code:
        sys.exit(f"error: the {name} run failed (exit {code}); see {os.path.join(out, name + '.log')}")
    return time.perf_counter() - started


def search_row(out: str, name: str, wall: float) -> dict:
    written = json.load(open(os.path.join(out, name, "results.json")))
    trials = written["trials"]
    return {"trials": len(trials), "stopped": sum(t["status"] == "stopped by ASHA" for t in trials),
            "trial_epochs": sum(t["epochs"] for t in trials),
            "best_val_accuracy": max(t["val_accuracy"][-1] for t in trials if t["val_accuracy"]),
            "search_seconds": written["seconds"]["search"], "wall_seconds": round(wall, 1),
            "winner": written["winner"], "test_accuracy": written["winner"]["test_accuracy"],
            "start_up": start_up(os.path.join(out, name, "ray_results", "mnist-tune-trials"),
                                 written["space"]["epochs"])}


def start_up(trial_runs: str, budget: int) -> dict:
    """Per trial: launched (its Tune actor's start, trial.json) to its first step (rank 0's record),
    and, for trials that ran the whole budget, launched to the last step."""
    import logging

    from ray.train import Result

    from trainer.train import checkpoint

    logging.getLogger("ray.train").setLevel(logging.WARNING)  # its note on each run's snapshot
    starts, walls = [], []
    for trial in sorted(os.listdir(trial_runs)):
        latest = Result.from_path(os.path.join(trial_runs, trial)).checkpoint
        with latest.as_directory() as directory:
            history = checkpoint.read_meta(directory)["history"]
            (worker,) = [w for w in checkpoint.read_worker_info(directory) if w["rank"] == 0]
        marks = worker["timeline"]
        launched = json.load(open(os.path.join(trial_runs, trial, "trial.json")))["launched"]
        starts.append(marks["first_step"] - launched)
        if len(history) >= budget:
            walls.append(marks["last_step"] - launched)
    return {"median_start_s": round(float(np.median(starts)), 1),
            "median_full_trial_s": round(float(np.median(walls)), 1) if walls else None,
            "start_share": round(float(np.median(starts) / np.median(walls)), 3) if walls else None}


def main() -> int:
    parser = script_parser(__doc__)
    parser.add_argument("--data", required=True, help="full MNIST (a Keras .npz, IDX directory or Parquet)")
    parser.add_argument("--out", default="/tmp/tune-compare", help="where the runs go")
    parser.add_argument("--trials", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    common = ["--data", args.data, "--trials", str(args.trials), "--seed", str(args.seed)]
    rows = {}
    for name, extra in (("asha", []), ("random", ["--scheduler", "fifo"])):
        wall = run(args.out, name, ["jobs/tune.py", *common, *extra, "--output", os.path.join(args.out, name)])
        rows[name] = search_row(args.out, name, wall)
    run(args.out, "seed", ["jobs/train_mnist.py", "--data", args.data, "--output", os.path.join(args.out, "seed"),
                           "--storage-path", os.path.join(args.out, "seed", "ray_results")])
    rows["paired"] = paired(args.data, os.path.join(args.out, "asha", "mnist.keras"),
                            os.path.join(args.out, "seed", "mnist.keras"))
    print(f"{'':8}{'trials':>7}{'stopped':>8}{'trial-epochs':>13}{'best val':>10}{'search s':>10}{'test acc':>10}"
          f"{'start s':>9}{'full trial s':>13}{'start share':>12}")
    for name in ("asha", "random"):
        r, s = rows[name], rows[name]["start_up"]
        print(f"{name:8}{r['trials']:>7}{r['stopped']:>8}{r['trial_epochs']:>13}{r['best_val_accuracy']:>10.4f}"
              f"{r['search_seconds']:>10.1f}{r['test_accuracy']:>10.4f}{s['median_start_s']:>9}"
              f"{s['median_full_trial_s'] or '-':>13}{s['start_share'] or '-':>12}")
    p = rows["paired"]
    print(f"ASHA winner {p['new_accuracy']:.4f} against the seed recipe {p['old_accuracy']:.4f} on the same 10,000 test "
          f"images: right only by the winner {p['new_only']}, only by the seed {p['old_only']}; McNemar p (better) "
          f"{p['p_better']:.3g}, p (worse) {p['p_worse']:.3g}")
    with open(os.path.join(args.out, "compare.json"), "w") as f:
        json.dump(rows, f, indent=2)
    return 0


def paired(data: str, new_model: str, old_model: str) -> dict:
    from trainer.common import quiet

    quiet.import_tensorflow()
    import keras

    from trainer.data import shards
    from trainer.model.network import preprocess
    from trainer.promote.gate import paired as mcnemar

    x, y = shards.load(shards.resolve_source(data)).split("test")
    inputs, _ = preprocess(x, y)
    right = {}
    for name, path in (("new", new_model), ("old", old_model)):
        right[name] = keras.models.load_model(path).predict(inputs, batch_size=1000, verbose=0).argmax(1) == y
    return {**mcnemar(right["new"], right["old"]), "new_accuracy": float(right["new"].mean()),
            "old_accuracy": float(right["old"].mean())}


if __name__ == "__main__":
    sys.exit(main())
