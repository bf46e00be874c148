"""sdlearn.diffusion: schedules, forward process, parameterisations, DDPM / DDIM steps (parity with diffusers),
guidance; and the 04 checkers against right and deliberately wrong answers."""
import pytest
import torch

from sdlearn import diffusion as D
from sdlearn.diffusion import NoiseSchedule

diffusers = pytest.importorskip("diffusers")

DIFFUSERS_KIND = {"linear": "linear", "scaled_linear": "scaled_linear", "cosine": "squaredcos_cap_v2"}
DIFFUSERS_PRED = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}


def _kw(kind, prediction="eps"):
    kw = dict(beta_schedule=DIFFUSERS_KIND[kind], prediction_type=DIFFUSERS_PRED[prediction], clip_sample=False)
    if kind == "scaled_linear":
        kw.update(beta_start=0.00085, beta_end=0.012)
    return kw


def _err(a, b):
    return (a.double() - b.double()).abs().max().item()


# -----------------------------------------------------------------------------
# schedules


@pytest.mark.parametrize("kind", D.SCHEDULES)
@pytest.mark.parametrize("num_steps", [1, 7, 50, 1000, 4000])
def test_alphas_cumprod_equal_diffusers(kind, num_steps):
    ours = NoiseSchedule(kind, num_steps)
    theirs = diffusers.DDPMScheduler(num_train_timesteps=num_steps, **_kw(kind))
    assert ours.alphas_cumprod.shape == (num_steps,)
    assert _err(ours.alphas_cumprod, theirs.alphas_cumprod) <= 1e-6
    assert _err(ours.betas, theirs.betas) <= 1e-6


def test_custom_betas_equal_diffusers():
    for kind in ("linear", "scaled_linear"):
        ours = NoiseSchedule(kind, 300, beta_start=0.001, beta_end=0.05)
        theirs = diffusers.DDPMScheduler(num_train_timesteps=300, beta_schedule=kind, beta_start=0.001, beta_end=0.05)
        assert _err(ours.alphas_cumprod, theirs.alphas_cumprod) <= 1e-6


def test_schedule_facts():
    lin, sl, cos = (NoiseSchedule(k) for k in D.SCHEDULES)
    for s in (lin, sl, cos):
        a = s.alphas_cumprod
        assert (a[1:] < a[:-1]).all() and 0 < a[-1] < a[0] < 1
        assert torch.allclose(s.snr(torch.arange(1000)), (a / (1 - a)).double())
        assert s.log_snr(5).ndim == 0
    assert sl.alphas_cumprod[-1] > lin.alphas_cumprod[-1]  # SD keeps more signal at t = T-1
    assert torch.allclose(sl.betas.sqrt()[[0, -1]], torch.tensor([0.00085, 0.012]).sqrt())
    assert repr(sl) == "NoiseSchedule('scaled_linear', num_steps=1000, beta_start=0.00085, beta_end=0.012)"
    assert NoiseSchedule("squaredcos_cap_v2").kind == "cosine"


@pytest.mark.parametrize("spacing", D.SPACINGS)
def test_timesteps_equal_diffusers(spacing):
    for T, steps in [(1000, 1), (1000, 3), (1000, 50), (1000, 333), (1000, 1000), (37, 10), (37, 37)]:
        theirs = diffusers.DDIMScheduler(num_train_timesteps=T, timestep_spacing=spacing)
        theirs.set_timesteps(steps)
        assert torch.equal(NoiseSchedule("linear", T).timesteps(steps, spacing), theirs.timesteps), (T, steps)
    sd = diffusers.DDIMScheduler(steps_offset=1)
    sd.set_timesteps(50)
    assert torch.equal(NoiseSchedule("scaled_linear").timesteps(50, offset=1), sd.timesteps)
    own = NoiseSchedule("scaled_linear", offset=1)  # a schedule's own grid: what sample() visits by default
    assert torch.equal(own.timesteps(50), sd.timesteps) and own.trajectory(50)[:-1] == sd.timesteps.tolist()
    assert NoiseSchedule(**own.init_args()).trajectory(7) == own.trajectory(7)
    trailing = NoiseSchedule("linear", spacing="trailing")
    assert trailing.trajectory(4)[0] == 999 and repr(trailing).endswith("spacing='trailing', offset=0)")


def test_bad_schedules_and_timesteps():
    with pytest.raises(ValueError, match="unknown schedule kind 'quadratic'.*linear.*scaled_linear.*cosine"):
        NoiseSchedule("quadratic")
    with pytest.raises(ValueError, match="num_steps must be a positive int, got 0"):
        NoiseSchedule("linear", 0)
    with pytest.raises(ValueError, match="cosine.*no beta_start"):
        NoiseSchedule("cosine", beta_start=0.001)
    with pytest.raises(ValueError, match="0 < beta_start <= beta_end < 1"):
        NoiseSchedule("linear", beta_start=0.02, beta_end=0.001)
    with pytest.raises(ValueError, match="unknown timestep spacing 'even'"):
        NoiseSchedule("linear", spacing="even")
    with pytest.raises(ValueError, match=r"offset must be an int in 0..99 \(SD: 1\), got -1"):
        NoiseSchedule("linear", 100, offset=-1)
    s = NoiseSchedule("linear", 100)
    with pytest.raises(ValueError, match="asked for 101 sampling steps but the schedule has only 100"):
        s.timesteps(101)
    with pytest.raises(ValueError, match="unknown timestep spacing 'even'"):
        s.timesteps(10, "even")
    with pytest.raises(ValueError, match="asked for 101 sampling steps"):
        D.sample(lambda x, t: x, torch.zeros(1, 2), s, steps=101, progress=False)


def test_bad_timesteps_are_clear_errors():
    s = NoiseSchedule("linear", 100)
    x = torch.zeros(4, 3, 8, 8)
    with pytest.raises(ValueError, match=r"timesteps must lie in \[0, 100\), got values in \[0, 100\]"):
        s.add_noise(x, x, torch.tensor([0, 1, 2, 100]))
    with pytest.raises(ValueError, match=r"in \[0, 100\), got values in \[-1, 2\]"):
        s.add_noise(x, x, torch.tensor([0, -1, 2, 2]))
    with pytest.raises(ValueError, match="timestep tensor has batch size 3 but the sample has batch size 4"):
        s.add_noise(x, x, torch.tensor([1, 2, 3]))
    with pytest.raises(TypeError, match="timesteps must be integers.*float32"):
        s.add_noise(x, x, torch.tensor([0.5, 1, 2, 3]))
    with pytest.raises(ValueError, match="scalar or a 1-D tensor"):
        s.add_noise(x, x, torch.zeros(4, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="same shape"):
        s.add_noise(x, x[:, :1], torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="earlier t_next in \\[-1, t\\), got t=10, t_next=10"):
        D.ddim_step(s, x, x, 10, 10)
    with pytest.raises(ValueError, match=r"in \[0, 100\), got values in \[100, 100\]"):
        D.ddpm_step(s, x, x, 100, 99)
    with pytest.raises(ValueError, match="model output must have the sample's shape"):
        D.ddim_step(s, x[:2], x, 10, 5)
    with pytest.raises(ValueError, match="unknown prediction type 'noise'"):
        s.target("noise", x, x, 3)
    with pytest.raises(ValueError, match="unknown sampler 'heun' for a NoiseSchedule"):
        D.sample(lambda x, t: x, x, s, 5, sampler="heun", progress=False)
    with pytest.raises(ValueError, match="strictly decreasing"):
        D.sample(lambda x, t: x, x, s, [5, 10], progress=False)


# -----------------------------------------------------------------------------
# forward process and parameterisations


@pytest.mark.parametrize("shape", [(5, 2), (4, 3, 8, 8), (3, 4, 2, 8, 8)])
def test_add_noise_and_velocity_equal_diffusers(shape):
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    t = torch.randint(0, 1000, (shape[0],), generator=g)
    for kind in D.SCHEDULES:
        ours, theirs = NoiseSchedule(kind), diffusers.DDPMScheduler(**_kw(kind))
        assert _err(ours.add_noise(x0, noise, t), theirs.add_noise(x0, noise, t)) <= 1e-6
        assert _err(ours.velocity(x0, noise, t), theirs.get_velocity(x0, noise, t)) <= 1e-6
    s = NoiseSchedule("linear")
    scalar = s.add_noise(x0, noise, 10)  # an int t applies to the whole batch
    assert _err(scalar, s.add_noise(x0, noise, torch.full((shape[0],), 10))) == 0


def test_parameterisations_round_trip():
    s = NoiseSchedule("scaled_linear")
    g = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(6, 4, 8, 8, generator=g), torch.randn(6, 4, 8, 8, generator=g)
    t = torch.tensor([0, 1, 10, 500, 998, 999])
    x_t = s.add_noise(x0, noise, t)
    for p in D.PREDICTIONS:
        target = s.target(p, x0, noise, t)
        assert _err(s.to_x0(p, target, x_t, t), x0) < 5e-4, p  # 1/sqrt(abar) amplifies float32 rounding at t=999
        assert _err(s.to_eps(p, target, x_t, t), noise) < 5e-4, p
    assert torch.equal(s.target("epsilon", x0, noise, t), noise)  # diffusers' names are accepted
    assert torch.equal(s.target("sample", x0, noise, t), x0)


def test_float64_samples_get_float64_arithmetic():
    s = NoiseSchedule("linear")
    x0 = torch.randn(2, 3, dtype=torch.float64)
    assert s.add_noise(x0, x0, torch.tensor([1, 2])).dtype == torch.float64
    assert s.gather(s.alphas_cumprod, 3, x0).dtype == torch.float64
    half = torch.randn(2, 3).half()
    assert s.add_noise(half, half, 3).dtype == torch.float16


# -----------------------------------------------------------------------------
# reverse steps: parity with diffusers


@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
@pytest.mark.parametrize("kind", D.SCHEDULES)
def test_ddpm_step_equals_diffusers(kind, prediction):
    s, theirs = NoiseSchedule(kind), diffusers.DDPMScheduler(**_kw(kind, prediction))
    g = torch.Generator().manual_seed(2)
    x, out = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    for t in [999, 500, 100, 10, 2, 1, 0]:  # every step t -> t-1, down to the last
        ref = theirs.step(out, t, x, generator=torch.Generator().manual_seed(t)).prev_sample
        ours = D.ddpm_step(s, out, x, t, t - 1, prediction=prediction, generator=torch.Generator().manual_seed(t))
        assert _err(ours, ref) <= 1e-5, t
        z = torch.Generator().manual_seed(t)  # the same noise, passed in
        assert _err(D.ddpm_step(s, out, x, t, t - 1, prediction=prediction,
                                noise=torch.randn(x.shape, generator=z)), ref) <= 1e-5
    theirs.set_timesteps(20)  # strided: t -> the previous of 20 timesteps
    ts = theirs.timesteps.tolist()
    for i in [0, 10, 19]:
        t, t_prev = ts[i], (ts[i + 1] if i + 1 < len(ts) else -1)
        ref = theirs.step(out, t, x, generator=torch.Generator().manual_seed(i)).prev_sample
        ours = D.ddpm_step(s, out, x, t, t_prev, prediction=prediction, generator=torch.Generator().manual_seed(i))
        assert _err(ours, ref) <= 1e-5, t


@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
@pytest.mark.parametrize("kind", D.SCHEDULES)
def test_ddim_step_equals_diffusers(kind, prediction):
    s = NoiseSchedule(kind)
    g = torch.Generator().manual_seed(3)
    x, out, z = (torch.randn(2, 4, 8, 8, generator=g) for _ in range(3))
    for steps in (50, 1000):
        theirs = diffusers.DDIMScheduler(**_kw(kind, prediction), set_alpha_to_one=True)
        theirs.set_timesteps(steps)
        ts = theirs.timesteps.tolist()
        for i in [0, len(ts) // 2, len(ts) - 2, len(ts) - 1]:  # the last is t=0 -> -1
            t, t_prev = ts[i], (ts[i + 1] if i + 1 < len(ts) else -1)
            for eta in (0.0, 0.5, 1.0):
                ref = theirs.step(out, t, x, eta=eta, variance_noise=z if eta else None).prev_sample
                ours = D.ddim_step(s, out, x, t, t_prev, prediction=prediction, eta=eta, noise=z)
                assert _err(ours, ref) <= 1e-5, (steps, t, eta)
    assert ts[-1] == 0


def test_steps_in_float64_equal_diffusers_in_float64():
    """Fed float64 samples, the steps compute in float64: diffusers with its tensors cast to float64 agrees to 1e-12."""
    s = NoiseSchedule("linear")
    ddpm, ddim = diffusers.DDPMScheduler(clip_sample=False), diffusers.DDIMScheduler(clip_sample=False)
    ddim.set_timesteps(1000)
    for d in (ddpm, ddim):
        d.alphas_cumprod = d.alphas_cumprod.double()
    ddpm.one, ddim.final_alpha_cumprod = torch.tensor(1.0, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64)
    g = torch.Generator().manual_seed(4)
    x, out, z = (torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64) for _ in range(3))
    for t in [999, 10, 1, 0]:
        ref = ddpm.step(out, t, x, generator=torch.Generator().manual_seed(0)).prev_sample
        assert _err(D.ddpm_step(s, out, x, t, t - 1, generator=torch.Generator().manual_seed(0)), ref) < 1e-12
        ref = ddim.step(out, t, x, eta=0.7, variance_noise=z).prev_sample
        assert _err(D.ddim_step(s, out, x, t, t - 1, eta=0.7, noise=z), ref) < 1e-12


def test_ddim_with_eta_one_is_the_ddpm_step():
    s = NoiseSchedule("cosine")
    g = torch.Generator().manual_seed(5)
    x, out, z = (torch.randn(3, 2, generator=g, dtype=torch.float64) for _ in range(3))
    for t, t_prev in [(999, 979), (500, 499), (20, 0), (0, -1)]:
        for p in D.PREDICTIONS:
            ddim = D.ddim_step(s, out, x, t, t_prev, prediction=p, eta=1.0, noise=z)
            ddpm = D.ddpm_step(s, out, x, t, t_prev, prediction=p, noise=z)
            assert _err(ddim, ddpm) < 1e-10


def test_posterior_at_the_last_step_is_x0():
    s = NoiseSchedule("linear")
    x0, x_t = torch.randn(2, 3), torch.randn(2, 3)
    mean, var = D.posterior(s, x0, x_t, 0)
    assert var == 0 and _err(mean, x0) < 1e-6


class Affine(torch.nn.Module):
    """A deterministic stand-in for a UNet: pred = a x + b t / T."""

    def forward(self, x, t):
        return 0.3 * x + 0.5 * (t.float() / 1000).view(-1, *[1] * (x.ndim - 1))


@pytest.mark.parametrize("sampler,eta,prediction", [("ddim", 0.0, "eps"), ("ddim", 0.5, "eps"), ("ddim", 0.0, "v"),
                                                    ("ddpm", 0.0, "eps"), ("ddpm", 0.0, "v")])
def test_sample_loop_equals_a_diffusers_loop(sampler, eta, prediction):
    model, steps = Affine(), 10
    cls = diffusers.DDIMScheduler if sampler == "ddim" else diffusers.DDPMScheduler
    theirs = cls(**_kw("scaled_linear", prediction))
    theirs.set_timesteps(steps)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(6))
    g = torch.Generator().manual_seed(7)
    ref = x.clone()
    for t in theirs.timesteps:
        out = model(ref, t.expand(2))
        kw = {"eta": eta} if sampler == "ddim" else {}
        ref = theirs.step(out, t, ref, generator=g, **kw).prev_sample
    seen = []
    ours = D.sample(model, x.clone(), NoiseSchedule("scaled_linear"), steps, sampler=sampler,
                    **({"eta": eta} if sampler == "ddim" else {}), prediction=prediction,
                    generator=torch.Generator().manual_seed(7), progress=False, callback=seen.append)
    assert _err(ours, ref) <= 1e-5
    assert [c["t"] for c in seen] == theirs.timesteps.tolist() and torch.equal(seen[-1]["x_next"], ours)


@pytest.mark.parametrize("prediction", ["eps", "v"])
@pytest.mark.parametrize("clip", [1.0, 0.5])
def test_clip_x0_equals_diffusers_clip_sample(clip, prediction):
    """clip_x0=c: the steps and the loop equal diffusers' schedulers with clip_sample=True, clip_sample_range=c."""
    kind, s = "cosine", NoiseSchedule("cosine")
    kw = dict(_kw(kind, prediction), clip_sample=True, clip_sample_range=clip)
    g = torch.Generator().manual_seed(11)
    x, out, z = (3 * torch.randn(2, 3, 8, 8, generator=g) for _ in range(3))  # big: the clamp bites
    ddpm = diffusers.DDPMScheduler(**kw)
    for t in [999, 500, 10, 0]:
        ref = ddpm.step(out, t, x, generator=torch.Generator().manual_seed(t)).prev_sample
        ours = D.ddpm_step(s, out, x, t, t - 1, prediction=prediction, clip_x0=clip,
                           generator=torch.Generator().manual_seed(t))
        assert _err(ours, ref) <= 1e-5, t
        assert _err(ours, D.ddpm_step(s, out, x, t, t - 1, prediction=prediction,
                                      generator=torch.Generator().manual_seed(t))) > 1e-3 or t == 0
    ddim = diffusers.DDIMScheduler(**kw, set_alpha_to_one=True)
    ddim.set_timesteps(50)
    ts = ddim.timesteps.tolist()
    for i in [0, 25, 49]:
        t, t_prev = ts[i], (ts[i + 1] if i + 1 < len(ts) else -1)
        for eta in (0.0, 1.0):
            ref = ddim.step(out, t, x, eta=eta, variance_noise=z if eta else None).prev_sample
            assert _err(D.ddim_step(s, out, x, t, t_prev, prediction=prediction, eta=eta, noise=z, clip_x0=clip),
                        ref) <= 1e-5, (t, eta)
    model, ref, seen = Affine(), x.clone(), []  # the whole loop
    ddim.set_timesteps(10, device="cpu")
    for t in ddim.timesteps:
        ref = ddim.step(model(ref, t.expand(2)), t, ref).prev_sample
    ours = D.sample(model, x.clone(), s, 10, prediction=prediction, clip_x0=clip, progress=False, callback=seen.append)
    assert _err(ours, ref) <= 1e-5
    assert all(c["denoised"].abs().max() <= clip for c in seen)


def test_clip_x0_is_off_by_default_and_checked():
    s = NoiseSchedule("linear")
    x, out = 3 * torch.randn(2, 3), 3 * torch.randn(2, 3)
    assert torch.equal(D.ddim_step(s, out, x, 500, 480), D.ddim_step(s, out, x, 500, 480, clip_x0=None))
    for bad in (0, -1.0, True, "1"):
        with pytest.raises(ValueError, match="clip_x0 must be a positive number"):
            D.ddim_step(s, out, x, 500, 480, clip_x0=bad)
        with pytest.raises(ValueError, match="clip_x0 must be a positive number"):
            D.sample(Affine(), x, s, 5, clip_x0=bad, progress=False)


def test_explicit_timesteps_and_ddpm_has_no_eta():
    s = NoiseSchedule("linear")
    x = torch.randn(2, 3)
    a = D.sample(Affine(), x, s, [999, 600, 300, 0], progress=False)
    b = x
    for t, t_prev in [(999, 600), (600, 300), (300, 0), (0, -1)]:
        b = D.ddim_step(s, Affine()(b, torch.full((2,), t)), b, t, t_prev)
    assert _err(a, b) < 1e-6
    with pytest.raises(ValueError, match="the 'ddpm' sampler has no option 'eta'"):
        D.sample(Affine(), x, s, 5, sampler="ddpm", eta=0.5, progress=False)


# -----------------------------------------------------------------------------
# guidance


def test_guidance_and_the_batched_wrapper():
    calls = []

    def model(x, t, context, ids):  # [B,D], [B], [B,K], [B,2] -> [B,D]
        calls.append(x.shape[0])
        return x * context.sum(-1, keepdim=True) + t[:, None].float() + ids

    x, t = torch.randn(3, 2), torch.tensor([5, 5, 5])
    cond, uncond, ids = torch.rand(3, 4), torch.zeros(1, 4), torch.randn(3, 2)
    for w in (0.0, 1.0, 7.5):
        expected = D.classifier_free_guidance(model(x, t, uncond.expand(3, 4), ids), model(x, t, cond, ids), w)
        calls.clear()
        # an entry without an unconditional twin (ids, as SDXL's size ids) is the same in both halves
        got = D.guided(model, {"context": cond, "ids": ids}, {"context": uncond}, w)(x, t)
        assert _err(got, expected) < 1e-6
        assert calls == [6]  # one forward pass over cond and uncond together
    assert _err(D.classifier_free_guidance(torch.zeros(2), torch.ones(2), 3.0), torch.full((2,), 3.0)) == 0
    with pytest.raises(ValueError, match="same shape"):
        D.guided(model, {"context": cond}, {"context": torch.zeros(2, 4)}, 2.0)
    with pytest.raises(ValueError, match=r"uncond has entries \['pooled'\] that cond lacks"):
        D.guided(model, {"context": cond}, {"pooled": torch.zeros(1, 4)}, 2.0)
    with pytest.raises(ValueError, match="same batch size"):
        D.guided(model, {"context": cond, "ids": ids[:2]}, {}, 2.0)


def test_sample_guides_with_cond_dicts_and_skips_the_uncond_half_at_w_1():
    s, calls = NoiseSchedule("linear"), []

    def model(x, t, context):
        calls.append(x.shape[0])
        return Affine()(x, t) * context.mean(-1).view(-1, 1)

    x, cond, uncond = torch.randn(2, 3), {"context": torch.rand(2, 4) + 1}, {"context": torch.zeros(1, 4)}
    w = 2.5
    ref = x
    for t, t_prev in zip([800, 600, 400, 200, 0], [600, 400, 200, 0, -1]):
        tt = torch.full((2,), t)
        out = D.classifier_free_guidance(model(ref, tt, uncond["context"].expand(2, 4)),
                                         model(ref, tt, cond["context"]), w)
        ref = D.ddim_step(s, out, ref, t, t_prev)
    calls.clear()
    got = D.sample(model, x, s, [800, 600, 400, 200, 0], cond=cond, uncond=uncond, guidance_scale=w, progress=False)
    assert _err(got, ref) < 1e-6 and calls == [4] * 5
    calls.clear()
    D.sample(model, x, s, 5, cond=cond, uncond=uncond, guidance_scale=1.0, progress=False)
    assert calls == [2] * 5  # w = 1 is the conditional model: no unconditional half


def test_trajectory_cuts_like_diffusers_denoising_end_and_start():
    s = NoiseSchedule("scaled_linear")
    full = s.trajectory(50)
    assert full == s.timesteps(50).tolist() + [-1]
    base, refiner = s.trajectory(50, end=0.8), s.trajectory(50, start=0.8)
    # diffusers: cutoff = round(T - 0.8 T) = 200; the base runs t >= 200 (40 steps), the refiner t < 200 (10 steps)
    assert base[:-1] == [t for t in full[:-1] if t >= 200] and len(base) - 1 == 40
    assert refiner[:-1] == [t for t in full[:-1] if t < 200] and refiner[-1] == -1
    assert base[-1] == refiner[0]  # the base's last step lands where the refiner starts
    assert s.trajectory(50, 1.0, 1.0) == [] and s.trajectory(50, 0.3, 0.3) == []
    for start, end in [(-0.1, 1.0), (0.5, 0.4), (0.0, 1.5)]:
        with pytest.raises(ValueError, match="0 <= start <= end <= 1"):
            s.trajectory(10, start, end)


def test_sample_from_the_middle_continues_a_stopped_run():
    s, x = NoiseSchedule("cosine"), torch.randn(2, 3, dtype=torch.float64)
    whole = D.sample(Affine(), x, s, 20, progress=False)
    half = D.sample(Affine(), x, s, 20, end=0.45, progress=False)
    assert _err(D.sample(Affine(), half, s, 20, start=0.45, progress=False), whole) == 0
