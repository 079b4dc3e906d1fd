"""MNIST in (npz, IDX via trainer/data/idx.py, Parquet), validated arrays out (trainer/data/mnist.py), and
Parquet shards with a manifest for Ray Data, written once per content.

Functions of numpy and pyarrow: nothing here knows about Ray. Keras (and so TensorFlow) is imported
only for the download, when no source is given.
Sources: a Keras-layout .npz, a directory of the four IDX files (gzip or raw), or a
Parquet directory written by `write_parquet` (local path or a pyarrow URI like s3://...).
"""

from __future__ import annotations

import contextlib
import json
import os
import posixpath
import sys
import zipfile
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from trainer.common import errors, quiet
from trainer.common.atomic import temporary_sibling
from trainer.common.fs import filesystem, join
from trainer.data.idx import load_idx_dir
from trainer.data.manifest import Manifest, Split
from trainer.data.mnist import (
    IMAGE_BYTES,
    IMAGE_SHAPE,
    SPLITS,
    ContentHash,
    DataError,
    Mnist,
    content_hash,
    label_problem,
    validate,
)

MANIFEST = "manifest.json"


# ---------------------------------------------------------------------------- loading

def resolve_source(data: str | None) -> str | None:
    """--data wins, then $MNIST_DATA; None means the Keras download."""
    return data or os.environ.get("MNIST_DATA") or None


def load(source: str | None) -> Mnist:
    """Load and validate MNIST from any supported source (None: keras.datasets download)."""
    if source is None:
        return _download()
    if "://" not in source:
        if not os.path.exists(source):
            raise DataError(f"MNIST source {source!r} does not exist; pass --data or set MNIST_DATA")
        if os.path.isfile(source):
            return load_npz(source)
        if not is_parquet_dir(source):
            return load_idx_dir(source)
    return load_parquet(source)


def _download() -> Mnist:
    quiet.import_tensorflow()  # its import-time C++ notices to the log file, not the console
    import keras  # only this path needs it

    try:
        (x_train, y_train), (x_test, y_test) = keras.datasets.mnist.load_data()
    except Exception as exc:  # no network, proxy, 404...: all mean the same to the user
        raise DataError(
            f"could not download MNIST ({errors.first_line(exc, named=True, limit=160)}); "
            "pass --data PATH or set MNIST_DATA to a local copy (.npz, IDX directory or Parquet)"
        ) from None
    return validate(Mnist(x_train, y_train, x_test, y_test), "keras.datasets.mnist")


def load_npz(path: str) -> Mnist:
    try:
        with np.load(path, allow_pickle=False) as npz:
            missing = [k for k in ("x_train", "y_train", "x_test", "y_test") if k not in npz.files]
            if missing:
                raise DataError(f"{path}: .npz lacks {', '.join(missing)} (expected Keras' mnist.npz layout)")
            arrays = {k: npz[k] for k in ("x_train", "y_train", "x_test", "y_test")}
    except DataError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:  # truncated, not a zip, bad header
        raise DataError(f"{path}: not a readable .npz file ({type(exc).__name__}: {exc})") from exc
    return validate(Mnist(**arrays), path)


# ---------------------------------------------------------------------------- Parquet

def is_parquet_dir(path: str) -> bool:
    fs, root = filesystem(path)
    try:
        return fs.get_file_info(posixpath.join(root, MANIFEST)).type == pafs.FileType.File
    except OSError as exc:  # an unreachable or refusing object store: the user's input, in one line
        raise DataError(f"{path}: cannot read it ({errors.first_line(exc, limit=300)})") from None


def read_manifest(path: str) -> Manifest:
    fs, root = filesystem(path)
    try:
        with fs.open_input_stream(posixpath.join(root, MANIFEST)) as f:
            value = json.loads(f.read())
    except FileNotFoundError:
        raise DataError(f"{path}: no {MANIFEST}; not a Parquet directory written by this project") from None
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}/{MANIFEST}: unreadable ({exc})") from None
    try:
        return Manifest.from_json(value)
    except ValueError as exc:
        raise DataError(f"{path}/{MANIFEST}: {exc}") from None


def _table(x: np.ndarray, y: np.ndarray, start: int) -> pa.Table:
    flat = np.ascontiguousarray(x.reshape(len(x), IMAGE_BYTES))
    images = pa.FixedSizeBinaryArray.from_buffers(
        pa.binary(IMAGE_BYTES), len(flat), [None, pa.py_buffer(flat.tobytes())])
    return pa.table({
        "index": pa.array(np.arange(start, start + len(x), dtype=np.int64)),
        "image": images,
        "label": pa.array(y, type=pa.uint8()),
    })


def write_parquet(data: Mnist, path: str, rows_per_file: int = 10_000) -> Manifest:
    """Write both splits as Parquet shards plus manifest.json under `path`, atomically. Returns the
    manifest (see write_shards)."""
    splits = {split: data.split(split) for split in SPLITS}
    return write_shards(path, {split: (len(x), pieces(x, y, rows_per_file)) for split, (x, y) in splits.items()},
                        rows_per_file)


def pieces(x: np.ndarray, y: np.ndarray, rows_per_file: int):
    """(images, labels) in order, rows_per_file rows each but the last: write_shards' pieces of arrays."""
    return ((x[start:start + rows_per_file], y[start:start + rows_per_file]) for start in range(0, len(x), rows_per_file))


def write_shards(path: str, splits: dict, rows_per_file: int) -> Manifest:
    """Write each split's (images, labels) pieces, one Parquet file each, plus manifest.json under
    `path`, atomically. `splits` maps each of SPLITS to (rows, pieces): every piece rows_per_file rows
    but the last. Only one piece is held at a time, and the content hash (mnist.ContentHash) is
    taken as the pieces pass, keeping only the labels (a byte a row).

    On a local disk files go to a temporary sibling first, which is renamed into place at the end.
    Object stores (s3://, gs://) cannot rename a directory: there the manifest, written last, is
    the commit mark (readers require it). Either way a crash never leaves a directory with a
    manifest but missing shards.
    """
    fs, root = filesystem(path)
    if fs.get_file_info(root).type != pafs.FileType.NotFound:
        raise DataError(f"{path} already exists; remove it or choose another destination")
    renames = isinstance(fs, pafs.LocalFileSystem)
    tmp = temporary_sibling(root) if renames else root
    fs.create_dir(tmp, recursive=True)
    try:
        digest, written_splits = ContentHash(), {}
        shards, written = sum(-(-rows // rows_per_file) for rows, _ in splits.values()), 0  # ceil
        for split in SPLITS:
            rows, pieces = splits[split]
            digest.start(split, rows)
            files, labels = [], []
            fs.create_dir(posixpath.join(tmp, split), recursive=True)
            for i, (x, y) in enumerate(pieces):
                start = i * rows_per_file
                if len(x) != min(rows_per_file, rows - start) or len(y) != len(x):
                    raise ValueError(f"{split} piece {i}: {len(x)} rows, expected {min(rows_per_file, rows - start)}")
                file = f"{split}/part-{i:05d}.parquet"
                pq.write_table(_table(x, y, start), posixpath.join(tmp, file), filesystem=fs)
                digest.add(x)
                labels.append(np.asarray(y, dtype=np.uint8))
                files.append({"path": file, "rows": len(x)})
                written += 1
                _progress(written, shards)
            y = np.concatenate(labels) if labels else np.zeros(0, np.uint8)
            if len(y) != rows:
                raise ValueError(f"{split}: {len(y)} rows written, expected {rows}")
            digest.add(y)
            written_splits[split] = Split(rows, tuple(files), tuple(np.bincount(y, minlength=10).tolist()))
        manifest = Manifest(digest.hexdigest(), written_splits)
        with fs.open_output_stream(posixpath.join(tmp, MANIFEST)) as f:
            f.write(json.dumps(manifest.to_json(), indent=2).encode())
    except BaseException:  # a full disk, a lost mount, Ctrl-C: no half-written folder left behind
        if renames:
            with contextlib.suppress(OSError):
                fs.delete_dir(tmp)
        raise
    if renames:
        if fs.get_file_info(root).type != pafs.FileType.NotFound:  # another writer finished first
            fs.delete_dir(tmp)
            raise DataError(f"{path} already exists; remove it or choose another destination")
        fs.move(tmp, root)
    return manifest


def _progress(done: int, total: int, width: int = 20) -> None:
    """`preparing data: [#####.....] 3/6 shards (50%)` on stderr: one line per shard in a log
    (`ray job logs` shows each at once), one line redrawn in place on a terminal."""
    tty = sys.stderr.isatty()
    bar = "#" * (width * done // total) + "." * (width - width * done // total)
    line = f"preparing data: [{bar}] {done}/{total} shards ({100 * done // total}%)"
    sys.stderr.write(("\r" + line + ("\n" if done == total else "")) if tty else line + "\n")
    sys.stderr.flush()


def read_parquet_tables(path: str, split: str, manifest: Manifest | None = None) -> list[pa.Table]:
    """One split's shards as Arrow tables (index, image, label), one per file in file order, each
    checked against the manifest's row count."""
    manifest = manifest or read_manifest(path)
    if split not in manifest.splits:
        raise DataError(f"{path}/{MANIFEST}: no {split!r} split")
    return list(_shards(path, manifest.files(split)))


def _shards(path: str, files: list[dict]):
    """The files' tables in order, each checked against its row count in the manifest. The next file
    is read (by Arrow, without the GIL) while the caller works on this one: two in memory at most."""
    fs, root = filesystem(path)

    def read(file: dict) -> pa.Table:
        try:
            table = pq.read_table(posixpath.join(root, file["path"]), filesystem=fs)
        except (OSError, pa.ArrowException) as exc:
            raise DataError(f"{path}/{file['path']}: unreadable Parquet shard ({exc})") from None
        if table.num_rows != file["rows"]:
            raise DataError(f"{path}/{file['path']}: {table.num_rows} rows, manifest says {file['rows']}")
        return table

    with ThreadPoolExecutor(1) as pool:
        ahead = pool.submit(read, files[0]) if files else None
        for k in range(len(files)):
            table = ahead.result()
            ahead = pool.submit(read, files[k + 1]) if k + 1 < len(files) else None
            yield table


def read_parquet_split(path: str, split: str, manifest: Manifest | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Read one split back as (images (n,28,28) uint8, labels (n,) uint8), ordered by index."""
    table = pa.concat_tables(read_parquet_tables(path, split, manifest)).sort_by("index")
    return images_from_column(table.column("image").to_numpy()), table.column("label").to_numpy().astype(np.uint8)


def scan(path: str, manifest: Manifest | None = None):
    """The training split's (images, labels) one shard at a time, in row order, never whole in memory,
    with the checks load_parquet makes: row counts, labels and, once the last shard is read, the
    content hash (a DataError then: use what was read only once the loop has ended)."""
    manifest = manifest or read_manifest(path)
    digest = ContentHash()
    for split in SPLITS:
        if split not in manifest.splits or not manifest.rows(split):
            raise DataError(f"{path}: the {split} split is empty")
        digest.start(split, manifest.rows(split))
        labels, row = [], 0
        for table in _shards(path, manifest.files(split)):
            index = table.column("index").to_numpy()
            if np.any(np.diff(index) < 0):  # as written, a shard is in row order already: no copy
                table = table.sort_by("index")
                index = table.column("index").to_numpy()
            if len(index) and (index[0] != row or index[-1] != row + len(index) - 1):
                raise DataError(f"{path}: {split} rows out of order at row {row}; rewrite the shards "
                                "with scripts/prepare_data.py")
            x, y = images_from_column(table.column("image")), table.column("label").to_numpy()
            problem = label_problem(y, f"{split} labels")
            if problem:
                raise DataError(f"{path}: {problem}")
            digest.add(x)
            labels.append(y.astype(np.uint8))
            row += len(y)
            if split == "train":
                yield x, labels[-1]
        digest.add(np.concatenate(labels))
    if digest.hexdigest() != manifest.content_sha256:
        raise DataError(f"{path}: content hash does not match {MANIFEST}; the shards were changed")


def load_parquet(path: str) -> Mnist:
    manifest = read_manifest(path)
    arrays = {}
    for split in SPLITS:
        arrays[f"x_{split}"], arrays[f"y_{split}"] = read_parquet_split(path, split, manifest)
    data = validate(Mnist(**arrays), path)
    if content_hash(data) != manifest.content_sha256:
        raise DataError(f"{path}: content hash does not match {MANIFEST}; the shards were changed")
    return data


def images_from_column(values) -> np.ndarray:
    """Image bytes (one 784-byte value per row, as Parquet/Ray Data hand them over) -> (n,28,28) uint8.
    An Arrow column of 784-byte values is read in place, with no copy per row."""
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    if len(values) == 0:
        return np.zeros((0, *IMAGE_SHAPE), np.uint8)
    if isinstance(values, pa.Array) and values.type == pa.binary(IMAGE_BYTES) and values.null_count == 0:
        flat = np.frombuffer(values.buffers()[1], np.uint8, count=len(values) * IMAGE_BYTES,
                             offset=values.offset * IMAGE_BYTES)
    elif isinstance(values, pa.Array):
        flat = np.frombuffer(b"".join(v or b"" for v in values.to_pylist()), np.uint8)
    elif isinstance(values, np.ndarray) and values.dtype.kind == "S":
        flat = np.frombuffer(values.tobytes(), np.uint8)
    else:
        flat = np.frombuffer(b"".join(values), np.uint8)
    if flat.size != len(values) * IMAGE_BYTES:
        raise DataError(f"image column holds {flat.size} bytes for {len(values)} rows, "
                        f"expected {IMAGE_BYTES} per row")
    return flat.reshape(len(values), *IMAGE_SHAPE)


def prepare(source: str | None, cache_root: str, whole: bool = True) -> tuple[str, Mnist | None, Manifest]:
    """Load any source; return (Parquet directory, arrays, manifest), writing shards once per content.

    A Parquet source is used in place: read whole and checked against its content hash, or, with
    whole=False, not read at all (arrays None: the streaming path's driver reads only the manifest).
    Any other source is read whole and written under `cache_root/<content hash>`, and reused by
    every later run on the same data.
    """
    if source is not None and is_parquet_dir(source):
        return source, load_parquet(source) if whole else None, read_manifest(source)
    data = load(source)
    digest = content_hash(data)
    target = join(cache_root, f"mnist-{digest[:16]}")
    if not is_parquet_dir(target):
        try:
            write_parquet(data, target)
        except DataError:
            if not is_parquet_dir(target):  # not a concurrent run that wrote the same content first
                raise
    manifest = read_manifest(target)
    if manifest.content_sha256 != digest:
        raise DataError(f"{target}: cached shards do not match the source's content hash; remove them")
    return target, data, manifest
