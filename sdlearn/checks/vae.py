"""Checkers for 03_vae: the reparameterisation trick, the KL term and the VAE loss.

Each runs the learner's function on small random inputs, compares it with sdlearn.vae's reference, and on a
mismatch tries the usual mistakes (std and log-variance confused, KL sign or 1/2 missing, sum vs mean) to
say which one was made.
"""
from __future__ import annotations

import torch

from sdlearn import vae as ref
from sdlearn.checks import call, diagnose, expect_tensor, fail, is_close, passed

B, C, H, W = 3, 4, 2, 2  # batch 3 and 16 latent elements per sample: sum vs mean differ by 3 or 16


def _inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    mean = torch.randn(B, C, H, W, generator=g, dtype=torch.float64)
    logvar = torch.rand(B, C, H, W, generator=g, dtype=torch.float64) * 3 - 2  # in [-2, 1]: std != var != 1
    noise = torch.randn(B, C, H, W, generator=g, dtype=torch.float64)
    return mean, logvar, noise


def _kl_terms(mean, logvar, var=None):
    var = logvar.exp() if var is None else var
    return mean.pow(2) + var - 1 - logvar  # [B,C,H,W], twice the KL per element


def reparameterize(fn) -> None:
    """fn(mean, logvar, noise) -> z = mean + exp(logvar / 2) * noise, differentiable in mean and logvar."""
    name = "reparameterize"
    mean, logvar, noise = _inputs(0)
    on = f"mean, logvar, noise [{B}, {C}, {H}, {W}]"
    got = expect_tensor(name, call(name, fn, mean, logvar, noise, on=on), (B, C, H, W), "z")
    expected = ref.reparameterize(mean, logvar, noise)
    if not is_close(got, expected):
        again = call(name, fn, mean, logvar, noise, on=on)
        if isinstance(again, torch.Tensor) and not is_close(got, again):
            fail(name, "two calls with the same inputs gave different z: don't draw noise yourself "
                       "(torch.randn...), use the `noise` argument")
    diagnose(name, got, expected, [
        ("you used exp(logvar), the variance, as the standard deviation: std = exp(0.5 * logvar)",
         mean + logvar.exp() * noise),
        ("logvar is the log of the variance, not the standard deviation: std = exp(0.5 * logvar)",
         mean + logvar * noise),
        ("std is exp(+0.5 * logvar), not exp(-0.5 * logvar)", mean + torch.exp(-0.5 * logvar) * noise),
        ("you forgot to add the mean: z = mean + std * noise", torch.exp(0.5 * logvar) * noise),
        ("the noise is scaled by the std, not the mean shifted: z = mean + std * noise",
         mean * noise + torch.exp(0.5 * logvar)),
    ], on=on, what="z", advice="z should be mean + exp(0.5 * logvar) * noise")
    mean_, logvar_ = mean.clone().requires_grad_(True), logvar.clone().requires_grad_(True)
    z = call(name, fn, mean_, logvar_, noise, on=f"{on} that require grad")
    if not z.requires_grad:
        fail(name, "z carries no gradient: build it from mean and logvar with torch operations "
                   "(no .detach(), .item(), numpy or torch.no_grad())")
    z.sum().backward()
    if mean_.grad is None or logvar_.grad is None or not is_close(logvar_.grad, 0.5 * torch.exp(0.5 * logvar) * noise):
        fail(name, "gradients do not reach mean and logvar as they should: the point of the trick is that "
                   "z = mean + std * noise is differentiable in both")
    passed(name)


def kl_divergence(fn) -> None:
    """fn(mean, logvar) -> KL(N(mean, exp(logvar)) || N(0, I)) per sample [B], summed over C, H, W."""
    name = "kl_divergence"
    mean, logvar, _ = _inputs(1)
    on = f"mean, logvar [{B}, {C}, {H}, {W}]"
    got = expect_tensor(name, call(name, fn, mean, logvar, on=on), what="the KL")
    if got.shape != (B,):
        hint = ("return one KL per sample, shape [B]: sum over channels, height and width, not over the batch"
                if got.ndim == 0 else
                "sum over every axis except the batch (dims 1, 2, 3): one KL per sample, shape [B]"
                if got.shape == mean.shape else f"expected shape ({B},), one KL per sample")
        fail(name, f"got shape {tuple(got.shape)}; {hint}")
    zeros = torch.zeros(2, C, H, W, dtype=torch.float64)
    zero = call(name, fn, zeros, zeros.clone(), on=f"mean = logvar = 0 [2, {C}, {H}, {W}]")
    t = _kl_terms(mean, logvar)
    diagnose(name, got, ref.kl_divergence(mean, logvar), [
        ("missing the factor 1/2: KL = 0.5 * sum(mean^2 + var - 1 - logvar)", t.flatten(1).sum(1)),
        ("the sign is flipped: KL = 0.5 * sum(mean^2 + var - 1 - logvar) is never negative",
         -0.5 * t.flatten(1).sum(1)),
        ("you averaged over the latent elements: sum them (independent dimensions' KLs add up)",
         0.5 * t.flatten(1).mean(1)),
        ("std and variance confused: the variance is exp(logvar), you used exp(0.5 * logvar)",
         0.5 * _kl_terms(mean, logvar, torch.exp(0.5 * logvar)).flatten(1).sum(1)),
        ("the log-variance term should be subtracted: ... - 1 - logvar",
         0.5 * (mean.pow(2) + logvar.exp() - 1 + logvar).flatten(1).sum(1)),
        ("you forgot the -1: the KL of N(0, 1) to itself must be 0",
         0.5 * (t + 1).flatten(1).sum(1)),
        ("the mean enters squared: mean^2, not mean", 0.5 * (t - mean.pow(2) + mean).flatten(1).sum(1)),
        ("averaged over the latent elements and missing 1/2", t.flatten(1).mean(1)),
    ], on=on, what="the KL", advice=f"KL should be 0.5 * sum over C,H,W of (mean^2 + exp(logvar) - 1 - logvar) "
                                    f"({C * H * W} elements per sample)")
    diagnose(name, zero, torch.zeros(2, dtype=torch.float64), on="mean = logvar = 0", what="the KL",
             advice="the KL of N(0, I) to N(0, I) should be 0")
    passed(name)


def vae_loss(fn) -> None:
    """fn(x, x_rec, mean, logvar, kl_weight) -> scalar: per-image summed squared error + kl_weight * per-image KL,
    both averaged over the batch."""
    name = "vae_loss"
    mean, logvar, _ = _inputs(2)
    g = torch.Generator().manual_seed(3)
    x = torch.rand(B, 3, 4, 4, generator=g, dtype=torch.float64) * 2 - 1
    x_rec = x + 0.3 * torch.randn(B, 3, 4, 4, generator=g, dtype=torch.float64)
    w = 0.1
    on = f"x, x_rec [{B}, 3, 4, 4], mean, logvar [{B}, {C}, {H}, {W}], kl_weight={w}"
    got = expect_tensor(name, call(name, fn, x, x_rec, mean, logvar, w, on=on), what="the loss")
    if got.numel() != 1 or got.ndim > 1:
        fail(name, f"the loss should be a single number (a 0-d tensor), got shape {tuple(got.shape)}: "
                   "average the per-image terms over the batch")
    got = got.reshape(())
    sq, ab = (x_rec - x).pow(2), (x_rec - x).abs()
    rec = sq.flatten(1).sum(1).mean()
    t = _kl_terms(mean, logvar)
    kl = 0.5 * t.flatten(1).sum(1)  # [B]
    diagnose(name, got, ref.vae_loss(x, x_rec, mean, logvar, w), [
        ("the reconstruction term is averaged over pixels (like F.mse_loss): sum the squared error over each "
         "image's pixels, then average over the batch, the same reduction as the KL",
         sq.mean() + w * kl.mean()),
        ("both terms are averaged over every element: sum over each image (pixels / latent elements), "
         "then average over the batch", sq.mean() + w * 0.5 * t.mean()),
        ("the KL is summed over the batch but the reconstruction averaged: average both over the batch",
         rec + w * kl.sum()),
        ("you summed over the batch: sum over each image, then average over the batch",
         sq.sum() + w * kl.sum()),
        ("kl_weight multiplies the KL, not the reconstruction", w * rec + kl.mean()),
        ("the KL is added with the wrong sign: loss = reconstruction + kl_weight * KL", rec - w * kl.mean()),
        ("the KL is missing its factor 1/2", rec + w * 2 * kl.mean()),
        ("std and variance confused in the KL: the variance is exp(logvar)",
         rec + w * 0.5 * _kl_terms(mean, logvar, torch.exp(0.5 * logvar)).flatten(1).sum(1).mean()),
        ("use the squared error (L2), not the absolute error", ab.flatten(1).sum(1).mean() + w * kl.mean()),
        ("the KL term is missing: loss = reconstruction + kl_weight * KL", rec),
        ("the reconstruction term is missing: loss = reconstruction + kl_weight * KL", w * kl.mean()),
    ], on=on, what="the loss", advice="loss = mean over the batch of (sum of squared errors per image) "
                                      "+ kl_weight * (mean over the batch of the per-image KL)")
    passed(name)
