"""Load training data: MNIST in its original IDX files, or any N x D arrays saved as .npy.

`load_data` reads a directory in either layout and returns flat float32 rows; `download_mnist`
fetches the official MNIST files and keeps them only if their md5 matches.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import logging
import math
import os
import struct
import tempfile
import urllib.error
import urllib.request
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

logger = logging.getLogger(__name__)

MNIST_FILES: dict[str, str] = {
    "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
}
MNIST_MIRRORS: tuple[str, ...] = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
)

_GZIP_MAGIC = b"\x1f\x8b"
_NPY_MAGIC = b"\x93NUMPY"
_IDX_UINT8 = 0x08
_CHUNK_SIZE = 1 << 16


def default_data_dir() -> Path:
    """Where the trainers look without --data-dir: $VAE_DATA_DIR, else ./data/mnist."""
    return Path(os.environ.get("VAE_DATA_DIR", "data/mnist"))


class DataError(ValueError):
    """A data file is missing, truncated, corrupt or of the wrong shape.

    The message names the file and the problem.
    """


@dataclass(frozen=True, eq=False)  # eq=False: comparing numpy arrays with == is ambiguous
class Dataset:
    """Train and test rows as float32 (N, D), images scaled to [0, 1]; labels as int64 or None.

    Tables (training/tables.py) also give their features' names and statistics, how they were
    read, and which test rows are anomalies (those whose label is not the normal value)."""

    name: str
    x_train: npt.NDArray[np.float32]
    y_train: npt.NDArray[np.int64] | None
    x_test: npt.NDArray[np.float32]
    y_test: npt.NDArray[np.int64] | None
    input_shape: tuple[int, ...]
    features: dict[str, Any] | None = None  # names, and the training rows' mean and std
    preprocessing: dict[str, Any] | None = None  # the label column, normal value, imputation
    test_is_anomaly: npt.NDArray[np.bool_] | None = None


def read_idx(path: Path) -> npt.NDArray[np.uint8]:
    """Read a uint8 IDX file, gzipped or raw, as an array of the shape its header gives."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read file: {e}") from e
    if raw.startswith(_GZIP_MAGIC):
        try:
            raw = gzip.decompress(raw)
        except EOFError as e:
            raise DataError(f"{path}: truncated gzip file: {e}") from e
        except (gzip.BadGzipFile, zlib.error, OSError) as e:
            raise DataError(f"{path}: corrupt gzip file: {e}") from e

    if len(raw) < 4 or raw[:2] != b"\x00\x00":
        raise DataError(
            f"{path}: not an IDX file: it starts with bytes [{raw[:4].hex(' ')}], "
            "expected [00 00 08 01] (labels) or [00 00 08 03] (images)."
        )
    type_code, ndim = raw[2], raw[3]
    if type_code != _IDX_UINT8:
        raise DataError(
            f"{path}: unsupported IDX data type 0x{type_code:02x}: only uint8 (0x08) is supported."
        )
    if ndim not in (1, 3):
        raise DataError(
            f"{path}: unsupported IDX file with {ndim} dimensions: "
            "expected 1 (labels) or 3 (images)."
        )
    header_size = 4 + 4 * ndim
    if len(raw) < header_size:
        raise DataError(
            f"{path}: truncated IDX header: expected {header_size} bytes, found {len(raw)}."
        )
    shape = struct.unpack(f">{ndim}I", raw[4:header_size])
    expected, found = math.prod(shape), len(raw) - header_size
    if found < expected:
        raise DataError(
            f"{path}: truncated IDX file: expected {expected} bytes of data, found {found}."
        )
    if found > expected:
        raise DataError(
            f"{path}: IDX file has {found - expected} trailing bytes after "
            f"the {expected} bytes of data."
        )
    # A copy, so that callers get a writable array rather than a view of immutable bytes.
    return np.frombuffer(raw, dtype=np.uint8, offset=header_size).reshape(shape).copy()


def _load_npy(path: Path) -> npt.NDArray[np.generic]:
    try:
        with path.open("rb") as f:
            magic = f.read(len(_NPY_MAGIC))
        # Checked first because np.load takes anything else for a pickle or an .npz archive.
        if magic == _NPY_MAGIC:
            array: npt.NDArray[np.generic] = np.load(path, allow_pickle=False)
            return array
    except (OSError, ValueError, EOFError) as e:
        raise DataError(f"{path}: cannot read .npy file: {e}") from e
    raise DataError(f"{path}: not a .npy file.")


def read_npy(path: Path) -> npt.NDArray[np.float32]:
    """Read an N x D numeric .npy array as float32."""
    array = _load_npy(path)
    if array.ndim != 2:
        raise DataError(f"{path}: expected a 2-D array (N x D), found shape {array.shape}.")
    if array.size == 0:
        raise DataError(f"{path}: array is empty: shape {array.shape}.")
    if array.dtype.kind not in "biuf":
        raise DataError(f"{path}: expected numeric data, found dtype {array.dtype}.")
    # Values beyond float32's range become inf here and are rejected with the NaNs below.
    with np.errstate(over="ignore", invalid="ignore"):
        x = array.astype(np.float32)
    if not np.isfinite(x).all():
        raise DataError(f"{path}: array has non-finite values (NaN, inf or beyond float32 range).")
    return x


def _read_labels_npy(path: Path, data_path: Path, n: int) -> npt.NDArray[np.int64] | None:
    if not path.is_file():
        return None
    labels = _load_npy(path)
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise DataError(
            f"{path}: expected a 1-D integer array, found shape {labels.shape} "
            f"of dtype {labels.dtype}."
        )
    if len(labels) != n:
        raise DataError(f"{path}: {len(labels)} labels do not match the {n} rows in {data_path}.")
    return labels.astype(np.int64)


def _find_idx(data_dir: Path, name: str) -> Path | None:
    for path in (data_dir / name, data_dir / f"{name}.gz"):
        if path.is_file():
            return path
    return None


def _load_idx_split(
    images_path: Path, labels_path: Path | None
) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.int64] | None]:
    images = read_idx(images_path)
    if images.ndim != 3:
        raise DataError(f"{images_path}: expected 3-D image data, found {images.ndim}-D.")
    if len(images) == 0:
        raise DataError(f"{images_path}: holds no images.")
    if labels_path is None:
        return images, None
    labels = read_idx(labels_path)
    if labels.ndim != 1:
        raise DataError(f"{labels_path}: expected 1-D label data, found {labels.ndim}-D.")
    if len(labels) != len(images):
        raise DataError(
            f"{labels_path}: {len(labels)} labels do not match "
            f"the {len(images)} images in {images_path}."
        )
    return images, labels.astype(np.int64)


def _flatten(images: npt.NDArray[np.uint8]) -> npt.NDArray[np.float32]:
    return images.reshape(len(images), -1).astype(np.float32) / np.float32(255)


def _load_mnist(data_dir: Path, train_images: Path, test_images: Path) -> Dataset:
    x_train, y_train = _load_idx_split(train_images, _find_idx(data_dir, "train-labels-idx1-ubyte"))
    x_test, y_test = _load_idx_split(test_images, _find_idx(data_dir, "t10k-labels-idx1-ubyte"))
    if x_train.shape[1:] != x_test.shape[1:]:
        raise DataError(
            f"{test_images}: images of size {x_test.shape[1:]} do not match "
            f"the {x_train.shape[1:]} images in {train_images}."
        )
    return Dataset("mnist", _flatten(x_train), y_train, _flatten(x_test), y_test, x_train.shape[1:])


def _load_vectors(data_dir: Path) -> Dataset:
    train_path, test_path = data_dir / "train.npy", data_dir / "test.npy"
    x_train, x_test = read_npy(train_path), read_npy(test_path)
    if x_train.shape[1] != x_test.shape[1]:
        raise DataError(
            f"{test_path}: rows of {x_test.shape[1]} values do not match "
            f"the rows of {x_train.shape[1]} values in {train_path}."
        )
    y_train = _read_labels_npy(data_dir / "train_labels.npy", train_path, len(x_train))
    y_test = _read_labels_npy(data_dir / "test_labels.npy", test_path, len(x_test))
    return Dataset(data_dir.name, x_train, y_train, x_test, y_test, (x_train.shape[1],))


def load_data(data_dir: Path) -> Dataset:
    """Load MNIST IDX files, or train.npy and test.npy, from data_dir."""
    if not data_dir.is_dir():
        raise DataError(
            f"{data_dir}: data directory does not exist; "
            "run with --download to fetch MNIST into it."
        )
    train_images = _find_idx(data_dir, "train-images-idx3-ubyte")
    test_images = _find_idx(data_dir, "t10k-images-idx3-ubyte")
    if train_images and test_images:
        return _load_mnist(data_dir, train_images, test_images)
    if (data_dir / "train.npy").is_file() and (data_dir / "test.npy").is_file():
        return _load_vectors(data_dir)
    raise DataError(
        f"{data_dir}: holds neither MNIST IDX files (train-images-idx3-ubyte[.gz] and "
        "t10k-images-idx3-ubyte[.gz], optionally train-labels-idx1-ubyte[.gz] and "
        "t10k-labels-idx1-ubyte[.gz]) nor train.npy and test.npy (optionally train_labels.npy "
        "and test_labels.npy); run with --download to fetch MNIST."
    )


def train_val_split(
    n: int, val_size: int, seed: int
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """Split range(n) at random into (train_idx, val_idx), the same way for the same seed."""
    if not 0 < val_size < n:
        raise ValueError(f"val_size must be between 1 and {n - 1}, got {val_size}.")
    perm = np.random.default_rng(seed).permutation(n).astype(np.int64)
    return perm[val_size:], perm[:val_size]


def binarize_fixed(x: npt.NDArray[np.floating], seed: int) -> npt.NDArray[np.float32]:
    """Draw each value of x in [0, 1] as a Bernoulli sample, the same way for the same seed."""
    if not ((x >= 0) & (x <= 1)).all():
        raise ValueError("binarize_fixed needs values in [0, 1].")
    rng = np.random.default_rng(seed)
    return (rng.random(x.shape) < x).astype(np.float32)


def _md5(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "md5").hexdigest()


def _fetch(url: str, path: Path, md5: str, timeout: float) -> None:
    logger.info("Downloading %s", url)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    tmp = Path(tmp_name)
    try:
        digest = hashlib.md5(usedforsecurity=False)
        with os.fdopen(fd, "wb") as f, urllib.request.urlopen(url, timeout=timeout) as response:
            while chunk := response.read(_CHUNK_SIZE):
                digest.update(chunk)
                f.write(chunk)
        if digest.hexdigest() != md5:
            raise DataError(
                f"{url}: md5 mismatch: expected {md5}, got {digest.hexdigest()}; "
                "the file was not kept."
            )
        os.replace(tmp, path)
    except (OSError, http.client.HTTPException) as e:
        if isinstance(e, urllib.error.HTTPError):
            e.close()  # it holds the connection open until closed
        raise DataError(f"{url}: download failed: {e}") from e
    finally:
        tmp.unlink(missing_ok=True)


def _download(name: str, path: Path, md5: str, mirrors: Sequence[str], timeout: float) -> None:
    failure = DataError(f"{name}: no mirrors to download from.")
    for mirror in mirrors:
        try:
            _fetch(f"{mirror.rstrip('/')}/{name}", path, md5, timeout)
            return
        except DataError as e:
            logger.warning("%s", e)
            failure = e
    raise failure


def download_mnist(
    data_dir: Path,
    mirrors: Sequence[str] = MNIST_MIRRORS,
    timeout: float = 60.0,
    checksums: Mapping[str, str] = MNIST_FILES,
) -> list[Path]:
    """Download the MNIST files that data_dir lacks, keeping only files with the right md5.

    checksums maps file names to md5 sums; tests pass their own for fake files.
    """
    data_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, md5 in checksums.items():
        path = data_dir / name
        paths.append(path)
        if path.is_file():
            if _md5(path) == md5:
                logger.info("%s is already present", path)
                continue
            logger.info("%s has the wrong md5, downloading it again", path)
        _download(name, path, md5, mirrors, timeout)
    return paths
