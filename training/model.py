"""The VAE of Kingma & Welling (2013): a Gaussian encoder and a Bernoulli or Gaussian decoder.

Every method the service calls is a pure function of its inputs: randomness arrives as `eps`, so
the caller owns seeding. `torch.jit.script` compiles the whole class (see export.py).
"""

import math

import torch
from torch import Tensor, nn

from training.config import ModelConfig


def mlp(sizes: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class VAE(nn.Module):
    bernoulli: bool
    latent_dim: int
    x_shift: Tensor  # buffers, (D,)
    x_scale: Tensor

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        hidden = list(cfg.hidden_dims)
        self.bernoulli = cfg.likelihood == "bernoulli"
        self.latent_dim = cfg.latent_dim
        self.encoder = mlp([cfg.input_dim, *hidden])
        self.enc_out = nn.Linear(hidden[-1], 2 * cfg.latent_dim)  # mean and log-variance
        self.decoder = mlp([cfg.latent_dim, *reversed(hidden)])
        self.dec_out = nn.Linear(hidden[0], cfg.input_dim)  # logits, or the Gaussian mean
        # Gaussian decoder only: a learned per-feature log-variance, and the data's own scale so
        # real-valued inputs reach the network standardised (set from the training data).
        # A Bernoulli model never uses it: frozen, so DistributedDataParallel expects no grad.
        self.dec_logvar = nn.Parameter(torch.zeros(cfg.input_dim), requires_grad=not self.bernoulli)
        self.register_buffer("x_shift", torch.zeros(cfg.input_dim))
        self.register_buffer("x_scale", torch.ones(cfg.input_dim))

    @torch.jit.export
    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """q(z|x) = N(mean, diag exp(logvar)); x (B, D) -> (B, Z), (B, Z)."""
        h = self.encoder((x - self.x_shift) / self.x_scale)
        out: Tensor = self.enc_out(h)
        mean, logvar = out.chunk(2, dim=-1)
        return mean, logvar

    def activations(self, x: Tensor) -> list[Tensor]:
        """The encoder's hidden layers' outputs (after each ReLU) for x (B, D), in order."""
        h = (x - self.x_shift) / self.x_scale
        out: list[Tensor] = []
        for i, layer in enumerate(self.encoder):  # Linear, ReLU, Linear, ReLU, ...
            h = layer(h)
            if i % 2 == 1:
                out.append(h)
        return out

    @torch.jit.export
    def features(self, x: Tensor) -> Tensor:
        """The encoder's first hidden layer for x, (B, D) -> (B, hidden_dims[0]): what the
        feature distance (format 9) compares with the training rows'."""
        return self.activations(x)[0]

    @torch.jit.export
    def hidden_gap(self, x: Tensor) -> Tensor:
        """RaPP's reconstruction in the hidden spaces (Kim et al., ICLR 2020): the encoder's
        activations of x minus those of its reconstruction E[x|z = mean], every hidden layer
        side by side; (B, D) -> (B, sum of hidden_dims). An input the model cannot reproduce
        differs from its reconstruction in features the pixels alone do not show."""
        mean, _ = self.encode(x)
        ours, theirs = self.activations(x), self.activations(self.decode(mean))
        gaps: list[Tensor] = []
        for k in range(len(ours)):
            gaps.append(ours[k] - theirs[k])
        return torch.cat(gaps, dim=1)

    def decoder_params(self, z: Tensor) -> Tensor:
        """Bernoulli logits, or the Gaussian mean; z (..., Z) -> (..., D)."""
        out: Tensor = self.dec_out(self.decoder(z))
        if self.bernoulli:
            return out
        return self.x_shift + self.x_scale * out

    @torch.jit.export
    def decode(self, z: Tensor) -> Tensor:
        """The decoder's mean E[x|z]: Bernoulli probabilities or Gaussian mean; (B, Z) -> (B, D)."""
        out = self.decoder_params(z)
        return torch.sigmoid(out) if self.bernoulli else out

    def log_px_given_z(self, x: Tensor, z: Tensor) -> Tensor:
        """log p(x|z) summed over features; x (B, D), z (L, B, Z) -> (L, B)."""
        return self.log_px_given_z_per_feature(x, z).sum(-1)

    def log_px_given_z_per_feature(self, x: Tensor, z: Tensor) -> Tensor:
        """log p(x_d|z) for each feature d; x (B, D), z (L, B, Z) -> (L, B, D)."""
        params = self.decoder_params(z)  # (L, B, D)
        if self.bernoulli:
            # log Bern(x; sigmoid(l)) = x * l - softplus(l): exact and stable for x in [0, 1],
            # and cheaper than binary_cross_entropy_with_logits on the IWAE hot path.
            return x * params - nn.functional.softplus(params)
        logvar = self.dec_logvar.clamp(-10.0, 10.0) + 2.0 * torch.log(self.x_scale)
        return -0.5 * (math.log(2.0 * math.pi) + logvar + (x - params) ** 2 * torch.exp(-logvar))

    @torch.jit.export
    def feature_log_prob(self, x: Tensor, eps: Tensor) -> Tensor:
        """log p(x_d|z) per feature, averaged over L posterior samples: which features the
        model finds unlikely (format 2); eps (L, B, Z) -> (B, D)."""
        mean, logvar = self.encode(x)
        z = mean + torch.exp(0.5 * logvar) * eps
        return self.log_px_given_z_per_feature(x, z).mean(0)

    @torch.jit.export
    def kl_divergence(self, x: Tensor) -> Tensor:
        """Closed-form KL(q(z|x) || N(0, I)) in nats (Kingma & Welling, app. B); (B, D) -> (B,)."""
        mean, logvar = self.encode(x)
        return 0.5 * (mean**2 + torch.exp(logvar) - 1.0 - logvar).sum(-1)

    @torch.jit.export
    def reconstruction_log_prob(self, x: Tensor, eps: Tensor) -> Tensor:
        """log of An & Cho's (2015) reconstruction probability, log mean_l p(x|z_l).

        eps (L, B, Z) -> (B,), computed in log space: logsumexp over l, minus log L.
        """
        mean, logvar = self.encode(x)
        z = mean + torch.exp(0.5 * logvar) * eps  # (L, B, Z)
        return torch.logsumexp(self.log_px_given_z(x, z), 0) - math.log(eps.shape[0])

    @torch.jit.export
    def log_importance_weights(self, x: Tensor, eps: Tensor) -> Tensor:
        """log p(x, z_k) - log q(z_k|x) for z_k = mean + std * eps_k; eps (K, B, Z) -> (K, B)."""
        mean, logvar = self.encode(x)
        z = mean + torch.exp(0.5 * logvar) * eps
        log_pz = -0.5 * (math.log(2.0 * math.pi) + z**2).sum(-1)
        log_qz = -0.5 * (math.log(2.0 * math.pi) + logvar + eps**2).sum(-1)
        return self.log_px_given_z(x, z) + log_pz - log_qz

    @torch.jit.export
    def log_likelihood(self, x: Tensor, eps: Tensor) -> Tensor:
        """Importance-sampled log p(x), the IWAE bound (Burda et al. 2015); (K, B, Z) -> (B,)."""
        return torch.logsumexp(self.log_importance_weights(x, eps), 0) - math.log(eps.shape[0])

    @torch.jit.export
    def elbo(self, x: Tensor, eps: Tensor) -> Tensor:
        """ELBO = E_q[log p(x|z)] - KL(q || p), one reparameterised sample; eps (B, Z) -> (B,).

        Kingma & Welling (2013), eq. 10: the KL term is analytic, the reconstruction term is a
        one-sample Monte Carlo estimate with z = mean + std * eps.
        """
        log_px, kl = self.elbo_terms(x, eps)
        return log_px - kl

    def elbo_terms(self, x: Tensor, eps: Tensor) -> tuple[Tensor, Tensor]:
        """The ELBO's two terms, (B,) each: training weights the KL during warm-up."""
        mean, logvar = self.encode(x)
        z = mean + torch.exp(0.5 * logvar) * eps
        kl = 0.5 * (mean**2 + torch.exp(logvar) - 1.0 - logvar).sum(-1)
        return self.log_px_given_z(x, z.unsqueeze(0)).squeeze(0), kl

    def forward(self, x: Tensor, eps: Tensor) -> tuple[Tensor, Tensor]:
        """The ELBO's terms, so DistributedDataParallel (which wraps forward) can train it."""
        return self.elbo_terms(x, eps)
