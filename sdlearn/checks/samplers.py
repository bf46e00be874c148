"""Checkers for 06b_samplers: the Euler step in sigma space and the DPM-Solver++(2M) update.

Both exercises work in sigma space (Karras et al. 2022): x = x0 + sigma * eps, the model reading
x / sqrt(sigma^2 + 1) (the VP sample it was trained on). Each checker runs the learner's function on levels far
apart, compares it with sdlearn.diffusion's euler_step / dpmpp_2m_step (which keep the loop's x in VP terms and
convert inside), and when it is wrong names the usual mistake: the input scaling forgotten, a swapped sign,
sigma_next where sigma is due, a first-order step where the second order is due, the ratio r upside down, ...
"""
from __future__ import annotations

import math

import torch

from sdlearn.checks import call, diagnose, expect_tensor, fail, passed
from sdlearn.diffusion import Level, NoiseSchedule, dpmpp_2m_step, euler_step

ATOL, RTOL = 1e-4, 1e-4
SHAPE = (3, 2, 4, 5)


def _schedule() -> NoiseSchedule:
    """Any NoiseSchedule: at a Level(t, sigma) the steps read sigma itself, so only the levels below matter."""
    return NoiseSchedule("scaled_linear", final="zero")


def _point(sigma: float):
    """The trajectory point of noise level sigma: a Level, or -1 (the end of the trajectory) at sigma 0."""
    return Level(0.0, sigma) if sigma > 0 else -1


def _c(sigma: float) -> float:
    """sqrt(sigma^2 + 1): x_sigma = c * x_t, the VP sample the model reads is x_sigma / c."""
    return (sigma**2 + 1) ** 0.5


def eps_model(x_in: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A stand-in noise predictor, nonlinear in its input so that a wrong input scaling shows: eps_hat(x_in, t)."""
    return torch.tanh(1.5 * x_in) + 0.3 * x_in * torch.cos(x_in) + 1e-4 * t.float().view(-1, *[1] * (x_in.ndim - 1))


# -----------------------------------------------------------------------------
# exercise 1: the Euler step in sigma space


def euler_sigma_step(fn) -> None:
    """fn(model, x, sigma, sigma_next, t) -> x at sigma_next, one Euler step of dx/dsigma = (x - x0_hat) / sigma."""
    name = "euler_sigma_step"
    s = _schedule()
    g = torch.Generator().manual_seed(3)
    for sigma, sigma_next in [(14.6, 6.0), (2.5, 0.9), (0.8, 0.2), (0.5, 0.0)]:
        x = torch.randn(SHAPE, generator=g) * _c(sigma)
        t = torch.full((SHAPE[0],), 500.0)
        where = f"sigma={sigma} -> sigma_next={sigma_next}"
        got = call(name, fn, eps_model, x.clone(), sigma, sigma_next, t.clone(), on=f"x of shape {SHAPE}, {where}")
        expect_tensor(name, got, SHAPE, "x_next")
        if not torch.isfinite(got).all():
            fail(name, f"x_next has inf or nan values at {where}: divide by sigma, the level you start from "
                       "(sigma > 0), never by sigma_next (0 at the last step)")
        expected = euler_step(s, eps_model(x / _c(sigma), t), x / _c(sigma), _point(sigma), _point(sigma_next))
        expected = expected * _c(sigma_next)  # the VP sample sdlearn's loop keeps, back in sigma space
        diagnose(name, got, expected, _euler_mistakes(x, sigma, sigma_next, t), on=where, atol=ATOL, rtol=RTOL,
                 what="x_next", advice="x_next = x + (sigma_next - sigma) * d, d = (x - x0_hat) / sigma, x0_hat = "
                                       "x - sigma * model(x / sqrt(sigma^2 + 1), t)")
    passed(name)


def _euler_mistakes(x: torch.Tensor, sigma: float, sigma_next: float, t: torch.Tensor):
    """(message, what that mistake gives) for the usual wrong Euler steps, computed when needed."""

    def step(x_in, dt=sigma_next - sigma, over=sigma, x0_from=None):
        eps = eps_model(x_in, t)
        x0 = (x if x0_from is None else x0_from) - sigma * eps
        return x + dt * (x - x0) / over

    c, c_next = _c(sigma), _c(sigma_next)
    yield ("forgot the input scaling: the model was trained on x_t = x / sqrt(sigma^2 + 1), call "
           "model(x / sqrt(sigma^2 + 1), t), not model(x, t)", step(x))
    yield ("the input scaling divides by sqrt(sigma^2 + 1), it does not multiply", step(x * c))
    yield "the input scaling is 1 / sqrt(sigma^2 + 1): the square root is missing", step(x / c**2)
    yield ("the input scaling uses sigma_next where sigma is due: the model reads x at the level it is at, "
           "x / sqrt(sigma^2 + 1)", step(x / c_next))
    yield ("the sign is swapped: the step is (sigma_next - sigma) * d, negative, since sigma decreases",
           step(x / c, dt=sigma - sigma_next))
    yield ("x0_hat = x - sigma * eps_hat takes x in sigma space, not the scaled input x / sqrt(sigma^2 + 1)",
           step(x / c, x0_from=x / c))
    yield ("returned the model's input scale: the exercise's x lives in sigma space (x = x0 + sigma eps), so return "
           "x + (sigma_next - sigma) d itself, not divided by sqrt(sigma_next^2 + 1)", step(x / c) / c_next)
    if sigma_next > 0:
        yield ("d = (x - x0_hat) / sigma: divide by sigma, the level you start from, not sigma_next",
               step(x / c, over=sigma_next))


# -----------------------------------------------------------------------------
# exercise 2: the DPM-Solver++(2M) update

LAST_STEP = ("at sigma_next = 0, h = log(sigma / sigma_next) is infinite: take the first-order step there, which "
             "lands on `denoised` itself (x_next = denoised)")


def dpmpp_2m_update(fn) -> None:
    """fn(x, denoised, sigma, sigma_next, old_denoised=None, sigma_prev=None) -> x at sigma_next (Lu et al. 2022
    alg. 2 in sigma space, k-diffusion's sample_dpmpp_2m)."""
    name = "dpmpp_2m_update"
    g = torch.Generator().manual_seed(4)
    for sigma_prev, sigma, sigma_next in [(None, 14.6, 4.0), (14.6, 4.0, 1.2), (3.0, 1.2, 0.6), (1.0, 0.3, 0.05),
                                          (None, 0.3, 0.0), (0.6, 0.3, 0.0)]:
        x, denoised, old = (torch.randn(SHAPE, generator=g) for _ in range(3))
        x = denoised + sigma * x
        old = None if sigma_prev is None else old
        where = (f"sigma={sigma} -> sigma_next={sigma_next}, " +
                 ("the first step (old_denoised=None)" if old is None else f"after sigma_prev={sigma_prev}"))
        got = call(name, fn, x.clone(), denoised.clone(), sigma, sigma_next, None if old is None else old.clone(),
                   sigma_prev, on=f"x of shape {SHAPE}, {where}", hints={"": LAST_STEP} if sigma_next == 0 else None)
        expect_tensor(name, got, SHAPE, "x_next")
        if not torch.isfinite(got).all():
            fail(name, f"x_next has inf or nan values at {where}: " + LAST_STEP)
        expected = _dpm_reference(x, denoised, sigma, sigma_next, old, sigma_prev)
        diagnose(name, got, expected, _dpm_mistakes(x, denoised, sigma, sigma_next, old, sigma_prev), on=where,
                 atol=ATOL, rtol=RTOL, what="x_next",
                 advice="h = log(sigma / sigma_next), r = log(sigma_prev / sigma) / h, D = (1 + 1/(2r)) denoised - "
                        "1/(2r) old_denoised, x_next = (sigma_next / sigma) x - expm1(-h) D")
    passed(name)


def _dpm_reference(x, denoised, sigma, sigma_next, old, sigma_prev) -> torch.Tensor:
    """sdlearn.diffusion.dpmpp_2m_step on the VP sample x / sqrt(sigma^2 + 1), its history in `state` from a first
    step sigma_prev -> sigma, and the result back in sigma space."""
    s = _schedule()
    state = {"steps": 100}  # a long run: no lower-order final step but at sigma 0
    if old is not None:
        dpmpp_2m_step(s, old, x / _c(sigma_prev), _point(sigma_prev), _point(sigma), prediction="x0", state=state)
    out = dpmpp_2m_step(s, denoised, x / _c(sigma), _point(sigma), _point(sigma_next), prediction="x0", state=state)
    return out * _c(sigma_next)


def _dpm_mistakes(x, denoised, sigma, sigma_next, old, sigma_prev):
    """(message, what that mistake gives) for the usual wrong DPM-Solver++(2M) updates, computed when needed."""
    if sigma_next == 0:  # h is infinite: x_next = 0 * x - expm1(-inf) D = D
        yield ("the data term has the wrong sign: at sigma_next = 0 the step lands on denoised, x_next = "
               "(sigma_next / sigma) x - expm1(-h) D with -expm1(-inf) = 1", -denoised)
        yield "at sigma_next = 0 the step lands on the data prediction: return denoised, not x", x
        return
    h = math.log(sigma / sigma_next)

    def update(d, ratio=sigma_next / sigma, coef=None):
        return ratio * x + (-math.expm1(-h) if coef is None else coef) * d

    yield ("the data term has the wrong sign: x_next = (sigma_next / sigma) x - expm1(-h) D, and -expm1(-h) = "
           "1 - e^-h > 0", update(denoised, coef=math.expm1(-h)))
    yield ("the x coefficient is sigma_next / sigma (it shrinks x), not sigma / sigma_next",
           update(denoised, ratio=sigma / sigma_next))
    yield ("h = lambda_next - lambda with lambda = -log(sigma): h = log(sigma / sigma_next) > 0, not "
           "log(sigma_next / sigma)", update(denoised, coef=-math.expm1(h)))
    yield "the data coefficient is -expm1(-h) = 1 - e^-h, not h (that is its first-order Taylor term)", \
        update(denoised, coef=h)
    if old is None:
        return
    h_last = math.log(sigma_prev / sigma)
    r = h_last / h

    def second(k):  # D = denoised + k (denoised - old)
        return update(denoised + k * (denoised - old))

    yield ("first order where the second order is due: with old_denoised given, use D = (1 + 1/(2r)) denoised - "
           "1/(2r) old_denoised, not denoised alone", update(denoised))
    yield "r is upside down: r = h_last / h with h_last = log(sigma_prev / sigma), not h / h_last", second(r / 2)
    yield "the correction is 1/(2r) (denoised - old_denoised), not 1/r: the factor 1/2 is missing", second(1 / r)
    yield ("the correction has the wrong sign: D = denoised + 1/(2r) (denoised - old_denoised), extrapolating away "
           "from old_denoised", second(-1 / (2 * r)))
    yield ("h_last is the previous step's h, log(sigma_prev / sigma): used this step's h, so r = 1", second(0.5))
    yield ("the multistep weights are swapped: D = (1 + 1/(2r)) denoised - 1/(2r) old_denoised, the newer "
           "prediction weighted more", update(old + (old - denoised) / (2 * r)))
