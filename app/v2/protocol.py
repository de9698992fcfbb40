"""The Open Inference Protocol's objects: its JSON messages, datatypes, errors, and the three
operations this server offers as V2 models."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictStr

from app.common import SCORES
from app.errors import VAEServiceError
from app.model import VAEService
from app.schemas import AnomalyScoreParams, DecodeParams, EncodeParams, Strict

HEADER_LENGTH = "Inference-Header-Content-Length"
PLATFORM = "pytorch_torchscript"  # the spec's platform name for TorchScript models
EXTENSIONS = ["binary_tensor_data", "model_repository"]
# A repository model `m` is three V2 models: `m` encodes, `m-decode` decodes, `m-anomaly`
# scores. `vae`, `vae-decode` and `vae-anomaly` are the default model's (as before models had
# names), unless the repository has a model named `vae`.
SUFFIXES = {"": "vae", "-decode": "vae-decode", "-anomaly": "vae-anomaly"}


def readings(v2_name: str) -> list[tuple[str, str]]:
    """What a V2 model name may mean, as (repository model, operation's model in MODELS): the
    name itself first (a model named `b-decode` encodes), then the name less an operation's
    suffix (model `b` decoding)."""
    return [
        (v2_name[: len(v2_name) - len(suffix)], base)
        for suffix, base in SUFFIXES.items()
        if not suffix or (v2_name.endswith(suffix) and len(v2_name) > len(suffix))
    ]


# The spec's datatypes this server takes, as little-endian numpy types (the binary
# extension's byte order); each becomes float32 before the model sees it.
DATATYPES: dict[str, np.dtype[Any]] = {
    name: np.dtype(code)
    for name, code in [
        ("FP32", "<f4"), ("FP16", "<f2"), ("FP64", "<f8"),
        ("INT8", "i1"), ("INT16", "<i2"), ("INT32", "<i4"), ("INT64", "<i8"),
        ("UINT8", "u1"), ("UINT16", "<u2"), ("UINT32", "<u4"), ("UINT64", "<u8"),
    ]
}  # fmt: skip


class ProtocolError(VAEServiceError):
    """A request that breaks the protocol or this model's signature."""

    status_code = 400


class UnknownModelError(VAEServiceError):
    status_code = 404


class UnsupportedEncodingError(VAEServiceError):
    status_code = 415


# -- the operations as models ------------------------------------------------------------------


@dataclass(frozen=True)
class V2Model:
    name: str
    operation: Literal["encode", "decode", "anomaly"]
    input: str  # the one input tensor's name, the REST field it mirrors
    params: type[BaseModel]
    description: str

    def outputs(self, vae: VAEService) -> dict[str, tuple[str, list[int]]]:
        """Every output this model can give: name -> (datatype, shape), -1 for any size."""
        z, d = vae.latent_dim, vae.input_dim
        if self.operation == "encode":
            return {"mean": ("FP32", [-1, z]), "std": ("FP32", [-1, z]),
                    "samples": ("FP32", [-1, -1, z])}  # fmt: skip
        if self.operation == "decode":
            return {"outputs": ("FP32", [-1, d])}
        offered = [name for name in SCORES if name in vae.calibration.scores]
        outs: dict[str, tuple[str, list[int]]] = {name: ("FP32", [-1]) for name in offered}
        outs |= {f"{name}_percentile": ("FP32", [-1]) for name in offered}
        outs["is_anomaly"] = ("BOOL", [-1])
        if vae.attribution_method is not None:
            outs["attribution"] = ("FP32", [-1, d])
        return outs


MODELS = {
    m.name: m
    for m in (
        V2Model("vae", "encode", "instances", EncodeParams,
                "Encode: the posterior q(z|x) as `mean` and `std` (and `samples` draws)."),
        V2Model("vae-decode", "decode", "latents", DecodeParams,
                "Decode: latents z to outputs (the decoder's mean, or with `output` mode)."),
        V2Model("vae-anomaly", "anomaly", "instances", AnomalyScoreParams,
                "Anomaly scores, their calibrated percentiles and `is_anomaly`."),
    )
}  # fmt: skip

# Outputs that exist only when a parameter asks for them, and what to ask.
NEEDS = {
    "samples": "parameters.samples > 0",
    "log_likelihood": "parameters.log_likelihood_samples, or decision_score log_likelihood",
    "log_likelihood_percentile": "parameters.log_likelihood_samples, or decision_score "
    "log_likelihood",
    "likelihood_ratio": "parameters.scores likelihood_ratio, or decision_score likelihood_ratio",
    "likelihood_ratio_percentile": "parameters.scores likelihood_ratio, or decision_score "
    "likelihood_ratio",
    "attribution": "parameters.attribution true",
}


# -- the protocol's JSON objects ---------------------------------------------------------------


class V2InputParameters(Strict):
    binary_data_size: int | None = Field(
        None,
        ge=0,
        strict=True,
        description="Binary extension: the tensor's bytes follow the JSON header instead of "
        "`data`, little-endian, row-major.",
    )


class V2RequestInput(Strict):
    name: StrictStr = Field(description="`instances` (vae, vae-anomaly) or `latents`.")
    shape: list[Annotated[int, Field(strict=True, ge=0)]] = Field(
        description="[N, D] or [N, *input_shape] for instances; [N, Z] for latents."
    )
    datatype: StrictStr = Field(
        description=f"FP32, or one of {', '.join(DATATYPES)}, converted to float32."
    )
    parameters: V2InputParameters | None = None
    # Any, not list[float]: the tensor is read by numpy, not one pydantic float at a time.
    data: Any = Field(
        None,
        description="The values, row-major: flat, or nested to `shape`. Absent when "
        "`parameters.binary_data_size` is given.",
        json_schema_extra={"type": "array", "items": {}},
    )


class V2OutputParameters(Strict):
    binary_data: StrictBool | None = Field(
        None, description="Binary extension: return this output's bytes after the JSON header."
    )


class V2RequestOutput(Strict):
    name: StrictStr
    parameters: V2OutputParameters | None = None


class V2InferenceRequest(Strict):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "id": "42",
                    "parameters": {"seed": 0},
                    "inputs": [
                        {
                            "name": "instances",
                            "shape": [1, 784],
                            "datatype": "FP32",
                            "data": [0.0] * 784,
                        }
                    ],
                    "outputs": [{"name": "mean"}],
                }
            ]
        },
    )

    id: StrictStr | None = Field(None, description="Echoed in the response.")
    parameters: dict[str, Any] | None = Field(
        None,
        description="The operation's options, as in the REST API: vae takes samples and seed; "
        "vae-decode output; vae-anomaly samples, log_likelihood_samples, "
        "threshold_percentile, decision_score, scores (comma-separated), attribution and seed. "
        "All take binary_data_output.",
    )
    inputs: list[V2RequestInput] = Field(min_length=1)
    outputs: list[V2RequestOutput] | None = Field(
        None, description="Outputs to return; all that the request computes when absent."
    )


class V2ResponseOutput(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Any] | None = Field(
        None, description="`binary_data_size` when the bytes follow the JSON header."
    )
    data: list[Any] | None = Field(None, description="Flat, row-major; absent when binary.")


class V2InferenceResponse(BaseModel):
    model_name: str
    model_version: str | None = Field(None, description="The version that answered.")
    id: str | None = None
    parameters: dict[str, Any] | None = Field(
        None, description="vae-anomaly: decision_score, threshold_percentile, samples (L) and "
        "log_likelihood_samples (K).",
    )  # fmt: skip
    outputs: list[V2ResponseOutput]


class V2TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int] = Field(description="-1 marks a dimension of any size.")


class V2ModelMetadata(BaseModel):
    name: str
    versions: list[str] = Field(description="The versions loaded, as the spec writes them.")
    platform: str
    inputs: list[V2TensorMetadata]
    outputs: list[V2TensorMetadata]


class V2ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class V2ErrorResponse(BaseModel):
    error: str = Field(
        description="One sentence saying what was wrong.",
        examples=["Model 'vae' has no input 'x'; its input is 'instances'."],
    )


class V2IndexRequest(Strict):
    ready: StrictBool | None = Field(None, description="true: list only the ready models.")


class V2RepositoryModel(BaseModel):
    name: str
    version: str
    state: str = Field(description="READY, LOADING, UNAVAILABLE or UNLOADED.")
    reason: str = ""


class V2LoadRequest(Strict):
    parameters: dict[str, Any] | None = Field(
        None, description="Accepted and ignored (tritonclient sends `unload_dependents`)."
    )
