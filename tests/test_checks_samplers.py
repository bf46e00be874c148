"""The notebook-06b checkers (sdlearn.checks.samplers): the Euler step in sigma space, the DPM-Solver++(2M) update.
Right answers pass; each plausible wrong one fails with a message naming its mistake."""
import math

import pytest

from sdlearn.checks import CheckFailed
from sdlearn.checks import samplers as check


def euler(model, x, sigma, sigma_next, t, scale=lambda s: 1 / (s**2 + 1) ** 0.5, sign=1, over=None, level=None):
    """The Euler step in sigma space, with knobs to make each usual mistake."""
    eps = model(x * scale(sigma if level is None else level), t)
    x0 = x - sigma * eps
    return x + sign * (sigma_next - sigma) * (x - x0) / (sigma if over is None else over)


def dpm(x, den, sigma, sigma_next, old=None, sigma_prev=None, order=2, k=lambda r: 1 / (2 * r), lam=math.log,
        coef=lambda h: -math.expm1(-h), guard=True):
    """The DPM-Solver++(2M) update in sigma space, with knobs to make each usual mistake."""
    if sigma_next == 0 and guard:
        return den
    h = lam(sigma) - lam(sigma_next)
    d = den
    if old is not None and order == 2:
        r = math.log(sigma_prev / sigma) / h
        d = den + k(r) * (den - old)
    return sigma_next / sigma * x + coef(h) * d


def test_right_answers_pass(capsys):
    check.euler_sigma_step(euler)
    check.dpmpp_2m_update(dpm)
    out = capsys.readouterr().out
    assert "euler_sigma_step: correct" in out and "dpmpp_2m_update: correct" in out


@pytest.mark.parametrize("hint, fn", [
    ("forgot the input scaling", lambda m, x, s, sn, t: euler(m, x, s, sn, t, scale=lambda s: 1.0)),
    ("square root is missing", lambda m, x, s, sn, t: euler(m, x, s, sn, t, scale=lambda s: 1 / (s**2 + 1))),
    ("divides by sqrt\\(sigma\\^2 \\+ 1\\), it does not multiply",
     lambda m, x, s, sn, t: euler(m, x, s, sn, t, scale=lambda s: (s**2 + 1) ** 0.5)),
    ("uses sigma_next where sigma is due", lambda m, x, s, sn, t: euler(m, x, s, sn, t, level=sn)),
    ("sign is swapped", lambda m, x, s, sn, t: euler(m, x, s, sn, t, sign=-1)),
    ("divide by sigma, the level you start from", lambda m, x, s, sn, t: euler(m, x, s, sn, t, over=sn)),
    ("not divided by sqrt\\(sigma_next\\^2 \\+ 1\\)",
     lambda m, x, s, sn, t: euler(m, x, s, sn, t) / (sn**2 + 1) ** 0.5),
    ("has shape", lambda m, x, s, sn, t: euler(m, x, s, sn, t)[None]),
])
def test_euler_checker_names_the_mistake(hint, fn):
    with pytest.raises(CheckFailed, match=hint):
        check.euler_sigma_step(fn)


@pytest.mark.parametrize("hint, fn", [
    ("first order where the second order is due", lambda *a: dpm(*a, order=1)),
    ("r is upside down", lambda *a: dpm(*a, k=lambda r: r / 2)),
    ("the factor 1/2 is missing", lambda *a: dpm(*a, k=lambda r: 1 / r)),
    ("correction has the wrong sign", lambda *a: dpm(*a, k=lambda r: -1 / (2 * r))),
    ("lambda = -log\\(sigma\\)", lambda *a: dpm(*a, lam=lambda s: -math.log(s))),
    ("x coefficient is sigma_next / sigma", lambda x, d, s, sn, o=None, sp=None: (
        dpm(x, d, s, sn, o, sp) + (s / sn - sn / s) * x if sn else d)),
    ("not h \\(that is its first-order Taylor term\\)", lambda *a: dpm(*a, coef=lambda h: h)),
    ("wrong sign: x_next = \\(sigma_next / sigma\\) x - expm1\\(-h\\) D",
     lambda *a: dpm(*a, coef=lambda h: math.expm1(-h))),
])
def test_dpm_checker_names_the_mistake(hint, fn):
    with pytest.raises(CheckFailed, match=hint):
        check.dpmpp_2m_update(fn)


def test_dpm_checker_names_the_last_step():
    def second_order_to_zero(x, den, sigma, sigma_next, old=None, sigma_prev=None):
        h = math.log(sigma / sigma_next) if sigma_next else math.inf
        d = den if old is None else den + (h / (2 * math.log(sigma_prev / sigma))) * (den - old)
        return sigma_next / sigma * x - math.expm1(-h) * d

    def math_log_of_zero(*args):  # right, but for the last step: math.log(sigma / 0) raises
        return dpm(*args, guard=False)

    for fn in (second_order_to_zero, math_log_of_zero):
        with pytest.raises(CheckFailed, match="sigma_next = 0"):
            check.dpmpp_2m_update(fn)


def test_checkers_let_an_unsolved_exercise_raise():
    def unsolved(*args):
        raise NotImplementedError()
    for checker in (check.euler_sigma_step, check.dpmpp_2m_update):
        with pytest.raises(NotImplementedError):
            checker(unsolved)
