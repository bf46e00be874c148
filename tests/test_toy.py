"""sdlearn.toy: the Gaussian mixture whose exact denoiser is known, and the sliced Wasserstein distance."""
import torch

from sdlearn import diffusion as D
from sdlearn.diffusion import NoiseSchedule
from sdlearn.toy import GaussianMixture, sliced_wasserstein


def _err(a, b):
    return (a.double() - b.double()).abs().max().item()


def test_mixture_eps_is_minus_sqrt_one_minus_abar_times_the_score():
    s = NoiseSchedule("linear")
    mix = GaussianMixture(torch.tensor([[1.0, 0.0], [-1.0, 0.5], [0.0, -2.0]]), std=0.3, weights=[0.5, 0.3, 0.2])
    x = torch.randn(5, 2, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0, 10, 200, 600, 999])
    abar = s.alphas_cumprod.double()[t][:, None]
    var = abar * 0.09 + 1 - abar
    comp = -((x[:, None] - abar.sqrt()[:, :, None] * mix.means[None]) ** 2).sum(-1) / (2 * var) - torch.log(var)
    logp = torch.logsumexp(comp + mix.weights.log(), -1).sum()
    (score,) = torch.autograd.grad(logp, x)
    assert _err(mix.eps(x.detach(), t, s), -(1 - abar).sqrt() * score) < 1e-9


def test_sampling_the_toy_with_the_exact_denoiser_recovers_it():
    s, mix = NoiseSchedule("linear"), GaussianMixture.ring(8, 2.0, 0.1)
    g = torch.Generator().manual_seed(8)
    target, _ = mix.sample(1000, g)
    floor = sliced_wasserstein(target, mix.sample(1000, g)[0])
    for sampler, steps in [("ddim", 50), ("ddpm", 1000)]:
        x = D.sample(mix.model(s), torch.randn(1000, 2, generator=g), s, steps, sampler=sampler, generator=g,
                     progress=False)
        assert sliced_wasserstein(x, target) < 3 * floor + 0.02, sampler
    far = sliced_wasserstein(torch.randn(1000, 2, generator=g), target)
    assert far > 4 * floor
