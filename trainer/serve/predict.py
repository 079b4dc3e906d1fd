"""Classify your own digit images with a trained model.

    python -m trainer.serve.predict models/mnist.keras seven.png scan.jpg [--json]
    python -m trainer.serve.predict models:/mnist@champion seven.png     (MLflow's registry: --tracking-uri or $MLFLOW_TRACKING_URI)

Each PNG or JPEG, of any size, dark ink on light paper or light on dark, is made to look like an
MNIST digit (`mnist_like`) and classified. One line per file: `seven.png: 7  (7 0.991, 1 0.006,
9 0.001)`; `--json` prints one JSON document instead. A file that cannot be read is reported on
stderr and the rest are still classified; exit code 1 if any file failed, 2 for bad usage.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass

import numpy as np

from trainer.common.cli import add_options, bug, fail, option
from trainer.common.errors import InputError, JobError
from trainer.model.images import mnist_like, read_image
from trainer.track.models import load_model

TOP = 3


def top_probabilities(probs: np.ndarray, k: int = TOP) -> list[dict]:
    order = np.argsort(-probs, kind="stable")[:k]
    return [{"digit": int(d), "probability": float(probs[d])} for d in order]


def format_line(path: str, top: list[dict]) -> str:
    ranked = ", ".join(f"{t['digit']} {t['probability']:.3f}" for t in top)
    return f"{path}: {top[0]['digit']}  ({ranked})"


@dataclass(frozen=True)
class Options:
    model: str = option(None, "trained model: mnist.keras (or mnist.h5), or an MLflow model URI such as "
                        "models:/mnist@champion or runs:/<run id>/model", positional=True, metavar="MODEL")
    images: tuple[str, ...] = option((), "PNG or JPEG files, one digit each", positional=True, nargs="+",
                                     metavar="IMAGE")
    json: bool = option(False, "print one JSON document instead of lines")
    tracking_uri: str | None = option(None, "the MLflow tracking server of a models:/ or runs:/ MODEL "
                                      "(default: $MLFLOW_TRACKING_URI)", metavar="URI")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m trainer.serve.predict",
                                     description="Classify PNG or JPEG digit images with a trained MNIST model.")
    return add_options(parser, Options)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        model = load_model(args.model, args.tracking_uri)
    except JobError as exc:
        return fail(str(exc), code=2)
    except Exception as exc:
        return bug(exc)
    results, pixels = [], []
    for path in args.images:
        try:
            pixels.append(mnist_like(read_image(path)))
            results.append({"file": path, "digit": None, "top3": None, "error": None})
        except InputError as exc:
            print(f"error: {path}: {exc}", file=sys.stderr, flush=True)
            results.append({"file": path, "digit": None, "top3": None, "error": str(exc)})
    classified = [r for r in results if r["error"] is None]
    if classified:
        probs = model.predict(np.stack(pixels), batch_size=256, verbose=0)
        for result, row in zip(classified, probs):
            result["top3"] = top_probabilities(row)
            result["digit"] = result["top3"][0]["digit"]
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        for result in classified:
            print(format_line(result["file"], result["top3"]))
    return 1 if len(classified) < len(results) else 0


if __name__ == "__main__":
    sys.exit(main())
