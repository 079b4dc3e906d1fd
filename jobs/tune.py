"""Search the MNIST job's hyperparameters with Ray Tune, then retrain the winner and score it once.

    python jobs/tune.py --data ../shared/data/mnist
    python jobs/tune.py --data ../shared/data/mnist --search optuna --trials 24
    python jobs/tune.py --data ../shared/data/mnist --store /srv/mnist-store

Each trial is the job itself (its Ray Train workers, step, checkpoints and restarts), scored every
epoch on 5,000 training rows held out (never the test split); ASHA stops the trials behind. One line
per trial as it ends, a table of the best, then the winner's run: results.json, results.csv and
tuning.png beside mnist.keras, mnist.h5 and metrics.json in --output. Rerun the same command to
continue an interrupted search. Submitted: `ray job submit --working-dir . -- python jobs/tune.py ...`.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from trainer.tune.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
