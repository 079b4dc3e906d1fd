"""A bigger MNIST for scaling runs: MNIST's 60,000 training images and seeded distortions of them
(a small shift, rotation and elastic distortion each, as LeCun's infinite MNIST makes), in the job's
Parquet layout with its manifest and content hash. The test split is MNIST's 10,000 originals.

    python scripts/make_big_mnist.py --rows 8100000 --output data/mnist8m --data ../shared/data/mnist
    python scripts/make_big_mnist.py --rows 300000 --output data/mnist300k --data ../shared/data/mnist

Row i is a copy of training image i mod 60,000 (its label too): the first 60,000 rows are the
originals, every later row a distortion drawn from a generator seeded by (--seed, file number), so
any file can be made again alone and the same flags always give the same data (and hash). It
streams: a file's rows (--rows-per-file) are in memory at a time, two a process at most with
--processes, so memory does not grow with --rows; only the labels, a byte a row, are kept (for the
hash and the manifest's label counts).
"""

from __future__ import annotations

import collections
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np
from scipy import ndimage

from trainer.common.cli import script_parser
from trainer.data import shards
from trainer.data.mnist import IMAGE_SHAPE

MAX_SHIFT = 1.0  # pixels, each axis
MAX_ROTATION = np.radians(8.0)
ELASTIC_ALPHA, ELASTIC_SIGMA = 20.0, 4.0  # a smoothed random field (Simard et al., 2003), scaled: 0.75 px an axis (sd)
BATCH = 4096  # images distorted at once


def distort(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Each (28, 28) uint8 image resampled (bilinear, black outside) at its own random rotation
    about the centre, shift and elastic displacement field."""
    n, (height, width) = len(images), IMAGE_SHAPE
    angle = rng.uniform(-MAX_ROTATION, MAX_ROTATION, n)[:, None, None]
    shift = rng.uniform(-MAX_SHIFT, MAX_SHIFT, (2, n))[:, :, None, None]
    field = rng.uniform(-1.0, 1.0, (2, n, height, width))
    field = ndimage.gaussian_filter(field, (0, 0, ELASTIC_SIGMA, ELASTIC_SIGMA), mode="constant") * ELASTIC_ALPHA
    rows, cols = np.mgrid[0:height, 0:width].astype(np.float64)
    rows, cols = rows - (height - 1) / 2, cols - (width - 1) / 2
    source_rows = np.cos(angle) * rows - np.sin(angle) * cols + (height - 1) / 2 + shift[0] + field[0]
    source_cols = np.sin(angle) * rows + np.cos(angle) * cols + (width - 1) / 2 + shift[1] + field[1]
    index = np.broadcast_to(np.arange(n, dtype=np.float64)[:, None, None], source_rows.shape)
    out = ndimage.map_coordinates(images.astype(np.float32), [index, source_rows, source_cols],
                                  order=1, mode="constant", cval=0.0)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def training_file(x: np.ndarray, y: np.ndarray, start: int, stop: int, seed: int, number: int):
    """Rows start..stop of the big training split: originals below len(x), distortions above."""
    rng = np.random.default_rng([seed, number])
    rows = np.arange(start, stop)
    images, labels = x[rows % len(x)], y[rows % len(x)]
    for b in range(0, len(rows), BATCH):
        distorted = rows[b:b + BATCH] >= len(x)
        if distorted.any():
            images[b:b + BATCH][distorted] = distort(images[b:b + BATCH][distorted], rng)
    return images, labels


def training_files(x, y, rows: int, rows_per_file: int, seed: int, processes: int):
    """The training split's files in order, made by `processes` processes (each given the source
    once), at most two a process made ahead of the writer."""
    spans = [(start, min(start + rows_per_file, rows)) for start in range(0, rows, rows_per_file)]
    if processes == 1:
        yield from (training_file(x, y, start, stop, seed, number) for number, (start, stop) in enumerate(spans))
        return
    spawn = multiprocessing.get_context("spawn")  # not fork: a parent's threads (TensorFlow's) do not fork
    with ProcessPoolExecutor(processes, mp_context=spawn, initializer=_keep_source, initargs=(x, y)) as pool:
        pending = collections.deque()
        for number, (start, stop) in enumerate(spans):
            pending.append(pool.submit(_training_file, start, stop, seed, number))
            if len(pending) >= 2 * processes:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


_SOURCE = None


def _keep_source(x, y):
    global _SOURCE
    _SOURCE = x, y


def _training_file(start, stop, seed, number):
    return training_file(*_SOURCE, start, stop, seed, number)


def main(argv: list[str] | None = None) -> int:
    parser = script_parser(__doc__)
    parser.add_argument("--rows", type=int, required=True, help="training rows (at least 1)")
    parser.add_argument("--output", required=True, help="destination directory or URI (must not exist)")
    parser.add_argument("--data", help="MNIST to grow; default $MNIST_DATA, else the keras download")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rows-per-file", type=int, default=50_000)
    parser.add_argument("--processes", type=int, default=os.cpu_count() or 1,
                        help="processes distorting images (default: one a core)")
    args = parser.parse_args(argv)
    if min(args.rows, args.rows_per_file, args.processes) < 1:
        print("error: --rows, --rows-per-file and --processes must be at least 1", file=sys.stderr)
        return 2
    try:
        source = shards.load(shards.resolve_source(args.data))
        x, y = source.split("train")
        pieces = training_files(x, y, args.rows, args.rows_per_file, args.seed, args.processes)
        x_test, y_test = source.split("test")
        test = shards.pieces(x_test, y_test, args.rows_per_file)
        started = time.monotonic()
        manifest = shards.write_shards(args.output, {"train": (args.rows, pieces), "test": (len(x_test), test)},
                                     args.rows_per_file)
    except (shards.DataError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    seconds = time.monotonic() - started
    print(f"wrote {args.output}: {args.rows:,} training rows in {seconds:.1f} s ({args.rows / seconds:,.0f} rows/s, "
          f"{args.processes} processes) "
          f"and {len(x_test):,} test rows, sha256 {manifest.content_sha256}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
