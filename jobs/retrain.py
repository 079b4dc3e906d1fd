"""Retrain the MNIST model into a versioned model store; promote it only if it is not significantly worse.

    python jobs/retrain.py --store /srv/mnist-store --data ../shared/data/mnist
    python jobs/retrain.py --store /srv/mnist-store --list
    python jobs/retrain.py --store /srv/mnist-store --rollback VERSION

One cycle checks the new data against the current version's (refused: exit status 4), trains once
(full MNIST, default recipe, 2 workers: about 70 s here and test accuracy about 0.98), then
promotes the new version only if it is not significantly worse than the current model on the same
test images, overall or on any digit (rejected: 3), is at least --min-accuracy (0.97), and loads
and predicts the same in a fresh process (the canary; failed: 5). Unchanged data and config:
nothing is trained. Another run holding the store: exits 0 at once.
Scheduled by scripts/retrain.crontab, scripts/systemd/ or jobs/raycronjob.yaml.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from trainer.promote.retrain import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
