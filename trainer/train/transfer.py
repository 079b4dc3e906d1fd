"""Adapt a trained MNIST model to new writers (scikit-learn's UCI digits), in this process, no Ray.

    python -m trainer.train.transfer models/mnist.keras --output models/transfer         # head, 50 per class
    python -m trainer.train.transfer models/mnist.keras --output models/transfer --mode all --per-class 10
    python -m trainer.train.transfer models/mnist.keras --output models/scratch --from-scratch
    python -m trainer.train.transfer models/mnist.keras --table 3      # the README's table, seeds 0, 1, 2

The digits: scikit-learn's bundled UCI optical digits (1,797 8x8 images of 0..16 ink counts, by
writers who are not MNIST's), each made MNIST-like exactly as trainer/serve/predict.py prepares a user's
image. That copy carries no writer ids, so the split is a seeded random one, stratified by digit
(SPLIT): the held-out set (797) depends on the seed, never on --per-class, so accuracies for
different N compare like with like. The same writers are on both sides: this measures adapting to
these writers, not generalising to unseen ones.

--mode head trains only the output layer at the recipe's learning rate (the hidden layer stays
frozen in the saved model); --mode all fine-tunes every layer at a tenth of it; --from-scratch
trains a fresh model on the same digits, the baseline. Writes mnist_transfer.keras, evaluation.json
and metrics.json (held-out accuracy before and after) into --output and prints four lines: under
10 s on 2 CPU cores. A full-MNIST MLP (5 epochs, 0.98 on MNIST's test set) scores 0.82-0.88 on the
held-out digits as it is; head or all lift it to about 0.96 with 10 per class and 0.98 with 50,
where the same digits from scratch reach 0.88 and 0.95 (--table 3).
Exit code 2 for bad usage or an unusable model (one line on stderr), 1 if --output cannot be written.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass

import numpy as np
from PIL import Image

from trainer.common import errors, quiet
from trainer.common.atomic import save_model_atomic, write_json_atomic
from trainer.common.cli import add_options, bug, fail, option
from trainer.common.errors import UsageError
from trainer.config import Config
from trainer.data.mnist import label_problem
from trainer.model.images import mnist_like
from trainer.track.models import load_model

NUM_CLASSES = 10
LABELLED_POOL = 100  # per digit, set aside for fine-tuning (the rarest digit has 174): N <= 100
MODES = ("head", "all")
SCRATCH = "from-scratch"  # metrics.json's mode for the baseline
# all: a tenth of the recipe's rate (Config's default), so MNIST's features are nudged, not erased
LEARNING_RATES = {"head": Config.learning_rate, "all": Config.learning_rate / 10, SCRATCH: Config.learning_rate}
EPOCHS = 20
BATCH_SIZE = 32  # 100 to 1,000 examples: the recipe's 128 would leave 1 to 8 steps an epoch
TABLE_PER_CLASS = (10, 50, 100)
MODEL_FILE = "mnist_transfer.keras"
SPLIT = (f"seeded random, stratified by digit (sklearn's UCI digits carry no writer ids): per digit, "
         f"{LABELLED_POOL} form the labelled pool, whose first per_class are fine-tuned on; the rest are held out")


def check_labels(labels) -> np.ndarray:
    """Labels as int64 (n,), or UsageError unless they are a 1-D integer array in 0..9."""
    labels = np.asarray(labels)
    problem = label_problem(labels)
    if problem:
        raise UsageError(problem)
    return labels.astype(np.int64)


def check_settings(per_class: int, epochs: int = 1, learning_rate: float | None = None) -> None:
    """UsageError unless 1 <= per_class <= LABELLED_POOL, epochs >= 1 and the rate (if given) > 0."""
    if not 1 <= per_class <= LABELLED_POOL:
        raise UsageError(f"per-class must be 1..{LABELLED_POOL} (each digit's labelled pool; the rest "
                         f"are held out), got {per_class}")
    if epochs < 1:
        raise UsageError(f"epochs must be at least 1, got {epochs}")
    if learning_rate is not None and not learning_rate > 0:
        raise UsageError(f"the learning rate must be positive, got {learning_rate}")


def uci_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1,797 UCI digits as MNIST-like float32 (n, 784) in [0, 1] and labels (n,)."""
    from sklearn.datasets import load_digits  # bundled with scikit-learn: no download

    digits = load_digits()
    grey = np.rint(digits.images * (255 / 16)).astype(np.uint8)  # 0..16 ink counts -> 0..255
    return np.stack([mnist_like(Image.fromarray(image)) for image in grey]), check_labels(digits.target)


def split(labels, per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(labelled indices, held-out indices), both sorted; see SPLIT. One permutation per digit,
    drawn from the seed alone, so the held-out set is the same for every per_class and a smaller
    per_class's labelled set is part of a larger one's."""
    labels = check_labels(labels)
    check_settings(per_class)
    rng = np.random.default_rng(seed)
    labelled, heldout = [], []
    for digit in range(NUM_CLASSES):
        order = rng.permutation(np.flatnonzero(labels == digit))
        if len(order) <= LABELLED_POOL:
            raise UsageError(f"digit {digit} has {len(order)} examples; the split needs more than {LABELLED_POOL}")
        labelled.append(order[:per_class])
        heldout.append(order[LABELLED_POOL:])
    return np.sort(np.concatenate(labelled)), np.sort(np.concatenate(heldout))


def train(model, x: np.ndarray, y: np.ndarray, epochs: int, learning_rate: float, seed: int):
    """Compile `model` as trainer/model/network.py does (RMSprop, cross-entropy, accuracy) and fit it."""
    import keras

    from trainer.model.network import compile_model

    compile_model(model, learning_rate)
    keras.utils.set_random_seed(seed)  # the shuffling order: same seed, same model
    model.fit(x, keras.utils.to_categorical(check_labels(y), NUM_CLASSES),
              batch_size=BATCH_SIZE, epochs=epochs, shuffle=True, verbose=0)
    return model


def adapt(model, x: np.ndarray, y: np.ndarray, mode: str, epochs: int, learning_rate: float, seed: int):
    """A fine-tuned copy of `model` (the original is left as it is). head: only the output layer
    learns; all: every layer does."""
    import keras

    if mode not in MODES:
        raise UsageError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    adapted = keras.models.clone_model(model)
    adapted.set_weights(model.get_weights())
    if mode == "head":
        for layer in adapted.layers[:-1]:  # the last layer is the Dense(10) softmax in both models
            layer.trainable = False
        if not adapted.layers[-1].trainable_weights:
            raise UsageError(f"--mode head needs a last layer with weights, got {adapted.layers[-1].name!r}")
    return train(adapted, x, y, epochs, learning_rate, seed)


def fine_tune(model, x, y, mode: str, epochs: int, seed: int, learning_rate: float | None = None):
    """adapt() for head and all; for SCRATCH, a fresh model (Config's architecture) trained instead.
    Each mode at its LEARNING_RATES entry unless one is given."""
    rate = LEARNING_RATES[mode] if learning_rate is None else learning_rate
    if mode != SCRATCH:
        return adapt(model, x, y, mode, epochs, rate, seed)
    from trainer.model.network import build_model

    return train(build_model(Config(seed=seed)), x, y, epochs, rate, seed)


def accuracy(model, x: np.ndarray, y: np.ndarray) -> float:
    """The share of digits whose most probable class is the label."""
    return float(np.mean(model.predict(x, batch_size=1000, verbose=0).argmax(axis=1) == check_labels(y)))


def measure(model, x, y, seeds, per_class=TABLE_PER_CLASS, epochs: int = EPOCHS) -> list[dict]:
    """Held-out accuracy of the model as it is and after each mode and from scratch: one dict per
    (seed, per_class)."""
    rows = []
    for seed in seeds:
        for n in per_class:
            labelled, heldout = split(y, n, seed)
            row = {"per_class": n, "seed": seed, "epochs": epochs, "before": accuracy(model, x[heldout], y[heldout])}
            for mode in (*MODES, SCRATCH):
                tuned = fine_tune(model, x[labelled], y[labelled], mode, epochs, seed)
                row[mode] = accuracy(tuned, x[heldout], y[heldout])
            rows.append(row)
    return rows


def format_table(rows: list[dict]) -> str:
    """measure()'s rows as a Markdown table: the mean over seeds, with the range when there are several."""
    columns = ("before", *MODES, SCRATCH)
    lines = [f"| per class | {' | '.join(columns)} |", "|---:|" + "---:|" * len(columns)]
    for n in dict.fromkeys(row["per_class"] for row in rows):
        cells = []
        for values in ([row[column] for row in rows if row["per_class"] == n] for column in columns):
            spread = f" ({min(values):.3f}-{max(values):.3f})" if len(values) > 1 else ""
            cells.append(f"{np.mean(values):.3f}{spread}")
        lines.append(f"| {n} | {' | '.join(cells)} |")
    seeds = ", ".join(map(str, sorted({row["seed"] for row in rows})))
    epochs = "/".join(map(str, sorted({row["epochs"] for row in rows})))
    return "\n".join([*lines, "", f"held-out accuracy, seeds {seeds}; {epochs} epochs"])


def run(args: argparse.Namespace) -> dict:
    """Adapt, evaluate, write the three files into args.output (metrics.json last); the metrics."""
    from trainer.model.report import evaluation_report

    model, (x, y) = load_model(args.model), uci_digits()
    labelled, heldout = split(y, args.per_class, args.seed)
    mode = SCRATCH if args.from_scratch else args.mode
    rate = LEARNING_RATES[mode] if args.learning_rate is None else args.learning_rate
    before = accuracy(model, x[heldout], y[heldout])
    print(f"UCI digits: {len(labelled)} labelled ({args.per_class} per class), {len(heldout)} held out, seed {args.seed}")
    print(f"held-out accuracy before: {before:.4f}  ({args.model} as it is)", flush=True)
    start = time.perf_counter()
    tuned = fine_tune(model, x[labelled], y[labelled], mode, args.epochs, args.seed, rate)
    seconds = time.perf_counter() - start
    report = evaluation_report(y[heldout], tuned.predict(x[heldout], batch_size=1000, verbose=0))
    print(f"held-out accuracy after:  {report['accuracy']:.4f}  ({mode}, {args.epochs} "
          f"epoch{'s' * (args.epochs != 1)}, learning rate {rate:g}, {seconds:.1f} s)")
    os.makedirs(args.output, exist_ok=True)
    paths = {name: os.path.join(args.output, name) for name in (MODEL_FILE, "evaluation.json", "metrics.json")}
    save_model_atomic(tuned, paths[MODEL_FILE])
    write_json_atomic(paths["evaluation.json"], report)
    metrics = {"model": os.path.abspath(args.model), "mode": mode, "per_class": args.per_class, "seed": args.seed,
               "data": "sklearn.datasets.load_digits: UCI optical digits, 1,797 8x8, made MNIST-like",
               "split": SPLIT, "labelled": len(labelled), "held_out": len(heldout),
               "accuracy_before": before, "accuracy_after": report["accuracy"], "epochs": args.epochs,
               "learning_rate": rate, "batch_size": BATCH_SIZE, "seconds": round(seconds, 2)}
    write_json_atomic(paths["metrics.json"], metrics)  # last: its presence means the rest is complete
    print(f"wrote {paths[MODEL_FILE]}, evaluation.json and metrics.json")
    return metrics


@dataclass(frozen=True)
class Options:
    model: str = option(None, "trained model: mnist.keras (or mnist.h5)", positional=True, metavar="MODEL")
    output: str | None = option(None, f"where {MODEL_FILE}, metrics.json and evaluation.json go", metavar="DIR")
    per_class: int = option(50, f"labelled digits per class to fine-tune on, 1..{LABELLED_POOL} (default: 50)",
                            metavar="N")
    mode: str = option("head", "head: train only the output layer; all: fine-tune every layer (default: head)",
                       choices=MODES, metavar=None)
    from_scratch: bool = option(False, "the baseline: train a fresh model on the same labelled digits instead")
    epochs: int = option(EPOCHS, f"(default: {EPOCHS})")
    learning_rate: float | None = option(None, "(default: " + ", ".join(
        f"{rate:g} for {mode}" for mode, rate in LEARNING_RATES.items()) + ")", metavar="RATE")
    seed: int = option(0, "the split, the shuffling, fresh weights (default: 0)")
    table: int | None = option(None, f"instead: print held-out accuracies for {', '.join(map(str, TABLE_PER_CLASS))} "
                               "per class, both modes and from scratch, over SEEDS seeds from --seed (default: 1)",
                               nargs="?", const=1, metavar="SEEDS")
    verbose: bool = option(False, "show TensorFlow's own notices on the console")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m trainer.train.transfer", description=(
        "Fine-tune a trained MNIST model on a few labelled UCI digits (new writers)."))
    return add_options(parser, Options)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        # Settings that would otherwise fail only after the slow part (TensorFlow, the model, training):
        if args.table is None and args.output is None:
            raise UsageError("--output DIR is required (or --table)")
        if args.table is not None and args.table < 1:
            raise UsageError(f"--table needs at least 1 seed, got {args.table}")
        if args.output and os.path.exists(args.output) and not os.path.isdir(args.output):
            raise UsageError(f"--output {args.output} is a file, not a folder")
        check_settings(args.per_class, args.epochs, args.learning_rate)
        quiet.import_tensorflow(args.verbose)  # TensorFlow's start-up notices go to a log file
        if args.table is None:
            run(args)
        else:
            model, (x, y) = load_model(args.model), uci_digits()
            print(format_table(measure(model, x, y, range(args.seed, args.seed + args.table), epochs=args.epochs)))
    except errors.JobError as exc:  # a setting, or a model that is not one: all before the outputs
        return fail(str(exc), code=2)
    except OSError as exc:  # --output not writable, disk full
        return fail(f"cannot write to {args.output}: {exc.strerror or exc}", code=1)
    except Exception as exc:
        return bug(exc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
