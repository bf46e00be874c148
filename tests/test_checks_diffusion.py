"""The notebook-04 checkers (sdlearn.checks.diffusion): add_noise, the DDPM posterior, the DDIM step."""
import pytest
import torch

from sdlearn import diffusion as D
from sdlearn.checks import CheckFailed
from sdlearn.checks import diffusion as check

# -----------------------------------------------------------------------------
# checkers: right answers pass, each usual mistake gets its hint


def _broadcast_abar(s, t, x):
    return s.alphas_cumprod[t].view(-1, *[1] * (x.ndim - 1))


def add_noise_right(s, x0, noise, t):
    a = _broadcast_abar(s, t, x0)
    return a.sqrt() * x0 + (1 - a).sqrt() * noise


def test_add_noise_checker(capsys):
    check.add_noise(add_noise_right)
    check.add_noise(lambda s, x0, noise, t: s.add_noise(x0, noise, t))
    assert "add_noise: correct" in capsys.readouterr().out
    wrong = {
        "forgot the square roots": lambda s, x0, n, t: (
            _broadcast_abar(s, t, x0) * x0 + (1 - _broadcast_abar(s, t, x0)) * n),
        "noise coefficient needs a square root": lambda s, x0, n, t: (
            _broadcast_abar(s, t, x0).sqrt() * x0 + (1 - _broadcast_abar(s, t, x0)) * n),
        "swapped": lambda s, x0, n, t: (
            (1 - _broadcast_abar(s, t, x0)).sqrt() * x0 + _broadcast_abar(s, t, x0).sqrt() * n),
        "used alpha_t": lambda s, x0, n, t: (
            s.alphas[t].view(-1, *[1] * (x0.ndim - 1)).sqrt() * x0
            + (1 - s.alphas[t].view(-1, *[1] * (x0.ndim - 1))).sqrt() * n),
        r"off by one: alphas_cumprod\[t - 1\]": lambda s, x0, n, t: add_noise_right(s, x0, n, t - 1),
        r"off by one: alphas_cumprod\[t \+ 1\]": lambda s, x0, n, t: add_noise_right(s, x0, n, (t + 1).clamp_max(19)),
        r"shape \[B\]: reshape": lambda s, x0, n, t: (
            s.alphas_cumprod[t].sqrt() * x0 + (1 - s.alphas_cumprod[t]).sqrt() * n),
        "has shape": lambda s, x0, n, t: add_noise_right(s, x0, n, t)[:, None],
    }
    for hint, fn in wrong.items():
        with pytest.raises(CheckFailed, match=hint):
            check.add_noise(fn)

    # 4-D only: a reshape that ignores x0.ndim fails on 2-D points
    def four_d(s, x0, n, t):
        abar = s.alphas_cumprod[t][:, None, None, None]
        return abar.sqrt() * x0 + (1 - abar).sqrt() * n

    with pytest.raises(CheckFailed, match="has shape|broadcast"):
        check.add_noise(four_d)


def test_checker_lets_an_unsolved_exercise_raise():
    def unsolved(*args):
        raise NotImplementedError()
    for checker in (check.add_noise, check.posterior_mean_variance, check.ddim_step):
        with pytest.raises(NotImplementedError):
            checker(unsolved)


def _posterior(s, x0, x_t, t, *, table_zero=False, alpha=None, var_kind="tilde", sq=True, shift=0):
    t = t + shift
    abar = s.alphas_cumprod
    a_t = abar[t].item()
    a_p = abar[t - 1].item() if (t > 0 or table_zero) else 1.0
    al = (alpha if alpha is not None else s.alphas)[t].item()
    be = s.betas[t].item()
    r = (lambda v: v**0.5) if sq else (lambda v: v)
    mean = r(a_p) * be / (1 - a_t) * x0 + r(al) * (1 - a_p) / (1 - a_t) * x_t
    var = {"tilde": (1 - a_p) / (1 - a_t) * be, "beta": be, "std": ((1 - a_p) / (1 - a_t) * be) ** 0.5}[var_kind]
    return mean, var


def test_posterior_checker(capsys):
    check.posterior_mean_variance(_posterior)
    check.posterior_mean_variance(lambda s, x0, x_t, t: D.posterior(s, x0, x_t, t))
    check.posterior_mean_variance(lambda s, x0, x_t, t: (_posterior(s, x0, x_t, t)[0],
                                                         torch.tensor(_posterior(s, x0, x_t, t)[1])))
    assert "posterior_mean_variance: correct" in capsys.readouterr().out
    wrong = {
        "LAST entry": lambda s, x0, x_t, t: _posterior(s, x0, x_t, t, table_zero=True),
        "forgot the square roots": lambda s, x0, x_t, t: _posterior(s, x0, x_t, t, sq=False),
        r"sqrt\(alpha_t\) \(this one step": lambda s, x0, x_t, t: _posterior(s, x0, x_t, t, alpha=s.alphas_cumprod),
        "that is beta_t": lambda s, x0, x_t, t: _posterior(s, x0, x_t, t, var_kind="beta"),
        "standard deviation": lambda s, x0, x_t, t: _posterior(s, x0, x_t, t, var_kind="std"),
        r"off by one: this is the step t\+1 -> t": lambda s, x0, x_t, t: (
            _posterior(s, x0, x_t, t, shift=1) if t < 19 else _posterior(s, x0, x_t, t)),
        "tuple": lambda s, x0, x_t, t: _posterior(s, x0, x_t, t)[0],
        "swapped": lambda s, x0, x_t, t: _posterior(s, x_t, x0, t),
    }
    for hint, fn in wrong.items():
        with pytest.raises(CheckFailed, match=hint):
            check.posterior_mean_variance(fn)


def _ddim(s, eps, x_t, t, t_next, eta=0.0, noise=None, *, prev_from=None, ignore_eta=False, no_shrink=False,
          table=None, sq=True):
    table = s.alphas_cumprod if table is None else table
    a_t = table[t].item()
    tp = t_next if prev_from is None else prev_from(t, t_next)
    a_p = table[tp].item() if tp >= 0 else 1.0
    x0 = (x_t - (1 - a_t) ** 0.5 * eps) / a_t**0.5
    eta = 0.0 if ignore_eta else eta
    sigma = eta * max((1 - a_p) / (1 - a_t) * (1 - a_t / a_p), 0.0) ** 0.5
    r = (lambda v: v**0.5) if sq else (lambda v: v)
    out = r(a_p) * x0 + r(max(1 - a_p - (0 if no_shrink else sigma**2), 0)) * eps
    return out + sigma * noise if eta > 0 else out


def test_ddim_checker(capsys):
    check.ddim_step(_ddim)
    check.ddim_step(lambda s, eps, x_t, t, t_next, eta=0.0, noise=None: D.ddim_step(s, eps, x_t, t, t_next, eta=eta,
                                                                                     noise=noise))
    assert "ddim_step: correct" in capsys.readouterr().out
    wrong = {
        "LAST entry": lambda *a: _ddim(*a, prev_from=lambda t, tp: tp if tp >= 0 else len(a[0]) - 1),
        "goes to t_next, not t - 1": lambda *a: _ddim(*a, prev_from=lambda t, tp: t - 1),
        "eta was ignored": lambda *a: _ddim(*a, ignore_eta=True),
        r"subtract sigma\^2": lambda *a: _ddim(*a, no_shrink=True),
        "used alpha": lambda *a: _ddim(*a, table=a[0].alphas),
        "forgot the square roots": lambda *a: _ddim(*a, sq=False),
    }
    for hint, fn in wrong.items():
        with pytest.raises(CheckFailed, match=hint):
            check.ddim_step(fn)


def test_a_mistake_outside_the_usual_ones_names_the_first_wrong_element():
    # a sign flipped on the noise: no known mistake gives it, so the message must say where it goes wrong
    with pytest.raises(CheckFailed, match=r"x_t differs .* first wrong element at index \(0, 0, 0, 0\): expected "
                                          r".*matches none of the usual mistakes"):
        check.add_noise(lambda s, x0, n, t: add_noise_right(s, x0, -n, t))
    with pytest.raises(CheckFailed, match=r"the mean differs .* first wrong element at index \(\d+, \d+, \d+, \d+\)"):
        check.posterior_mean_variance(lambda s, x0, x_t, t: (-_posterior(s, x0, x_t, t)[0],
                                                             _posterior(s, x0, x_t, t)[1]))
    with pytest.raises(CheckFailed, match=r"x_next differs .* first wrong element at index .*none of the usual"):
        check.ddim_step(lambda *a: 0.5 * _ddim(*a))


def test_a_shape_error_gets_a_hint_in_the_learners_terms():
    # the posterior's coefficients indexed per sample, as if t were [B]: a broadcasting crash
    def per_sample(s, x0, x_t, t):
        c = s.alphas_cumprod[torch.full((len(x0),), t)]  # [B] against [B, C, H, W]
        return c * x0 + x_t, 0.0

    with pytest.raises(CheckFailed, match=r"raised RuntimeError .* t, t_next are plain ints, so every coefficient"):
        check.posterior_mean_variance(per_sample)
    with pytest.raises(CheckFailed, match=r"raised RuntimeError .* plain ints"):
        check.ddim_step(lambda s, eps, x_t, t, t_next, eta=0.0, noise=None: (
            s.alphas_cumprod[torch.full((len(x_t),), t)] * x_t))
