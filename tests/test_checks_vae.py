"""The notebook-03 checkers (sdlearn.checks.vae): reparameterize, the KL, the VAE loss."""
import pytest
import torch

from sdlearn.checks import CheckFailed
from sdlearn.checks import vae as check
from sdlearn.vae import kl_divergence, vae_loss

# -----------------------------------------------------------------------------
# the checkers: right answers pass, each typical mistake gets its hint


def _rep_ok(mean, logvar, noise):
    return mean + torch.exp(0.5 * logvar) * noise


@pytest.mark.parametrize("wrong, hint", [
    (lambda m, lv, n: m + torch.exp(lv) * n, r"exp\(logvar\), the variance, as the standard deviation"),
    (lambda m, lv, n: m + lv * n, "logvar is the log of the variance"),
    (lambda m, lv, n: m + torch.exp(-0.5 * lv) * n, r"exp\(\+0.5 \* logvar\), not exp\(-0.5"),
    (lambda m, lv, n: torch.exp(0.5 * lv) * n, "forgot to add the mean"),
    (lambda m, lv, n: m + torch.exp(0.5 * lv) * torch.randn_like(n), "use the `noise` argument"),
    (lambda m, lv, n: (m + torch.exp(0.5 * lv) * n).detach(), "carries no gradient"),
    (lambda m, lv, n: m[0] + torch.exp(0.5 * lv) * n, "z should be mean"),
    (lambda m, lv, n: (m + torch.exp(0.5 * lv) * n).mean(0), r"has shape \(4, 2, 2\), expected \(3, 4, 2, 2\)"),
    (lambda m, lv, n: (m + torch.exp(0.5 * lv) * n).tolist(), "should be a torch.Tensor, got list"),
])
def test_reparameterize_checker(wrong, hint, capsys):
    check.reparameterize(_rep_ok)
    assert "reparameterize: correct" in capsys.readouterr().out
    with pytest.raises(CheckFailed, match=hint):
        check.reparameterize(wrong)


def _kl_ok(mean, logvar):
    return 0.5 * (mean**2 + logvar.exp() - 1 - logvar).sum(dim=(1, 2, 3))


@pytest.mark.parametrize("wrong, hint", [
    (lambda m, lv: (m**2 + lv.exp() - 1 - lv).sum(dim=(1, 2, 3)), "missing the factor 1/2"),
    (lambda m, lv: -0.5 * (m**2 + lv.exp() - 1 - lv).sum(dim=(1, 2, 3)), "sign is flipped"),
    (lambda m, lv: 0.5 * (1 + lv - m**2 - lv.exp()).sum(dim=(1, 2, 3)), "sign is flipped"),
    (lambda m, lv: 0.5 * (m**2 + lv.exp() - 1 - lv).mean(dim=(1, 2, 3)), "averaged over the latent elements"),
    (lambda m, lv: 0.5 * (m**2 + (0.5 * lv).exp() - 1 - lv).sum(dim=(1, 2, 3)), "std and variance confused"),
    (lambda m, lv: 0.5 * (m**2 + lv.exp() - lv).sum(dim=(1, 2, 3)), "forgot the -1"),
    (lambda m, lv: 0.5 * (m**2 + lv.exp() - 1 + lv).sum(dim=(1, 2, 3)), "log-variance term should be subtracted"),
    (lambda m, lv: 0.5 * (m + lv.exp() - 1 - lv).sum(dim=(1, 2, 3)), "mean enters squared"),
    (lambda m, lv: 0.5 * (m**2 + lv.exp() - 1 - lv).sum(), r"shape \(\); return one KL per sample"),
    (lambda m, lv: 0.5 * (m**2 + lv.exp() - 1 - lv).sum(dim=(1, 2, 3)).mean(), r"got shape \(\)"),
    (lambda m, lv: 0.5 * (m**2 + lv.exp() - 1 - lv), "sum over every axis except the batch"),
    (lambda m, lv: 0.5 * (m**2 + lv.exp() - 1 - lv).sum(dim=(1, 2, 3)) + 1, "KL should be 0.5"),
])
def test_kl_checker(wrong, hint, capsys):
    check.kl_divergence(_kl_ok)
    check.kl_divergence(kl_divergence)
    assert "kl_divergence: correct" in capsys.readouterr().out
    with pytest.raises(CheckFailed, match=hint):
        check.kl_divergence(wrong)


def _loss_ok(x, x_rec, mean, logvar, kl_weight):
    rec = ((x_rec - x) ** 2).sum(dim=(1, 2, 3)).mean()
    return rec + kl_weight * _kl_ok(mean, logvar).mean()


def _sq(x, xr):
    return (xr - x) ** 2


@pytest.mark.parametrize("wrong, hint", [
    (lambda x, xr, m, lv, w: _sq(x, xr).mean() + w * _kl_ok(m, lv).mean(), "averaged over pixels"),
    (lambda x, xr, m, lv, w: torch.nn.functional.mse_loss(xr, x) + w * 0.5 * (m**2 + lv.exp() - 1 - lv).mean(),
     "both terms are averaged over every element"),
    (lambda x, xr, m, lv, w: _sq(x, xr).sum((1, 2, 3)).mean() + w * _kl_ok(m, lv).sum(), "KL is summed over the batch"),
    (lambda x, xr, m, lv, w: _sq(x, xr).sum() + w * _kl_ok(m, lv).sum(), "you summed over the batch"),
    (lambda x, xr, m, lv, w: w * _sq(x, xr).sum((1, 2, 3)).mean() + _kl_ok(m, lv).mean(), "kl_weight multiplies"),
    (lambda x, xr, m, lv, w: _sq(x, xr).sum((1, 2, 3)).mean() - w * _kl_ok(m, lv).mean(), "wrong sign"),
    (lambda x, xr, m, lv, w: _sq(x, xr).sum((1, 2, 3)).mean() + w * 2 * _kl_ok(m, lv).mean(), "missing its factor"),
    (lambda x, xr, m, lv, w: _sq(x, xr).sum((1, 2, 3)).mean()
     + w * 0.5 * (m**2 + (0.5 * lv).exp() - 1 - lv).sum((1, 2, 3)).mean(), "std and variance confused"),
    (lambda x, xr, m, lv, w: (xr - x).abs().sum((1, 2, 3)).mean() + w * _kl_ok(m, lv).mean(), r"squared error \(L2\)"),
    (lambda x, xr, m, lv, w: _sq(x, xr).sum((1, 2, 3)).mean(), "KL term is missing"),
    (lambda x, xr, m, lv, w: w * _kl_ok(m, lv).mean(), "reconstruction term is missing"),
    (lambda x, xr, m, lv, w: _sq(x, xr).sum((1, 2, 3)) + w * _kl_ok(m, lv), "should be a single number"),
    (lambda x, xr, m, lv, w: _loss_ok(x, xr, m, lv, w) * 1.1, "expected .*, got"),
])
def test_vae_loss_checker(wrong, hint, capsys):
    check.vae_loss(_loss_ok)
    check.vae_loss(vae_loss)
    assert "vae_loss: correct" in capsys.readouterr().out
    with pytest.raises(CheckFailed, match=hint):
        check.vae_loss(wrong)
