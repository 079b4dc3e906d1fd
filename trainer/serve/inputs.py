"""What `mnist-serve` accepts, turned into model input: request bodies -> (n, 784) float32 in [0, 1].

    {"image": [[0..255] x 28] x 28}          one digit as MNIST stores it (rows of pixel values)
    {"image": "<base64 PNG or JPEG>"}        a picture, prepared as `mnist-predict` prepares one
    {"images": [either of those, ...]}       up to MAX_IMAGES in one request
    a raw PNG or JPEG body                   Content-Type image/png or image/jpeg
    a form upload (multipart/form-data)      each file field one picture (curl -F image=@seven.png)

The HTTP layer (trainer/serve/app.py, FastAPI) reads the body, at most MAX_BODY_BYTES, and the form's
files; this module turns what it read into pixels. A request's pictures hold at most MAX_PIXELS in all,
read from their headers before any is decoded. Anything else is a BadInput with its HTTP status and
one line saying what was wrong. Pydantic (the JSON body's model), numpy and Pillow: nothing here
knows about Ray Serve or Keras.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
from typing import Annotated, Any

import numpy as np
from PIL import Image
from pydantic import BaseModel, Field, ValidationError, WithJsonSchema

from trainer.common import errors
from trainer.common.errors import InputError
from trainer.model.images import decode_image, mnist_like

MAX_BODY_BYTES = 1 << 20  # 1 MiB: 64 digits as JSON need about 200 KB, a phone photo needs resizing first
MAX_IMAGES = 64
MAX_PIXELS = 4096 * 4096  # in one request's pictures together: a 12 MP phone photo fits
IMAGE_TYPES = ("image/png", "image/jpeg")
EMPTY_BODY = "empty body: send JSON {\"image\": ...} or {\"images\": [...]}, or a PNG/JPEG image"
NOT_JSON = "body is not JSON (nor a PNG or JPEG sent as image/png or image/jpeg)"
NOT_A_REQUEST = "JSON body must be an object with \"image\" (one digit) or \"images\" (a list)"
NO_FILE = "multipart body holds no file: send the image as a file field (curl -F image=@digit.png)"

# The JSON schema /docs shows for one digit. The values are checked below, not by pydantic, so that
# each refusal says in one line what was wrong with which digit ("images[3]: shape (27, 28), ...").
DIGIT_SCHEMA = {"anyOf": [
    {"type": "array", "minItems": 28, "maxItems": 28, "description": "28 rows of 28 pixel values",
     "items": {"type": "array", "minItems": 28, "maxItems": 28,
               "items": {"type": "integer", "minimum": 0, "maximum": 255}}},
    {"type": "string", "format": "byte", "description": "a base64 PNG or JPEG of a digit"},
]}
Digit = Annotated[Any, WithJsonSchema(DIGIT_SCHEMA)]
Digits = Annotated[Any, WithJsonSchema({"type": "array", "items": DIGIT_SCHEMA, "minItems": 1, "maxItems": MAX_IMAGES})]


class BadInput(errors.InputError):
    """A request the app refuses: `status` (4xx) and a one-line message."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


class PredictRequest(BaseModel):
    """POST /predict's JSON body: "image", one digit, or "images", up to 64 of them."""

    image: Digit = Field(None, description="one digit: 28 rows of 28 pixel values 0..255, or a base64 PNG/JPEG")
    images: Digits = Field(None, description=f"a batch: up to {MAX_IMAGES} digits, each as \"image\" takes one")

    @classmethod
    def parse(cls, body: bytes) -> PredictRequest:
        """A JSON body (any encoding json reads) -> the request; a BadInput if it is not one."""
        try:
            document = json.loads(body)
        except (ValueError, RecursionError):  # not JSON, not text, numbers of 4,300 digits, nested too deep
            raise BadInput(NOT_JSON) from None
        try:
            request = cls.model_validate(document)
        except ValidationError:  # not an object: the fields themselves take any JSON value
            raise BadInput(NOT_A_REQUEST) from None
        if not request.model_fields_set & {"image", "images"}:
            raise BadInput(NOT_A_REQUEST)
        return request

    def pixels(self) -> tuple[np.ndarray, bool]:
        """(images as (n, 784) float32 in [0, 1], whether the request was the batch form)."""
        if "image" in self.model_fields_set:
            return one(self.image, "image")[None], False
        items = self.images
        if not isinstance(items, list) or not items:
            raise BadInput("\"images\" must be a non-empty list of digits")
        if len(items) > MAX_IMAGES:
            raise BadInput(f"{len(items)} images in one request; the limit is {MAX_IMAGES}", 413)
        wheres = [f"images[{i}]" for i in range(len(items))]
        within_budget([(where, base64_picture(item, where)) for where, item in zip(wheres, items)
                       if isinstance(item, str)])
        return np.stack([one(item, where) for where, item in zip(wheres, items)]), True


def form_pictures(files: list[tuple[str, bytes]]) -> tuple[np.ndarray, bool]:
    """A form upload's files, (name, contents) each (curl -F image=@seven.png): every file one picture;
    more than one is the batch form."""
    if not files:
        raise BadInput(NO_FILE)
    if len(files) > MAX_IMAGES:
        raise BadInput(f"{len(files)} images in one request; the limit is {MAX_IMAGES}", 413)
    within_budget(files)
    return np.stack([picture(data, name) for name, data in files]), len(files) > 1


def one(item, where: str) -> np.ndarray:
    """One digit: 28 rows of 28 integers 0..255, or a base64 PNG/JPEG -> (784,) float32."""
    if isinstance(item, str):
        return picture(base64_picture(item, where), where)
    try:
        pixels = np.array(item, dtype=object)
    except ValueError:  # ragged rows
        raise BadInput(f"{where}: must be 28 rows of 28 pixel values") from None
    if pixels.shape != (28, 28):
        raise BadInput(f"{where}: shape {pixels.shape}, expected 28 rows of 28 pixel values")
    values = pixels.reshape(784).tolist()
    if not all(type(v) is int for v in values):  # not bool, float, NaN or a string
        raise BadInput(f"{where}: pixel values must be integers 0..255")
    low, high = min(values), max(values)  # Python ints: any size, compared before numpy sees them
    if low < 0 or high > 255:
        raise BadInput(f"{where}: pixel values must lie in 0..255, found {_short(low)}..{_short(high)}")
    return (np.array(values, np.float64) / 255.0).astype(np.float32)


def base64_picture(item: str, where: str) -> bytes:
    try:
        return base64.b64decode(item, validate=True)
    except (binascii.Error, ValueError):
        raise BadInput(f"{where}: a string must be a base64 PNG or JPEG") from None


def picture(data: bytes, where: str = "body") -> np.ndarray:
    """A PNG or JPEG of a digit, prepared as MNIST was (trainer/serve/predict.py) -> (784,) float32.
    Its size is read from its header first: one over MAX_PIXELS is refused before it is decoded."""
    size(data, where)
    try:
        return mnist_like(decode_image(data))
    except InputError as exc:  # not an image, truncated, another format, or blank
        raise BadInput(f"{where}: {exc}") from None


def size(data: bytes, where: str) -> int:
    """The pixels a picture decodes to, from its header (0 where Pillow reads none: decode_image then
    says what it is); a 413 over MAX_PIXELS, as a PNG of a few KB can decode to gigabytes."""
    try:
        with Image.open(io.BytesIO(data)) as header:  # reads the header only
            width, height = header.size
    except Image.DecompressionBombError:  # over twice Pillow's own limit, itself over ours
        raise BadInput(f"{where}: an image over the limit of {MAX_PIXELS:,} pixels; send it smaller", 413) from None
    except Exception:
        return 0
    if width * height > MAX_PIXELS:
        raise BadInput(f"{where}: an image of {width:,} x {height:,} pixels is over the limit of "
                       f"{MAX_PIXELS:,} pixels; send it smaller", 413)
    return width * height


def within_budget(pictures: list[tuple[str, bytes]]) -> None:
    """The pictures of one request, (where, bytes) each, hold at most MAX_PIXELS together (a 413 if not):
    preparing one costs about 40 ns a pixel, so 64 large ones would hold a replica for most of a minute."""
    total = sum(size(data, where) for where, data in pictures)
    if total > MAX_PIXELS:
        raise BadInput(f"{len(pictures)} pictures of {total:,} pixels together are over the limit of "
                       f"{MAX_PIXELS:,} for one request; send them smaller", 413)


def _short(value: int) -> str:
    """A pixel value for a message: 1e30, not thirty zeros (JSON ints have at most 4,300 digits)."""
    digits = str(abs(value))
    return str(value) if len(digits) < 10 else f"{'-' if value < 0 else ''}{digits[0]}e{len(digits) - 1}"
