"""What mnist-serve accepts (trainer/inputs.py): every body form, and every bad one refused with its
status and one line. No Ray, no model."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
from PIL import Image

from tests.conftest import SAMPLE
from trainer.inputs import MAX_BODY_BYTES, MAX_IMAGES, BadInput, parse_body
from trainer.predict import mnist_like


@pytest.fixture(scope="module")
def digits():
    with np.load(SAMPLE) as npz:
        return npz["x_test"][:3]


def png(pixels: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def body(document) -> bytes:
    return json.dumps(document).encode()


def test_an_array_a_base64_picture_a_batch_and_a_raw_picture_become_model_input(digits):
    x, batch = parse_body(body({"image": digits[0].tolist()}))
    assert x.shape == (1, 784) and x.dtype == np.float32 and not batch
    assert np.allclose(x[0], digits[0].reshape(784) / 255.0)
    picture = mnist_like(Image.open(io.BytesIO(png(digits[1]))))
    x, _ = parse_body(body({"image": base64.b64encode(png(digits[1])).decode()}))
    assert np.array_equal(x[0], picture)  # prepared as mnist-predict prepares a picture
    x, batch = parse_body(body({"images": [digits[0].tolist(), base64.b64encode(png(digits[2])).decode()]}))
    assert x.shape == (2, 784) and batch
    x, _ = parse_body(png(digits[1]), "image/png")
    assert np.array_equal(x[0], picture)
    boundary = "b0undary"
    form = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"seven.png\"\r\n"
            "Content-Type: image/png\r\n\r\n").encode() + png(digits[1]) + f"\r\n--{boundary}--\r\n".encode()
    x, batch = parse_body(form, f"multipart/form-data; boundary={boundary}")
    assert np.array_equal(x[0], picture) and not batch
    with pytest.raises(BadInput, match="multipart body holds no file"):
        parse_body(f"--{boundary}\r\nContent-Disposition: form-data; name=\"x\"\r\n\r\n1\r\n--{boundary}--\r\n".encode(),
                   f"multipart/form-data; boundary={boundary}")


@pytest.mark.parametrize("raw, content_type, status, message", [
    (b"", "application/json", 400, "empty body"),
    (b"{not json", "application/json", 400, "body is not JSON"),
    (body([1, 2]), "application/json", 400, "an object with \"image\""),
    (body({"image": [[0] * 28] * 27}), "application/json", 400, r"image: shape \(27, 28\), expected 28 rows"),
    (body({"image": [[0] * 28] * 27 + [[0] * 27]}), "application/json", 400, "shape"),
    (body({"image": [[0] * 28] * 27 + [[0] * 27 + [256]]}), "application/json", 400, r"must lie in 0..255, found 0..256"),
    (body({"image": [[-1] * 28] * 28}), "application/json", 400, "must lie in 0..255"),
    (body({"image": [[0.5] * 28] * 28}), "application/json", 400, "must be integers 0..255"),
    (body({"image": [[True] * 28] * 28}), "application/json", 400, "must be integers 0..255"),
    (body({"image": "not base64!"}), "application/json", 400, "a string must be a base64 PNG or JPEG"),
    (body({"image": base64.b64encode(b"GIF89a not an image").decode()}), "application/json", 400,
     "image: not a PNG or JPEG image"),
    (body({"image": base64.b64encode(png(np.zeros((28, 28), np.uint8))).decode()}), "application/json", 400,
     "no digit found"),
    (body({"images": []}), "application/json", 400, "non-empty list"),
    (body({"images": [[[0] * 28] * 28] * (MAX_IMAGES + 1)}), "application/json", 413, f"the limit is {MAX_IMAGES}"),
    (b"\x89PNG\r\n\x1a\n truncated", "image/png", 400, "body: "),
    (b" " * (MAX_BODY_BYTES + 1), "application/json", 413, "over the limit of 1,048,576"),
])
def test_bad_input_is_refused_with_its_status_and_one_line(raw, content_type, status, message):
    with pytest.raises(BadInput, match=message) as info:
        parse_body(raw, content_type)
    assert info.value.status == status and "\n" not in str(info.value)
