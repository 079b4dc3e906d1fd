"""What mnist-serve accepts (trainer/serve/inputs.py): every body form, and every bad one refused with its
status and one line. No Ray, no model, no HTTP (tests/test_serve.py sends these over HTTP to the real app)."""

from __future__ import annotations

import base64
import io
import json
import random

import numpy as np
import pytest
from PIL import Image, ImageDraw

from tests.conftest import SAMPLE
from trainer.model.images import mnist_like
from trainer.serve.inputs import MAX_IMAGES, MAX_PIXELS, BadInput, PredictRequest, form_pictures, picture

NOISE = np.random.default_rng(0).integers(0, 256, (28, 28), dtype=np.uint8)  # a PNG of 880 bytes


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


def pixels_of(raw: bytes) -> tuple[np.ndarray, bool]:
    """What the app does with a JSON body (any Content-Type but a picture's or a form's)."""
    return PredictRequest.parse(raw).pixels()


def bomb(side: int) -> bytes:
    """A 1-bit PNG of side x side pixels with a stroke on it: a few KB that decode to side**2 bytes and more."""
    image = Image.new("1", (side, side), 0)
    ImageDraw.Draw(image).line((0, 0, side, side), fill=1, width=8)
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def test_an_array_a_base64_picture_a_batch_a_raw_picture_and_a_form_become_model_input(digits):
    x, batch = pixels_of(body({"image": digits[0].tolist()}))
    assert x.shape == (1, 784) and x.dtype == np.float32 and not batch
    assert np.array_equal(x[0], (digits[0].reshape(784) / 255.0).astype(np.float32))
    picture_1 = mnist_like(Image.open(io.BytesIO(png(digits[1]))))
    x, _ = pixels_of(body({"image": base64.b64encode(png(digits[1])).decode()}))
    assert np.array_equal(x[0], picture_1)  # prepared as mnist-predict prepares a picture
    x, batch = pixels_of(body({"images": [digits[0].tolist(), base64.b64encode(png(digits[2])).decode()]}))
    assert x.shape == (2, 784) and batch
    assert np.array_equal(picture(png(digits[1])), picture_1)  # a raw image/png body
    x, batch = form_pictures([("seven.png", png(digits[1]))])
    assert np.array_equal(x[0], picture_1) and not batch
    x, batch = form_pictures([("a.png", png(digits[1])), ("b.png", png(digits[2]))])
    assert x.shape == (2, 784) and batch  # two files answer as a batch
    with pytest.raises(BadInput, match="multipart body holds no file"):
        form_pictures([])


def test_json_as_python_reads_it_still_works(digits):
    """Bodies json.loads has always taken: a UTF-8 byte-order mark, UTF-16, a repeated key (the last wins)."""
    document = json.dumps({"image": digits[0].tolist()})
    for raw in (b"\xef\xbb\xbf" + document.encode(), document.encode("utf-16"),
                ('{"image": "x", ' + document[1:]).encode()):
        x, batch = pixels_of(raw)
        assert x.shape == (1, 784) and not batch


ROWS = [[0] * 28] * 28


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # the 13,000 x 13,000 PNG
@pytest.mark.parametrize("raw, status, message", [
    (b"", 400, "body is not JSON"),
    (b"{not json", 400, "body is not JSON"),
    (b"\xff\xfe\x00garbage", 400, "body is not JSON"),
    (b"[" * 100_000 + b"]" * 100_000, 400, "body is not JSON"),  # deeper than json can nest
    (b'{"image": ' + b"[" * 500 + b"]" * 500 + b"}", 400, r"image: shape \(1, 1, 1"),
    (b'{"image": 1' + b"0" * 5000 + b"}", 400, "body is not JSON"),  # past Python's 4,300-digit int limit
    (body([1, 2]), 400, "an object with \"image\""),
    (body("image"), 400, "an object with \"image\""),
    (body(None), 400, "an object with \"image\""),
    (body({}), 400, "an object with \"image\""),
    (body({"imgae": ROWS}), 400, "an object with \"image\""),
    (body({"image": None}), 400, r"image: shape \(\)"),
    (body({"image": 7}), 400, r"image: shape \(\)"),
    (body({"image": {"rows": ROWS}}), 400, r"image: shape \(\)"),
    (body({"image": [[0] * 28] * 27}), 400, r"image: shape \(27, 28\), expected 28 rows"),
    (body({"image": [[0] * 28] * 27 + [[0] * 27]}), 400, "shape"),
    (body({"image": [[[0]] * 28] * 28}), 400, r"image: shape \(28, 28, 1\)"),
    (body({"image": [[0] * 28] * 27 + [[[0, 1]] * 28]}), 400, "image: "),  # a row of the wrong depth
    (body({"image": [[0] * 28] * 27 + [[0] * 27 + [256]]}), 400, r"must lie in 0..255, found 0..256"),
    (body({"image": [[-1] * 28] * 28}), 400, "must lie in 0..255"),
    (body({"image": [[10 ** 30] * 28] * 28}), 400, "must lie in 0..255, found 1e30..1e30"),
    (body({"image": [[-10 ** 30] * 28] * 28}), 400, "must lie in 0..255, found -1e30..-1e30"),
    (body({"image": [[0.5] * 28] * 28}), 400, "must be integers 0..255"),
    (body({"image": [[1.0] * 28] * 28}), 400, "must be integers 0..255"),
    (b'{"image": [' + b",".join([b"[" + b",".join([b"NaN"] * 28) + b"]"] * 28) + b"]}", 400, "must be integers"),
    (b'{"image": [' + b",".join([b"[" + b",".join([b"Infinity"] * 28) + b"]"] * 28) + b"]}", 400, "must be integers"),
    (b'{"image": [' + b",".join([b"[" + b",".join([b"1e400"] * 28) + b"]"] * 28) + b"]}", 400, "must be integers"),
    (body({"image": [[True] * 28] * 28}), 400, "must be integers 0..255"),
    (body({"image": [["0"] * 28] * 28}), 400, "must be integers 0..255"),
    (body({"image": [[None] * 28] * 28}), 400, "must be integers 0..255"),
    (body({"image": "not base64!"}), 400, "a string must be a base64 PNG or JPEG"),
    (body({"image": "ü"}), 400, "a string must be a base64 PNG or JPEG"),
    (body({"image": ""}), 400, "image: not a PNG or JPEG image"),
    (body({"image": base64.b64encode(b"GIF89a not an image").decode()}), 400, "image: not a PNG or JPEG image"),
    (body({"image": base64.b64encode(png(np.zeros((28, 28), np.uint8))).decode()}), 400, "no digit found"),
    (body({"image": base64.b64encode(bomb(13_000)).decode()}), 413, "13,000 x 13,000 pixels is over the limit"),
    (body({"images": []}), 400, "non-empty list"),
    (body({"images": None}), 400, "non-empty list"),
    (body({"images": ROWS[0]}), 400, r"images\[0\]: shape \(\)"),
    (body({"images": "abc"}), 400, "non-empty list"),
    (body({"images": {"0": ROWS}}), 400, "non-empty list"),
    (body({"images": [ROWS, "not base64!"]}), 400, r"images\[1\]: a string must be"),
    (body({"images": [ROWS] * (MAX_IMAGES + 1)}), 413, f"65 images in one request; the limit is {MAX_IMAGES}"),
])
def test_bad_json_is_refused_with_its_status_and_one_line(raw, status, message):
    with pytest.raises(BadInput, match=message) as info:
        pixels_of(raw)
    assert info.value.status == status and "\n" not in str(info.value)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
@pytest.mark.parametrize("data, status, message", [
    (b"", 400, "not a PNG or JPEG image"),
    (b"GIF89a, not a digit", 400, "not a PNG or JPEG image"),
    (b"\x89PNG\r\n\x1a\n truncated", 400, "body: "),
    (png(NOISE)[:300], 400, "body: truncated or corrupt PNG"),
    (bomb(13_000), 413, f"13,000 x 13,000 pixels is over the limit of {MAX_PIXELS:,} pixels"),  # Pillow warns only
    (bomb(20_000), 413, f"over the limit of {MAX_PIXELS:,} pixels"),  # Pillow refuses to open it at all
])
def test_a_bad_picture_is_refused_before_it_is_decoded_when_it_is_too_large(data, status, message):
    with pytest.raises(BadInput, match=message) as info:
        picture(data)
    assert info.value.status == status and "\n" not in str(info.value)


def test_the_pictures_of_one_request_hold_at_most_max_pixels_together():
    """Each of 3,000 x 3,000 pixels passes alone; two in one request (18 million pixels) do not."""
    large = bomb(3_000)
    assert picture(large).shape == (784,)
    with pytest.raises(BadInput, match=f"2 pictures of 18,000,000 pixels together are over the limit of "
                                       f"{MAX_PIXELS:,} for one request") as info:
        pixels_of(body({"images": [base64.b64encode(large).decode()] * 2}))
    assert info.value.status == 413
    with pytest.raises(BadInput, match="2 pictures of 18,000,000 pixels together") as info:
        form_pictures([("a.png", large), ("b.png", large)])
    assert info.value.status == 413


def test_a_form_names_the_file_that_is_wrong_and_counts_its_files(digits):
    with pytest.raises(BadInput, match="^b.png: not a PNG or JPEG image$"):
        form_pictures([("a.png", png(digits[0])), ("b.png", b"")])
    with pytest.raises(BadInput, match=f"65 images in one request; the limit is {MAX_IMAGES}") as info:
        form_pictures([("d.png", b"")] * (MAX_IMAGES + 1))
    assert info.value.status == 413


def test_mangled_pictures_are_refused_as_bad_input_and_never_raise_anything_else(digits):
    """Bytes flipped, cut, inserted and length fields overwritten in PNGs and JPEGs of several modes:
    each either decodes or is a BadInput (400), never another exception (a 500 from the app)."""
    rng = random.Random(7)
    seeds = []
    for fmt, mode in (("PNG", "L"), ("PNG", "RGBA"), ("PNG", "P"), ("PNG", "1"), ("PNG", "I;16"),
                      ("JPEG", "L"), ("JPEG", "RGB"), ("JPEG", "CMYK")):
        image = (Image.fromarray(digits[0].astype(np.uint16) * 257) if mode == "I;16"  # a 16-bit PNG
                 else Image.fromarray(digits[0]).convert(mode))
        out = io.BytesIO()
        image.resize((56, 56)).save(out, format=fmt)
        seeds.append(out.getvalue())
    outcomes = {"decoded": 0, "refused": 0}
    for _ in range(1500):
        data = bytearray(rng.choice(seeds))
        kind = rng.randrange(4)
        if kind == 0:
            for _ in range(rng.randint(1, 8)):
                data[rng.randrange(len(data))] = rng.randrange(256)
        elif kind == 1:
            data = data[:rng.randrange(len(data))]
        elif kind == 2:
            at = rng.randrange(len(data))
            data[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 40)))
        else:
            at = rng.randrange(8, 40)
            data[at:at + 4] = rng.choice([b"\xff\xff\xff\xff", b"\x00\x00\x00\x00", b"\x7f\xff\xff\xff"])
        try:
            assert picture(bytes(data)).shape == (784,)
            outcomes["decoded"] += 1
        except BadInput as exc:
            assert exc.status in (400, 413) and "\n" not in str(exc)
            outcomes["refused"] += 1
    assert outcomes["refused"] > 500 and outcomes["decoded"] > 50, outcomes
