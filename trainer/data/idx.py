"""MNIST's original IDX files (LeCun et al.; gzip or raw), read and checked byte for byte."""

from __future__ import annotations

import gzip
import os
import struct

import numpy as np

from trainer.data.mnist import IMAGE_SHAPE, DataError, Mnist, validate

IDX_NAMES = {  # (split, part) -> file stem, as distributed by LeCun et al. and mirrored by Keras
    ("train", "images"): "train-images-idx3-ubyte",
    ("train", "labels"): "train-labels-idx1-ubyte",
    ("test", "images"): "t10k-images-idx3-ubyte",
    ("test", "labels"): "t10k-labels-idx1-ubyte",
}
IDX_MAGIC = {"images": (0x00000803, 3), "labels": (0x00000801, 1)}


def load_idx_dir(directory: str) -> Mnist:
    arrays = {}
    for (split, part), stem in IDX_NAMES.items():
        path = _find_idx(directory, stem)
        arrays[f"{'x' if part == 'images' else 'y'}_{split}"] = read_idx(path, part)
    return validate(Mnist(**arrays), directory)


def _find_idx(directory: str, stem: str) -> str:
    candidates = [stem, stem + ".gz", stem.replace("-idx", ".idx"), stem.replace("-idx", ".idx") + ".gz"]
    for name in candidates:
        if os.path.isfile(os.path.join(directory, name)):
            return os.path.join(directory, name)
    raise DataError(f"{directory}: no {stem}[.gz] found (expected the four MNIST IDX files, "
                    "a Keras .npz, or a Parquet directory with manifest.json)")


def read_idx(path: str, part: str) -> np.ndarray:
    """Read one IDX file ('images' or 'labels'), gzip or raw, checking magic, dimensions and size."""
    with open(path, "rb") as f:
        raw = f.read()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as exc:
            raise DataError(f"{path}: corrupt or truncated gzip data ({exc})") from None
    want_magic, ndim = IDX_MAGIC[part]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: {len(raw)} bytes is too short for an IDX {part} header")
    magic = struct.unpack(">I", raw[:4])[0]
    if magic != want_magic:
        raise DataError(f"{path}: IDX magic number 0x{magic:08x}, expected 0x{want_magic:08x} for {part}")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    if part == "images" and tuple(dims[1:]) != IMAGE_SHAPE:
        raise DataError(f"{path}: images are {dims[1]}x{dims[2]}, expected 28x28")
    expected = int(np.prod(dims))
    if len(raw) - header != expected:
        raise DataError(f"{path}: {len(raw) - header} data bytes, header promises {expected} "
                        f"({'x'.join(map(str, dims))}); file truncated or padded")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)
