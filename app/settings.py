"""The service's one settings class: every `VAE_*` environment variable, documented and bounded."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from app.common import ScoreName

# A comma-separated environment variable, read as a list (not as JSON).
CommaList = Annotated[list[str], NoDecode]
_PIN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}(/[1-9][0-9]{0,8})?=[0-9a-fA-F]{64}$")
SecretList = Annotated[list[SecretStr], NoDecode]  # never shown in a repr or a log


class Settings(BaseSettings):
    # protected_namespaces=(): `model_path` is our field, not pydantic's `model_` namespace.
    model_config = SettingsConfigDict(env_prefix="VAE_", protected_namespaces=(), extra="ignore")

    model_path: Path = Field(
        Path("models/default/vae.pt"), description="The TorchScript artifact to serve (read "
        "locally only); the default is the MNIST model that ships with the repository.",
    )  # fmt: skip
    model_sha256: str | None = Field(
        None, pattern=r"^[0-9a-fA-F]{64}$", description="Pins the artifact: start-up and "
        "reload refuse a file whose sha256 differs.",
    )  # fmt: skip
    model_repository: Path | None = Field(
        None, description="A model repository to serve instead of VAE_MODEL_PATH, in Triton's "
        "layout: DIR/<name>/<version>/vae.pt (the version a positive integer); DIR/<name>/vae.pt "
        "or DIR/<name>.pt is version 1 (docs/models.md; `models` serves both shipped models). "
        "Nothing outside DIR is read, symlinks included.",
    )  # fmt: skip
    model_control: Literal["all", "explicit"] = Field(
        "all", description="`all`: load every model in the repository at start; `explicit`: "
        "load only VAE_DEFAULT_MODEL (if set) at start, the others when asked (POST "
        "/v2/repository/models/{name}/load or /admin/models/{name}/load). Load and unload "
        "need an admin key in both modes.",
    )  # fmt: skip
    default_model: str | None = Field(
        None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$", description="The repository model "
        "that the routes without a model name (/encode, ..., V2's `vae`) serve. Unset: the only "
        "model when the repository holds one, else none (those routes answer 404).",
    )  # fmt: skip
    max_models: int = Field(
        16, ge=1, le=4096, description="Most model versions held loaded at once; a load beyond "
        "it is refused (409) before anything is read, never an out-of-memory.",
    )  # fmt: skip
    model_pins: CommaList = Field(
        default_factory=list, description="sha256 pins for repository models, comma-separated "
        "`name=sha256` (every version) or `name/version=sha256`: a load refuses a file that "
        "hashes otherwise. VAE_MODEL_SHA256 pins VAE_MODEL_PATH's model.",
    )  # fmt: skip
    device: str = Field(
        "auto",
        pattern=r"^(auto|cpu|cuda(:\d+)?)$",
        description="auto (CUDA when available), cpu, cuda or cuda:N; an explicit CUDA device "
        "that is absent stops start-up.",
    )
    host: str = Field("127.0.0.1", description="Interface for `python -m app` to bind.")
    port: int = Field(8000, ge=1, le=65535, description="Port for `python -m app`.")
    workers: int = Field(
        1, ge=1, le=64, description="uvicorn worker processes for `python -m app`; each loads "
        "the model and runs its own batcher (docs/performance.md has the measurement).",
    )  # fmt: skip
    run_dir: Path | None = Field(
        None, description="With several workers: the folder they share for their metrics and "
        "reloads (emptied at start). Unset: a fresh temporary folder.",
    )  # fmt: skip
    loop: Literal["auto", "asyncio", "uvloop"] | None = Field(
        None, description="uvicorn event loop for `python -m app` (auto = uvloop if installed). "
        "Unset, by measurement (docs/performance.md): asyncio for one worker, where uvloop left "
        "some requests waiting over a second at 64 connections (p99 18x p50, asyncio's 1.3x); "
        "uvloop for several, where asyncio's accept took a whole burst of connections into one "
        "worker and left the others idle.",
    )  # fmt: skip

    @property
    def event_loop(self) -> str:
        return self.loop or ("asyncio" if self.workers == 1 else "uvloop")

    def intra_op_threads(self) -> int:
        """VAE_TORCH_THREADS, or a core for the event loop and the rest for torch: with torch's
        own default (every core) the inference thread's helpers took the core the event loop
        needed, and /anomaly-score x1 at 16 connections served 837 req/s against 1,119 with
        one thread on 2 cores (docs/benchmarks/throughput.md)."""
        if self.torch_threads:
            return self.torch_threads
        usable = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
        cores = len(usable) if usable is not None else (os.cpu_count() or 1)
        return max(1, cores // self.workers - 1)

    http: Literal["auto", "h11", "httptools"] = Field(
        "auto", description="uvicorn HTTP parser for `python -m app` (auto = httptools)."
    )
    max_instances: int = Field(
        1024, ge=1, le=65536, description="Most instances (or latents) in one request."
    )
    max_samples: int = Field(
        1024, ge=1, le=65536, description="Most samples per request: L for /anomaly-score, S for "
        "/encode, n for /sample.",
    )  # fmt: skip
    max_total_samples: int = Field(
        65536, ge=1, description="Most instances x samples in one request: each is one decoder "
        "pass, so this bounds a request's memory (65536 x 784 floats is about 200 MB).",
    )  # fmt: skip
    default_anomaly_samples: int | None = Field(
        None, ge=1, description="L for /anomaly-score when a request gives none (default: the L "
        "the artifact's calibration used, so percentiles compare like with like).",
    )  # fmt: skip
    default_log_likelihood_samples: int | None = Field(
        None, ge=1, description="K for the log-likelihood score when it is needed and a request "
        "gives none (default: the K of the artifact's calibration).",
    )  # fmt: skip
    anomaly_percentile: float = Field(
        0.99, gt=0.0, lt=1.0, description="Flag an instance as anomalous when its decision "
        "score is more anomalous than this share of normal validation data.",
    )  # fmt: skip
    anomaly_score: ScoreName | None = Field(
        None, description="The score that drives is_anomaly (default: the one the artifact "
        "recommends, the best measured by its trainer: see docs/anomaly.md; "
        "reconstruction_log_prob for format-1 artifacts).",
    )  # fmt: skip
    max_batch_size: int = Field(
        64, ge=1, le=65536, description="Most instances the batcher merges into one forward "
        "pass (concurrent unseeded requests; seeded ones always run alone).",
    )  # fmt: skip
    max_batch_delay_ms: float = Field(
        0.0, ge=0.0, le=1000.0, description="How long the batcher waits for more requests "
        "before a forward pass; 0 merges only what is already queued.",
    )  # fmt: skip
    hot_path: bool = Field(
        True, description="Serve the common model requests (/encode, /decode, /anomaly-score "
        "with a JSON or .npy body, V2 infer) without FastAPI's router and dependency solver, "
        "calling the same handlers: the same answers, a fraction of the overhead. false sends "
        "every request through FastAPI.",
    )  # fmt: skip
    inline_max_ms: float = Field(
        0.5, ge=0.0, le=100.0, description="Run a job on the event loop, skipping the hand-off "
        "to the inference thread, when its estimated model time (instances x samples x the "
        "per-row cost measured at warm-up) is at most this and it is the only request in "
        "flight; 0 turns it "
        "off, and so does a VAE_MAX_BATCH_DELAY_MS above 0 (jobs then wait for company). The "
        "loop is held that long at most, so keep it small.",
    )  # fmt: skip
    max_body_bytes: int = Field(
        32 * 2**20, ge=1024, description="Largest request body; a bigger one gets 413 before it "
        "is read (32 MiB holds 1024 MNIST images as JSON).",
    )  # fmt: skip
    max_in_flight: int = Field(
        256, ge=1, description="Most model requests (POST) accepted at once; more get 503 with "
        "Retry-After, so a flood cannot grow memory or queueing without bound.",
    )  # fmt: skip
    request_timeout_s: float = Field(
        60.0, gt=0.0, description="A model request that has not answered after this long gets "
        "504; work not yet started is dropped.",
    )  # fmt: skip
    shutdown_timeout_s: float = Field(
        30.0, ge=2.0, description="On SIGTERM: refuse new model requests with 503, finish those "
        "accepted, and exit within this many seconds.",
    )  # fmt: skip
    api_keys: SecretList = Field(
        default_factory=list, description="Comma-separated API keys for the model routes; when "
        "any is set (here or in the keys file), every route but the probes (/health, /ready, "
        "/v2/health/*), the docs and, while VAE_METRICS_PUBLIC is true, /metrics needs a key. "
        "These keys never open /admin.",
    )  # fmt: skip
    api_keys_file: Path | None = Field(
        None, description="A file of API keys, one per line (for Docker or Kubernetes secrets)."
    )
    admin_keys: SecretList = Field(
        default_factory=list, description="Comma-separated admin keys: the only keys /admin "
        "routes (reload) take; they open every other route too. None set: /admin is off.",
    )  # fmt: skip
    admin_keys_file: Path | None = Field(None, description="A file of admin keys, one per line.")
    root_path: str = Field(
        "", pattern=r"^(/[^/?#]+)*$", description="The path prefix a reverse proxy serves the "
        "app under (e.g. /vae), for `python -m app`; routes, keys and limits match the path "
        "after it, and the docs pages link under it.",
    )  # fmt: skip
    cors_origins: CommaList = Field(
        default_factory=list, description="Comma-separated origins allowed by CORS (e.g. "
        "https://app.example.com, or *); empty turns CORS off.",
    )  # fmt: skip
    torch_threads: int | None = Field(
        None, ge=1, le=256, description="torch intra-op threads per worker (default: the cores "
        "this process may use, shared among VAE_WORKERS, less one for the event loop; at least "
        "1).",
    )  # fmt: skip
    torch_interop_threads: int | None = Field(
        None, ge=1, le=256, description="torch inter-op threads (default: torch's own choice)."
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        "info", description="Log level of the service and uvicorn."
    )
    log_format: Literal["json", "text"] = Field(
        "json", description="`json`: one JSON object per line (one per request, with its id); "
        "`text`: plain lines for people.",
    )  # fmt: skip
    metrics_public: bool = Field(
        True, description="Serve /metrics without an API key even when keys are set (for "
        "Prometheus scrapers); false puts it behind the keys like the model routes.",
    )  # fmt: skip

    @field_validator("api_keys", "admin_keys", "cors_origins", "model_pins", mode="before")
    @classmethod
    def _split_commas(cls, value: object) -> object:
        if isinstance(value, str):
            return [item.strip() for item in value.split(",") if item.strip()]
        return value

    @field_validator("model_pins")
    @classmethod
    def _check_pins(cls, value: list[str]) -> list[str]:
        for pin in value:
            if not _PIN.match(pin):
                raise ValueError(f"'{pin}' is not a pin: write name=sha256 or name/version=sha256")
        return value

    def pins(self) -> dict[str, str]:
        """VAE_MODEL_PINS as `name` or `name/version` -> lower-case sha256."""
        return dict((k, v.lower()) for k, v in (pin.split("=", 1) for pin in self.model_pins))

    def load_api_keys(self) -> list[SecretStr]:
        """The keys from VAE_API_KEYS and VAE_API_KEYS_FILE, read once at start-up."""
        return _keys(self.api_keys, self.api_keys_file, "API keys")

    def load_admin_keys(self) -> list[SecretStr]:
        """The keys from VAE_ADMIN_KEYS and VAE_ADMIN_KEYS_FILE, read once at start-up."""
        return _keys(self.admin_keys, self.admin_keys_file, "admin keys")


def _keys(given: list[SecretStr], file: Path | None, what: str) -> list[SecretStr]:
    keys = [k.get_secret_value() for k in given]
    if file is not None:
        try:
            text = file.read_text()
        except OSError as e:
            raise ValueError(f"{file}: cannot read the {what} file ({e.strerror}).") from None
        keys += [line.strip() for line in text.splitlines() if line.strip()]
    return [SecretStr(k) for k in keys]
