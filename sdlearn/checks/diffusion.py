"""Checkers for 04_ddpm_noising: add_noise, the DDPM posterior, the DDIM step.

Each checker runs the learner's function on a short schedule with large betas (so that alpha_t and
abar_t, t and t - 1, differ a lot), compares it with sdlearn.diffusion, and when the answer is wrong
compares it with the usual mistakes (square root forgotten, alpha vs abar, t off by one, a [B] tensor
broadcast against the last axis, ...) to say which one it is.
"""
from __future__ import annotations

import torch

from sdlearn.checks import call, diagnose, expect_tensor, fail, passed
from sdlearn.diffusion import NoiseSchedule
from sdlearn.diffusion import ddim_step as _ddim_step
from sdlearn.diffusion import posterior as _posterior

ATOL, RTOL = 1e-4, 1e-4


def _schedule() -> NoiseSchedule:
    """20 steps, betas 0.01..0.2: every coefficient is far from its look-alikes."""
    return NoiseSchedule("linear", num_steps=20, beta_start=0.01, beta_end=0.2)


def _b(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """[B] -> [B,1,...,1] to broadcast over x."""
    return v.view(-1, *([1] * (x.ndim - 1)))


ADVICE = "compare each coefficient with the formula above"
SCALAR_T = {"size of tensor|shape|broadcast|expand": (
    "shapes do not line up: x0, x_t and eps are [B, C, H, W] and t, t_next are plain ints, so every coefficient "
    "(alphas_cumprod[t], betas[t], ...) is one number that multiplies a whole tensor: no reshape, no indexing of "
    "x0 or x_t by t")}


# -----------------------------------------------------------------------------


def add_noise(fn) -> None:
    """fn(schedule, x0 [B,...], noise [B,...], t LongTensor [B]) -> x_t = sqrt(abar_t) x0 + sqrt(1-abar_t) noise."""
    name = "add_noise"
    s = _schedule()
    g = torch.Generator().manual_seed(0)
    broadcast = ("abar_t = alphas_cumprod[t] has shape [B]: reshape it to [B,1,...,1] "
                 "(e.g. .view(-1, *[1] * (x0.ndim - 1))) so it broadcasts over every axis but the batch")
    # batch 3 differs from every other axis, then a batch equal to the last axis (a silent broadcast),
    # then 2-D points and 5-D video-like tensors: any shape must work
    for shape, t in [((3, 2, 4, 5), [0, 7, 19]), ((4, 3, 4, 4), [1, 5, 10, 18]), ((6, 2), [0, 3, 9, 12, 15, 19]),
                     ((2, 1, 2, 3, 3), [4, 11])]:
        x0, noise = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
        t = torch.tensor(t)
        on = f"x0 of shape {shape}, t={t.tolist()}"
        got = call(name, fn, s, x0.clone(), noise.clone(), t.clone(), on=on,
                   hints={"size of tensor|shape|broadcast": broadcast})
        expect_tensor(name, got, shape, "x_t")
        abar = s.alphas_cumprod
        a = _b(abar[t], x0)
        alpha = _b(s.alphas[t], x0)
        a_prev = _b(abar[t - 1], x0)  # what alphas_cumprod[t - 1] gives: at t = 0, python's last entry
        a_next = _b(abar[(t + 1).clamp_max(len(s) - 1)], x0)
        mistakes = [
            ("forgot the square roots: x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise", a * x0 + (1 - a) * noise),
            ("the noise coefficient needs a square root: sqrt(1 - abar_t)", a.sqrt() * x0 + (1 - a) * noise),
            ("the x0 coefficient needs a square root: sqrt(abar_t)", a * x0 + (1 - a).sqrt() * noise),
            ("the noise coefficient is sqrt(1 - abar_t), not 1 - sqrt(abar_t)", a.sqrt() * x0 + (1 - a.sqrt()) * noise),
            ("the coefficients are swapped: sqrt(abar_t) goes with x0, sqrt(1 - abar_t) with the noise",
             (1 - a).sqrt() * x0 + a.sqrt() * noise),
            ("used alpha_t = 1 - beta_t (one step); the closed form needs abar_t = schedule.alphas_cumprod[t]",
             alpha.sqrt() * x0 + (1 - alpha).sqrt() * noise),
            ("t is off by one: alphas_cumprod[t - 1]; timesteps are 0-based, use alphas_cumprod[t]",
             a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * noise),
            ("t is off by one: alphas_cumprod[t + 1]; timesteps are 0-based, use alphas_cumprod[t]",
             a_next.sqrt() * x0 + (1 - a_next).sqrt() * noise),
        ]
        if shape[-1] == shape[0]:  # abar [B] broadcast against the last axis: right shape, wrong numbers
            flat = abar[t]
            mistakes.insert(0, (broadcast, flat.sqrt() * x0 + (1 - flat).sqrt() * noise))
        diagnose(name, got, s.add_noise(x0, noise, t), mistakes, on=on, atol=ATOL, rtol=RTOL, what="x_t",
                 advice=ADVICE)
    passed(name)


def posterior_mean_variance(fn) -> None:
    """fn(schedule, x0, x_t, t: int) -> (mean, variance) of q(x_{t-1} | x_t, x0) (Ho et al. eq. 6-7)."""
    name = "posterior_mean_variance"
    s = _schedule()
    g = torch.Generator().manual_seed(1)
    shape = (3, 2, 4, 5)
    for t in [len(s) - 1, 10, 1, 0]:
        x0, x_t = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
        on = f"x0, x_t of shape {shape}, t={t}"
        mean, var = _mean_and_variance(name, call(name, fn, s, x0.clone(), x_t.clone(), t, on=on, hints=SCALAR_T),
                                       shape)
        exp_mean, exp_var = _posterior(s, x0, x_t, t)
        diagnose(name, mean, exp_mean, _posterior_mean_mistakes(s, t, x0, x_t), on=on, atol=ATOL, rtol=RTOL,
                 what="the mean", advice=ADVICE)
        diagnose(name, var, exp_var, _posterior_variance_mistakes(s, t, exp_var), on=f"t={t}", atol=ATOL, rtol=RTOL,
                 what="the variance")
    passed(name)


def _mean_and_variance(name: str, out, shape) -> tuple[torch.Tensor, torch.Tensor]:
    """The learner's (mean, variance), checked for their form: a tensor shaped like x_t and one number."""
    if not isinstance(out, tuple) or len(out) != 2:
        fail(name, f"should return a tuple (mean, variance), got {type(out).__name__}")
    mean, var = out
    expect_tensor(name, mean, shape, "the mean")
    if not isinstance(var, (float, int, torch.Tensor)):
        fail(name, f"the variance should be a float (or a tensor), got {type(var).__name__}")
    var = torch.as_tensor(var, dtype=torch.float64)
    if var.numel() > 1 and not (var == var.flatten()[0]).all():
        fail(name, "the variance should be one number (the same for every element): it depends only on t")
    return mean, var.flatten()[0] if var.numel() else var


def _posterior_mean_mistakes(s, t: int, x0: torch.Tensor, x_t: torch.Tensor) -> list:
    """(message, what that mistake gives) for the usual wrong posterior means at t."""
    abar, alphas = s.alphas_cumprod.double(), s.alphas.double()
    a_t, a_p = abar[t].item(), (abar[t - 1].item() if t > 0 else 1.0)
    al, be = alphas[t].item(), 1 - alphas[t].item()
    last = abar[-1].item()  # what alphas_cumprod[t - 1] gives at t = 0

    def m(a_t=a_t, a_p=a_p, al=al, be=be, sq=True):
        r = (lambda v: v**0.5) if sq else (lambda v: v)
        return r(a_p) * be / (1 - a_t) * x0 + r(al) * (1 - a_p) / (1 - a_t) * x_t

    zero_hint = ("at t = 0 there is no abar_{t-1} in the table: alphas_cumprod[t - 1] is alphas_cumprod[-1], "
                 "python's LAST entry. Use abar_{t-1} = 1 when t = 0")
    mistakes = [
        ("forgot the square roots: sqrt(abar_{t-1}) and sqrt(alpha_t)", m(sq=False)),
        ("the x_t coefficient uses sqrt(alpha_t) (this one step, schedule.alphas[t]), not sqrt(abar_t)", m(al=a_t)),
        ("the x0 coefficient uses sqrt(abar_{t-1}), not sqrt(abar_t)", m(a_p=a_t)),
        ("the coefficients are swapped: sqrt(abar_{t-1}) beta_t / (1 - abar_t) multiplies x0, "
         "sqrt(alpha_t) (1 - abar_{t-1}) / (1 - abar_t) multiplies x_t",
         (a_p**0.5 * be / (1 - a_t)) * x_t + (al**0.5 * (1 - a_p) / (1 - a_t)) * x0),
    ]
    if t == 0:
        mistakes += [(zero_hint, m(a_p=last)), (zero_hint, m(a_p=last, be=1 - a_t / last))]
    else:
        mistakes.append(("the x0 coefficient uses sqrt(abar_{t-1}) (the cumulative product), not sqrt(alpha_{t-1})",
                         m(a_p=alphas[t - 1].item(), be=be)))
        a_pp = abar[t - 2].item() if t >= 2 else 1.0
        mistakes.append(("t is off by one: this is the step t-1 -> t-2; timesteps are 0-based, "
                         "abar_t = alphas_cumprod[t] and abar_{t-1} = alphas_cumprod[t-1]",
                         m(a_t=a_p, a_p=a_pp, al=alphas[t - 1].item(), be=1 - alphas[t - 1].item())))
    if t + 1 < len(s):
        mistakes.append(("t is off by one: this is the step t+1 -> t; timesteps are 0-based, the step is "
                         "t -> t-1 with abar_t = alphas_cumprod[t]",
                         m(a_t=abar[t + 1].item(), a_p=a_t, al=alphas[t + 1].item(), be=1 - alphas[t + 1].item())))
    return mistakes


def _posterior_variance_mistakes(s, t: int, exp_var: torch.Tensor) -> list:
    """(message, what that mistake gives) for the usual wrong posterior variances at t."""
    abar, alphas = s.alphas_cumprod.double(), s.alphas.double()
    a_t, al, be, last = abar[t].item(), alphas[t].item(), 1 - alphas[t].item(), abar[-1].item()
    mistakes = [
        ("that is beta_t; the posterior variance is beta~_t = (1 - abar_{t-1}) / (1 - abar_t) beta_t", be),
        ("that is a standard deviation; return the variance (no square root)", exp_var**0.5),
        ("the posterior variance uses the cumulative abar in the ratio: (1 - abar_{t-1}) / (1 - abar_t) beta_t, "
         "not alphas", (1 - (alphas[t - 1].item() if t else 1.0)) / (1 - al) * be),
    ]
    if t == 0:
        mistakes.insert(0, ("at t = 0 the variance is 0 (abar_{t-1} = 1): alphas_cumprod[-1] is python's LAST entry",
                            (1 - last) / (1 - a_t) * be))
    return mistakes


def ddim_step(fn) -> None:
    """fn(schedule, eps, x_t, t, t_next, eta=0.0, noise=None) -> x_{t_next} (Song et al. eq. 12)."""
    name = "ddim_step"
    s = _schedule()
    g = torch.Generator().manual_seed(2)
    shape = (3, 2, 4, 5)
    abar = s.alphas_cumprod.double()
    for t, t_next, eta in [(19, 14, 0.0), (9, 4, 0.0), (4, -1, 0.0), (10, 9, 0.0), (14, 9, 0.7), (9, 4, 1.0),
                           (4, -1, 0.5)]:
        eps, x_t, noise = (torch.randn(shape, generator=g) for _ in range(3))
        where = f"t={t} -> t_next={t_next}, eta={eta}"
        got = call(name, fn, s, eps.clone(), x_t.clone(), t, t_next, eta, noise.clone() if eta > 0 else None,
                   on=f"eps, x_t of shape {shape}, {where}", hints=SCALAR_T)
        expect_tensor(name, got, shape, "x_next")
        expected = _ddim_step(s, eps, x_t, t, t_next, eta=eta, noise=noise)

        def step(a_t, a_p, eta=eta, sq=True, sq_x0=True, direction_sigma=True, x0_sqrt=True, z=noise,
                 x_t=x_t, eps=eps):
            r = (lambda v: v**0.5) if sq else (lambda v: v)
            r0 = (lambda v: v**0.5) if sq_x0 else (lambda v: v)
            x0 = (x_t - r0(1 - a_t) * eps) / (r0(a_t) if x0_sqrt else a_t)
            sigma = eta * max((1 - a_p) / (1 - a_t) * (1 - a_t / a_p), 0.0) ** 0.5
            d = max(1 - a_p - (sigma**2 if direction_sigma else 0), 0.0)
            return r(a_p) * x0 + r(d) * eps + sigma * z

        a_t, a_p = abar[t].item(), (abar[t_next].item() if t_next >= 0 else 1.0)
        mistakes = [
            ("at t_next = -1 (the last step) abar_next = 1: alphas_cumprod[-1] is python's LAST entry, not abar_{-1}",
             step(a_t, abar[-1].item())),
            ("the step goes to t_next, not t - 1: abar_next = alphas_cumprod[t_next]",
             step(a_t, abar[t - 1].item())),
            ("forgot the square roots: sqrt(abar_next) x0_hat + sqrt(1 - abar_next - sigma^2) eps",
             step(a_t, a_p, sq=False)),
            ("forgot the square roots: x0_hat = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t), "
             "x_next = sqrt(abar_next) x0_hat + sqrt(1 - abar_next - sigma^2) eps",
             step(a_t, a_p, sq=False, sq_x0=False)),
            ("x0_hat = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t): the division needs the square root",
             step(a_t, a_p, x0_sqrt=False)),
            ("used alpha (one step, schedule.alphas) where DDIM needs abar = schedule.alphas_cumprod",
             step(s.alphas[t].item(), s.alphas[t_next].item() if t_next >= 0 else 1.0)),
        ]
        if eta > 0:
            mistakes += [
                ("eta was ignored: with eta > 0 add sigma * noise, sigma = eta sqrt((1-abar_next)/(1-abar_t)) "
                 "sqrt(1 - abar_t/abar_next)", step(a_t, a_p, eta=0.0)),
                ("the direction term is sqrt(1 - abar_next - sigma^2) eps: subtract sigma^2 when adding noise",
                 step(a_t, a_p, direction_sigma=False)),
                ("sigma is multiplied by eta (eta = 1 is DDPM's posterior std, eta = 0 no noise)",
                 step(a_t, a_p, eta=1.0) if eta != 1.0 else step(a_t, a_p, eta=0.0)),
            ]
        diagnose(name, got, expected, mistakes, on=where, atol=ATOL, rtol=RTOL, what="x_next", advice=ADVICE)
    passed(name)
