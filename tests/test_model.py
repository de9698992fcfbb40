"""The theory, checked: closed-form KL, reconstruction probability, the IWAE bound."""

from __future__ import annotations

import math

import pytest
import torch

from training.config import ModelConfig
from training.model import VAE


@pytest.fixture(params=["bernoulli", "gaussian"])
def model(request: pytest.FixtureRequest) -> VAE:
    torch.manual_seed(0)
    return VAE(ModelConfig(input_dim=6, hidden_dims=(16,), latent_dim=3, likelihood=request.param))


@pytest.fixture
def x() -> torch.Tensor:
    return torch.bernoulli(torch.rand(5, 6, generator=torch.Generator().manual_seed(1)))


@torch.no_grad()
def test_kl_divergence_matches_monte_carlo(model: VAE, x: torch.Tensor) -> None:
    mean, logvar = model.encode(x)
    q = torch.distributions.Normal(mean, torch.exp(0.5 * logvar))
    p = torch.distributions.Normal(torch.zeros_like(mean), torch.ones_like(mean))
    z = q.sample((200_000,))  # (S, B, Z)
    mc = (q.log_prob(z) - p.log_prob(z)).sum(-1).mean(0)
    torch.testing.assert_close(model.kl_divergence(x), mc, atol=0.02, rtol=0.02)


@torch.no_grad()
def test_reconstruction_log_prob_equals_direct_computation(model: VAE, x: torch.Tensor) -> None:
    eps = torch.randn(7, x.shape[0], 3, generator=torch.Generator().manual_seed(2))
    mean, logvar = model.encode(x)
    direct = torch.zeros(x.shape[0])
    for b in range(x.shape[0]):
        probs = []
        for sample in range(eps.shape[0]):
            z = mean[b] + torch.exp(0.5 * logvar[b]) * eps[sample, b]
            out = model.decoder_params(z)
            if model.bernoulli:
                dist = torch.distributions.Bernoulli(logits=out)
            else:
                std = torch.exp(0.5 * (model.dec_logvar.clamp(-10, 10) + 2 * model.x_scale.log()))
                dist = torch.distributions.Normal(out, std)  # type: ignore[assignment]
            probs.append(dist.log_prob(x[b]).sum().exp().double())
        direct[b] = torch.stack(probs).mean().log()  # the plain average of p(x|z_l)
    torch.testing.assert_close(model.reconstruction_log_prob(x, eps), direct, atol=1e-4, rtol=1e-5)


@torch.no_grad()
def test_iwae_bound_is_at_least_the_elbo_on_average(model: VAE, x: torch.Tensor) -> None:
    g = torch.Generator().manual_seed(3)
    elbo = torch.stack([model.elbo(x, torch.randn(5, 3, generator=g)) for _ in range(2000)])
    iwae = torch.stack(
        [model.log_likelihood(x, torch.randn(50, 5, 3, generator=g)) for _ in range(200)]
    )
    assert (iwae.mean(0) >= elbo.mean(0)).all()


@torch.no_grad()
def test_iwae_bound_does_not_drop_as_k_grows(model: VAE, x: torch.Tensor) -> None:
    g = torch.Generator().manual_seed(4)
    # Average many independent estimates per K, so the comparison is of expectations.
    means = []
    for k in (1, 5, 50):
        estimates = [model.log_likelihood(x, torch.randn(k, 5, 3, generator=g)) for _ in range(400)]
        means.append(torch.stack(estimates).mean().item())
    assert means[0] <= means[1] + 1e-3 <= means[2] + 2e-3


@torch.no_grad()
def test_log_likelihood_equals_direct_importance_sampling(model: VAE, x: torch.Tensor) -> None:
    eps = torch.randn(4, 5, 3, generator=torch.Generator().manual_seed(5))
    mean, logvar = model.encode(x)
    q = torch.distributions.Normal(mean, torch.exp(0.5 * logvar))
    prior = torch.distributions.Normal(0.0, 1.0)
    z = mean + torch.exp(0.5 * logvar) * eps  # (K, B, Z)
    log_px = model.log_px_given_z(x, z)  # checked against torch.distributions above
    log_w = log_px + prior.log_prob(z).sum(-1) - q.log_prob(z).sum(-1)
    direct = torch.logsumexp(log_w, 0) - math.log(4)
    torch.testing.assert_close(model.log_likelihood(x, eps), direct)


@torch.no_grad()
def test_decode_gives_probabilities_for_bernoulli(model: VAE) -> None:
    out = model.decode(torch.randn(4, 3))
    assert out.shape == (4, 6)
    if model.bernoulli:
        assert ((out > 0) & (out < 1)).all()
