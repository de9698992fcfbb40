"""The artifact: scripted methods equal the eager model's, and the manifest travels with it."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
import torch

from tests.conftest import make_artifact
from training.config import ModelConfig
from training.export import FORMAT_VERSION, export_artifact, load_artifact, sha256_of
from training.model import VAE


@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian"])
@torch.no_grad()
def test_scripted_methods_equal_eager_on_fixed_eps(tmp_path: Path, likelihood: str) -> None:
    torch.manual_seed(0)
    model = VAE(ModelConfig(input_dim=6, hidden_dims=(16, 8), latent_dim=3, likelihood=likelihood))  # type: ignore[arg-type]
    model.x_shift.fill_(0.3)
    model.x_scale.fill_(2.0)
    model.eval()
    export_artifact(model, {"format_version": FORMAT_VERSION}, tmp_path / "m.pt")
    scripted, manifest = load_artifact(tmp_path / "m.pt")
    assert manifest == {"format_version": FORMAT_VERSION}

    g = torch.Generator().manual_seed(1)
    x = torch.rand(5, 6, generator=g)
    eps = torch.randn(7, 5, 3, generator=g)
    z = torch.randn(5, 3, generator=g)
    for got, want in [
        (scripted.encode(x), model.encode(x)),
        (scripted.decode(z), model.decode(z)),
        (scripted.kl_divergence(x), model.kl_divergence(x)),
        (scripted.reconstruction_log_prob(x, eps), model.reconstruction_log_prob(x, eps)),
        (scripted.log_likelihood(x, eps), model.log_likelihood(x, eps)),
    ]:
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_artifact_carries_the_manifest_contract(tiny_artifact: Path) -> None:
    _, manifest = load_artifact(tiny_artifact)
    for key in ("format_version", "input_shape", "input_dim", "latent_dim", "likelihood",
                "input_range", "dataset", "training", "metrics", "calibration", "created_at",
                "torch_version"):  # fmt: skip
        assert key in manifest, key
    assert manifest["input_shape"] == [2, 2]
    assert manifest["input_dim"] == 4
    assert manifest["input_range"] == [0.0, 1.0]
    calibration = manifest["calibration"]
    values = calibration["scores"]["kl_divergence"]["values"]  # format 4: one per row
    assert len(values) == calibration["n"] == 64
    assert values == sorted(values)


def test_export_leaves_no_temp_file_and_reports_sha256(tmp_path: Path) -> None:
    path = make_artifact(tmp_path / "out" / "vae.pt")
    assert [p.name for p in path.parent.iterdir()] == ["vae.pt"]
    _, manifest = load_artifact(path)
    assert json.dumps(manifest)  # the manifest is plain JSON
    assert len(sha256_of(path)) == 64


def test_export_writes_a_file_others_may_read(tmp_path: Path) -> None:
    """Not mkstemp's private 0600: a container's non-root user must be able to read it."""
    umask = os.umask(0o022)
    try:
        path = make_artifact(tmp_path / "vae.pt")
    finally:
        os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


def test_failed_export_keeps_the_previous_artifact(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = make_artifact(tmp_path / "vae.pt")
    before = path.read_bytes()

    def crash(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(torch.jit, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        make_artifact(path, seed=1)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["vae.pt"]
