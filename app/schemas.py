"""Request and response models: constraints, descriptions and working examples live here.

The request examples fit a 784-dimensional MNIST model with a 32-dimensional latent; `main.py`
rewrites them from the loaded artifact's manifest, so "Try it out" on /docs works for any model.
Response examples are shortened to a few values per row.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator
from pydantic_core import PydanticCustomError

from app.common import ScoreName

# Strict: a JSON `true` is not the number 1. Finite: NaN and Infinity are refused by index.
Number = Annotated[float, Field(strict=True, allow_inf_nan=False)]


def _refuse_bool(value: object) -> object:
    if isinstance(value, bool):
        raise PydanticCustomError("int_type", "Input should be a valid integer")
    return value


# A count or seed: an integer as JSON Schema means it (2.0 is 2), but a JSON `true` is not 1.
Int = Annotated[int, BeforeValidator(_refuse_bool)]


def _true_or_false(value: object) -> object:
    """JSON's true and false; in a query or a form field, which are text, only `true` and
    `false` (not 0, 1, yes or on)."""
    if isinstance(value, bool) or (isinstance(value, str) and value.lower() in ("true", "false")):
        return value
    raise PydanticCustomError("bool_type", "Input should be true or false")


Flag = Annotated[bool, BeforeValidator(_true_or_false)]


def _split_commas(value: object) -> object:
    # Query parameters and form fields carry a list as one string: "dose,likelihood_ratio".
    return [v.strip() for v in value.split(",") if v.strip()] if isinstance(value, str) else value


ScoreNames = Annotated[list[ScoreName], BeforeValidator(_split_commas)]
FlatInstance = list[Number]
NestedInstance = list[list[Number]]
EXAMPLE_INPUT_DIM = 784
EXAMPLE_LATENT_DIM = 32
# One row of a table model, keyed by its feature names (GET /model lists them).
Record = dict[str, Number]
Instances = Annotated[
    list[FlatInstance | NestedInstance] | None,
    Field(
        min_length=1,
        description="Inputs, each flat (length D) or nested to the model's input shape (e.g. "
        "28x28). Values must be finite, and in [0, 1] for a Bernoulli model. Give instances "
        "or records.",
        examples=[[[0.0] * EXAMPLE_INPUT_DIM]],
    ),
]
Records = Annotated[
    list[Record] | None,
    Field(
        min_length=1,
        description="Inputs as records, for a model trained on a table: each maps every feature "
        "name (GET /model lists them) to its value. Give instances or records.",
        examples=[[{"mean radius": 12.1, "mean texture": 17.9}]],
    ),
]


class _InstancesOrRecords(BaseModel):
    instances: Instances = None
    records: Records = None

    @model_validator(mode="after")
    def _one_of(self) -> _InstancesOrRecords:
        # Absent, not null: the schema has each as a list, and `null` would pass for neither.
        for name in ("instances", "records"):
            if name in self.model_fields_set and getattr(self, name) is None:
                raise PydanticCustomError(
                    "null_inputs", f"{name} must be a list; leave it out rather than null"
                )
        if (self.instances is None) == (self.records is None):
            raise PydanticCustomError(
                "instances_or_records", "Give instances or records: exactly one of the two."
            )
        return self


Seed = Annotated[
    Int,
    Field(
        ge=0,
        le=2**63 - 1,
        description="Makes the answer reproducible: the same seed gives byte-identical output.",
        examples=[0],
    ),
]
Output = Annotated[
    Literal["mean", "mode"],
    Field(
        description="`mean`: E[x|z] (Bernoulli probabilities or the Gaussian mean); `mode`: the "
        "most probable x (rounded probabilities for Bernoulli, the mean for Gaussian).",
    ),
]


class Strict(BaseModel):
    """Refuses unknown fields: a typo in an option is an error, not a silent default."""

    model_config = ConfigDict(extra="forbid")


class EncodeParams(Strict):
    """/encode's options: JSON fields, or query parameters with a .npy body."""

    samples: Int = Field(
        0, ge=0, description="S: draws from q(z|x) to return per instance (0 for none)."
    )
    seed: Seed | None = None


class EncodeRequest(_InstancesOrRecords, EncodeParams):
    pass


class EncodeResponse(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [{"mean": [[0.12, -0.53]], "std": [[0.31, 0.95]], "samples": None}]
        }
    )

    mean: list[list[float]] = Field(description="Posterior means, (B, Z): the representation.")
    std: list[list[float]] = Field(description="Posterior standard deviations, (B, Z).")
    samples: list[list[list[float]]] | None = Field(
        None, description="(B, S, Z) draws z = mean + std * eps, when samples > 0."
    )


class DecodeParams(Strict):
    output: Output = "mean"


class DecodeRequest(DecodeParams):
    latents: list[list[Number]] = Field(
        min_length=1,
        description="Latent vectors, each of length Z.",
        examples=[[[0.0] * EXAMPLE_LATENT_DIM]],
    )


class DecodeResponse(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={"examples": [{"outputs": [[0.0, 0.01, 0.93, 0.88]]}]}
    )

    outputs: list[list[float]] = Field(description="Decoded outputs, (B, D).")


class SampleRequest(Strict):
    n: Int = Field(1, ge=1, description="How many samples to draw from the prior.", examples=[4])
    seed: Seed | None = None
    output: Output = "mean"


class SampleResponse(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [{"latents": [[-1.53, 0.75]], "outputs": [[0.0, 0.02, 0.97, 0.6]]}]
        }
    )

    latents: list[list[float]] = Field(description="The prior draws z ~ N(0, I), (n, Z).")
    outputs: list[list[float]] = Field(description="Their decoded outputs, (n, D).")


class AnomalyScoreParams(Strict):
    samples: Int | None = Field(
        None,
        ge=1,
        description="L: posterior samples for the reconstruction probability (default: the L "
        "the artifact was calibrated with).",
        examples=[16],
    )
    log_likelihood_samples: Int | None = Field(
        None,
        ge=1,
        description="K: importance samples for the log-likelihood score (the IWAE bound). Given, "
        "the answer includes `log_likelihood`; it is also computed, with the calibrated K, "
        "when it drives the decision.",
        examples=[100],
    )
    threshold_percentile: float | None = Field(
        None,
        gt=0.0,
        lt=1.0,
        description="Flag instances more anomalous than this share of normal data (default: "
        "VAE_ANOMALY_PERCENTILE).",
        examples=[0.99],
    )
    decision_score: ScoreName | None = Field(
        None,
        description="The score that drives `is_anomaly` (default: VAE_ANOMALY_SCORE, else the "
        "one the artifact recommends).",
    )
    scores: ScoreNames | None = Field(
        None,
        description="Scores to compute besides the ones always given (KL, the reconstruction "
        "probability, in format-2 artifacts input_complexity and dose, in format-3 ones "
        "latent_distance and ensemble, in format-4 ones rapp, in format-5 ones "
        "latent_polar_distance, in format-7 table models input_distance, and in format-9 image "
        "models feature_distance): log_likelihood "
        "(K importance samples) or likelihood_ratio (a background model's L passes). A score "
        "the artifact lacks is a 422. In a query or form: comma-separated.",
        examples=[["likelihood_ratio"]],
    )
    attribution: Flag = Field(
        False,
        description="Also return, per instance, each feature's share in its anomaly, read "
        "against the input's projection z* on normal data: for an image model (format 6) the "
        "residual |x_d - E[x_d|z*]| from the input redrawn, in [0, 1]; for a table model (and "
        "older image models) -log p(x_d|z*) standardised against normal validation data.",
    )
    top_features: Int | None = Field(
        None,
        ge=1,
        description="Also return, per instance, the k features with the highest attribution, "
        "by name for a model trained on a table, most anomalous first.",
        examples=[3],
    )
    seed: Seed | None = None


class AnomalyScoreRequest(_InstancesOrRecords, AnomalyScoreParams):
    pass


class ScorePercentiles(BaseModel):
    """Per score, the share of normal validation data less anomalous than each instance."""

    kl_divergence: list[float]
    reconstruction_log_prob: list[float]
    log_likelihood: list[float] | None = None
    input_complexity: list[float] | None = None
    likelihood_ratio: list[float] | None = None
    dose: list[float] | None = None
    latent_distance: list[float] | None = None
    latent_polar_distance: list[float] | None = None
    rapp: list[float] | None = None
    input_distance: list[float] | None = None
    feature_distance: list[float] | None = None
    ensemble: list[float] | None = None


class FeatureShare(BaseModel):
    index: int = Field(description="The feature's position in the input, from 0.")
    feature: str | None = Field(description="Its name, for a model trained on a table.")
    attribution: float | None = Field(
        description="Its standardised -log p(x_d|z); null where it is not finite (an input "
        "beyond what the model represents), which ranks first."
    )


class AnomalyScoreResponse(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "kl_divergence": [20.9],
                    "reconstruction_log_prob": [-43.3],
                    "log_likelihood": None,
                    "input_complexity": [-393.5],
                    "likelihood_ratio": None,
                    "dose": [3.02],
                    "latent_distance": [0.41],
                    "latent_polar_distance": [0.47],
                    "rapp": [812.0],
                    "input_distance": None,
                    "feature_distance": [0.52],
                    "ensemble": [1.74],
                    "percentiles": {
                        "kl_divergence": [0.14],
                        "reconstruction_log_prob": [0.14],
                        "log_likelihood": None,
                        "input_complexity": [0.81],
                        "likelihood_ratio": None,
                        "dose": [0.58],
                        "latent_distance": [0.62],
                        "latent_polar_distance": [0.6],
                        "rapp": [0.55],
                        "input_distance": None,
                        "feature_distance": [0.66],
                        "ensemble": [0.71],
                    },
                    "is_anomaly": [False],
                    "decision_score": "ensemble",
                    "threshold_percentile": 0.99,
                    "samples": 16,
                    "log_likelihood_samples": None,
                    "attribution": None,
                    "top_features": None,
                    "uncalibrated": [],
                    "warnings": [],
                }
            ]
        }
    )

    kl_divergence: list[float] = Field(
        description="KL(q(z|x) || p(z)) in nats per instance; higher is more anomalous."
    )
    reconstruction_log_prob: list[float] = Field(
        description="log of the reconstruction probability (An & Cho 2015), log mean_l "
        "p(x|z_l), in nats; lower is more anomalous."
    )
    log_likelihood: list[float] | None = Field(
        None,
        description="Importance-sampled log p(x) with K samples (Burda et al. 2015), in nats; "
        "lower is more anomalous. Present when asked for or when it drives the decision.",
    )
    input_complexity: list[float] | None = Field(
        None,
        description="-log2 p(x) - L(x) in bits, L(x) the zlib length of x thresholded at 0.5 "
        "(Serrà et al. 2020); higher is more anomalous. Format-2 Bernoulli models.",
    )
    likelihood_ratio: list[float] | None = Field(
        None,
        description="The reconstruction log-probability minus a background model's (Ren et "
        "al. 2019), in nats; lower is more anomalous. When asked for or deciding.",
    )
    dose: list[float] | None = Field(
        None,
        description="-log density of the instance's summary statistics among normal data's "
        "(DoSE, Morningstar et al. 2021); higher is more anomalous. Format-2 artifacts.",
    )
    latent_distance: list[float] | None = Field(
        None,
        description="Mean distance, between unit vectors, from the posterior mean to its 5 "
        "nearest training rows' means, in [0, 2]; higher is more anomalous. Format-3 artifacts.",
    )
    latent_polar_distance: list[float] | None = Field(
        None,
        description="The same, with the mean's length kept as well as its direction: the mean "
        "Euclidean distance in (unit vector, log length) coordinates to its 5 nearest training "
        "rows' means; higher is more anomalous. Format-5 artifacts.",
    )
    rapp: list[float] | None = Field(
        None,
        description="RaPP (Kim et al. 2020): how differently the encoder sees the instance and "
        "its reconstruction, layer by layer, whitened by the training rows' own gaps; higher "
        "is more anomalous. Format-4 artifacts.",
    )
    input_distance: list[float] | None = Field(
        None,
        description="Mean Euclidean distance from the instance to its 5 nearest training rows, "
        "each feature standardised over them (a k-NN detector); higher is more anomalous. "
        "Table models of format 7.",
    )
    feature_distance: list[float] | None = Field(
        None,
        description="Mean distance, between unit vectors, from the encoder's first-layer "
        "features of the instance to its 5 nearest training rows' (projected on 128 "
        "directions), in [0, 2]; higher is more anomalous. Image models of format 9.",
    )
    ensemble: list[float] | None = Field(
        None,
        description="Format 5: the tails of dose's, latent_distance's, latent_polar_distance's, "
        "rapp's and (for data in [0, 1]) input_complexity's percentiles summed, -log(1 - p) "
        "each; a format-7 table model's: of dose's and input_distance's; format 4: of dose's, "
        "latent_distance's and rapp's; format 3: the larger of dose's and latent_distance's. "
        "Higher is more anomalous; infinite where one of them is not finite. The default "
        "decision for images, and for tables from format 7.",
    )
    attribution: list[list[float]] | None = Field(
        None,
        description="When asked for: per instance, one value per feature, the residual from "
        "the input redrawn (image models, format 6) or -log p(x_d|z*) standardised against "
        "normal data; the highest are the most anomalous features.",
    )
    top_features: list[list[FeatureShare]] | None = Field(
        None,
        description="When `top_features` is k: per instance, the k most anomalous features, "
        "highest attribution first.",
    )
    percentiles: ScorePercentiles = Field(
        description="Per score, the share of normal validation data (V rows, counted out of "
        "V + 1) strictly less anomalous than each instance: normal data exceeds a threshold q "
        "at most 1 - q of the time. 1.0 where the score is not finite (null above). From "
        "format 8 the ensemble's is a full conformal p-value: its rank among the validation "
        "rows' sums, each taken against the other rows and the instance."
    )
    is_anomaly: list[bool] = Field(
        description="Whether each instance's decision-score percentile exceeds the threshold."
    )
    decision_score: ScoreName = Field(description="The score that drove `is_anomaly`.")
    threshold_percentile: float = Field(
        description="The percentile threshold applied: the one asked for, or lower when the "
        "calibration's V rows cannot resolve so small a tail (then `warnings` says so)."
    )
    samples: int = Field(description="L, the posterior samples used.")
    log_likelihood_samples: int | None = Field(
        None, description="K, the importance samples used, when log_likelihood was computed."
    )
    uncalibrated: list[ScoreName] = Field(
        default_factory=list,
        description="Scores computed with another L or K than the calibration drew (a request's "
        "`samples` or `log_likelihood_samples`): their percentiles, and a decision on them, do "
        "not keep the threshold's false-alarm rate.",
    )
    warnings: list[str] = Field(
        default_factory=list,
        description="One sentence each on what this answer cannot promise: uncalibrated "
        "percentiles, a threshold lowered to what the calibration resolves, scores that are "
        "not finite for an instance.",
    )


class HealthResponse(BaseModel):
    status: Literal["ok"] = Field("ok", description="Always `ok` when answered with 200.")


class FeatureInfo(BaseModel):
    name: str
    mean: float = Field(description="Its mean over the training rows.")
    std: float = Field(description="Its standard deviation over the training rows.")


class VersionInfo(BaseModel):
    version: int = Field(description="A positive integer: the folder DIR/<name>/<version>.")
    state: Literal["READY", "LOADING", "UNAVAILABLE", "UNLOADED"] = Field(
        description="READY serves; LOADING is being read and warmed up; UNAVAILABLE was "
        "refused by its last load (`reason` says why); UNLOADED is on disk, not loaded."
    )
    reason: str | None = Field(None, description="Why it is not READY.")
    sha256: str | None = Field(None, description="SHA-256 of the artifact serving it.")


class ModelEntryResponse(BaseModel):
    name: str = Field(examples=["default"])
    state: Literal["READY", "LOADING", "UNAVAILABLE", "UNLOADED"] = Field(
        description="READY while a version serves."
    )
    versions: list[VersionInfo]
    default: bool = Field(
        False, description="Whether the routes without a model name serve this model."
    )


class ModelsResponse(BaseModel):
    default: str | None = Field(
        description="The model the routes without a name serve (VAE_DEFAULT_MODEL, or the "
        "only one); null when there is none."
    )
    models: list[ModelEntryResponse] = Field(
        description="Every model in the repository, loaded or not, by name."
    )


class ModelResponse(BaseModel):
    name: str = Field("default", description="The model's name in the repository.")
    version: int = Field(1, description="The version this answer describes.")
    versions: list[VersionInfo] = Field(
        default_factory=list, description="Every version of the model and its state."
    )
    features: list[FeatureInfo] | None = Field(
        None,
        description="A table model's features, in input order: the keys of `records`.",
    )
    sha256: str = Field(description="SHA-256 of the artifact file being served.")
    artifact: str = Field(
        description="The artifact's file name (where it lies on the server is not shown)."
    )
    device: str = Field(description="The torch device the model runs on.")
    manifest: dict[str, Any] = Field(
        description="The artifact's manifest: shapes, likelihood, dataset, training config, "
        "test metrics and calibration summary."
    )


class ReloadResponse(BaseModel):
    sha256: str = Field(description="SHA-256 of the artifact now serving.")
    previous_sha256: str = Field(description="SHA-256 of the artifact it replaced.")
    changed: bool = Field(description="Whether the file's contents differ from before.")
    workers: int = Field(1, description="The server's worker processes (VAE_WORKERS).")
    workers_serving: int = Field(
        1,
        description="How many of them serve `sha256` now; fewer than `workers` when one refused "
        "the file (its log says why) or did not finish in time.",
    )
