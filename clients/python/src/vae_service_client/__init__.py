"""vae-service-client: call a vae-service server with numpy arrays in and out, over httpx.

The whole client lives in `vae_service_client.client`; its public names are re-exported here.
"""

from vae_service_client.client import (
    AnomalyScores,
    AsyncVAEClient,
    Encoded,
    FeatureShare,
    ModelInfo,
    ModelSummary,
    ModelVersionState,
    RetryPolicy,
    Samples,
    ScorePercentiles,
    VAEAuthError,
    VAEClient,
    VAEConnectionError,
    VAEError,
    VAENotFoundError,
    VAETimeoutError,
    VAEUnavailableError,
    VAEValidationError,
    __version__,
)

__all__ = [
    "AnomalyScores",
    "AsyncVAEClient",
    "Encoded",
    "FeatureShare",
    "ModelInfo",
    "ModelSummary",
    "ModelVersionState",
    "RetryPolicy",
    "Samples",
    "ScorePercentiles",
    "VAEAuthError",
    "VAEClient",
    "VAEConnectionError",
    "VAEError",
    "VAENotFoundError",
    "VAETimeoutError",
    "VAEUnavailableError",
    "VAEValidationError",
    "__version__",
]
