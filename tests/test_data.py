"""Tests for training.data: IDX and .npy readers, load_data, splitting and binarisation."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import MNIST_DIR
from training.data import (
    DataError,
    Dataset,
    binarize_fixed,
    load_data,
    read_idx,
    read_npy,
    train_val_split,
)


def idx_bytes(array: np.ndarray, type_code: int = 0x08) -> bytes:
    header = struct.pack(">HBB", 0, type_code, array.ndim)
    return header + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


def images(n: int, rows: int = 4, cols: int = 3) -> np.ndarray:
    return (np.arange(n * rows * cols) % 256).astype(np.uint8).reshape(n, rows, cols)


def write_mnist_dir(
    data_dir: Path, n_train: int = 5, n_test: int = 2, n_train_labels: int | None = None
) -> None:
    data_dir.mkdir(exist_ok=True)
    n_labels = n_train if n_train_labels is None else n_train_labels
    files = {
        "train-images-idx3-ubyte.gz": images(n_train),
        "train-labels-idx1-ubyte.gz": np.arange(n_labels, dtype=np.uint8) % 10,
        "t10k-images-idx3-ubyte.gz": images(n_test),
        "t10k-labels-idx1-ubyte.gz": np.arange(n_test, dtype=np.uint8) % 10,
    }
    for name, array in files.items():
        (data_dir / name).write_bytes(gzip.compress(idx_bytes(array), mtime=0))


# read_idx


def test_read_idx_reads_raw_images(tmp_path: Path) -> None:
    path = tmp_path / "images"
    path.write_bytes(idx_bytes(images(5)))
    x = read_idx(path)
    assert x.dtype == np.uint8
    np.testing.assert_array_equal(x, images(5))


def test_read_idx_reads_gzipped_labels(tmp_path: Path) -> None:
    labels = np.array([3, 1, 4, 1, 5], dtype=np.uint8)
    path = tmp_path / "labels.gz"
    path.write_bytes(gzip.compress(idx_bytes(labels)))
    np.testing.assert_array_equal(read_idx(path), labels)


def test_read_idx_detects_gzip_by_magic_not_suffix(tmp_path: Path) -> None:
    gzipped, raw = tmp_path / "images", tmp_path / "images.gz"
    gzipped.write_bytes(gzip.compress(idx_bytes(images(2))))
    raw.write_bytes(idx_bytes(images(2)))
    np.testing.assert_array_equal(read_idx(gzipped), images(2))
    np.testing.assert_array_equal(read_idx(raw), images(2))


def test_read_idx_rejects_wrong_magic(tmp_path: Path) -> None:
    path = tmp_path / "images"
    path.write_bytes(b"\x01\x02" + idx_bytes(images(2))[2:])
    with pytest.raises(DataError, match=r"images: not an IDX file"):
        read_idx(path)


def test_read_idx_rejects_wrong_type_code(tmp_path: Path) -> None:
    path = tmp_path / "floats"
    path.write_bytes(idx_bytes(images(2), type_code=0x0D))
    with pytest.raises(DataError, match=r"floats: unsupported IDX data type 0x0d"):
        read_idx(path)


def test_read_idx_rejects_unsupported_ndim(tmp_path: Path) -> None:
    path = tmp_path / "matrix"
    path.write_bytes(idx_bytes(np.zeros((2, 3), dtype=np.uint8)))
    with pytest.raises(DataError, match=r"matrix: unsupported IDX file with 2 dimensions"):
        read_idx(path)


def test_read_idx_rejects_truncated_header(tmp_path: Path) -> None:
    path = tmp_path / "images"
    path.write_bytes(idx_bytes(images(2))[:10])
    with pytest.raises(DataError, match=r"images: truncated IDX header"):
        read_idx(path)


def test_read_idx_rejects_truncated_payload(tmp_path: Path) -> None:
    path = tmp_path / "images"
    path.write_bytes(idx_bytes(images(5))[:-7])
    with pytest.raises(DataError, match=r"images: truncated IDX file: expected 60 bytes .* 53"):
        read_idx(path)


def test_read_idx_rejects_truncated_gzip(tmp_path: Path) -> None:
    data = gzip.compress(idx_bytes(images(50)))
    path = tmp_path / "images.gz"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"images\.gz: truncated gzip file"):
        read_idx(path)


def test_read_idx_rejects_corrupt_gzip(tmp_path: Path) -> None:
    path = tmp_path / "images.gz"
    path.write_bytes(b"\x1f\x8b" + b"not really gzip" * 4)
    with pytest.raises(DataError, match=r"images\.gz: corrupt gzip file"):
        read_idx(path)


def test_read_idx_rejects_trailing_bytes(tmp_path: Path) -> None:
    path = tmp_path / "images"
    path.write_bytes(idx_bytes(images(2)) + b"extra")
    with pytest.raises(DataError, match=r"images: IDX file has 5 trailing bytes"):
        read_idx(path)


def test_read_idx_rejects_garbage(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_bytes(b"these are not the digits you are looking for")
    with pytest.raises(DataError, match=r"notes\.txt: not an IDX file"):
        read_idx(path)


def test_read_idx_rejects_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"absent: cannot read file"):
        read_idx(tmp_path / "absent")


# load_data on MNIST IDX files


def test_load_data_reads_idx_dir(tmp_path: Path) -> None:
    write_mnist_dir(tmp_path / "digits", n_train=5, n_test=2)
    data = load_data(tmp_path / "digits")
    assert data.name == "mnist"
    assert data.input_shape == (4, 3)
    assert data.x_train.shape == (5, 12)
    assert data.x_test.shape == (2, 12)
    assert data.x_train.dtype == np.float32
    np.testing.assert_allclose(data.x_train, images(5).reshape(5, 12) / 255, rtol=1e-6)
    assert data.y_train is not None
    assert data.y_train.dtype == np.int64


def test_load_data_allows_missing_labels(tmp_path: Path) -> None:
    write_mnist_dir(tmp_path)
    (tmp_path / "train-labels-idx1-ubyte.gz").unlink()
    data = load_data(tmp_path)
    assert data.y_train is None
    assert data.y_test is not None


def test_load_data_rejects_label_count_mismatch(tmp_path: Path) -> None:
    write_mnist_dir(tmp_path, n_train=5, n_train_labels=4)
    with pytest.raises(
        DataError,
        match=r"train-labels-idx1-ubyte\.gz: 4 labels do not match the 5 images in "
        r".*train-images-idx3-ubyte\.gz",
    ):
        load_data(tmp_path)


def test_load_data_rejects_labels_file_as_images(tmp_path: Path) -> None:
    write_mnist_dir(tmp_path)
    labels = (tmp_path / "t10k-labels-idx1-ubyte.gz").read_bytes()
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(labels)
    with pytest.raises(DataError, match=r"t10k-images-idx3-ubyte\.gz: expected 3-D image data"):
        load_data(tmp_path)


def test_load_data_rejects_empty_dir(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"holds neither .*train-images-idx3-ubyte.*--download"):
        load_data(tmp_path)


def test_load_data_rejects_missing_dir(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"nowhere: data directory does not exist.*--download"):
        load_data(tmp_path / "nowhere")


# load_data on the real MNIST files


@pytest.fixture(scope="module")
def mnist() -> Dataset:
    return load_data(MNIST_DIR)


def test_real_mnist_has_header_counts(mnist: Dataset) -> None:
    assert mnist.name == "mnist"
    assert mnist.input_shape == (28, 28)
    assert mnist.x_train.shape == (10_000, 784)
    assert mnist.x_test.shape == (5_000, 784)


def test_real_mnist_pixels_are_float32_in_unit_range(mnist: Dataset) -> None:
    for x in (mnist.x_train, mnist.x_test):
        assert x.dtype == np.float32
        assert x.min() == 0.0
        assert x.max() == 1.0


def test_real_mnist_labels_are_digits_in_official_order(mnist: Dataset) -> None:
    assert mnist.y_train is not None
    assert mnist.y_test is not None
    assert mnist.y_train.shape == (10_000,)
    assert mnist.y_test.shape == (5_000,)
    assert set(np.unique(mnist.y_train)) == set(range(10))
    assert set(np.unique(mnist.y_test)) == set(range(10))
    np.testing.assert_array_equal(mnist.y_train[:5], [5, 0, 4, 1, 9])
    np.testing.assert_array_equal(mnist.y_test[:5], [7, 2, 1, 0, 4])


# read_npy and load_data on .npy files


def test_read_npy_reads_2d_array_as_float32(tmp_path: Path) -> None:
    path = tmp_path / "x.npy"
    np.save(path, np.arange(6, dtype=np.int64).reshape(3, 2))
    x = read_npy(path)
    assert x.dtype == np.float32
    np.testing.assert_array_equal(x, [[0, 1], [2, 3], [4, 5]])


def test_read_npy_rejects_corrupt_file(tmp_path: Path) -> None:
    path = tmp_path / "x.npy"
    path.write_bytes(b"definitely not numpy")
    with pytest.raises(DataError, match=r"x\.npy: not a \.npy file"):
        read_npy(path)


def test_read_npy_rejects_truncated_file(tmp_path: Path) -> None:
    path = tmp_path / "x.npy"
    np.save(path, np.ones((100, 10)))
    path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(DataError, match=r"x\.npy: cannot read \.npy file"):
        read_npy(path)


def test_read_npy_rejects_1d_array(tmp_path: Path) -> None:
    path = tmp_path / "x.npy"
    np.save(path, np.ones(5))
    with pytest.raises(DataError, match=r"x\.npy: expected a 2-D array"):
        read_npy(path)


def test_read_npy_rejects_empty_array(tmp_path: Path) -> None:
    path = tmp_path / "x.npy"
    np.save(path, np.ones((0, 3)))
    with pytest.raises(DataError, match=r"x\.npy: array is empty"):
        read_npy(path)


def test_read_npy_rejects_nan(tmp_path: Path) -> None:
    path = tmp_path / "x.npy"
    np.save(path, np.array([[0.0, np.nan], [1.0, 2.0]]))
    with pytest.raises(DataError, match=r"x\.npy: array has non-finite values"):
        read_npy(path)


def test_read_npy_rejects_values_beyond_float32(tmp_path: Path) -> None:
    path = tmp_path / "x.npy"
    np.save(path, np.array([[0.0, 1e300]]))
    with pytest.raises(DataError, match=r"x\.npy: array has non-finite values"):
        read_npy(path)


def test_read_npy_rejects_object_array(tmp_path: Path) -> None:
    path = tmp_path / "x.npy"
    np.save(path, np.array([[1, "a"], [2, None]], dtype=object))
    with pytest.raises(DataError, match=r"x\.npy: cannot read \.npy file: Object arrays"):
        read_npy(path)


def test_read_npy_rejects_strings(tmp_path: Path) -> None:
    path = tmp_path / "x.npy"
    np.save(path, np.array([["a", "b"]]))
    with pytest.raises(DataError, match=r"x\.npy: expected numeric data"):
        read_npy(path)


def write_npy_dir(data_dir: Path, d_test: int = 3, n_train_labels: int = 4) -> None:
    data_dir.mkdir()
    np.save(data_dir / "train.npy", np.ones((4, 3)))
    np.save(data_dir / "test.npy", np.zeros((2, d_test)))
    np.save(data_dir / "train_labels.npy", np.arange(n_train_labels))


def test_load_data_reads_npy_dir(tmp_path: Path) -> None:
    write_npy_dir(tmp_path / "sensors")
    data = load_data(tmp_path / "sensors")
    assert data.name == "sensors"
    assert data.input_shape == (3,)
    assert data.x_train.shape == (4, 3)
    assert data.x_test.shape == (2, 3)
    assert data.x_train.dtype == np.float32
    assert data.y_train is not None
    assert data.y_train.dtype == np.int64
    assert data.y_test is None


def test_load_data_rejects_npy_width_mismatch(tmp_path: Path) -> None:
    write_npy_dir(tmp_path / "sensors", d_test=5)
    with pytest.raises(DataError, match=r"test\.npy: rows of 5 values .* 3 values in .*train\.npy"):
        load_data(tmp_path / "sensors")


def test_load_data_rejects_npy_label_count_mismatch(tmp_path: Path) -> None:
    write_npy_dir(tmp_path / "sensors", n_train_labels=3)
    with pytest.raises(DataError, match=r"train_labels\.npy: 3 labels .* 4 rows in .*train\.npy"):
        load_data(tmp_path / "sensors")


def test_load_data_rejects_float_npy_labels(tmp_path: Path) -> None:
    write_npy_dir(tmp_path / "sensors")
    np.save(tmp_path / "sensors" / "train_labels.npy", np.zeros(4))
    with pytest.raises(DataError, match=r"train_labels\.npy: expected a 1-D integer array"):
        load_data(tmp_path / "sensors")


# train_val_split


def test_train_val_split_is_disjoint_and_covers_range() -> None:
    train_idx, val_idx = train_val_split(100, 20, seed=0)
    assert len(val_idx) == 20
    assert len(train_idx) == 80
    assert train_idx.dtype == val_idx.dtype == np.int64
    assert not set(train_idx) & set(val_idx)
    assert sorted([*train_idx, *val_idx]) == list(range(100))


def test_train_val_split_is_seeded() -> None:
    first, second, other = (train_val_split(100, 20, seed=s)[1] for s in (1, 1, 2))
    np.testing.assert_array_equal(first, second)
    assert not np.array_equal(first, other)


@pytest.mark.parametrize("val_size", [-1, 0, 10, 11])
def test_train_val_split_rejects_bad_val_size(val_size: int) -> None:
    with pytest.raises(ValueError, match="val_size"):
        train_val_split(10, val_size, seed=0)


# binarize_fixed


def test_binarize_fixed_is_deterministic() -> None:
    x = np.full((50, 20), 0.5, dtype=np.float32)
    np.testing.assert_array_equal(binarize_fixed(x, seed=7), binarize_fixed(x, seed=7))
    assert not np.array_equal(binarize_fixed(x, seed=7), binarize_fixed(x, seed=8))


def test_binarize_fixed_returns_binary_float32_with_mean_of_input() -> None:
    x = np.full((100, 100), 0.3, dtype=np.float32)
    b = binarize_fixed(x, seed=0)
    assert b.dtype == np.float32
    assert b.shape == x.shape
    assert set(np.unique(b)) == {0.0, 1.0}
    assert b.mean() == pytest.approx(0.3, abs=0.02)


def test_binarize_fixed_keeps_zeros_and_ones() -> None:
    x = np.array([[0.0, 1.0, 0.0, 1.0]], dtype=np.float32)
    np.testing.assert_array_equal(binarize_fixed(x, seed=3), x)


def test_binarize_fixed_rejects_values_outside_unit_range() -> None:
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        binarize_fixed(np.array([0.5, 1.5]), seed=0)
