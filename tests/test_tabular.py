"""Tables in, named features out: a CSV of the real breast cancer data trains through the CLI,
and a real server scores its rows as records keyed by feature name.

The bad-input cases check the trainer's exact messages: each names the file, the column and
the first bad row.
"""

from __future__ import annotations

import csv
import io
import json
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from sklearn.datasets import load_breast_cancer
from vae_service_client import VAEClient, VAEValidationError

from app.model import VAEService
from tests.conftest import Server
from training.__main__ import main
from training.data import DataError, train_val_split
from training.tables import TableOptions, load_table

LABEL = "diagnosis"


def write_csv(path: Path, header: list[str], rows: list[list[Any]]) -> Path:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def breast_cancer_csv(path: Path) -> tuple[Path, list[str], np.ndarray, list[str]]:
    data = load_breast_cancer()
    names = [str(n) for n in data.feature_names]
    labels = [str(data.target_names[t]) for t in data.target]
    rows = [[*x.tolist(), y] for x, y in zip(data.data, labels, strict=True)]
    return write_csv(path, [*names, LABEL], rows), names, data.data, labels


def manifest_of(artifact: Path) -> dict[str, Any]:
    with zipfile.ZipFile(artifact) as z:
        name = next(n for n in z.namelist() if n.endswith("extra/manifest.json"))
        manifest: dict[str, Any] = json.loads(z.read(name))
    return manifest


def input_reference(artifact: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The archive's input_reference.npz: the standardised rows, the shifts, the scales."""
    with zipfile.ZipFile(artifact) as z:
        name = next(n for n in z.namelist() if n.endswith("extra/input_reference.npz"))
        with np.load(io.BytesIO(z.read(name))) as parts:
            return parts["rows"], parts["shift"], parts["scale"]


# -- training from a CSV, through the CLI --------------------------------------------------------

# Small and short: the test is about the path, not the model (benchmark_tabular measures that).
FAST = ["--epochs", "15", "--hidden-dims", "64", "--latent-dim", "4", "--background-epochs", "5",
        "--val-min", "30", "--eval-k", "10", "--batch-size", "32", "--no-progress"]  # fmt: skip


@pytest.fixture(scope="module")
def table_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str], np.ndarray]:
    tmp = tmp_path_factory.mktemp("table")
    path, names, x, labels = breast_cancer_csv(tmp / "breast_cancer.csv")
    out = tmp / "vae.pt"
    argv = ["--data", str(path), "--label-column", LABEL, "--normal-value", "benign",
            "--out", str(out), *FAST]  # fmt: skip
    assert main(argv) == 0
    return out, names, x[np.array(labels) == "malignant"]


def test_a_table_of_250_normal_rows_trains_with_default_flags(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Breast cancer split 70/30: 250 benign rows to learn from and calibrate on."""
    path, *_ = breast_cancer_csv(tmp_path / "breast_cancer.csv")
    out = tmp_path / "vae.pt"
    argv = ["--data", str(path), "--label-column", LABEL, "--normal-value", "benign",
            "--test-fraction", "0.3", "--out", str(out), "--epochs", "2", "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    manifest = manifest_of(out)
    assert (manifest["dataset"]["train_size"], manifest["dataset"]["val_size"]) == (175, 75)
    assert manifest["calibration"]["n"] == 75
    assert (
        "calibration  75 validation rows: the smallest tail they resolve is 1.32%; at the "
        "default 0.99 threshold, only inputs beyond every one of them are flagged"
    ) in capsys.readouterr().out


def test_a_csv_trains_on_its_normal_rows_and_records_its_features(
    table_model: tuple[Path, list[str], np.ndarray],
) -> None:
    artifact, names, _ = table_model
    m = manifest_of(artifact)
    assert m["features"]["names"] == names
    assert m["likelihood"] == "gaussian"
    benign = load_breast_cancer().data[load_breast_cancer().target == 1]
    # 357 benign rows: 20% held out for testing (71), the rest split into train and validation.
    assert m["dataset"]["train_size"] + m["dataset"]["val_size"] == 357 - 71
    assert m["dataset"]["test_size"] == 71 + 212  # every malignant row is a test anomaly
    assert m["dataset"]["label_column"] == LABEL
    assert m["dataset"]["normal_value"] == "benign"
    # The statistics are the training rows', which are benign: close to all benign rows'.
    assert np.allclose(m["features"]["mean"], benign.mean(0), rtol=0.1)
    assert set(m["metrics"]["test_auroc"]) >= {"kl_divergence", "dose", "input_distance"}
    # A table decides with the ensemble of DoSE and the input distance (format 7), not the
    # image models' five, whose latent distances read a table's anomalies poorly.
    assert m["decision_score"] == "ensemble"
    assert m["ensemble"] == {"scores": ["dose", "input_distance"], "combine": "fisher"}
    assert m["input_distance"]["k"] == 5
    assert m["input_distance"]["n"] == m["dataset"]["train_size"]
    assert max(m["metrics"]["test_auroc"].values()) > 0.8


def test_the_ensembles_validation_rows_keep_each_rows_parts_together(
    table_model: tuple[Path, list[str], np.ndarray],
) -> None:
    """Format 8's rows: the validation split's own values of DoSE and the input distance, row
    by row, so the conformal percentile pairs each row's two; sorted columns alone would load
    as well, and pair them wrongly. The input distance of each validation row, served now,
    is its row's second value, in the split's order."""
    artifact, _, _ = table_model
    m = manifest_of(artifact)
    entry = m["calibration"]["scores"]["ensemble"]
    assert entry["parts"] == ["dose", "input_distance"]
    rows = np.array(entry["rows"])
    assert rows.shape == (m["calibration"]["n"], 2)
    path = artifact.parent / "breast_cancer.csv"
    data = load_table(path, None, TableOptions(LABEL, "benign", seed=m["training"]["seed"]))
    _, val_idx = train_val_split(len(data.x_train), m["dataset"]["val_size"], m["training"]["seed"])
    served = VAEService.load(artifact, "cpu").anomaly_scores(data.x_train[val_idx], 16, seed=0)
    assert served["input_distance"].tolist() == rows[:, 1].tolist()
    assert sorted(rows[:, 0].tolist()) == m["calibration"]["scores"]["dose"]["values"]


def test_the_input_distance_reference_is_the_training_rows_standardised(
    table_model: tuple[Path, list[str], np.ndarray],
) -> None:
    """The artifact's rows, undone, are benign rows (the training split: no validation row, no
    malignant one), and the spread they are standardised by is the training rows' own."""
    artifact, _, malignant = table_model
    m = manifest_of(artifact)
    rows, shift, scale = input_reference(artifact)
    assert rows.shape == (m["dataset"]["train_size"], 30)
    undone = rows.astype(np.float64) * scale + shift
    benign = load_breast_cancer().data[load_breast_cancer().target == 1]
    # Each row, undone, is a benign row to float32's precision, feature by feature.
    gap = np.abs(undone[:, None, :] - benign[None]) / scale  # (N, 357, 30), in spreads
    assert np.all(gap.max(-1).min(1) < 1e-5)
    assert len({tuple(np.round(r, 3)) for r in undone}) == len(undone)
    assert np.allclose(rows.mean(0), 0.0, atol=1e-4)
    assert np.allclose(rows.std(0), 1.0, atol=1e-4)
    assert not np.any(np.abs(undone[:, None, :] - malignant[None]).max(-1) < 1e-6)


@pytest.fixture(scope="module")
def table_server(
    table_model: tuple[Path, list[str], np.ndarray], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    server = Server(
        {"VAE_MODEL_PATH": str(table_model[0])}, tmp_path_factory.mktemp("srv") / "server.log"
    )
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


def records(names: list[str], x: np.ndarray) -> list[dict[str, float]]:
    return [dict(zip(names, map(float, row), strict=True)) for row in x]


@pytest.mark.server
def test_the_server_scores_records_by_feature_name(
    table_model: tuple[Path, list[str], np.ndarray], table_server: Server
) -> None:
    _, names, malignant = table_model
    body = {"records": records(names, malignant[:4]), "top_features": 3, "seed": 0}
    r = httpx.post(f"{table_server.url}/anomaly-score", json=body, timeout=30)
    assert r.status_code == 200, r.text
    answer = r.json()
    assert len(answer["is_anomaly"]) == 4
    assert answer["attribution"] is None  # only the top k was asked for
    for top in answer["top_features"]:
        assert [t["feature"] for t in top] == [names[t["index"]] for t in top]
        values = [t["attribution"] for t in top]
        assert values == sorted(values, reverse=True)
        assert len(values) == 3
    # The input distance, by hand: the mean Euclidean distance to the 5 nearest reference
    # rows, each feature standardised as they are.
    rows, shift, scale = input_reference(table_model[0])
    q = (malignant[:4].astype(np.float32).astype(np.float64) - shift) / scale
    by_hand = np.sort(np.linalg.norm(q[:, None, :] - rows[None], axis=-1), axis=1)[:, :5].mean(1)
    np.testing.assert_allclose(answer["input_distance"], by_hand, rtol=1e-5)
    assert answer["decision_score"] == "ensemble"
    # Records and instances are the same inputs: the same seeded scores.
    same = {"instances": malignant[:4].tolist(), "top_features": 3, "seed": 0}
    assert httpx.post(f"{table_server.url}/anomaly-score", json=same).json() == answer
    # Key order in a record does not matter.
    shuffled = [dict(reversed(list(rec.items()))) for rec in body["records"]]
    again = httpx.post(f"{table_server.url}/anomaly-score", json={**body, "records": shuffled})
    assert again.json() == answer


@pytest.mark.server
def test_model_lists_the_features_with_their_training_statistics(
    table_model: tuple[Path, list[str], np.ndarray], table_server: Server
) -> None:
    features = httpx.get(f"{table_server.url}/model").json()["features"]
    assert [f["name"] for f in features] == table_model[1]
    assert all(f["std"] > 0 for f in features)
    schema = httpx.get(f"{table_server.url}/openapi.json").json()
    record = schema["components"]["schemas"]["AnomalyScoreRequest"]["properties"]["records"]
    assert record["items"]["required"] == table_model[1]


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda recs: recs[1].pop("mean texture"), "records[1] lacks the feature 'mean texture'."),
        (
            lambda recs: recs[0].update({"mean colour": 1.0}),
            "records[0] has the unknown feature 'mean colour'; GET /model lists this model's "
            "30 features.",
        ),
    ],
)
@pytest.mark.server
def test_a_missing_or_unknown_feature_is_a_422_naming_it_and_the_record(
    table_model: tuple[Path, list[str], np.ndarray],
    table_server: Server,
    edit: Callable[[list[dict[str, float]]], object],
    message: str,
) -> None:
    recs = records(table_model[1], table_model[2][:2])
    edit(recs)
    for route in ("/encode", "/anomaly-score"):
        r = httpx.post(f"{table_server.url}{route}", json={"records": recs})
        assert r.status_code == 422
        assert r.json()["detail"] == message


@pytest.mark.server
def test_a_feature_given_twice_is_a_422_naming_it_and_the_record(
    table_model: tuple[Path, list[str], np.ndarray], table_server: Server
) -> None:
    first = json.dumps(records(table_model[1], table_model[2][:1])[0])
    twice = first[:-1] + ', "mean radius": 3.0}'
    body = f'{{"records": [{first}, {twice}]}}'
    r = httpx.post(
        f"{table_server.url}/encode", content=body, headers={"content-type": "application/json"}
    )
    assert r.status_code == 422
    assert r.json()["detail"] == "records[1] gives the feature 'mean radius' more than once."


@pytest.mark.server
def test_instances_and_records_together_or_neither_are_refused(table_server: Server) -> None:
    for body in ({"instances": [[0.0] * 30], "records": [{"a": 1.0}]}, {"seed": 1}):
        r = httpx.post(f"{table_server.url}/encode", json=body)
        assert r.status_code == 422
        assert r.json()["detail"] == "Give instances or records: exactly one of the two."


@pytest.mark.server
def test_a_model_without_feature_names_refuses_records(
    tiny_artifact: Path, start_server: Callable[[dict[str, str]], Server]
) -> None:
    server = start_server({"VAE_MODEL_PATH": str(tiny_artifact)})
    server.wait_ready()
    r = httpx.post(f"{server.url}/encode", json={"records": [{"a": 1.0}]})
    assert r.status_code == 422
    assert r.json()["detail"] == (
        "This model has no feature names (it was not trained on a table); send instances."
    )
    top = httpx.post(f"{server.url}/anomaly-score", json={"instances": [[1, 0, 0, 1]],
                                                          "top_features": 2})  # fmt: skip
    assert [t["feature"] for t in top.json()["top_features"][0]] == [None, None]


@pytest.mark.server
def test_the_client_and_v2_send_records_too(
    table_model: tuple[Path, list[str], np.ndarray], table_server: Server
) -> None:
    _, names, malignant = table_model
    recs = records(names, malignant[:3])
    with VAEClient(table_server.url) as client:
        scores = client.anomaly_score(records=recs, top_features=2, seed=0)
        assert scores.top_features is not None
        assert scores.top_features[0][0].feature in names
        encoded = client.encode(records=recs)
        assert encoded.mean.shape == (3, manifest_of(table_model[0])["latent_dim"])
        np.testing.assert_allclose(encoded.mean, client.encode(malignant[:3]).mean, rtol=1e-6)
        with pytest.raises(VAEValidationError, match="lacks the feature 'mean radius'"):
            client.encode(records=[{k: v for k, v in recs[0].items() if k != "mean radius"}])
        with pytest.raises(TypeError, match="exactly one"):
            client.encode()

    inputs = [{"name": n, "datatype": "FP64", "shape": [3], "data": [r[n] for r in recs]}
              for n in names]  # fmt: skip
    url = f"{table_server.url}/v2/models/vae/infer"
    r = httpx.post(url, json={"inputs": inputs})
    assert r.status_code == 200, r.text
    mean = next(o for o in r.json()["outputs"] if o["name"] == "mean")
    np.testing.assert_allclose(np.reshape(mean["data"], mean["shape"]), encoded.mean, rtol=1e-5)
    r = httpx.post(url, json={"inputs": inputs[1:]})
    assert r.status_code == 400
    assert r.json()["error"] == "The request lacks the input for the feature 'mean radius'."


# -- bad tables: each refused with the file, the column and the row ------------------------------


def test_tables_read_from_a_directory_with_a_test_file_and_from_parquet(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(70, 3))
    header = ["a", "b", "c"]
    write_csv(tmp_path / "train.csv", header, x[:60].tolist())
    pq.write_table(pa.table({n: x[60:, i] for i, n in enumerate(header)}),
                   tmp_path / "test.parquet")  # fmt: skip
    out = tmp_path / "vae.pt"
    assert main(["--data-dir", str(tmp_path), "--out", str(out), "--dry-run", "--val-min", "5",
                 "--no-progress"]) == 0  # fmt: skip
    m = manifest_of(out)
    assert m["features"]["names"] == header
    assert m["dataset"]["test_size"] == 10
    np.testing.assert_allclose(m["features"]["mean"], x[:60].mean(0)[None].repeat(1, 0)[0],
                               rtol=1e-3, atol=1e-4)  # fmt: skip


def bad(tmp_path: Path, rows: list[list[Any]], header: tuple[str, ...] = ("a", "b", "y")) -> Path:
    good = [[float(i), float(i % 3), "n"] for i in range(10)]
    return write_csv(tmp_path / "t.csv", list(header), good + rows)


@pytest.mark.parametrize(
    ("rows", "opts", "message"),
    [
        (
            [[1.0, "high", "n"]],
            {},
            "column 'b' is not numeric: row 11 holds 'high'; drop the column, or encode it as "
            "numbers, before training.",
        ),
        (
            [[1.0, "", "n"], [2.0, "", "n"]],
            {},
            "column 'b', row 11: the value is missing; fill it in, or pass --impute median.",
        ),
        ([[1.0, "inf", "n"]], {}, "column 'b', row 11: the value is infinite."),
        (
            [[1.0, 0.0, "a"]],
            {"normal_value": "n"},
            None,  # only the label differs: trains; the constant case follows
        ),
        ([[1.0, 2.0, ""]], {}, "column 'y', row 11: the label is missing."),
        (
            [],
            {"normal_value": "z"},
            "no row of column 'y' holds the normal value 'z'; its values are n.",
        ),
    ],
)
def test_bad_tables_are_refused_naming_file_column_and_row(
    tmp_path: Path, rows: list[list[Any]], opts: dict[str, Any], message: str | None
) -> None:
    path = bad(tmp_path, rows)
    options = TableOptions(label_column="y", **opts)
    if message is None:
        data = load_table(path, None, options)
        assert data.test_is_anomaly is not None
        assert data.test_is_anomaly.sum() == 1
        return
    with pytest.raises(DataError) as e:
        load_table(path, None, options)
    assert str(e.value) == f"{path}: {message}"


def test_a_constant_column_is_refused(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "t.csv", ["a", "b"], [[float(i), 7.0] for i in range(10)])
    with pytest.raises(DataError) as e:
        load_table(path, None, TableOptions())
    assert str(e.value) == (
        f"{path}: column 'b' holds the same value (7) in all 8 training rows, so there is "
        "nothing to learn from it; drop it."
    )


def test_impute_median_fills_missing_values_from_the_training_rows(tmp_path: Path) -> None:
    rows = [[float(i), float(i)] for i in range(9)] + [[9.0, ""]]
    path = write_csv(tmp_path / "t.csv", ["a", "b"], rows)
    data = load_table(path, None, TableOptions(impute="median", test_fraction=0.1))
    assert np.isfinite(data.x_train).all()
    assert np.isfinite(data.x_test).all()
    assert data.preprocessing is not None
    assert data.preprocessing["impute"]["method"] == "median"


@pytest.mark.parametrize(
    ("header", "rows", "message"),
    [
        (
            ["1.5", "2"],
            [[1, 2]],
            "the first row (1.5, 2, ...) looks like data, not a header; "
            "the first row must name the columns.",
        ),
        (["a", "a"], [[1, 2]], "the column 'a' appears twice in the header."),
        (["a", "b"], [], "holds a header but no rows."),
    ],
)
def test_headers_must_name_the_columns(
    tmp_path: Path, header: list[str], rows: list[list[Any]], message: str
) -> None:
    path = write_csv(tmp_path / "t.csv", header, rows)
    with pytest.raises(DataError) as e:
        load_table(path, None, TableOptions())
    assert str(e.value) == f"{path}: {message}"


def test_the_cli_exits_2_with_the_message_and_no_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = bad(tmp_path, [[1.0, "high", "n"]])
    assert main(["--data", str(path), "--label-column", "y", "--out", str(tmp_path / "m.pt")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {path}: column 'b' is not numeric: row 11 holds 'high'")
    assert "Traceback" not in err
    missing = main(["--data", str(path), "--label-column", "size", "--out", str(tmp_path / "m")])
    assert missing == 2
    assert "no column 'size' (--label-column); its columns are a, b, y." in capsys.readouterr().err
