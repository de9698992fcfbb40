"""Tables in: CSV or Parquet files with a header row, read with pyarrow.

The header names the features, and the names travel into the artifact's manifest, so that the
service can take records keyed by name. Every check fails with a DataError that names the file,
the column and the first bad row (numbered from 1, the header not counted), never with a
traceback:

- a column that is not numeric is refused: encode it as numbers first (one-hot encoding would
  have to be repeated, identically, by every caller of the service, so it is not done here);
- a missing value is refused, unless `impute="median"` fills it with the column's median over
  the training rows;
- an infinite value is refused;
- a constant column (over the rows trained on) is refused: it carries nothing to learn, and the
  Gaussian decoder's standardisation would divide by its zero spread.

With a label column, `normal_value` keeps the rows holding that value for training and sends
every other row to the test set, flagged as anomalies, which evaluation and the benchmarks use.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from training.data import DataError, Dataset

TABLE_SUFFIXES = (".csv", ".parquet")
Impute = Literal["median"]


@dataclass(frozen=True)
class TableOptions:
    label_column: str | None = None  # kept out of the features
    normal_value: str | None = None  # train on the rows whose label is this; test on the rest
    impute: Impute | None = None  # fill missing values; unset refuses them
    test_fraction: float = 0.2  # of the (normal) rows, when no test file is given
    seed: int = 0  # the test split's


@dataclass(frozen=True)
class _Table:
    path: Path
    names: list[str]
    x: npt.NDArray[np.float64]  # (N, D), NaN where a value is missing
    labels: list[str] | None


def find_table(data_dir: Path, stem: str) -> Path | None:
    """data_dir/stem.csv or data_dir/stem.parquet, whichever exists (CSV first)."""
    for suffix in TABLE_SUFFIXES:
        if (data_dir / f"{stem}{suffix}").is_file():
            return data_dir / f"{stem}{suffix}"
    return None


def load_table(train_path: Path, test_path: Path | None, opts: TableOptions) -> Dataset:
    """Train and test rows from one table (split at random, seeded) or from two."""
    train = _read(train_path, opts)
    test = _read(test_path, opts) if test_path is not None else None
    if test is not None and test.names != train.names:
        missing = [n for n in train.names if n not in test.names]
        extra = [n for n in test.names if n not in train.names]
        what = f"lacks the column '{missing[0]}'" if missing else (
            f"has the column '{extra[0]}', which {train_path.name} lacks" if extra
            else "has the same columns in another order"
        )  # fmt: skip
        raise DataError(f"{test_path}: {what}; the test file needs the training file's columns.")

    normal = _normal_rows(train, opts)
    rng = np.random.default_rng(opts.seed)
    if test is None:
        idx = rng.permutation(np.flatnonzero(normal))
        n_test = round(len(idx) * opts.test_fraction)
        if not 0 < n_test < len(idx):
            raise DataError(
                f"{train_path}: a test fraction of {opts.test_fraction} of {len(idx)} rows "
                "leaves no test or no training rows; give a test file or another fraction."
            )
        train_rows, test_parts = idx[n_test:], [(train, idx[:n_test])]
    else:
        train_rows = np.flatnonzero(normal)
        test_parts = [(test, np.arange(len(test.x)))]
    held_out = np.flatnonzero(~normal)  # rows of other labels: anomalies, for evaluation
    if held_out.size:
        test_parts.append((train, held_out))

    medians = _impute_values(train, train_rows, opts)
    x_train = _filled(train, train_rows, medians)
    _check_constant(train, x_train)
    order = rng.permutation(sum(len(rows) for _, rows in test_parts))  # a capped evaluation
    x_test = np.concatenate([_filled(t, rows, medians) for t, rows in test_parts])[order]

    y_train = y_test = is_anomaly = None
    if train.labels is not None:
        labels_test = [_labels(t)[i] for t, rows in test_parts for i in rows]
        classes = sorted(set(train.labels) | set(labels_test))
        code = {c: i for i, c in enumerate(classes)}
        y_train = np.array([code[train.labels[i]] for i in train_rows], dtype=np.int64)
        y_test = np.array([code[labels_test[i]] for i in order], dtype=np.int64)
        if opts.normal_value is not None:
            is_anomaly = np.array([labels_test[i] != opts.normal_value for i in order])
    features = {
        "names": train.names,
        "mean": x_train.mean(0).tolist(),
        "std": x_train.std(0).tolist(),
    }
    preprocessing: dict[str, Any] = {"label_column": opts.label_column}
    if opts.normal_value is not None:
        preprocessing["normal_value"] = opts.normal_value
    if medians is not None:
        preprocessing["impute"] = {"method": "median", "values": medians.tolist()}
    name = train_path.parent.name if train_path.stem == "train" else train_path.stem
    return Dataset(
        name,
        x_train.astype(np.float32), y_train, x_test.astype(np.float32), y_test,
        (len(train.names),), features=features, preprocessing=preprocessing,
        test_is_anomaly=is_anomaly,
    )  # fmt: skip


def _read(path: Path, opts: TableOptions) -> _Table:
    import pyarrow as pa  # the training extra; imported here so .npy and IDX runs need none

    table = _read_arrow(path)
    names = [str(n) for n in table.column_names]
    if table.num_rows == 0:
        raise DataError(f"{path}: holds a header but no rows.")
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise DataError(f"{path}: the column '{name}' appears twice in the header.")
        seen.add(name)
    if all(_is_number(n) for n in names):
        raise DataError(
            f"{path}: the first row ({', '.join(names[:3])}, ...) looks like data, not a header; "
            "the first row must name the columns."
        )
    labels: list[str | None] | None = None
    if opts.label_column is not None:
        if opts.label_column not in names:
            raise DataError(
                f"{path}: no column '{opts.label_column}' (--label-column); "
                f"its columns are {', '.join(names)}."
            )
        column = table.column(opts.label_column)
        labels = [None if v is None else _label_text(v) for v in column.to_pylist()]
        empty = next((i for i, v in enumerate(labels) if v in (None, "")), None)
        if empty is not None:  # a CSV's empty string is a string, not a null
            raise DataError(
                f"{path}: column '{opts.label_column}', row {empty + 1}: the label is missing."
            )
        names.remove(opts.label_column)
        table = table.drop_columns([opts.label_column])
    if not names:
        raise DataError(f"{path}: has no feature columns besides the label.")
    columns = []
    for name in names:
        column = table.column(name)
        kind = column.type
        if pa.types.is_boolean(kind):
            column = column.cast(pa.int8())
        elif not (pa.types.is_integer(kind) or pa.types.is_floating(kind)
                  or pa.types.is_decimal(kind) or pa.types.is_null(kind)):  # fmt: skip
            row, value = _first_non_number(column.to_pylist())
            raise DataError(
                f"{path}: column '{name}' is not numeric: row {row} holds {value!r}; "
                "drop the column, or encode it as numbers, before training."
            )
        values = column.cast(pa.float64()).to_numpy(zero_copy_only=False)
        missing = np.isnan(values)  # nulls, and Parquet's NaNs (a CSV's "nan" reads as null)
        if missing.any() and opts.impute is None:
            row = int(np.argmax(missing)) + 1
            raise DataError(
                f"{path}: column '{name}', row {row}: the value is missing; fill it in, "
                "or pass --impute median."
            )
        infinite = np.isinf(values)
        if infinite.any():
            row = int(np.argmax(infinite)) + 1
            raise DataError(f"{path}: column '{name}', row {row}: the value is infinite.")
        columns.append(values)
    text = None if labels is None else [str(v) for v in labels]
    return _Table(path, names, np.stack(columns, axis=1), text)


def _read_arrow(path: Path) -> Any:
    import pyarrow as pa
    import pyarrow.csv as pa_csv
    import pyarrow.parquet as pq

    if not path.is_file():
        raise DataError(f"{path}: no such file.")
    try:
        if path.suffix == ".parquet":
            return pq.read_table(path)
        if path.suffix == ".csv":
            return pa_csv.read_csv(path)
    except (pa.ArrowException, OSError) as e:
        reason = str(e).strip().rstrip(".")
        raise DataError(f"{path}: cannot read it as {path.suffix[1:].upper()}: {reason}.") from None
    raise DataError(f"{path}: not a table; tables end in {' or '.join(TABLE_SUFFIXES)}.")


def _normal_rows(t: _Table, opts: TableOptions) -> npt.NDArray[np.bool_]:
    if opts.normal_value is None:
        return np.ones(len(t.x), dtype=bool)
    if t.labels is None:
        raise DataError(f"{t.path}: --normal-value needs --label-column.")
    normal = np.array([label == opts.normal_value for label in t.labels])
    if not normal.any():
        values = ", ".join(sorted(set(t.labels))[:10])
        raise DataError(
            f"{t.path}: no row of column '{opts.label_column}' holds the normal value "
            f"'{opts.normal_value}'; its values are {values}."
        )
    return normal


def _impute_values(
    t: _Table, rows: npt.NDArray[np.int64], opts: TableOptions
) -> npt.NDArray[np.float64] | None:
    """The training rows' median of each column, when imputing; a column with no value at all
    among them has none to give and is refused."""
    if opts.impute is None:
        return None
    x = t.x[rows]
    empty = np.isnan(x).all(axis=0)
    if empty.any():
        name = t.names[int(np.argmax(empty))]
        raise DataError(f"{t.path}: column '{name}' has no value in any training row to impute.")
    medians: npt.NDArray[np.float64] = np.nanmedian(x, axis=0)
    return medians


def _filled(
    t: _Table, rows: npt.NDArray[np.int64], medians: npt.NDArray[np.float64] | None
) -> npt.NDArray[np.float64]:
    x = t.x[rows]
    if medians is not None:
        x = np.where(np.isnan(x), medians, x)
    return x


def _check_constant(t: _Table, x: npt.NDArray[np.float64]) -> None:
    """x: the training rows, missing values filled (a filled column is constant exactly when
    its given values are)."""
    constant = x.max(axis=0) == x.min(axis=0)
    if constant.any():
        j = int(np.argmax(constant))
        raise DataError(
            f"{t.path}: column '{t.names[j]}' holds the same value ({x[0, j]:g}) in all "
            f"{len(x)} training rows, so there is nothing to learn from it; drop it."
        )


def _labels(t: _Table) -> list[str]:
    assert t.labels is not None  # read with the same label column as the training file
    return t.labels


def _first_non_number(values: list[Any]) -> tuple[int, Any]:
    for i, v in enumerate(values):
        if v is not None and not _is_number(v):
            return i + 1, v
    return 1, values[0]


def _is_number(value: object) -> bool:
    try:
        float(str(value))
    except ValueError:
        return False
    return True


def _label_text(value: object) -> str:
    """A label as text, so that --normal-value 1 matches 1 and 1.0 alike."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, float) and math.isnan(value):
        return "nan"
    return str(value)
