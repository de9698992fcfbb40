"""The format-2 and format-3 scores and the attribution through the HTTP API, JSON, .npy, PNG
and V2, and format-1 and format-2 artifacts that keep serving their own scores."""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from matplotlib import colormaps
from PIL import Image

from app.images import HEAT_COLOURS, LEGEND_HEIGHT, LEGEND_WIDTH, SEPARATOR
from app.main import create_app
from app.model import VAEService
from app.settings import Settings
from scoring.artifact import ModelLoadError
from scoring.calibration import Calibration
from scoring.scores import References
from tests.conftest import EVERY_SCORE, drop_format_8, make_artifact
from training.config import ModelConfig
from training.export import export_artifact, load_artifact, load_weights
from training.model import VAE

X = np.random.default_rng(0).uniform(0, 1, (3, 16)).round(3).tolist()  # 4x4 images
NEW = ("input_complexity", "likelihood_ratio", "dose", "latent_distance", "latent_polar_distance",
       "rapp", "feature_distance", "ensemble")  # fmt: skip
CHEAP = ("kl_divergence", "reconstruction_log_prob", "input_complexity", "dose",
         "latent_distance", "latent_polar_distance", "rapp", "feature_distance",
         "ensemble")  # fmt: skip
# Format 5's ensemble, format 9's (the same and the feature distance, counted twice), and
# format 4's.
ENSEMBLE_5 = ("dose", "latent_distance", "latent_polar_distance", "rapp", "input_complexity")
ENSEMBLE = (*ENSEMBLE_5, "feature_distance")
WEIGHTS = (1.0, 1.0, 1.0, 1.0, 1.0, 2.0)
ENSEMBLE_4 = ("dose", "latent_distance", "rapp")


@pytest.fixture(scope="module")
def v2_artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_artifact(tmp_path_factory.mktemp("v2") / "vae.pt", input_shape=(4, 4))


@pytest.fixture(scope="module")
def v1_artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("v1") / "vae.pt"
    return make_artifact(path, input_shape=(4, 4), format_version=1)


@pytest.fixture(scope="module")
def format8_artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("f8") / "vae.pt"
    return make_artifact(path, input_shape=(4, 4), format_version=8)


@pytest.fixture(scope="module")
def format4_artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("f4") / "vae.pt"
    return make_artifact(path, input_shape=(4, 4), format_version=4)


@pytest.fixture(scope="module")
def format3_artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("f3") / "vae.pt"
    return make_artifact(path, input_shape=(4, 4), format_version=3)


@pytest.fixture(scope="module")
def format2_artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("f2") / "vae.pt"
    return make_artifact(path, input_shape=(4, 4), format_version=2)


def client_for(path: Path, **settings: Any) -> TestClient:
    return TestClient(create_app(Settings(model_path=path, **settings)))


@pytest.fixture
def client(v2_artifact: Path) -> Iterator[TestClient]:
    with client_for(v2_artifact) as c:
        yield c


def score(client: TestClient, **body: Any) -> Any:
    r = client.post("/anomaly-score", json={"instances": X, "seed": 0, **body})
    assert r.status_code == 200, r.text
    return r.json()


def test_format_3_answers_every_cheap_score_and_the_ratio_when_asked(client: TestClient) -> None:
    out = score(client)
    for name in CHEAP:
        assert len(out[name]) == 3
        assert len(out["percentiles"][name]) == 3
    assert out["likelihood_ratio"] is None
    assert out["log_likelihood"] is None
    out = score(client, scores=["likelihood_ratio", "log_likelihood"])
    assert len(out["likelihood_ratio"]) == 3
    assert len(out["percentiles"]["likelihood_ratio"]) == 3
    assert out["log_likelihood_samples"] == 8  # the calibrated K


def test_the_artifact_recommends_the_decision_score(client: TestClient) -> None:
    assert score(client)["decision_score"] == "ensemble"


def sum_of_tails(
    out: dict[str, Any], names: tuple[str, ...], weights: tuple[float, ...] | None = None
) -> list[float]:
    """-log(1 - p) summed over the named scores' percentiles, each times its weight, per
    instance: the ensemble, for values within the calibration's range (beyond it, each tail
    grows on)."""
    rows = zip(*(out["percentiles"][n] for n in names), strict=True)
    w = weights or (1.0,) * len(names)
    return [sum(wi * -np.log1p(-p) for wi, p in zip(w, ps, strict=True)) for ps in rows]


def test_the_ensemble_sums_the_tails_of_its_six_percentiles(client: TestClient) -> None:
    out = score(client)
    np.testing.assert_allclose(out["ensemble"], sum_of_tails(out, ENSEMBLE, WEIGHTS), rtol=1e-5)
    assert all(0.0 <= d <= 2.0 for d in out["feature_distance"])
    assert all(0.0 <= d <= 2.0 for d in out["latent_distance"])
    assert all(r >= 0.0 for r in out["rapp"])
    # The polar distance is the direction's chord and the log lengths' gap together: never
    # below the direction's alone, for the same neighbours or nearer ones.
    assert all(p >= 0.0 for p in out["latent_polar_distance"])


def test_a_format_8_artifact_keeps_its_ensemble_of_five(format8_artifact: Path) -> None:
    with client_for(format8_artifact) as c:
        out = score(c)
        ensemble = c.get("/model").json()["manifest"]["ensemble"]
    assert ensemble == {"scores": list(ENSEMBLE_5), "combine": "fisher"}  # no weights
    assert out["feature_distance"] is None
    assert out["percentiles"]["feature_distance"] is None
    np.testing.assert_allclose(out["ensemble"], sum_of_tails(out, ENSEMBLE_5), rtol=1e-5)


def test_a_format_4_artifact_keeps_its_ensemble_of_three(format4_artifact: Path) -> None:
    with client_for(format4_artifact) as c:
        out = score(c)
        assert c.get("/model").json()["manifest"]["ensemble"]["scores"] == list(ENSEMBLE_4)
    assert out["latent_polar_distance"] is None
    assert out["percentiles"]["latent_polar_distance"] is None
    np.testing.assert_allclose(out["ensemble"], sum_of_tails(out, ENSEMBLE_4), rtol=1e-5)


def test_a_format_3_ensemble_is_the_larger_of_its_two_percentiles(format3_artifact: Path) -> None:
    with client_for(format3_artifact) as c:
        out = score(c)
    assert out["rapp"] is None
    pct = out["percentiles"]
    # Format 3's ensemble was calibrated on interpolated percentiles: it takes them still.
    cal = Calibration.from_manifest(load_artifact(format3_artifact)[1], "m").scores
    dose, distance = (cal[n].as_trained(np.float32(out[n])) for n in ("dose", "latent_distance"))
    np.testing.assert_allclose(out["ensemble"], np.maximum(dose, distance), rtol=1e-6)
    assert len(pct["ensemble"]) == 3


def with_manifest(
    artifact: Path, out: Path, change: Callable[[dict[str, Any]], None], rapp: bool = True
) -> Path:
    """The artifact's weights and references exported again with its manifest changed in
    place by `change` (without RaPP's projection, unless `rapp`)."""
    weights, background, manifest = load_weights(artifact)
    served = VAEService.load(artifact, "cpu")
    change(manifest)
    cfg = ModelConfig.from_dict(manifest["model"])
    model, bg = VAE(cfg), VAE(cfg)
    model.load_state_dict(weights)
    assert background is not None
    bg.load_state_dict(background)
    references = References(
        served.neighbours, served.gaps if rapp else None, features=served.features
    )
    export_artifact(model, manifest, out, bg, references)
    return out


def test_an_ensemble_of_a_score_the_artifact_lacks_is_refused_at_load(tmp_path: Path) -> None:
    """An artifact whose manifest's ensemble names a score its calibration lacks would fail
    every request: it is refused at load, naming the score."""

    def without_rapp(manifest: dict[str, Any]) -> None:
        del manifest["calibration"]["scores"]["rapp"], manifest["rapp"]
        drop_format_8(manifest["calibration"])  # else its rows' parts are refused first

    artifact = make_artifact(tmp_path / "good.pt", input_shape=(4, 4))
    broken = with_manifest(artifact, tmp_path / "broken.pt", without_rapp, rapp=False)
    with pytest.raises(ModelLoadError, match=r"the ensemble combines rapp, not calibrated"):
        VAEService.load(broken, "cpu")


def test_an_ensemble_whose_rows_are_of_other_parts_is_refused_at_load(tmp_path: Path) -> None:
    """Format 8's rows pair each validation row's parts in the order of `parts`; an ensemble
    that combines its scores in another order would read each row's values as the wrong
    scores' (every column is still some score's own values, so the calibration passes)."""

    def reversed_ensemble(manifest: dict[str, Any]) -> None:
        manifest["ensemble"]["scores"] = manifest["ensemble"]["scores"][::-1]

    artifact = make_artifact(tmp_path / "good.pt", input_shape=(4, 4))
    broken = with_manifest(artifact, tmp_path / "broken.pt", reversed_ensemble)
    with pytest.raises(ModelLoadError, match=r"validation rows are not of the scores it combines"):
        VAEService.load(broken, "cpu")


def test_an_ensemble_weighted_otherwise_than_its_rows_is_refused_at_load(tmp_path: Path) -> None:
    """Format 9's weights enter the ensemble's value and, from the calibration's own copy,
    its conformal percentile: an artifact whose two copies differ is refused."""

    def unweighted(manifest: dict[str, Any]) -> None:
        del manifest["ensemble"]["weights"]

    artifact = make_artifact(tmp_path / "good.pt", input_shape=(4, 4))
    broken = with_manifest(artifact, tmp_path / "broken.pt", unweighted)
    with pytest.raises(ModelLoadError, match=r"rows are weighted otherwise than its scores"):
        VAEService.load(broken, "cpu")


@pytest.mark.parametrize("name", EVERY_SCORE)
def test_every_score_can_decide(client: TestClient, name: str) -> None:
    out = score(client, decision_score=name, threshold_percentile=0.5)
    assert out["decision_score"] == name
    assert out[name] is not None
    assert out["is_anomaly"] == [p > 0.5 for p in out["percentiles"][name]]


def test_the_setting_overrides_the_artifacts_choice(v2_artifact: Path) -> None:
    with client_for(v2_artifact, anomaly_score="input_complexity") as c:
        assert score(c)["decision_score"] == "input_complexity"


def test_asking_for_more_never_changes_a_seeded_answers_other_scores(client: TestClient) -> None:
    plain = score(client)
    more = score(client, scores=["likelihood_ratio", "log_likelihood"], attribution=True)
    for name in CHEAP:
        assert more[name] == plain[name]
    assert score(client) == plain  # and seeded answers repeat byte for byte


def test_attribution_is_one_value_per_feature_in_json_and_npy(client: TestClient) -> None:
    out = score(client, attribution=True)
    assert np.asarray(out["attribution"]).shape == (3, 16)
    r = client.post(
        "/anomaly-score",
        json={"instances": X, "seed": 0, "attribution": True},
        headers={"accept": "application/x-npy"},
    )
    assert r.status_code == 200
    record = np.load(io.BytesIO(r.content))
    np.testing.assert_array_equal(record["attribution"], np.asarray(out["attribution"], np.float32))
    for name in ("dose", "latent_distance", "ensemble"):
        np.testing.assert_array_equal(record[name], np.asarray(out[name], np.float32))
        assert f"{name}_percentile" in record.dtype.names
    assert record["is_anomaly"].tolist() == out["is_anomaly"]


def heat_map_canvas(client: TestClient) -> np.ndarray:
    """The PNG answer to a seeded request for the three instances X, as an RGB array, checked
    for its size: 3 cells in a 2 x 2 grid, each 4 x (4 + gap + 4) pixels scaled 2x, a gap
    apart, and the colour scale below, at its least width."""
    r = client.post(
        "/anomaly-score?scale=2",
        json={"instances": X, "seed": 0},
        headers={"accept": "image/png"},
    )
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "image/png"
    with Image.open(io.BytesIO(r.content)) as img:
        assert img.size == (max(GRID_W, LEGEND_WIDTH), GRID_H + LEGEND_HEIGHT)
        assert img.mode == "RGB"
        return np.asarray(img)


CELL_W, CELL_H = 2 * (8 + SEPARATOR), 2 * 4
GRID_W, GRID_H = 2 * CELL_W + SEPARATOR, 2 * CELL_H + SEPARATOR
INFERNO = colormaps["inferno"](np.linspace(0, 1, 256))[:, :3] * 255


def assert_cells(canvas: np.ndarray, heat: np.ndarray) -> None:
    """Each cell holds the input's grey level on the left and, on the right, its heat level
    (0..255) in inferno's colours; grey gaps between them; the colour scale below runs from
    inferno's darkest at the left to its palest at the right."""
    inputs = np.asarray(X, dtype=np.float32).astype(np.float64)  # as the service holds them
    for i in range(3):
        top, left = divmod(i, 2)
        y0, x0 = top * (CELL_H + SEPARATOR), left * (CELL_W + SEPARATOR)
        cell = canvas[y0 : y0 + CELL_H : 2, x0 : x0 + CELL_W : 2]  # one pixel per model pixel
        grey = np.rint(inputs[i].reshape(4, 4) * 255)
        for channel in range(3):
            np.testing.assert_array_equal(cell[:, :4, channel], grey)
        assert (cell[:, 4 : 4 + SEPARATOR] == 128).all()  # the grey gap between the two
        np.testing.assert_allclose(
            cell[:, 4 + SEPARATOR :], INFERNO[heat[i].reshape(4, 4)], atol=1.5
        )
    assert (canvas[CELL_H : CELL_H + SEPARATOR, :GRID_W] == 128).all()  # between the rows
    assert (canvas[CELL_H + SEPARATOR : GRID_H, CELL_W + SEPARATOR : GRID_W] == 128).all()
    bar = canvas[GRID_H + 6].astype(float)
    np.testing.assert_allclose(bar[0], INFERNO[0], atol=1.5)
    np.testing.assert_allclose(bar[-1], INFERNO[255], atol=1.5)


def test_png_answer_is_each_input_beside_its_redrawn_residual(client: TestClient) -> None:
    canvas = heat_map_canvas(client)
    # Format 6: the residual from x redrawn, from the JSON answer to the same seeded request,
    # on its fixed scale, 0 (as redrawn) to 1 (off by the whole range).
    attribution = np.asarray(score(client, attribution=True)["attribution"])
    assert ((attribution >= 0) & (attribution <= 1)).all()
    assert_cells(canvas, np.rint(attribution * 255).astype(int))


def test_png_answer_draws_older_formats_standardised_map_on_a_log_scale(
    format4_artifact: Path,
) -> None:
    with client_for(format4_artifact) as c:
        canvas = heat_map_canvas(c)
        # log(1 + attribution) from its darkest (0) to its palest (the grid's largest value).
        attribution = np.maximum(np.asarray(score(c, attribution=True)["attribution"]), 0.0)
    heat = np.rint(np.log1p(attribution) / np.log1p(attribution).max() * 255).astype(int)
    assert_cells(canvas, heat)


@pytest.mark.parametrize("features", [1, 2, 3])
def test_a_model_of_very_few_features_redraws_at_least_one(tmp_path: Path, features: int) -> None:
    # 15% of 1 to 3 features rounds to none; the redraw still takes the worst one.
    path = make_artifact(tmp_path / "vae.pt", input_shape=(features,))
    rows = np.random.default_rng(features).uniform(0, 1, (5, features)).round(3).tolist()
    with client_for(path) as c:
        r = c.post(
            "/anomaly-score",
            json={"instances": rows, "seed": 0, "attribution": True, "top_features": 1},
        )
        assert r.status_code == 200, r.text
        attribution = np.asarray(r.json()["attribution"])
    assert attribution.shape == (5, features)
    assert ((attribution >= 0) & (attribution <= 1)).all()


def test_the_heat_colours_are_matplotlibs_inferno() -> None:
    expected = np.rint(colormaps["inferno"](np.linspace(0, 1, 256))[:, :3] * 255)
    np.testing.assert_array_equal(HEAT_COLOURS, expected)  # scripts/colour_map.py rewrites it


def test_v2_offers_the_new_scores_and_the_attribution(client: TestClient) -> None:
    body = {
        "inputs": [{"name": "instances", "shape": [3, 16], "datatype": "FP32",
                    "data": np.ravel(X).tolist()}],
        "parameters": {"seed": 0, "scores": "likelihood_ratio", "attribution": True},
    }  # fmt: skip
    r = client.post("/v2/models/vae-anomaly/infer", json=body)
    assert r.status_code == 200, r.text
    outputs = {o["name"]: o for o in r.json()["outputs"]}
    rest = score(client, scores=["likelihood_ratio"], attribution=True)
    for name in NEW:
        np.testing.assert_array_equal(np.float32(outputs[name]["data"]), np.float32(rest[name]))
    assert outputs["attribution"]["shape"] == [3, 16]
    meta = client.get("/v2/models/vae-anomaly").json()
    assert {*NEW, "attribution"} <= {o["name"] for o in meta["outputs"]}


def test_format_1_serves_its_own_scores_and_names_what_it_lacks(v1_artifact: Path) -> None:
    with client_for(v1_artifact) as c:
        out = score(c)
        assert out["decision_score"] == "reconstruction_log_prob"
        assert all(out[name] is None for name in NEW)
        r = c.post("/anomaly-score", json={"instances": X, "decision_score": "dose"})
        assert r.status_code == 422
        assert r.json()["detail"] == (
            "This artifact (format_version 1) has no dose score; it offers kl_divergence, "
            "reconstruction_log_prob, log_likelihood."
        )
        r = c.post("/anomaly-score", json={"instances": X, "attribution": True})
        assert r.status_code == 422
        assert "format_version 1" in r.json()["detail"]


def test_format_2_serves_its_own_scores_and_names_what_it_lacks(format2_artifact: Path) -> None:
    with client_for(format2_artifact) as c:
        out = score(c, attribution=True)
        assert out["decision_score"] == "dose"
        assert len(out["dose"]) == len(out["attribution"]) == 3
        assert out["latent_distance"] is None
        assert out["ensemble"] is None
        r = c.post("/anomaly-score", json={"instances": X, "scores": ["ensemble"]})
        assert r.status_code == 422
        assert r.json()["detail"] == (
            "This artifact (format_version 2) has no ensemble score; it offers kl_divergence, "
            "reconstruction_log_prob, log_likelihood, input_complexity, likelihood_ratio, dose."
        )


def test_attribution_is_true_or_false_not_a_number(client: TestClient) -> None:
    r = client.post("/anomaly-score", json={"instances": X, "attribution": 1})
    assert r.status_code == 422
    assert r.json()["detail"] == "attribution: Input should be true or false."
