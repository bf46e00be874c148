"""sdlearn.flow: SD3's rectified-flow schedule (parity with diffusers' FlowMatchEulerDiscreteScheduler), the
trajectory cut, the pipeline, the training loss and its sign, the training-time densities, the exact toy
velocity and what Euler on it does against DDIM, and bad input."""
import math
import warnings

import pytest
import torch

from sdlearn.checks.pipeline import tiny_pipeline
from sdlearn.diffusion import NoiseSchedule, ddim_step, sample
from sdlearn.flow import (
    FlowSchedule,
    euler_step,
    mixture_velocity,
    sample_t,
    shift_sigmas,
    training_loss,
    velocity_model,
)
from sdlearn.pipeline import TextToImage
from sdlearn.toy import GaussianMixture, sliced_wasserstein

diffusers = pytest.importorskip("diffusers")
from diffusers import FlowMatchEulerDiscreteScheduler  # noqa: E402


def _err(a, b):
    return (a.double() - b.double()).abs().max().item()


def _diffusers(shift=3.0, steps=None, T=1000):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        d = FlowMatchEulerDiscreteScheduler(shift=shift, num_train_timesteps=T)
    if steps is not None:
        d.set_timesteps(steps)
    return d


def stand_in(x, t, **cond):
    """A deterministic velocity 'model' that depends on x, on t [B] (= 1000 sigma) and on the condition."""
    s = (t / 1000).view(-1, *[1] * (x.ndim - 1))
    c = cond["context"].mean((1, 2)).view(-1, *[1] * (x.ndim - 1)) if cond else 0.0
    return torch.sin(1.3 * x + 2 * s) - 0.4 * x * (1 - s) + 0.3 * c


# -----------------------------------------------------------------------------
# parity with diffusers


@pytest.mark.parametrize("shift", [1.0, 3.0, 0.5, 6.0])
@pytest.mark.parametrize("steps", [1, 2, 4, 28, 50, 1000])
def test_sigmas_and_timesteps_equal_diffusers(shift, steps):
    ours, theirs = FlowSchedule(shift), _diffusers(shift, steps)
    sig = ours.sigmas(steps)
    assert sig.shape == (steps + 1,) and sig.dtype == torch.float32
    assert _err(sig, theirs.sigmas) <= 1e-6                         # measured: bit-identical
    assert sig[0] == 1 and sig[-1] == 0 and (sig[1:] < sig[:-1]).all()
    x = torch.zeros(3, 2)
    ts = torch.stack([ours.model_timesteps(s, x) for s in sig[:-1].tolist()])  # [steps, 3]
    assert ts.dtype == torch.float32 and torch.equal(ts, theirs.timesteps[:, None].expand(-1, 3))


def test_the_double_shift_in_numbers():
    """diffusers spaces its grid between already-shifted end points and shifts again (see FlowSchedule.sigmas)."""
    s = FlowSchedule(3.0)
    assert s.sigmas(4).tolist() == pytest.approx([1.0, 0.857692, 0.602151, 0.008929, 0.0], abs=1e-6)
    assert shift_sigmas(shift_sigmas(0.001, 3.0), 3.0) == pytest.approx(s.sigmas(4)[-2].item(), abs=1e-7)
    paper = shift_sigmas(torch.linspace(1, 0, 5, dtype=torch.float64), 3.0)
    assert paper.tolist() == pytest.approx([1.0, 0.9, 0.75, 0.5, 0.0])
    assert FlowSchedule(1.0).sigmas(4).tolist() == pytest.approx([1.0, 0.667, 0.334, 0.001, 0.0], abs=1e-6)
    assert _err(FlowSchedule(3.0, 37).sigmas(7), _diffusers(3.0, 7, T=37).sigmas) <= 1e-6


def test_euler_step_and_forward_process_equal_diffusers():
    g = torch.Generator().manual_seed(0)
    x, out, x0, noise = (torch.randn(2, 4, 8, 8, generator=g) for _ in range(4))
    for shift, steps in ((3.0, 28), (1.0, 10), (2.0, 3)):
        ours, theirs = FlowSchedule(shift), _diffusers(shift, steps)
        sig = ours.sigmas(steps).tolist()
        for i in (0, 1, steps // 2, steps - 1):
            theirs._step_index = i
            ref = theirs.step(out, theirs.timesteps[i], x).prev_sample
            assert _err(euler_step(ours, out, x, sig[i], sig[i + 1]), ref) == 0
            theirs._step_index, theirs._begin_index = None, i
            ref = theirs.scale_noise(x0, theirs.timesteps[i:i + 1], noise)
            assert _err(ours.add_noise(x0, noise, torch.full((2,), sig[i])), ref) <= 1e-6
            theirs._begin_index = None


def test_the_parameterisation():
    s, g = FlowSchedule(), torch.Generator().manual_seed(1)
    x0, noise = torch.randn(5, 3, generator=g), torch.randn(5, 3, generator=g)
    t = torch.tensor([0.0, 0.2, 0.5, 0.9, 1.0])
    x_t = s.add_noise(x0, noise, t)
    assert torch.allclose(x_t[0], x0[0]) and torch.allclose(x_t[-1], noise[-1])
    v = s.target("v", x0, noise, t)
    assert torch.equal(v, noise - x0)                                # eps - x0, not x0 - eps
    assert torch.allclose(s.to_x0("v", v, x_t, t), x0, atol=1e-6)
    assert torch.allclose(s.to_eps("flow", v, x_t, t), noise, atol=1e-6)
    assert s.snr(0.5) == 1 and s.snr(torch.tensor([0.25])).item() == pytest.approx(9.0)
    assert s.init_args() == {"shift": 3.0, "num_train_timesteps": 1000} and len(s) == 1000
    assert repr(FlowSchedule(**s.init_args())) == "FlowSchedule(shift=3.0, num_train_timesteps=1000)"
    assert s.parse_prediction("flow") == "v"
    # an Euler step lands exactly on the straight line when v is the true velocity
    assert torch.allclose(euler_step(s, v, s.add_noise(x0, noise, 0.8), 0.8, 0.3), s.add_noise(x0, noise, 0.3),
                          atol=1e-6)


def test_clip_x0_clamps_the_implied_clean_sample():
    s, g = FlowSchedule(), torch.Generator().manual_seed(2)
    x, v = torch.randn(4, 6, generator=g), 3 * torch.randn(4, 6, generator=g)
    plain = euler_step(s, v, x, 0.7, 0.4)
    assert torch.allclose(euler_step(s, v, x, 0.7, 0.4, clip_x0=1e3), plain, atol=1e-5)
    clipped = euler_step(s, v, x, 0.7, 0.4, clip_x0=1.0)
    x0 = (x - 0.7 * v).clamp(-1, 1)
    assert torch.allclose(clipped, 0.6 * x0 + 0.4 * (x + 0.3 * v), atol=1e-6)
    assert torch.allclose(euler_step(s, v, x, 0.7, 0.0, clip_x0=1.0), x0, atol=1e-6)  # lands on the clamped x0


@pytest.mark.parametrize("shift, steps", [(3.0, 28), (1.0, 7), (3.0, 2)])
def test_the_sampling_loop_equals_a_diffusers_loop(shift, steps):
    g = torch.Generator().manual_seed(3)
    x, ctx, empty = torch.randn(2, 4, 6, 6, generator=g), torch.randn(2, 5, 3, generator=g), torch.zeros(1, 5, 3)
    ours = sample(stand_in, x, FlowSchedule(shift), steps, cond={"context": ctx}, uncond={"context": empty},
                  guidance_scale=2.5, prediction="v", progress=False)
    d, z = _diffusers(shift, steps), x.clone()
    for t in d.timesteps:
        tt = t.expand(2)
        u, c = stand_in(z, tt, context=empty.expand(2, -1, -1)), stand_in(z, tt, context=ctx)
        z = d.step(u + 2.5 * (c - u), t, z).prev_sample
    assert _err(ours, z) <= 1e-5                                      # measured: 0, bit-identical


@pytest.mark.parametrize("f", [0.3, 0.5, 0.8, 0.97])
def test_a_run_cut_at_f_and_continued_is_one_run(f):
    s, g = FlowSchedule(), torch.Generator().manual_seed(4)
    x = torch.randn(3, 2, 4, 4, generator=g)
    whole = s.trajectory(20)
    first, rest = s.trajectory(20, end=f), s.trajectory(20, start=f)
    assert first[:-1] + rest == whole and first[-1] == rest[0]       # one trajectory, split where the cut lands
    assert min(first[:-1]) > 1 - f >= rest[0]                        # the rule: sigma > 1 - f comes before f
    run = sample(stand_in, sample(stand_in, x, s, 20, end=f, prediction="v", progress=False), s, 20, start=f,
                 prediction="v", progress=False)
    assert torch.equal(run, sample(stand_in, x, s, 20, prediction="v", progress=False))
    assert s.trajectory(20, start=f, end=f) == [] and s.trajectory(5, end=0.0) == []
    assert s.trajectory([0.9, 0.5, 0.1], start=0.4, end=0.7) == [0.5, 0.1]  # explicit noise levels, 0 appended
    assert s.trajectory([0.9, 0.5, 0.1]) == [0.9, 0.5, 0.1, 0.0]


# -----------------------------------------------------------------------------
# the pipeline, unchanged


def test_the_flow_schedule_plugs_into_the_pipeline_unchanged():
    base = tiny_pipeline("v")
    sched = FlowSchedule(3.0)
    pipe = TextToImage(base.conditioner, base.denoiser, sched, base.vae, "v", 16)
    prompts = ["a red circle on the left", "a blue square at the top"]
    images = pipe.generate(prompts, steps=4, guidance_scale=2.0, seed=3, progress=False)
    # the same, written out by hand: Euler on diffusers' sigmas, the UNet reading 1000 sigma
    z, sig = pipe.noise(2, 3), sched.sigmas(4).tolist()
    cond, uncond = pipe.encode_prompts(prompts)["context"], pipe.encode_prompts([""])["context"].expand(2, -1, -1)
    for a, b in zip(sig[:-1], sig[1:]):
        t = torch.full((2,), a * 1000)
        out_u, out_c = pipe.denoiser(z, t, uncond), pipe.denoiser(z, t, cond)
        z = z + (b - a) * (out_u + 2.0 * (out_c - out_u))
    assert torch.allclose(images, pipe.decode(z), atol=1e-5)
    # img2img (SDEdit from the first noise level below the strength) and the hand-over
    assert sched.trajectory(10, start=0.5)[0] < 0.5
    same = pipe.img2img(images, prompts, strength=0.0, steps=10, progress=False)
    assert torch.allclose(same, pipe.decode(pipe.vae.to_latent(images, sample=False)), atol=1e-6)
    assert pipe.img2img(images, prompts, strength=0.6, steps=10, progress=False).shape == images.shape
    whole = pipe.generate(prompts, steps=10, seed=4, output="latent", progress=False)
    latents = pipe.generate(prompts, steps=10, seed=4, end=0.8, output="latent", progress=False)
    assert torch.allclose(pipe.generate(prompts, steps=10, seed=4, start=0.8, latents=latents, output="latent",
                                        progress=False), whole, atol=1e-6)
    with pytest.raises(ValueError, match=r"predicts the velocity v = eps - x0: prediction must be 'v' \(or 'flow'\)"
                                         r", got 'eps'"):
        TextToImage(base.conditioner, base.denoiser, sched, base.vae, "eps", 16)


# -----------------------------------------------------------------------------
# training


def test_training_loss_oracle_zero_and_sign_errors():
    s, g = FlowSchedule(), torch.Generator().manual_seed(5)
    x0 = torch.randn(4096, 4, 2, 2, generator=g)                      # unit variance
    ctx, empty = torch.randn(4096, 3, 8, generator=g) + 2.0, torch.zeros(1, 3, 8)
    seen = {}

    def oracle(x_t, t, context, sign=1.0):  # knows x0: the true velocity (x_t - x0) / t = eps - x0
        seen.update(t=t, context=context)
        return sign * (x_t - x0) / (t / 1000).view(-1, 1, 1, 1)

    assert training_loss(oracle, s, x0, {"context": ctx}, {"context": empty}, generator=g) < 1e-6
    t = seen["t"]
    assert t.dtype == torch.float32 and t.shape == (4096,) and 0 < t.min() and t.max() < 1000
    assert abs(t.median().item() - 500) < 25                          # logit-normal(0, 1): median t = 1/2
    dropped = (seen["context"] == 0).flatten(1).all(1).float().mean()
    assert 0.07 < dropped < 0.13                                      # p_uncond = 0.1
    zero = training_loss(lambda x, t, context: torch.zeros_like(x), s, x0, {"context": ctx}, {"context": empty})
    assert zero.item() == pytest.approx(2.0, abs=0.1)                 # E|eps - x0|^2 = 1 + 1
    flipped = training_loss(lambda x, t, context: oracle(x, t, context, -1.0), s, x0, {"context": ctx},
                            {"context": empty})
    assert flipped.item() == pytest.approx(8.0, rel=0.05)             # x0 - eps: four times the zero predictor's

    def unconditional(x_t, t):
        return (x_t - x0) / (t / 1000).view(-1, 1, 1, 1)

    for density in ("uniform", "mode"):
        assert training_loss(unconditional, s, x0, {}, None, density=density, generator=g) < 1e-6


# -----------------------------------------------------------------------------
# the training-time densities


def _quantiles(t, q):
    return torch.quantile(t.double(), q)


def test_logit_normal_and_uniform_densities():
    q = torch.tensor([0.01, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99], dtype=torch.float64)
    z = torch.distributions.Normal(0.0, 1.0).icdf(q)
    for m, sd in ((0.0, 1.0), (0.5, 0.6), (-1.0, 2.0)):
        t = sample_t(200_000, "logit_normal", m, sd, generator=torch.Generator().manual_seed(6))
        assert 0 < t.min() and t.max() < 1
        assert torch.allclose(_quantiles(t, q), torch.sigmoid(m + sd * z), atol=0.006)
    t = sample_t(200_000, "uniform", generator=torch.Generator().manual_seed(7))
    assert torch.allclose(_quantiles(t, q), q, atol=0.006)


@pytest.mark.parametrize("scale", [1.29, 0.0, -0.8, 1.75])
def test_mode_density(scale):
    """SD3 eq. 19: t = f(u), u uniform, f decreasing from 1 to 0, so t's q-quantile is f(1 - q); its mean is 1/2."""
    def f(u):
        return 1 - u - scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)

    t = sample_t(200_000, "mode", mode_scale=scale, generator=torch.Generator().manual_seed(8))
    q = torch.tensor([0.01, 0.1, 0.3, 0.5, 0.7, 0.9, 0.99], dtype=torch.float64)
    assert torch.allclose(_quantiles(t, q), f(1 - q), atol=0.006)
    assert t.min() >= 0 and t.max() <= 1 and t.double().mean().item() == pytest.approx(0.5, abs=0.003)
    if scale == 1.29:  # more mass in the middle than uniform: P(|t - 1/2| < 1/4) = 1 - 2 u(3/4)
        assert ((t - 0.5).abs() < 0.25).float().mean() > 0.6


def test_densities_draw_as_diffusers():
    from diffusers.training_utils import compute_density_for_timestep_sampling as theirs

    for density, kw in (("logit_normal", {"m": 0.3, "s": 0.8}), ("mode", {"mode_scale": 1.29}), ("uniform", {})):
        ours = sample_t(64, density, generator=torch.Generator().manual_seed(9), **kw)
        ref = theirs(density if density != "uniform" else "none", 64, logit_mean=kw.get("m"), logit_std=kw.get("s"),
                     mode_scale=kw.get("mode_scale"), generator=torch.Generator().manual_seed(9))
        assert torch.equal(ours, ref)


# -----------------------------------------------------------------------------
# the toy: the exact velocity of a Gaussian mixture


MIX = GaussianMixture(torch.tensor([[1.0, 0.0], [-1.0, 0.5], [0.0, -2.0]]), std=0.3, weights=[0.5, 0.3, 0.2])


def test_mixture_velocity_equals_the_score_form():
    """v* = E[eps - x0 | x_t] = -(x_t + t score(x_t)) / (1 - t), the score by autograd of the noised mixture's log
    density sum_k w_k N((1 - t) mu_k, ((1 - t)^2 std^2 + t^2) I)."""
    g = torch.Generator().manual_seed(10)
    x = (2 * torch.randn(64, 2, generator=g, dtype=torch.float64)).requires_grad_()
    t = torch.rand(64, generator=g, dtype=torch.float64) * 0.98 + 0.01
    a, var = (1 - t)[:, None, None], ((1 - t) ** 2 * MIX.std**2 + t**2)[:, None]
    logp = (MIX.weights.log() - ((x[:, None] - a * MIX.means) ** 2).sum(-1) / (2 * var) - torch.log(2 * math.pi * var))
    score = torch.autograd.grad(logp.logsumexp(-1).sum(), x)[0]
    expected = -(x.detach() + t[:, None] * score) / (1 - t)[:, None]
    assert _err(mixture_velocity(MIX, x.detach(), t), expected) < 1e-10
    # the ends: at t = 0 the path has not moved (v = -x0 given x0 = x), at t = 1 v = eps - E[x0]
    assert torch.allclose(mixture_velocity(MIX, x.detach(), 0.0), -x.detach())
    assert torch.allclose(mixture_velocity(MIX, x.detach(), 1.0), x.detach() - MIX.weights @ MIX.means)


def test_mixture_velocity_is_the_conditional_mean():
    """Monte Carlo: the residual (eps - x0) - v*(x_t) is orthogonal to functions of x_t (what E[. | x_t] means),
    while the sign-flipped field is not."""
    g = torch.Generator().manual_seed(11)
    n = 400_000
    x0 = MIX.sample(n, g)[0].double()
    eps = torch.randn(n, 2, generator=g, dtype=torch.float64)
    t = torch.rand(n, generator=g, dtype=torch.float64)
    x_t = (1 - t)[:, None] * x0 + t[:, None] * eps
    v = mixture_velocity(MIX, x_t, t)
    tests = torch.stack([torch.ones(n), x_t[:, 0], x_t[:, 1], torch.tanh(x_t[:, 0] * x_t[:, 1]), t], 1)  # [n,5]
    residual = (eps - x0) - v                                                      # [n,2]
    assert (tests.T @ residual / n).abs().max() < 0.03                             # standard errors <= 0.008
    assert ((tests.T @ ((eps - x0) + v) / n).abs().max()) > 0.3                    # 2 E[eps - x0] = (-0.4, 0.5)


def test_euler_on_the_exact_velocity_recovers_the_mixture_and_beats_ddim_with_few_steps():
    ring = GaussianMixture.ring(8, 2.0, 0.1)
    g = torch.Generator().manual_seed(12)
    data, other = ring.sample(2000, g)[0], ring.sample(2000, g)[0]
    floor = sliced_wasserstein(data, other)                                        # ~0.042: data vs data
    x = torch.randn(2000, 2, generator=g)
    s = FlowSchedule(1.0)
    model = velocity_model(ring, s)

    def w1(steps, schedule=s, m=model, prediction="v"):
        return sliced_wasserstein(sample(m, x, schedule, steps, prediction=prediction, progress=False), data)

    assert w1(32) < 1.3 * floor
    assert w1(32, FlowSchedule(3.0), velocity_model(ring, FlowSchedule(3.0))) < 1.3 * floor
    assert w1(8, m=lambda x, t: -model(x, t)) > 0.5                                # the sign error walks away
    # with 4 steps, Euler on the paper's grid (uniform in t) beats DDIM with the exact eps on every schedule
    flow4 = w1(shift_sigmas(torch.linspace(1, 0, 5), 1.0)[:-1].tolist())           # ~0.083
    for kind in ("linear", "scaled_linear", "cosine"):
        ns = NoiseSchedule(kind)
        for spacing in ("leading", "trailing"):
            assert flow4 < w1(ns.timesteps(4, spacing).tolist(), ns, ring.model(ns), "eps")  # >= 0.094 (cosine)
    # diffusers' grid wastes its last step on [0.001, 0]: its 4 steps are about the paper grid's 3
    assert w1(4) > 1.5 * flow4


def test_euler_on_the_flow_is_ddim_at_the_same_snr():
    """x_t / sqrt((1 - t)^2 + t^2) is a variance-preserving sample with abar = (1 - t)^2 / ((1 - t)^2 + t^2), and
    an Euler step (x0 and eps held fixed along the step) is DDIM's (Song et al. eq. 12): the samplers differ only
    in the noise levels they visit."""
    fs = FlowSchedule(3.0)
    sig = shift_sigmas(torch.linspace(0.98, 0.05, 6, dtype=torch.float64), 3.0).tolist()  # [6], 0 then appended
    abar = torch.tensor([(1 - s) ** 2 / ((1 - s) ** 2 + s**2) for s in sig[::-1]], dtype=torch.float64)
    ns = NoiseSchedule("linear", len(sig))
    ns.alphas_cumprod = abar                                       # timestep k <-> sig[5 - k]; -1 <-> t = 0

    def c(s):
        return 1 / ((1 - s) ** 2 + s**2) ** 0.5

    def eps_model(x_vp, k):                                        # the stand-in's velocity, as eps for DDIM
        s = sig[len(sig) - 1 - int(k[0])]
        x = x_vp / c(s)
        return fs.to_eps("v", stand_in(x, fs.model_timesteps(s, x)), x, s)

    x = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(13), dtype=torch.float64)
    flow = sample(stand_in, x, fs, sig, prediction="v", progress=False)
    z = c(sig[0]) * x
    for k in range(len(sig) - 1, -1, -1):
        z = ddim_step(ns, eps_model(z, torch.tensor([k])), z, k, k - 1)
    assert _err(flow, z) < 1e-10


# -----------------------------------------------------------------------------
# bad input


@pytest.mark.parametrize("call, error, match", [
    (lambda s: FlowSchedule(shift=0.0), ValueError, r"shift must be a positive number .* got 0.0"),
    (lambda s: FlowSchedule(shift=-3), ValueError, "shift must be a positive number"),
    (lambda s: shift_sigmas(0.5, float("nan")), ValueError, "shift must be a positive number"),
    (lambda s: FlowSchedule(num_train_timesteps=0), ValueError, "num_train_timesteps must be a positive int, got 0"),
    (lambda s: s.sigmas(0), ValueError, "steps must be an int >= 1, got 0"),
    (lambda s: s.trajectory(0), ValueError, "steps must be an int >= 1, got 0"),
    (lambda s: sample(stand_in, torch.zeros(1, 2), s, 0, prediction="v"), ValueError, "steps must be an int >= 1"),
    (lambda s: s.trajectory(10, start=0.9, end=0.1), ValueError, "0 <= start <= end <= 1; got start=0.9, end=0.1"),
    (lambda s: s.trajectory([0.5, 0.7]), ValueError, r"strictly decreasing sequence in \(0, 1\], got \[0.5, 0.7\]"),
    (lambda s: s.add_noise(torch.zeros(2, 3), torch.zeros(2, 3), torch.tensor([0.5, 1.5])), ValueError,
     r"t must lie in \[0, 1\] \(0: data, 1: noise\), got values in \[0.5, 1.5\]"),
    (lambda s: s.add_noise(torch.zeros(2, 3), torch.zeros(2, 3), torch.tensor([500, 10])), TypeError,
     "noise level in \\[0, 1\\] \\(a float tensor\\), got dtype torch.int64: integer timesteps belong to a "
     "NoiseSchedule"),
    (lambda s: s.add_noise(torch.zeros(2, 3), torch.zeros(2, 3), torch.rand(3)), ValueError,
     r"t must be a scalar or a tensor \[B\] = \[2\], got shape \(3,\)"),
    (lambda s: s.add_noise(torch.zeros(2, 3), torch.zeros(2, 4), 0.5), ValueError, "same shape"),
    (lambda s: s.model_timesteps(1.2, torch.zeros(2, 3)), ValueError, r"sigma must lie in \[0, 1\].*\[1.2, 1.2\]"),
    (lambda s: s.model_timesteps(-0.1, torch.zeros(2, 3)), ValueError, r"sigma must lie in \[0, 1\]"),
    (lambda s: s.parse_prediction("epsilon"), ValueError, "prediction must be 'v' \\(or 'flow'\\), got 'epsilon'"),
    (lambda s: sample(stand_in, torch.zeros(1, 2), s, 4), ValueError, "prediction must be 'v'"),
    (lambda s: euler_step(s, torch.zeros(2, 3), torch.zeros(2, 4), 0.5, 0.4), ValueError, "the sample's shape"),
    (lambda s: sample_t(4, "lognorm"), ValueError, r"unknown density 'lognorm', expected one of \('logit_normal'"),
    (lambda s: sample_t(4, "mode", mode_scale=2.0), ValueError, r"mode_scale must lie in \[-1, 2 / \(pi - 2\)"),
    (lambda s: sample_t(4, "logit_normal", s=0.0), ValueError, "scale s > 0"),
])
def test_bad_input_is_a_clear_error(call, error, match):
    with pytest.raises(error, match=match):
        call(FlowSchedule())
