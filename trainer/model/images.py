"""Any digit image made to look like an MNIST digit: decoded (PNG or JPEG), light on dark, cropped,
scaled into 20x20 and centred by centre of mass in 28x28, as MNIST was prepared. Used by
mnist-predict, mnist-serve and mnist-transfer alike."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from trainer.common import errors
from trainer.common.errors import InputError

FORMATS = ("PNG", "JPEG", "MPO")  # MPO: how Pillow names many phone cameras' JPEGs
FIELD = 28  # MNIST: 28x28 images...
BOX = 20  # ...whose digit was scaled to fit 20x20, then centred by centre of mass
CENTRE = 14.0  # where MNIST's centres of mass sit, in pixel indices (measured on the test set)
INK_FLOOR = 0.1  # of the strongest ink: fainter pixels are paper texture, noise or JPEG ringing


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
        raise InputError("no digit found: the image is blank")
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
        raise InputError("no such file") from None
    except IsADirectoryError:
        raise InputError("is a directory, not an image") from None
    except OSError as exc:
        raise InputError(f"cannot read ({exc.strerror or exc})") from None
    if not raw:
        raise InputError("empty file")
    return decode_image(raw)


def decode_image(raw: bytes) -> Image.Image:
    """A PNG or JPEG's bytes, decoded fully; ValueError with a one-line reason."""
    try:
        image = Image.open(io.BytesIO(raw))
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError, ValueError):
        raise InputError("not a PNG or JPEG image") from None
    if image.format not in FORMATS:
        raise InputError(f"a {image.format} image; only PNG and JPEG are supported")
    try:
        image.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise InputError(f"truncated or corrupt {image.format} image ({errors.first_line(exc, named=True, limit=160)})") from None
    return image
