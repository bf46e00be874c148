"""The samplers the published checkpoints use, against diffusers' schedulers (fp32): each sampler's grid (timesteps
and sigmas) and every step of a whole loop, for eps- and v-prediction, every timestep spacing, steps_offset, Karras
sigmas, final_sigmas_type / set_alpha_to_one and zero terminal SNR; then whole pipelines (tiny random SD 1.5-like and
SDXL-like diffusers folders) with each scheduler config they may ship: sdlearn's images are diffusers'.
"""
import itertools
import math
import re
import warnings

import pytest
import torch
from tiny import err, one_thread  # noqa: F401

from sdlearn import diffusion as D
from sdlearn.diffusion import Level, NoiseSchedule, sample

diffusers = pytest.importorskip("diffusers")

BETAS = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
SCHEDULERS = {"ddim": "DDIMScheduler", "ddpm": "DDPMScheduler", "euler": "EulerDiscreteScheduler",
              "euler_a": "EulerAncestralDiscreteScheduler", "dpmpp_2m": "DPMSolverMultistepScheduler"}
SIGMA_SPACE = ("euler", "euler_a")  # diffusers keeps x_sigma = x sqrt(sigma^2 + 1); sdlearn's loop keeps x
TOL = 1e-5


def _configs(sampler):
    """Every scheduler config the sampler's diffusers class reads, as (sdlearn settings, diffusers kwargs)."""
    karras = (False, True) if sampler in ("euler", "dpmpp_2m") else (False,)
    finals = ("zero", "sigma_min") if sampler in ("ddim", "euler", "dpmpp_2m") else ("zero",)
    for spacing, offset, k, final, zero in itertools.product(("leading", "trailing", "linspace"), (0, 1), karras,
                                                             finals, (False, True)):
        if zero and (spacing != "trailing" or k or offset):  # zero SNR: with trailing spacing (Lin et al.)
            continue
        if offset and spacing != "leading":  # steps_offset moves "leading" only (in every diffusers scheduler)
            continue
        ours = dict(spacing=spacing, offset=offset, sampler=sampler, karras=k, final=final, zero_snr=zero)
        theirs = dict(timestep_spacing=spacing, steps_offset=offset, rescale_betas_zero_snr=zero)
        if sampler == "ddim":
            theirs.update(set_alpha_to_one=final == "zero", clip_sample=False)
        elif sampler == "ddpm":
            theirs.update(clip_sample=False)
        if k:
            theirs["use_karras_sigmas"] = True
        if sampler in ("euler", "dpmpp_2m"):
            theirs["final_sigmas_type"] = final
        yield ours, theirs


CASES = [(s, o, t) for s in SCHEDULERS for o, t in _configs(s)]


def _id(case):
    sampler, ours, _ = case
    flags = [k for k in ("karras", "zero_snr") if ours[k]] + (["sigma_min"] if ours["final"] == "sigma_min" else [])
    return "-".join([sampler, ours["spacing"], f"offset{ours['offset']}", *flags])


def _pair(sampler, ours, theirs, prediction="eps"):
    names = {"eps": "epsilon", "v": "v_prediction"}
    sched = getattr(diffusers, SCHEDULERS[sampler])(**BETAS, **theirs, prediction_type=names[prediction])
    return NoiseSchedule("scaled_linear", 1000, 0.00085, 0.012, **ours), sched


@pytest.mark.parametrize("case", CASES, ids=[_id(c) for c in CASES])
def test_the_grid_is_diffusers_timesteps_and_sigmas(case):
    sampler, ours, theirs = case
    s, d = _pair(sampler, ours, theirs)
    for steps in (1, 4, 25, 50):
        if steps == 1 and ours["zero_snr"] and sampler != "ddim":
            continue
        d.set_timesteps(steps)
        points = s.trajectory(steps)
        assert D._timestep(points[-1]) == -1 and len(points) == steps + 1
        ts = torch.tensor([float(D._timestep(p)) for p in points[:-1]])
        assert torch.equal(ts, d.timesteps.float()), (steps, ts, d.timesteps)
        if hasattr(d, "sigmas"):
            sig = torch.tensor([s.sigma(p) for p in points], dtype=torch.float32)
            assert torch.equal(sig, d.sigmas.float()), (steps, sig, d.sigmas)
        if ours["karras"]:
            assert all(isinstance(p, Level) for p in points[:-1])


TABLE = NoiseSchedule("scaled_linear").sigmas.double()


def _model(prediction):
    """A fixed smooth 'denoiser' of x and the (possibly fractional) timestep t, shaped like a trained one: its x0
    guess is bounded and its eps / v are consistent with x at the sigma of t, so no step amplifies rounding."""
    def model(x, t):
        i = t.double().clamp(0, 998.999)
        lo = i.floor().long()
        s = (TABLE[lo] + (i - lo) * (TABLE[lo + 1] - TABLE[lo])).float().view(-1, *([1] * (x.ndim - 1)))
        a = 1 / (s**2 + 1) ** 0.5
        x0 = torch.tanh(0.5 * x / a + 0.3 * x.roll(1, -1))
        eps = (x - a * x0) / (s * a)
        return {"eps": eps, "v": a * eps - s * a * x0, "x0": x0}[prediction]
    return model


def _to_x(d, sampler, x_d, i):
    """diffusers' sample after step i -> the loop's x (Euler keeps x_sigma; at the end it is the result itself)."""
    if sampler not in SIGMA_SPACE or i + 1 == len(d.timesteps):
        return x_d
    return x_d / (d.sigmas[i + 1] ** 2 + 1) ** 0.5


def _diffusers_loop(d, sampler, noise, steps, seed, model):
    d.set_timesteps(steps)
    x = noise * ((d.sigmas[0] ** 2 + 1) ** 0.5 if sampler in SIGMA_SPACE else 1.0)  # see test below: not init_noise
    g, out = torch.Generator().manual_seed(seed), []
    for i, t in enumerate(d.timesteps):
        x_in = d.scale_model_input(x, t)
        kw = {"generator": g} if sampler in ("ddpm", "euler_a") else {}
        x = d.step(model(x_in, t.expand(len(x))), t, x, **kw).prev_sample
        out.append(_to_x(d, sampler, x, i))
    return out


@pytest.mark.parametrize("case", CASES, ids=[_id(c) for c in CASES])
def test_every_step_of_a_loop_equals_diffusers(case):
    sampler, ours, theirs = case
    if sampler == "ddim" and ours["spacing"] == "linspace":
        pytest.skip("diffusers' DDIM steps from t to t - T // n, off the linspace grid: see the test below")
    noise = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(7))
    # zero SNR: v only (eps says nothing at abar = 0, Lin et al. 2024); 4 and 20 steps: T // n is the grid's stride
    # on "trailing" too, so DDIM's t - T // n is the next point
    for prediction in ("v",) if ours["zero_snr"] else ("eps", "v"):
        s, d = _pair(sampler, ours, theirs, prediction)
        for steps in (4, 20):
            _compare_loops(s, d, sampler, prediction, steps, noise, ours["zero_snr"])


def _compare_loops(s, d, sampler, prediction, steps, noise, zero_snr):
    theirs_xs = _diffusers_loop(d, sampler, noise, steps, 5, _model(prediction))
    ours_xs = []
    x = sample(_model(prediction), noise.clone(), s, steps, prediction=prediction, progress=False,
               generator=torch.Generator().manual_seed(5), callback=lambda r: ours_xs.append(r["x_next"]))
    assert len(ours_xs) == len(theirs_xs) == steps
    worst = max(err(a, b) for a, b in zip(ours_xs, theirs_xs))
    # zero SNR's first sigma is 4096 (abar = 2^-24): x_sigma = 4096 x holds ~5e-4 absolute in float32, and the
    # first sigma-space step cancels it down to O(1), in diffusers as here; elsewhere 1e-5
    tol = 4096 * torch.finfo(torch.float32).eps if zero_snr and sampler in SIGMA_SPACE else TOL
    assert worst <= tol and err(x, theirs_xs[-1]) <= tol, (prediction, steps, worst)
    assert err(theirs_xs[-1], noise) > 0.1  # the loop moved


def test_diffusers_ddim_on_linspace_lands_off_the_grid_and_sdlearn_on_it():
    """DDIMScheduler.step goes from t to t - T // n whatever the spacing: on "linspace" (and on "trailing" when n does
    not divide T) that is not the next timestep the model is called at (999 -> 749, then the model reads 666).
    sdlearn's DDIM steps from each grid point to the next; every other diffusers scheduler does the same."""
    d = diffusers.DDIMScheduler(**BETAS, timestep_spacing="linspace")
    d.set_timesteps(4)
    assert d.timesteps.tolist() == [999, 666, 333, 0] == NoiseSchedule("scaled_linear", spacing="linspace").grid(4)
    assert [int(t) - 1000 // 4 for t in d.timesteps[:-1]] == [749, 416, 83]


def test_euler_from_trailing_or_linspace_starts_from_diffusers_init_noise_sigma_scaled_back():
    """diffusers' Euler schedulers scale the initial noise by sigma_max (not sqrt(sigma_max^2 + 1)) on "trailing" and
    "linspace" grids, so their first model input has variance sigma_max^2 / (sigma_max^2 + 1), not 1; sdlearn starts
    from the loop's x = noise (unit variance, as on "leading"). Measured here, and the pipeline tests pass diffusers
    latents scaled to make up for it."""
    d = diffusers.EulerDiscreteScheduler(**BETAS, timestep_spacing="trailing")
    d.set_timesteps(10)
    s_max = float(d.sigmas[0])
    assert math.isclose(float(d.init_noise_sigma), s_max) and abs(s_max / (s_max**2 + 1) ** 0.5 - 0.9977) < 1e-4


# -----------------------------------------------------------------------------
# the pieces, against diffusers' functions


def test_zero_terminal_snr_betas_equal_diffusers():
    from diffusers.schedulers.scheduling_ddim import rescale_zero_terminal_snr

    s = NoiseSchedule("scaled_linear", zero_snr=True, spacing="trailing")
    ref = rescale_zero_terminal_snr(NoiseSchedule("scaled_linear").betas)
    assert torch.equal(s.betas, ref) and s.alphas_cumprod[-1] == 0 and float(s.snr(0)) > 100
    assert torch.equal(s.alphas_cumprod[:-1], diffusers.DDIMScheduler(
        **BETAS, rescale_betas_zero_snr=True).alphas_cumprod[:-1])


def test_guidance_rescale_equals_diffusers_rescale_noise_cfg():
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

    g = torch.Generator().manual_seed(0)
    cfg, text = torch.randn(3, 4, 8, 8, generator=g) * 3, torch.randn(3, 4, 8, 8, generator=g)
    for phi in (0.0, 0.3, 0.7, 1.0):
        assert err(D.rescale_guidance(cfg, text, phi), rescale_noise_cfg(cfg, text, guidance_rescale=phi)) < 1e-6
    assert torch.equal(D.rescale_guidance(cfg, text, 0.0), cfg)


def test_guidance_rescale_runs_in_the_loop():
    s = NoiseSchedule("scaled_linear")
    cond, uncond = {"c": torch.ones(2, 1, 1, 1)}, {"c": -torch.ones(1, 1, 1, 1)}

    def model(x, t, c):
        return _model("eps")(x, t) * (1 + 0.5 * c)

    noise = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    plain = sample(model, noise, s, 5, cond=cond, uncond=uncond, guidance_scale=5.0, progress=False)
    rescaled = sample(model, noise, s, 5, cond=cond, uncond=uncond, guidance_scale=5.0, progress=False,
                      guidance_rescale=0.7)
    assert err(plain, rescaled) > 1e-3


def test_deterministic_euler_on_the_training_sigmas_is_ddim_in_other_coordinates():
    """Karras et al. 2022 sec. 3: DDIM (eta = 0) and the Euler step in sigma space are the same map (to the float32
    rounding of the sigma table, which Euler reads as diffusers does, and DDIM's abar table)."""
    s = NoiseSchedule("scaled_linear", offset=1)
    noise = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    a = sample(_model("v"), noise, s, 10, sampler="ddim", prediction="v", progress=False)
    b = sample(_model("v"), noise, s, 10, sampler="euler", prediction="v", progress=False)
    assert err(a, b) < 1e-6 and err(a, noise) > 0.1


def test_dpmpp_2m_without_state_is_first_order_and_the_loop_hands_one_state_per_run():
    s = NoiseSchedule("scaled_linear", sampler="dpmpp_2m")
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    pts = s.trajectory(10)
    out = _model("eps")(x, s.model_timesteps(pts[0], x))
    first_order = D.dpmpp_2m_step(s, out, x, pts[0], pts[1])  # DPM-Solver++(1) is DDIM (Lu et al. 2022 sec. 4)
    assert err(first_order, D.ddim_step(s, out, x, pts[0], pts[1])) < 1e-6
    first, second = (sample(_model("eps"), x, s, 10, progress=False) for _ in range(2))
    assert torch.equal(first, second)  # nothing of the first run leaks into the second


def test_a_karras_schedule_survives_init_args_and_replace():
    s = NoiseSchedule("scaled_linear", offset=1, sampler="dpmpp_2m", karras=True, final="sigma_min")
    again = NoiseSchedule(**s.init_args())
    assert again.trajectory(7) == s.trajectory(7) and "karras=True" in repr(s)
    assert s.replace(karras=False).trajectory(7) == NoiseSchedule("scaled_linear", offset=1,
                                                                  sampler="dpmpp_2m", final="sigma_min").trajectory(7)
    assert NoiseSchedule("scaled_linear").init_args() == {"kind": "scaled_linear", "num_steps": 1000,
                                                          "beta_start": 0.00085, "beta_end": 0.012}


# -----------------------------------------------------------------------------
# whole pipelines: a diffusers folder with the scheduler it ships gives diffusers' images


PIPELINE_SCHEDULERS = {  # name: (diffusers class, its config on top of the folder's DDIM one)
    "ddim-alpha-to-one-false": ("DDIMScheduler", dict(set_alpha_to_one=False)),  # SD 1.5's published setting
    "euler": ("EulerDiscreteScheduler", {}),                                      # SDXL's published sampler
    "euler-karras": ("EulerDiscreteScheduler", dict(use_karras_sigmas=True)),
    "euler-ancestral": ("EulerAncestralDiscreteScheduler", {}),
    "dpmpp-2m": ("DPMSolverMultistepScheduler", dict(timestep_spacing="linspace", final_sigmas_type="sigma_min")),
    "dpmpp-2m-karras": ("DPMSolverMultistepScheduler", dict(use_karras_sigmas=True)),  # "DPM++ 2M Karras"
}


def _folder(tmp, pipe, cls, config):
    pipe.scheduler = getattr(diffusers, cls).from_config(pipe.scheduler.config, **config)
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(tmp / cls, safe_serialization=True)
    return tmp / cls


def _same_images(ours, theirs, **options):
    """sdlearn's latents and images from `ours` against diffusers' `theirs`, same latents and generator."""
    from test_convert_pipeline import GUIDANCE, PROMPTS, SIZE, STEPS
    from tiny import check_images

    z = ours.noise(len(PROMPTS), seed=0)
    img = theirs(PROMPTS, latents=z.clone(), output_type="pt", num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                 height=SIZE, width=SIZE, generator=torch.Generator().manual_seed(0), **options).images
    check_images(ours.generate(PROMPTS, STEPS, GUIDANCE, latents=z, progress=False, **options), img,
                 f"{type(theirs.scheduler).__name__}", len(PROMPTS), SIZE)


@pytest.fixture(scope="module")
def sd15(tmp_path_factory):
    from test_convert_pipeline import _sd

    torch.manual_seed(0)
    tmp = tmp_path_factory.mktemp("sd15")
    (tmp / "vocab").mkdir()
    return tmp, _sd(tmp / "vocab", "sd15")


@pytest.mark.parametrize("name", list(PIPELINE_SCHEDULERS))
def test_an_sd15_folder_with_its_scheduler_gives_diffusers_images(sd15, name):
    from sdlearn import convert
    from sdlearn.convert.scheduler import schedule_to_diffusers

    tmp, pipe = sd15
    cls, config = PIPELINE_SCHEDULERS[name]
    folder = _folder(tmp, pipe, cls, config)
    ours = convert.load(folder)
    assert ours.schedule.sampler == convert.scheduler.SAMPLERS[cls]
    _same_images(ours, pipe)
    back = schedule_to_diffusers(ours.schedule, ours.prediction)  # what save writes
    assert type(back) is type(pipe.scheduler) and {k: back.config[k] for k in config} == config
    # every field the class takes as the folder had it (from_config also carries keys the class ignores)
    assert all(back.config[k] == v for k, v in pipe.scheduler.config.items()
               if k in back.config and not k.startswith("_")), name


def test_an_sd15_folder_before_this_change_was_1e_3_off_with_set_alpha_to_one_false(sd15):
    """The issue's measurement: DDIM stepping to abar = 1 at the end (set_alpha_to_one=True, sdlearn's only choice
    before) against the folder's set_alpha_to_one=False is ~1e-3 off in the image; now it is diffusers' own."""
    from sdlearn import convert

    tmp, pipe = sd15
    ours = convert.load(_folder(tmp, pipe, "DDIMScheduler", dict(set_alpha_to_one=False)))
    z = ours.noise(2, seed=0)
    ours.schedule = ours.schedule.replace(final="zero")
    old = ours.generate(["a red circle on the left", "a blue circle"], 8, 5.0, latents=z, progress=False)
    ours.schedule = ours.schedule.replace(final="sigma_min")
    new = ours.generate(["a red circle on the left", "a blue circle"], 8, 5.0, latents=z, progress=False)
    assert 2e-4 < err(old, new) / 2 < 1e-2  # on [0, 1]


def test_a_v_prediction_zero_snr_folder_with_guidance_rescale_gives_diffusers_images(tmp_path):
    """SD 2.1-v-like, rescaled to zero terminal SNR with trailing spacing, guidance rescaled (Lin et al. 2024)."""
    from test_convert_pipeline import _sd

    from sdlearn import convert

    torch.manual_seed(1)
    (tmp_path / "vocab").mkdir()
    pipe = _sd(tmp_path / "vocab", "sd21-v")
    for cls in ("DDIMScheduler", "EulerDiscreteScheduler"):
        folder = _folder(tmp_path, pipe, cls, dict(rescale_betas_zero_snr=True, timestep_spacing="trailing"))
        ours = convert.load(folder)
        assert ours.schedule.zero_snr and float(ours.schedule.alphas_cumprod[-1]) == 0
        _same_images(ours, pipe, guidance_rescale=0.7)


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    from test_convert_pipeline import _sdxl

    torch.manual_seed(3)
    tmp = tmp_path_factory.mktemp("sdxl")
    (tmp / "vocab").mkdir()
    return tmp, _sdxl(tmp / "vocab")[0]


@pytest.mark.parametrize("name", ["euler", "dpmpp-2m-karras"])
def test_an_sdxl_folder_with_its_scheduler_gives_diffusers_images(sdxl, name):
    from sdlearn import convert

    tmp, pipe = sdxl
    cls, config = PIPELINE_SCHEDULERS[name]
    ours = convert.load(_folder(tmp, pipe, cls, config))
    assert ours.schedule.sampler == convert.scheduler.SAMPLERS[cls]
    _same_images(ours, pipe)


def test_the_checkpoints_sampler_survives_save_and_load(tmp_path):
    """A course pipeline set to sample like "DPM++ 2M Karras" keeps it through pretrained.save / load (the schedule's
    init_args), and convert.save writes diffusers' DPMSolverMultistepScheduler with those settings."""
    from sdlearn import pretrained
    from sdlearn.checks.pipeline import tiny_pipeline
    from sdlearn.convert.scheduler import schedule_to_diffusers

    pipe = tiny_pipeline("v")
    pipe.schedule = pipe.schedule.replace(sampler="dpmpp_2m", karras=True, final="sigma_min")
    before = pipe.generate(["a red circle"], steps=4, progress=False)
    assert err(before, pipe.generate(["a red circle"], steps=4, sampler="ddim", progress=False)) > 1e-4
    again = pretrained.load_path(pretrained.save(pipe, "tiny-dpm", 16, "a test", tmp_path / "tiny.safetensors"))
    assert again.schedule.init_args() == pipe.schedule.init_args() and again.schedule.sampler == "dpmpp_2m"
    assert torch.equal(again.generate(["a red circle"], steps=4, progress=False), before)
    back = schedule_to_diffusers(again.schedule, "v")
    assert type(back).__name__ == "DPMSolverMultistepScheduler" and back.config.use_karras_sigmas
    assert back.config.final_sigmas_type == "sigma_min" and back.config.prediction_type == "v_prediction"


# -----------------------------------------------------------------------------
# a checkpoint's scheduler config: every field read or warned about; bad input


def _config(cls, **fields):
    return {"_class_name": cls, **BETAS, "timestep_spacing": "leading", "steps_offset": 1, **fields}


def test_every_field_sdlearn_does_not_implement_is_a_warning_naming_it():
    from sdlearn.convert.scheduler import schedule_from_diffusers

    cases = [("DDIMScheduler", "thresholding", True), ("DPMSolverMultistepScheduler", "solver_order", 3),
             ("DPMSolverMultistepScheduler", "algorithm_type", "sde-dpmsolver++"),
             ("EulerDiscreteScheduler", "interpolation_type", "log_linear"),
             ("DDPMScheduler", "variance_type", "fixed_large")]
    for cls, key, value in cases:
        with pytest.warns(UserWarning, match=re.escape(f"{cls}: {key}={value!r} is not implemented in sdlearn; it "
                                                       "samples")):
            schedule_from_diffusers(_config(cls, **{key: value}))
    with pytest.warns(UserWarning, match="PNDMScheduler is not implemented in sdlearn: it samples with ddim"):
        schedule, _ = schedule_from_diffusers(_config("PNDMScheduler", set_alpha_to_one=False, skip_prk_steps=True))
    assert (schedule.sampler, schedule.final) == (None, "sigma_min")  # DDIM on SD 1.5's published config
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the fields it reads, and keys the class does not take (as diffusers)
        schedule, prediction = schedule_from_diffusers(_config(
            "EulerDiscreteScheduler", use_karras_sigmas=True, final_sigmas_type="sigma_min", clip_sample=False,
            set_alpha_to_one=False, skip_prk_steps=True, prediction_type="v_prediction"))
    assert (schedule.sampler, schedule.karras, schedule.final, schedule.offset, prediction) == \
        ("euler", True, "sigma_min", 1, "v")
    ddim, _ = schedule_from_diffusers(_config("DDIMScheduler", clip_sample=True, clip_sample_range=2.0))
    assert ddim.clip_x0 == 2.0 and ddim.sampler == "ddim"


def test_bad_input_is_a_clear_error():
    from sdlearn.convert.scheduler import schedule_from_diffusers
    from sdlearn.flow import FlowSchedule

    s = NoiseSchedule("scaled_linear")
    x = torch.zeros(1, 2, 2, 2)
    with pytest.raises(ValueError, match=r"unknown sampler 'dpm\+\+' .* expected one of \('ddim', 'ddpm', 'euler', "
                                         r"'euler_a', 'dpmpp_2m'\)"):
        sample(lambda x, t: x, x, s, 5, sampler="dpm++", progress=False)
    with pytest.raises(ValueError, match="unknown sampler 'lms'"):
        NoiseSchedule("scaled_linear", sampler="lms")
    with pytest.raises(TypeError, match=r"EulerDiscreteScheduler: use_karras_sigmas must be bool .* got str 'yes'"):
        schedule_from_diffusers(_config("EulerDiscreteScheduler", use_karras_sigmas="yes"))
    with pytest.raises(TypeError, match=r"DDIMScheduler: steps_offset must be int .* got float 1.0"):
        schedule_from_diffusers(_config("DDIMScheduler", steps_offset=1.0))
    with pytest.raises(TypeError, match="karras must be a bool, got int 1"):
        NoiseSchedule("scaled_linear", karras=1)
    with pytest.raises(ValueError, match="final must be one of .*'sigma_min'.*got 'one'"):
        NoiseSchedule("scaled_linear", final="one")
    with pytest.raises(ValueError, match="Karras sigmas .* are a NoiseSchedule setting .* a FlowSchedule samples on "
                                         "its own grid: .* shift"):
        D.with_karras(FlowSchedule(shift=3.0))
    with pytest.raises(ValueError, match="Karras sigmas .* FlowSchedule"):
        schedule_from_diffusers({"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0,
                                 "use_karras_sigmas": True})
    for steps in (0, -3):
        with pytest.raises(ValueError, match=f"steps must be a positive int, got {steps}"):
            sample(lambda x, t: x, x, s.replace(sampler="dpmpp_2m", karras=True), steps, progress=False)
    with pytest.raises(ValueError, match="asked for 1001 sampling steps but the schedule has only 1000 timesteps"):
        sample(lambda x, t: x, x, s.replace(sampler="euler"), 1001, progress=False)
    with pytest.raises(ValueError, match="guidance_rescale must be a number in"):
        sample(lambda x, t: x, x, s, 2, cond={}, uncond={}, guidance_scale=2.0, guidance_rescale=1.5, progress=False)
    with pytest.raises(ValueError, match="expected a diffusers scheduler config naming its class"):
        schedule_from_diffusers(dict(BETAS))


def test_explicit_noise_levels_are_diffusers_custom_sigmas():
    """A run on explicit noise levels (`schedule.level(sigma)`, here Karras's formula from a lower sigma_max) visits
    the points of diffusers' EulerDiscreteScheduler.set_timesteps(sigmas=...) and steps as it does; a Karras grid
    handed back as levels is the same run; levels that do not descend, or a sigma <= 0, are clear errors."""
    s = NoiseSchedule("scaled_linear", 1000, 0.00085, 0.012, sampler="euler")
    custom = D.karras_sigmas(5.0, float(s.sigmas[0]), 6)  # [6], from sigma 5 (the table's last: 14.6)
    levels = [s.level(float(v)) for v in custom]
    d = diffusers.EulerDiscreteScheduler(**BETAS)
    d.set_timesteps(sigmas=[*custom, 0.0])
    points = s.trajectory(levels)
    assert torch.equal(torch.tensor([p.t for p in points[:-1]]), d.timesteps)
    assert torch.equal(torch.tensor([s.sigma(p) for p in points], dtype=torch.float32), d.sigmas)
    noise = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(3))
    x, theirs = noise * (d.sigmas[0] ** 2 + 1) ** 0.5, []
    for i, t in enumerate(d.timesteps):
        x = d.step(_model("eps")(d.scale_model_input(x, t), t.expand(len(x))), t, x).prev_sample
        theirs.append(_to_x(d, "euler", x, i))
    ours = []
    sample(_model("eps"), noise.clone(), s, levels, progress=False, callback=lambda r: ours.append(r["x_next"]))
    assert len(ours) == 6 and max(err(a, b) for a, b in zip(ours, theirs)) <= TOL
    karras = s.replace(karras=True, sampler="dpmpp_2m")
    cosine = NoiseSchedule("cosine", sampler="dpmpp_2m", karras=True)  # DPM-Solver rounds t, except on the cosine
    for k in (karras.replace(sampler="euler"), cosine):  # level() reads sigma in float32, as set_timesteps(sigmas=)
        assert err(sample(_model("v"), noise, k, 8, prediction="v", progress=False),
                   sample(_model("v"), noise, k, [k.level(p.sigma) for p in k.grid(8)], prediction="v",
                          progress=False)) <= TOL
    with pytest.raises(ValueError, match="strictly decreasing in sigma"):
        s.trajectory(levels[::-1])
    with pytest.raises(ValueError, match="finite number > 0, got 0.0"):
        s.level(0.0)
