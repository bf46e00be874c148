"""A toy whose exact denoiser is known: a mixture of isotropic Gaussians in a few dimensions, and a distance
between point clouds to score samplers on it (notebook 04; notebook 08 reuses both for rectified flow).

    mix = GaussianMixture.ring(8, radius=2.0, std=0.1)        # eight blobs on a circle
    x0, component = mix.sample(2000)                           # [2000, 2] points and which blob each came from
    model = mix.model(schedule)                                # model(x_t, t) -> the exact eps*(x_t, t)
    x = sample(model, torch.randn(2000, 2), schedule, 50)      # sdlearn.diffusion's loop, no training
    sliced_wasserstein(x, x0)                                  # how far the samples are from the data

Noised by the forward process a Gaussian mixture stays a mixture, so the ideal noise prediction, which a
perfectly trained network would output, is a formula: sampling errors on the toy are the sampler's alone.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch

from sdlearn.diffusion import NoiseSchedule


class GaussianMixture:
    """p(x0) = sum_k w_k N(mu_k, std^2 I): noised by the forward process it stays a mixture,
    sum_k w_k N(sqrt(abar) mu_k, (abar std^2 + 1 - abar) I), so the ideal noise prediction is exact:
    eps*(x_t, t) = E[eps | x_t] = -sqrt(1 - abar_t) * score(x_t) (Tweedie's formula).
    """

    def __init__(self, means: torch.Tensor, std: float, weights: torch.Tensor | None = None):
        self.means = torch.as_tensor(means, dtype=torch.float64)  # [K,D]
        if self.means.ndim != 2:
            raise ValueError(f"means must be [K,D], got shape {tuple(self.means.shape)}")
        K = self.means.shape[0]
        w = torch.full((K,), 1.0 / K, dtype=torch.float64) if weights is None else torch.as_tensor(weights).double()
        if w.shape != (K,) or (w < 0).any():
            raise ValueError(f"weights must be [K={K}] and non-negative, got {tuple(w.shape)}")
        self.weights, self.std = w / w.sum(), float(std)

    @classmethod
    def ring(cls, k: int = 8, radius: float = 2.0, std: float = 0.1) -> GaussianMixture:
        angle = torch.arange(k, dtype=torch.float64) * 2 * math.pi / k
        return cls(torch.stack([angle.cos(), angle.sin()], 1) * radius, std)

    def sample(self, n: int, generator: torch.Generator | None = None, weights: torch.Tensor | None = None):
        """n samples x0 [n,D] (float32) and their components [n]."""
        w = self.weights if weights is None else torch.as_tensor(weights).double()
        k = torch.multinomial(w, n, replacement=True, generator=generator)  # [n]
        x = self.means[k] + self.std * torch.randn(n, self.means.shape[1], generator=generator, dtype=torch.float64)
        return x.float(), k

    def eps(self, x_t: torch.Tensor, t: torch.Tensor, schedule: NoiseSchedule,
            weights: torch.Tensor | None = None) -> torch.Tensor:
        """The exact eps*(x_t, t) [B,D]; weights [K] or [B,K] (a per-sample condition) replace the mixture's."""
        abar = _abar(schedule, t, x_t)  # [B,1]
        x = x_t.double()  # [B,D]
        var = abar * self.std**2 + 1 - abar  # [B,1], variance of each noised component
        mu = abar.sqrt()[:, :, None] * self.means.to(x.device)[None]  # [B,K,D], the noised means
        w = self.weights if weights is None else torch.as_tensor(weights).double().to(x.device)
        logits = w.clamp_min(1e-300).log() - ((x[:, None] - mu) ** 2).sum(-1) / (2 * var)  # [B,K]
        r = logits.softmax(-1)  # [B,K], responsibilities
        score = -(x - (r[:, :, None] * mu).sum(1)) / var  # [B,D]
        return (-(1 - abar).sqrt() * score).to(x_t.dtype)

    def model(self, schedule: NoiseSchedule) -> Callable:
        """model(x, t) -> eps*, the perfect noise predictor, in the signature `sample` expects."""
        return lambda x, t: self.eps(x, t, schedule)


def _abar(schedule: NoiseSchedule, t: torch.Tensor, x_t: torch.Tensor) -> torch.Tensor:
    """abar at timesteps t [B] -> [B,1] float64. A fractional t (a Karras sigma's timestep, notebook 06b) reads sigma
    linear in log sigma between the training timesteps, the inverse of diffusers' _sigma_to_t, so abar = 1 / (1 +
    sigma^2) is the level the sampler is at."""
    if not (isinstance(t, torch.Tensor) and t.dtype.is_floating_point):
        return schedule.gather(schedule.alphas_cumprod, t, x_t).double()
    log_sigma = schedule.sigmas.double().log()  # [T]
    low = t.detach().cpu().double().floor().clamp(0, len(log_sigma) - 2).long()  # [B]
    w = (t.detach().cpu().double() - low).clamp(0, 1)
    sigma = ((1 - w) * log_sigma[low] + w * log_sigma[low + 1]).exp()
    return (1 / (1 + sigma**2)).view(-1, 1).to(x_t.device)


def sliced_wasserstein(a: torch.Tensor, b: torch.Tensor, projections: int = 256, seed: int = 0) -> float:
    """Sliced Wasserstein-1 distance between point clouds a [N,D] and b [M,D]: the W1 distance of their
    1-D projections onto random directions, averaged (quantiles at 100 levels when N != M)."""
    g = torch.Generator().manual_seed(seed)
    d = torch.randn(a.shape[1], projections, generator=g, dtype=torch.float64)
    d = d / d.norm(dim=0)  # [D,P] unit directions
    q = torch.linspace(0.005, 0.995, 100, dtype=torch.float64)
    pa = torch.quantile(a.double() @ d, q, dim=0)  # [100,P]
    pb = torch.quantile(b.double() @ d, q, dim=0)
    return (pa - pb).abs().mean().item()


