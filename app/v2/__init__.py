"""The Open Inference Protocol (KServe "V2") over REST, beside the service's own API.

A peer of the REST routes (app/routes.py): both call app/operations.py, neither imports the
other. `protocol.py` holds the protocol's objects, `codec.py` turns bodies into arrays and
back, `routes.py` the endpoints.

Endpoints: `GET /v2/health/live`, `GET /v2/health/ready`, `GET /v2` (server metadata),
`GET /v2/models/{name}[/versions/{v}]` (model metadata), `GET .../ready` and `POST .../infer`,
with JSON tensors and the binary tensor data extension; and the model repository extension,
`POST /v2/repository/index` and `POST /v2/repository/models/{name}/load` and `/unload`, behind
the admin key (docs/models.md).

Design decisions:

* **Each operation is a model name**: `vae` encodes, `vae-decode` decodes, `vae-anomaly`
  scores. V2 model metadata describes one tensor signature per model, and generic V2 tools
  (perf_analyzer, model-agnostic clients) build their requests from it. The three
  operations take different inputs (x of length D, or z of length Z) and give different
  outputs, so a single model switched by an `operation` parameter could only advertise a
  signature that is wrong for two of the three. `vae` is the encoder because the
  representation q(z|x) is the model's primary output. A repository model `m` is `m`,
  `m-decode` and `m-anomaly` the same way; `vae`, `vae-decode` and `vae-anomaly` are the
  default model's.
* **Options are request `parameters`**, validated by the very models the REST routes use
  (`EncodeParams`, `DecodeParams`, `AnomalyScoreParams`), so `seed`, `samples` and the rest
  mean and are bounded the same; `binary_data_output` is V2's own. Unknown parameters are
  refused, as unknown REST fields are.
* **The same path through the model as REST**: checks from `validation.py` (shapes, range,
  VAE_MAX_INSTANCES and the sample limits, with the same sentences) and the same batcher keys
  and operations, so V2 and REST requests for the same work share a forward pass.
* **Inputs**: FP32, and FP16, FP64 and the integer types converted to float32 (cheap, and
  what numpy-first clients send); shape [N, D] or [N, *input_shape]. Metadata advertises
  [-1, D], the one shape every artifact has. Data is flat or nested to the shape.
* **Outputs**: FP32 tensors (BOOL for `is_anomaly`); JSON `data` is flat, row-major. The
  anomaly model's scalars (decision score, threshold, L and K) come back as response
  `parameters`. Versions as Triton has them: `/versions/{v}` in the path picks one (else the
  highest loaded), metadata lists the loaded ones, and answers carry `model_version`.
* **Errors** are `{"error": "<one sentence>"}`. Bad input is a 400, the spec's "typically
  400", also for the checks REST answers with 422; an unknown model or endpoint is a 404, a
  wrong method a 405, a compressed body a 415. Not ready is a 503 (the spec says 4xx for
  "false"; 503 is what `/ready` answers, and Kubernetes and tritonclient read any non-200 as
  false). Health answers carry no body, as the spec asks.
"""

from app.v2.routes import router

__all__ = ["router"]
