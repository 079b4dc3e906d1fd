"""What `mnist-serve` accepts, turned into model input: request bodies -> (n, 784) float32 in [0, 1].

    {"image": [[0..255] x 28] x 28}          one digit as MNIST stores it (rows of pixel values)
    {"image": "<base64 PNG or JPEG>"}        a picture, prepared as `mnist-predict` prepares one
    {"images": [either of those, ...]}       up to MAX_IMAGES in one request
    a raw PNG or JPEG body                   Content-Type image/png or image/jpeg
    a form upload (multipart/form-data)      each file field one picture (curl -F image=@seven.png)

Anything else is a BadInput with its HTTP status and one line saying what was wrong. Pure numpy and
Pillow: nothing here knows about Ray Serve or Keras.
"""

from __future__ import annotations

import base64
import binascii
import json
from email.parser import BytesParser
from email.policy import HTTP

import numpy as np
from trainer.predict import decode_image, mnist_like

MAX_BODY_BYTES = 1 << 20  # 1 MiB: 64 digits as JSON need about 200 KB, a phone photo needs resizing first
MAX_IMAGES = 64
IMAGE_TYPES = ("image/png", "image/jpeg")


class BadInput(ValueError):
    """A request the app refuses: `status` (4xx) and a one-line message."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def parse_body(body: bytes, content_type: str = "application/json") -> tuple[np.ndarray, bool]:
    """(images as (n, 784) float32 in [0, 1], whether the request was the batch form)."""
    if not body:
        raise BadInput("empty body: send JSON {\"image\": ...} or {\"images\": [...]}, or a PNG/JPEG image")
    if len(body) > MAX_BODY_BYTES:
        raise BadInput(f"body of {len(body):,} bytes is over the limit of {MAX_BODY_BYTES:,}", 413)
    kind = content_type.split(";")[0].strip().lower()
    if kind in IMAGE_TYPES:
        return picture(body)[None], False
    if kind == "multipart/form-data":
        return form_pictures(body, content_type)
    try:
        document = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise BadInput("body is not JSON (nor a PNG or JPEG sent as image/png or image/jpeg)") from None
    if not isinstance(document, dict) or not ({"image", "images"} & set(document)):
        raise BadInput("JSON body must be an object with \"image\" (one digit) or \"images\" (a list)")
    if "image" in document:
        return one(document["image"], "image")[None], False
    items = document["images"]
    if not isinstance(items, list) or not items:
        raise BadInput("\"images\" must be a non-empty list of digits")
    if len(items) > MAX_IMAGES:
        raise BadInput(f"{len(items)} images in one request; the limit is {MAX_IMAGES}", 413)
    return np.stack([one(item, f"images[{i}]") for i, item in enumerate(items)]), True


def form_pictures(body: bytes, content_type: str) -> tuple[np.ndarray, bool]:
    """A form upload (curl -F image=@seven.png): every file field is one picture."""
    message = BytesParser(policy=HTTP).parsebytes(f"Content-Type: {content_type}\r\n\r\n".encode() + body)
    files = [part for part in (message.iter_parts() if message.is_multipart() else []) if part.get_filename()]
    if not files:
        raise BadInput("multipart body holds no file: send the image as a file field (curl -F image=@digit.png)")
    if len(files) > MAX_IMAGES:
        raise BadInput(f"{len(files)} images in one request; the limit is {MAX_IMAGES}", 413)
    pictures = [picture(part.get_payload(decode=True) or b"", part.get_filename()) for part in files]
    return np.stack(pictures), len(files) > 1


def one(item, where: str) -> np.ndarray:
    """One digit: 28 rows of 28 integers 0..255, or a base64 PNG/JPEG -> (784,) float32."""
    if isinstance(item, str):
        try:
            data = base64.b64decode(item, validate=True)
        except (binascii.Error, ValueError):
            raise BadInput(f"{where}: a string must be a base64 PNG or JPEG") from None
        return picture(data, where)
    try:
        pixels = np.array(item, dtype=object)
    except ValueError:  # ragged rows
        raise BadInput(f"{where}: must be 28 rows of 28 pixel values") from None
    if pixels.shape != (28, 28):
        raise BadInput(f"{where}: shape {pixels.shape}, expected 28 rows of 28 pixel values")
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in pixels.flat):
        raise BadInput(f"{where}: pixel values must be integers 0..255")
    values = pixels.astype(np.int64)
    if values.min() < 0 or values.max() > 255:
        raise BadInput(f"{where}: pixel values must lie in 0..255, found {values.min()}..{values.max()}")
    return (values.reshape(784) / 255.0).astype(np.float32)


def picture(data: bytes, where: str = "body") -> np.ndarray:
    """A PNG or JPEG of a digit, prepared as MNIST was (trainer/predict.py) -> (784,) float32."""
    try:
        return mnist_like(decode_image(data))
    except ValueError as exc:  # not an image, truncated, another format, or blank
        raise BadInput(f"{where}: {exc}") from None
