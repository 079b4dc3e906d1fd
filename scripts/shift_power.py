"""How often the data checks catch a shift, measured as Failing Loudly (Rabanser et al., 2019) does.

    python scripts/shift_power.py --data ../shared/data/mnist            # about 3 minutes on 2 cores
    python scripts/shift_power.py --data tests/data/mnist_sample.npz --sizes 100 500 --draws 3 --null-draws 5

Trains the job's model on the training split (plain Keras, --epochs), or loads --model. The
reference is the model's softmax on a fixed sample of its own training split (--reference rows);
every draw comes from the rest of that split, so the two never share an image. For each shift
(Gaussian noise; rotation, translation and zoom; each small, medium and large; applied to 10%, 50%
and 100% of a draw's images) and for a knock-out (50% or 90% of one digit's images removed), the
detection rate over --draws draws at each sample size, for BBSD (trainer/data/shift.py, at --alpha)
and for today's threshold checks (trainer/data/checks.py: label mix, a scarce digit, pixel
statistics; rows and leakage do not apply to a sample). Then the false-alarm rate on --null-draws
unshifted draws, and on draws of the test split: the same digits, but images the model never saw.
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np

from trainer.common import quiet
from trainer.common.cli import script_parser
from trainer.config import Config
from trainer.data import checks, shards
from trainer.data.mnist import Mnist
from trainer.data.shift import ALPHA, SAMPLE_ROWS, bbsd, sample_rows

NOISE = {"small": 1.0, "medium": 10.0, "large": 100.0}  # std, pixel units (0..255), as the paper's
ROTATION = {"small": 10.0, "medium": 40.0, "large": 90.0}  # degrees, uniform in +-
TRANSLATION = {"small": 0.05, "medium": 0.2, "large": 0.4}  # of the width and of the height, uniform in +-
ZOOM = {"small": 0.1, "medium": 0.2, "large": 0.4}  # scale uniform in 1 +- this
FRACTIONS = (0.1, 0.5, 1.0)
KNOCKOUT = (0.5, 0.9)
KNOCKOUT_DIGIT = 3


def transform(images: np.ndarray, kind: str, level: float, rng: np.random.Generator) -> np.ndarray:
    """Each image shifted once, with its own random draw of the shift."""
    from scipy import ndimage

    x = images.astype(np.float32)
    if kind == "noise":
        return np.clip(np.rint(x + rng.normal(0.0, level, x.shape)), 0, 255).astype(np.uint8)
    out = np.empty_like(x)
    centre = (np.array(x.shape[1:]) - 1) / 2.0
    for i, image in enumerate(x):
        if kind == "rotation":
            out[i] = ndimage.rotate(image, rng.uniform(-level, level), reshape=False, order=1)
        elif kind == "translation":
            out[i] = ndimage.shift(image, rng.uniform(-level, level, 2) * image.shape, order=1)
        else:  # zoom: scale about the centre
            scale = rng.uniform(1 - level, 1 + level)
            out[i] = ndimage.affine_transform(image, np.eye(2) / scale, offset=centre - centre / scale, order=1)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


class Bench:
    """The model, the reference, the pool of draws, and both checks on a draw."""

    def __init__(self, data: Mnist, model, reference_rows: int, alpha: float, seed: int):
        self.model, self.alpha, self.rng = model, alpha, np.random.default_rng(seed)
        ref = sample_rows(len(data.y_train), reference_rows, seed)
        rest = np.setdiff1d(np.arange(len(data.y_train)), ref)
        self.reference = self.outputs(data.x_train[ref])
        self.ref_profile = checks.profile(Mnist(data.x_train[ref], data.y_train[ref], *empty()))
        self.x, self.y = data.x_train[rest], data.y_train[rest]
        self.clean = self.outputs(self.x)
        self.test = data

    def outputs(self, images: np.ndarray) -> np.ndarray:
        return self.model.predict(images.reshape(len(images), -1).astype(np.float32) / 255.0, batch_size=2000,
                                  verbose=0)

    def caught(self, outputs: np.ndarray, images: np.ndarray, labels: np.ndarray) -> tuple[bool, bool]:
        """(BBSD refuses, today's checks refuse) for one draw."""
        new = checks.profile(Mnist(images, labels, *empty()))
        old = {**self.ref_profile, "train_rows": new["train_rows"]}  # a sample: rows do not apply
        return bbsd(self.reference, outputs).p_value < self.alpha, bool(checks.compare(old, new, checks.Limits()))

    def rates(self, size: int, draws: int, pick) -> tuple[float, float]:
        hits = np.array([self.caught(*pick(size)) for _ in range(draws)])
        return float(hits[:, 0].mean()), float(hits[:, 1].mean())

    def shifted_pick(self, shifted_x: np.ndarray, shifted_out: np.ndarray, fraction: float):
        def pick(size):
            rows = self.rng.choice(len(self.y), size=min(size, len(self.y)), replace=False)
            moved = np.zeros(len(rows), bool)
            moved[self.rng.choice(len(rows), size=round(fraction * len(rows)), replace=False)] = True
            out = np.where(moved[:, None], shifted_out[rows], self.clean[rows])
            x = np.where(moved[:, None, None], shifted_x[rows], self.x[rows])
            return out, x, self.y[rows]
        return pick

    def knockout_pick(self, removed: float):
        digit = np.flatnonzero(self.y == KNOCKOUT_DIGIT)
        gone = self.rng.choice(digit, size=int(removed * len(digit)), replace=False)
        keep = np.setdiff1d(np.arange(len(self.y)), gone)

        def pick(size):
            rows = self.rng.choice(keep, size=min(size, len(keep)), replace=False)
            return self.clean[rows], self.x[rows], self.y[rows]
        return pick

    def null_pick(self, size):
        rows = self.rng.choice(len(self.y), size=min(size, len(self.y)), replace=False)
        return self.clean[rows], self.x[rows], self.y[rows]

    def unseen_pick(self, size):
        rows = self.rng.choice(len(self.test.y_test), size=min(size, len(self.test.y_test)), replace=False)
        return self.outputs(self.test.x_test[rows]), self.test.x_test[rows], self.test.y_test[rows]


def empty() -> tuple[np.ndarray, np.ndarray]:
    return np.zeros((0, 28, 28), np.uint8), np.zeros((0,), np.uint8)


def train_model(data: Mnist, epochs: int):
    import keras

    from trainer.model.network import build_model, preprocess

    keras.utils.set_random_seed(0)
    model = build_model(Config())
    x, y = preprocess(data.x_train, data.y_train)
    model.fit(x, y, batch_size=Config().batch_size, epochs=epochs, verbose=0)
    return model


def main(argv: list[str] | None = None) -> int:
    parser = script_parser(__doc__)
    parser.add_argument("--data", help="MNIST: a directory of IDX files, an .npz, or Parquet shards")
    parser.add_argument("--model", help="a trained model (.keras or .h5) instead of training one")
    parser.add_argument("--epochs", type=int, default=Config().epochs)
    parser.add_argument("--reference", type=int, default=SAMPLE_ROWS, help="rows of the reference sample")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000, 10_000], help="arriving sample sizes")
    parser.add_argument("--draws", type=int, default=20, help="draws per shifted cell")
    parser.add_argument("--null-draws", type=int, default=100, help="unshifted draws for the false-alarm rate")
    parser.add_argument("--alpha", type=float, default=ALPHA, help="BBSD's level over the ten classes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write the table here")
    args = parser.parse_args(argv)
    if not 0 < args.alpha < 1 or min(args.sizes) < 1 or args.draws < 1 or args.null_draws < 1:
        print("error: --alpha must be in (0, 1), and --sizes, --draws and --null-draws positive", file=sys.stderr)
        return 2
    started = time.time()
    data = shards.load(args.data)
    if args.reference >= len(data.y_train):
        print(f"error: --reference {args.reference} leaves no training rows to draw from "
              f"({len(data.y_train)} in all)", file=sys.stderr)
        return 2
    quiet.import_tensorflow()
    import keras

    model = keras.models.load_model(args.model) if args.model else train_model(data, args.epochs)
    bench = Bench(data, model, args.reference, args.alpha, args.seed)
    rng = np.random.default_rng(args.seed + 1)
    rows = []

    def add(name: str, fraction: str, pick, draws: int) -> None:
        cells = [bench.rates(size, draws, pick) for size in args.sizes]
        rows.append({"shift": name, "images": fraction, "draws": draws,
                     "bbsd": [c[0] for c in cells], "checks": [c[1] for c in cells]})
        print(format_row(rows[-1]), flush=True)

    print(header(args.sizes), flush=True)
    add("none (training split)", "-", bench.null_pick, args.null_draws)
    add("none, unseen (test split)", "-", bench.unseen_pick, args.null_draws)
    for kind, levels in (("noise", NOISE), ("rotation", ROTATION), ("translation", TRANSLATION), ("zoom", ZOOM)):
        for level_name, level in levels.items():
            shifted_x = transform(bench.x, kind, level, rng)
            shifted_out = bench.outputs(shifted_x)
            for fraction in FRACTIONS:
                add(f"{kind} {level_name}", f"{fraction:.0%}", bench.shifted_pick(shifted_x, shifted_out, fraction),
                    args.draws)
    for removed in KNOCKOUT:
        add(f"knock-out {removed:.0%} of digit {KNOCKOUT_DIGIT}", "-", bench.knockout_pick(removed), args.draws)
    print(f"alpha {args.alpha:g}; reference {len(bench.reference)} rows of the training split; "
          f"{time.time() - started:.0f} s", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"alpha": args.alpha, "sizes": args.sizes, "reference_rows": len(bench.reference),
                       "rows": rows}, f, indent=1)
    return 0


def header(sizes: list[int]) -> str:
    cols = [f"BBSD n={s:,}" for s in sizes] + [f"checks n={s:,}" for s in sizes]
    return f"{'shift':<32} {'images':>6} {'draws':>5}  " + "  ".join(f"{c:>13}" for c in cols)


def format_row(row: dict) -> str:
    cells = [f"{v:>13.2f}" for v in row["bbsd"] + row["checks"]]
    return f"{row['shift']:<32} {row['images']:>6} {row['draws']:>5}  " + "  ".join(cells)


if __name__ == "__main__":
    sys.exit(main())
