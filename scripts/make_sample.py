"""Cut the small real-MNIST sample the tests use (tests/data/mnist_sample.npz, ~650 KB).

    python scripts/make_sample.py --data ../shared/data/mnist

3,000 training and 1,000 test digits, drawn without replacement with a fixed seed.
"""

from __future__ import annotations

import os
import sys

import numpy as np

from trainer.common.cli import script_parser
from trainer.data import shards


def main(argv: list[str] | None = None) -> int:
    parser = script_parser(__doc__)
    parser.add_argument("--data", help="full MNIST source; default $MNIST_DATA")
    parser.add_argument("--out", default="tests/data/mnist_sample.npz")
    parser.add_argument("--train", type=int, default=3000)
    parser.add_argument("--test", type=int, default=1000)
    args = parser.parse_args(argv)
    full = shards.load(shards.resolve_source(args.data))
    rng = np.random.default_rng(0)
    train = np.sort(rng.choice(len(full.x_train), args.train, replace=False))
    test = np.sort(rng.choice(len(full.x_test), args.test, replace=False))
    np.savez_compressed(args.out, x_train=full.x_train[train], y_train=full.y_train[train],
                        x_test=full.x_test[test], y_test=full.y_test[test])
    print(f"wrote {args.out} ({os.path.getsize(args.out):,} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
