"""The baseline: the classic tutorial as one plain Keras process (model.fit on in-memory arrays).

    python scripts/plain_keras.py --data ../shared/data/mnist [--save mnist.keras]

Same model, optimizer and recipe as the distributed job (trainer.model.network.build_model), no Ray.
Prints per-epoch seconds, the test accuracy and the wall time, and a JSON summary line.
"""

from __future__ import annotations

import json
import sys
import time

from trainer.common import quiet
from trainer.common.cli import script_parser
from trainer.config import MODELS, Config


def main(argv: list[str] | None = None) -> int:
    started = time.time()
    parser = script_parser(__doc__)
    defaults = Config()
    parser.add_argument("--data")
    parser.add_argument("--epochs", type=int, default=defaults.epochs)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--model", default=defaults.model, choices=MODELS)
    parser.add_argument("--threads", type=int, help="TensorFlow's intra- and inter-op threads (default: its own)")
    parser.add_argument("--device", choices=("cpu", "gpu"), default="cpu",
                        help="cpu hides any GPU, as the job's CPU workers do; gpu requires one")
    parser.add_argument("--save", metavar="PATH", help="also save the trained model (.keras or .h5), as the "
                        "tutorial saves models/mnist.h5")
    args = parser.parse_args(argv)

    tf = quiet.import_tensorflow()
    if args.device == "cpu":
        tf.config.set_visible_devices([], "GPU")
    elif not tf.config.list_physical_devices("GPU"):
        print("error: --device gpu, but TensorFlow sees no GPU", file=sys.stderr)
        return 1
    if args.threads:
        tf.config.threading.set_intra_op_parallelism_threads(args.threads)
        tf.config.threading.set_inter_op_parallelism_threads(args.threads)
    import keras

    from trainer.data import shards
    from trainer.model.network import build_model, preprocess

    mnist = shards.load(shards.resolve_source(args.data))
    cfg = Config(model=args.model, epochs=args.epochs, batch_size=args.batch_size, num_workers=1)
    x_train, y_train = preprocess(mnist.x_train, mnist.y_train)
    x_test, y_test = preprocess(mnist.x_test, mnist.y_test)
    model = build_model(cfg)

    class EpochTimer(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            self.seconds, self.first_step = [], None

        def on_train_batch_begin(self, batch, logs=None):
            self.first_step = self.first_step or time.time()

        def on_epoch_begin(self, epoch, logs=None):
            self.t = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            self.seconds.append(time.perf_counter() - self.t)

    timer = EpochTimer()
    model.fit(x_train, y_train, batch_size=cfg.batch_size, epochs=cfg.epochs, verbose=2, callbacks=[timer])
    loss, accuracy = model.evaluate(x_test, y_test, verbose=0)
    print(f"test accuracy: {accuracy:.4f}")
    if args.save:
        from trainer.common.atomic import save_model_atomic

        save_model_atomic(model, args.save)
        print(f"model saved to {args.save}")
    print(json.dumps({"test_accuracy": accuracy, "test_loss": loss, "epoch_seconds": timer.seconds,
                      "start_to_first_step": timer.first_step - started,
                      "wall_seconds": time.time() - started}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
