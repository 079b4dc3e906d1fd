"""Classify your own digit images with a trained model.

    python -m trainer.predict models/mnist.keras seven.png scan.jpg [--json]
    python -m trainer.predict models:/mnist@champion seven.png     (MLflow's registry: --tracking-uri or $MLFLOW_TRACKING_URI)

Each PNG or JPEG, of any size, dark ink on light paper or light on dark, is made to look like an
MNIST digit (`mnist_like`) and classified. One line per file: `seven.png: 7  (7 0.991, 1 0.006,
9 0.001)`; `--json` prints one JSON document instead. A file that cannot be read is reported on
stderr and the rest are still classified; exit code 1 if any file failed, 2 for bad usage.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from trainer import errors

FORMATS = ("PNG", "JPEG", "MPO")  # MPO: how Pillow names many phone cameras' JPEGs
FIELD = 28  # MNIST: 28x28 images...
BOX = 20  # ...whose digit was scaled to fit 20x20, then centred by centre of mass
CENTRE = 14.0  # where MNIST's centres of mass sit, in pixel indices (measured on the test set)
INK_FLOOR = 0.1  # of the strongest ink: fainter pixels are paper texture, noise or JPEG ringing
TOP = 3
MODEL_SUFFIXES = (".keras", ".h5", ".hdf5")  # what keras.saving.load_model accepts
MLFLOW_SCHEMES = ("models:/", "runs:/")  # an MLflow model (trainer/tracking.py)


def mnist_like(image: Image.Image) -> np.ndarray:
    """Any digit image -> float32 (784,) in [0, 1], prepared as MNIST was: light digit on black,
    cropped to its bounding box, scaled so the longer side is 20 px, centred by centre of mass
    in a 28x28 field. Raises ValueError when the image holds no digit (a blank page)."""
    gray = _grayscale(image)
    border = np.concatenate([gray[0], gray[-1], gray[:, 0], gray[:, -1]])
    background = float(np.median(border))  # median: a stroke touching the edge does not move it
    if background > gray.mean():  # light paper, dark ink: MNIST is the other way round
        gray, background = 255.0 - gray, 255.0 - background
    ink = np.clip(gray - background, 0, None)
    if ink.max() < 16:  # under ~6% contrast there is no digit to find, only noise
        raise ValueError("no digit found: the image is blank")
    ink /= ink.max()
    ink[ink < INK_FLOOR] = 0.0
    rows, cols = np.flatnonzero(ink.any(axis=1)), np.flatnonzero(ink.any(axis=0))
    digit = ink[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]

    height, width = digit.shape
    scale = BOX / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    # Lanczos on the float image averages over the whole footprint when shrinking (no aliasing).
    small = np.asarray(Image.fromarray(digit.astype(np.float32)).resize(size, Image.Resampling.LANCZOS))
    small = np.clip(small, 0.0, None)
    small /= small.max()  # thin pen strokes fade when shrunk a lot; MNIST ink peaks at full white

    ys, xs = np.indices(small.shape)
    mass = small.sum()
    top = _offset(CENTRE - (ys * small).sum() / mass, small.shape[0])
    left = _offset(CENTRE - (xs * small).sum() / mass, small.shape[1])
    field = np.zeros((FIELD, FIELD), np.float32)
    field[top:top + small.shape[0], left:left + small.shape[1]] = small
    return field.reshape(FIELD * FIELD)


def _grayscale(image: Image.Image) -> np.ndarray:
    image = ImageOps.exif_transpose(image)  # phone photos store rotation as a tag, not pixels
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        # Transparent drawing-app exports: flatten onto white paper.
        rgba = image.convert("RGBA")
        paper = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(paper, rgba)
    if image.mode.startswith("I"):  # 16-bit PNG: convert("L") would clip it, so rescale to 0..255
        return np.asarray(image, dtype=np.float32) * (255.0 / 65535.0)
    return np.asarray(image.convert("L"), dtype=np.float32)


def _offset(shift: float, extent: int) -> int:
    """Where to paste a patch so its centre of mass lands at CENTRE, kept wholly inside the field."""
    return int(min(max(round(shift), 0), FIELD - extent))


def read_image(path: str) -> Image.Image:
    """Decode a PNG or JPEG fully (so truncation shows here); ValueError with a one-line reason."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise ValueError("no such file") from None
    except IsADirectoryError:
        raise ValueError("is a directory, not an image") from None
    except OSError as exc:
        raise ValueError(f"cannot read ({exc.strerror or exc})") from None
    if not raw:
        raise ValueError("empty file")
    return decode_image(raw)


def decode_image(raw: bytes) -> Image.Image:
    """A PNG or JPEG's bytes, decoded fully; ValueError with a one-line reason."""
    try:
        image = Image.open(io.BytesIO(raw))
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError, ValueError):
        raise ValueError("not a PNG or JPEG image") from None
    if image.format not in FORMATS:
        raise ValueError(f"a {image.format} image; only PNG and JPEG are supported")
    try:
        image.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise ValueError(f"truncated or corrupt {image.format} image ({errors.first_line(exc, named=True, limit=160)})") from None
    return image




def top_probabilities(probs: np.ndarray, k: int = TOP) -> list[dict]:
    order = np.argsort(-probs, kind="stable")[:k]
    return [{"digit": int(d), "probability": float(probs[d])} for d in order]


def format_line(path: str, top: list[dict]) -> str:
    ranked = ", ".join(f"{t['digit']} {t['probability']:.3f}" for t in top)
    return f"{path}: {top[0]['digit']}  ({ranked})"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m trainer.predict",
        description="Classify PNG or JPEG digit images with a trained MNIST model.")
    parser.add_argument("model", metavar="MODEL", help="trained model: mnist.keras (or mnist.h5), or an MLflow "
                        "model URI such as models:/mnist@champion or runs:/<run id>/model")
    parser.add_argument("images", metavar="IMAGE", nargs="+", help="PNG or JPEG files, one digit each")
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of lines")
    parser.add_argument("--tracking-uri", metavar="URI", help="the MLflow tracking server of a models:/ or runs:/ "
                        "MODEL (default: $MLFLOW_TRACKING_URI)")
    return parser


def load_model(path: str, tracking_uri: str | None = None):
    """The model, or ValueError with a one-line reason (missing, unreadable, wrong shape)."""
    if path.startswith(MLFLOW_SCHEMES):
        from trainer import tracking

        return _checked(path, tracking.load_keras(path, tracking_uri))
    if not os.path.isfile(path):
        raise ValueError(f"model file {path!r} not found; train one first (it is written to models/mnist.keras)")
    if not path.endswith(MODEL_SUFFIXES):  # Keras picks the loader by suffix; say so in our words
        raise ValueError(f"{path}: not a Keras model file (expected .keras, .h5 or .hdf5)")
    import keras

    try:
        model = keras.saving.load_model(path, safe_mode=True, compile=False)  # compile: only predicting
    except Exception as exc:  # corrupt zip, wrong format, unsafe lambda...: all mean "not a model"
        raise ValueError(f"{path}: not a loadable Keras model ({errors.first_line(exc, named=True, limit=160)})") from None
    return _checked(path, model)


def _checked(path: str, model):
    if tuple(model.input_shape) != (None, FIELD * FIELD) or tuple(model.output_shape) != (None, 10):
        raise ValueError(f"{path}: model maps {model.input_shape} -> {model.output_shape}, "
                         "expected an MNIST model (None, 784) -> (None, 10)")
    return model


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        model = load_model(args.model, args.tracking_uri)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    results, pixels = [], []
    for path in args.images:
        try:
            pixels.append(mnist_like(read_image(path)))
            results.append({"file": path, "digit": None, "top3": None, "error": None})
        except ValueError as exc:
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
