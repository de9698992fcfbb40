"""Cut the MNIST slice that ships with the tests (tests/data/mnist) from a directory of the
official IDX files: the first N training and the first M test images with their labels, in
the same IDX format, gzipped with a fixed timestamp so the bytes are reproducible.

    python scripts/mnist_slice.py ../shared/datasets/mnist tests/data/mnist

The README beside the slice gives its source, licence and checksums.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import struct
from pathlib import Path

from training.data import read_idx

TRAIN_IMAGES = 10_000  # enough for a 3-epoch model that really learns, in seconds
TEST_IMAGES = 5_000  # the anomaly and false-alarm tests' held-out digits


def write_idx(path: Path, array: object) -> None:
    import numpy as np

    a = np.ascontiguousarray(array, dtype=np.uint8)
    header = struct.pack(">BBBB", 0, 0, 0x08, a.ndim) + struct.pack(f">{a.ndim}I", *a.shape)
    # mtime=0 and no file name in the header: the same input always gives the same bytes.
    with path.open("wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, filename="") as f:
        f.write(header + a.tobytes())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", type=Path, help="a directory with the four MNIST .gz files")
    parser.add_argument("out", type=Path, help="where to write the slice")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", TRAIN_IMAGES), ("t10k", TEST_IMAGES)):
        for kind in ("images-idx3", "labels-idx1"):
            name = f"{prefix}-{kind}-ubyte.gz"
            write_idx(args.out / name, read_idx(args.source / name)[:n])
            digest = hashlib.md5((args.out / name).read_bytes()).hexdigest()
            print(f"{name}: {n} rows, md5 {digest}")


if __name__ == "__main__":
    main()
