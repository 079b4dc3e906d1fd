"""Train the classic Keras MNIST model with Ray Train workers; the driver evaluates and saves it.

    python jobs/train_mnist.py --data ../shared/data/mnist --num-workers 2

Full MNIST with the defaults (mlp, 5 epochs, global batch 128) on 2 workers: test accuracy about
0.98 (measured times: docs/performance.md). Writes models/mnist.keras, mnist.h5 and metrics.json.
With --address or $RAY_ADDRESS (as under `ray job submit`) it joins that cluster; otherwise it
starts a local Ray on 127.0.0.1.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from trainer.train.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
