"""Rectified flow (Esser et al. 2024, "Scaling Rectified Flow Transformers for High-Resolution Image Synthesis"):
SD3's forward process, its training times, its shifted sampling schedule and the Euler sampler.

    schedule = FlowSchedule(shift=3.0)                         # SD3's
    x_t = schedule.add_noise(x0, noise, t)                     # (1 - t) x0 + t eps, t: FloatTensor [B] in [0, 1]
    t = sample_t(B)                                            # logit-normal(0, 1) training times
    loss = F.mse_loss(model(x_t, 1000 * t), schedule.target("v", x0, noise, t))   # or training_loss(...)
    x0 = sample(model, torch.randn(shape), schedule, steps=28, prediction="v")     # sdlearn.diffusion's loop

Notation (SD3 sec. 2-3, the "rectified flow" of Liu et al. 2022): the noise level t runs from 0 (data) to
1 (pure noise), x_t = (1 - t) x_0 + t eps, and the model predicts the velocity of that straight path,
v = dx_t/dt = eps - x_0 (SD3 eq. 1-3 with a_t = 1 - t, b_t = t). Sampling integrates dx/dt = v from t = 1 to
t = 0: one Euler step is x_next = x + (t_next - t) v. diffusers calls t "sigma", and so does this module's
schedule; the transformer reads 1000 t (`model_timesteps`). Sign convention: v points from data to noise,
eps - x0, not x0 - eps. A sign error here is the most common bug people report: a model trained with the
wrong sign, or sampled with the wrong sign, walks away from the data (the test suite checks both).

FlowSchedule is a sdlearn.diffusion.Schedule: it plugs into sdlearn.diffusion.sample and
sdlearn.pipeline.TextToImage as a NoiseSchedule does, with its Euler step registered as its sampler "euler".
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from sdlearn.diffusion import _check_output, _clip, compute_dtype, register
from sdlearn.pipeline import drop_conditions
from sdlearn.toy import GaussianMixture

PREDICTION_ALIASES = {"v": "v", "flow": "v"}
DENSITIES = ("logit_normal", "uniform", "mode")


def shift_sigmas(s, shift: float):
    """SD3 sec. 5.3.2, the resolution-dependent shift: t_m = shift t_n / (1 + (shift - 1) t_n) (shift = sqrt(m/n)
    for m pixels instead of n). shift > 1 moves every noise level up (more steps at high noise); 1: unchanged."""
    _check_shift(shift)
    return shift * s / (1 + (shift - 1) * s)


def _check_shift(shift) -> float:
    if isinstance(shift, bool) or not isinstance(shift, numbers.Real) or not math.isfinite(shift) or shift <= 0:
        raise ValueError(f"shift must be a positive number (1: no shift, SD3: 3.0), got {shift!r}")
    return float(shift)


def _check_steps(steps) -> int:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    return steps


def _as_t(t, x: torch.Tensor, what: str = "t") -> torch.Tensor:
    """t (a float, a 0-d tensor or a FloatTensor [B]) checked to lie in [0, 1], shaped [B,1,...,1] (or []) to
    broadcast over x, in x's compute dtype on x's device."""
    if isinstance(t, bool) or not isinstance(t, (numbers.Real, torch.Tensor)):
        raise TypeError(f"{what} must be a float or a float tensor [B] in [0, 1], got {type(t).__name__}")
    if isinstance(t, torch.Tensor) and not t.dtype.is_floating_point:
        raise TypeError(f"a FlowSchedule's {what} is a noise level in [0, 1] (a float tensor), got dtype {t.dtype}: "
                        f"integer timesteps belong to a NoiseSchedule")
    t = torch.as_tensor(t, dtype=torch.float64 if isinstance(t, numbers.Real) else None)
    if t.ndim > 1 or (t.ndim == 1 and x.ndim and t.shape[0] != x.shape[0]):
        raise ValueError(f"{what} must be a scalar or a tensor [B] = [{x.shape[0] if x.ndim else '?'}], "
                         f"got shape {tuple(t.shape)}")
    if t.numel() and not (t.min() >= 0 and t.max() <= 1):  # also refuses NaN
        raise ValueError(f"a FlowSchedule's {what} must lie in [0, 1] (0: data, 1: noise), got values in "
                         f"[{t.min().item():.6g}, {t.max().item():.6g}]")
    t = t.to(compute_dtype(x))
    if t.ndim == 1:
        t = t.view(-1, *([1] * (x.ndim - 1)))  # [B,1,...,1]
    return t.to(x.device)


class FlowSchedule:
    """The rectified-flow schedule: x_t = (1 - t) x0 + t eps on t in [0, 1], a model that predicts v = eps - x0,
    sampled on `sigmas(steps)` (SD3's shifted grid, as diffusers' FlowMatchEulerDiscreteScheduler) with Euler steps.

    shift: the timestep shift (SD3 sec. 5.3.2; 3.0 for SD3 at 1024 px); num_train_timesteps: the scale of what
    the model reads, 1000 t (`model_timesteps`)."""

    def __init__(self, shift: float = 3.0, num_train_timesteps: int = 1000):
        self.shift = _check_shift(shift)
        T = num_train_timesteps
        if isinstance(T, bool) or not isinstance(T, int) or T < 1:
            raise ValueError(f"num_train_timesteps must be a positive int, got {T!r}")
        self.num_train_timesteps = T

    def __len__(self) -> int:
        """The scale of the model's timesteps: it reads len(schedule) * t."""
        return self.num_train_timesteps

    def __repr__(self) -> str:
        return f"FlowSchedule(shift={self.shift}, num_train_timesteps={self.num_train_timesteps})"

    def init_args(self) -> dict:
        """What rebuilds this schedule: FlowSchedule(**init_args()) (a release stores it)."""
        return {"shift": self.shift, "num_train_timesteps": self.num_train_timesteps}

    @staticmethod
    def parse_prediction(kind: str) -> str:
        """The model's prediction type, checked: "v" (the velocity eps - x0; "flow" is an alias)."""
        if kind not in PREDICTION_ALIASES:
            raise ValueError(f"a FlowSchedule's model predicts the velocity v = eps - x0: prediction must be 'v' "
                             f"(or 'flow'), got {kind!r}")
        return PREDICTION_ALIASES[kind]

    # -- the sampling grid ---------------------------------------------------------------------------------

    def sigmas(self, steps: int) -> torch.Tensor:
        """The noise levels of a `steps`-step run -> FloatTensor [steps + 1], from 1 down to a last 0, equal to
        diffusers' FlowMatchEulerDiscreteScheduler(shift=shift).set_timesteps(steps) then `.sigmas`.

        How diffusers builds them (and SD3's reference sampler and ComfyUI's "normal" scheduler alike): the
        training grid t = 1/T .. 1 is shifted once, which gives the end points sigma_max = 1 and
        sigma_min = shift(1/T); then `steps` points are spaced evenly between those *shifted* end points, shifted
        *again*, and a 0 is appended. The paper's grid is instead shift(linspace(1, 0, steps + 1)) (pass it to
        `trajectory` as explicit sigmas). In numbers, shift = 3, T = 1000: sigma_min = 0.002994 becomes 0.008929,
        so the last step of every run goes from 0.0089 to 0 and barely moves x, and the first steps - 1 steps
        share [0.0089, 1]: 4 steps visit 1, 0.858, 0.602, 0.0089 (the paper's grid: 1, 0.9, 0.75, 0.5), and
        2 steps visit 1, 0.0089 (one Euler step does all the work), the paper's 1, 0.75. With shift = 1 there is
        no double shift but the same structure: 1, 0.667, 0.334, 0.001, 0 for 4 steps. (On the 2-D toy below,
        diffusers' 4 steps sample about as well as the paper grid's 3.)
        """
        steps = _check_steps(steps)
        T, shift = self.num_train_timesteps, self.shift
        ends = torch.tensor([T, 1], dtype=torch.float32) / T  # the training grid's end points, 1 and 1/T
        s_max, s_min = (shift * ends / (1 + (shift - 1) * ends)).tolist()  # shifted once, in float32 (diffusers)
        start, stop = s_max * T, s_min * T  # as diffusers' np.linspace(start, stop, steps), in float64
        ts = start + torch.arange(steps, dtype=torch.float64) * ((stop - start) / max(steps - 1, 1))
        if steps > 1:
            ts[-1] = stop
        s = ts / T
        s = shift * s / (1 + (shift - 1) * s)  # shifted again
        return torch.cat([s.float(), torch.zeros(1)])  # [steps + 1]

    def trajectory(self, steps: int | Sequence[float], start: float = 0.0, end: float = 1.0) -> list[float]:
        """The noise levels a sampler visits from fraction `start` to `end` of the way from noise to clean,
        followed by the one its last step lands on (0.0, the clean sample, when end = 1): [n + 1] descending floats,
        [] for n = 0.

        steps: how many steps the whole trajectory has (`sigmas(steps)`), or an explicit strictly decreasing
        sequence of the noise levels visited, in (0, 1] (0 is appended as the landing point).
        The cut is NoiseSchedule.trajectory's (diffusers' denoising_end / denoising_start) with t = sigma as the
        noise level: a step at sigma belongs to the part before fraction f when sigma > 1 - f. A run to end=f and
        a run from start=f therefore split one trajectory: the first's last step lands where the second starts.
        (diffusers' SD3 img2img cuts by step count instead, int(steps (1 - strength)) steps skipped; with this
        rule img2img at strength s starts at the first noise level below s, as in SDEdit.)
        """
        if not 0 <= start <= end <= 1:
            raise ValueError(f"start and end are fractions of the trajectory, 0 <= start <= end <= 1; got "
                             f"start={start}, end={end}")
        if isinstance(steps, int) and not isinstance(steps, bool):
            full = self.sigmas(steps).tolist()
        else:
            if isinstance(steps, (str, bytes)) or not isinstance(steps, (Sequence, torch.Tensor)):
                raise ValueError(f"steps must be an int >= 1 or a sequence of noise levels, got {steps!r}")
            full = [float(s) for s in steps]
            if not full or any(not 0 < s <= 1 for s in full) or any(a <= b for a, b in zip(full, full[1:])):
                raise ValueError(f"explicit noise levels must be a non-empty strictly decreasing sequence in (0, 1], "
                                 f"got {full}")
            full = full + [0.0]
        keep = [i for i, s in enumerate(full[:-1]) if 1 - start >= s > 1 - end]  # after start, before end
        if not keep:
            return []
        return full[keep[0]:keep[-1] + 2]

    def model_timesteps(self, sigma: float, x: torch.Tensor) -> torch.Tensor:
        """What the model reads at noise level sigma: sigma * num_train_timesteps, once per sample -> FloatTensor [B]
        (float32, as diffusers' `timesteps`; SD3's transformer embeds it with a sinusoid)."""
        _as_t(sigma, x[:1], "sigma")
        t = torch.tensor(float(sigma), dtype=torch.float32) * self.num_train_timesteps  # float32 product, as diffusers
        return torch.full((x.shape[0],), t.item(), dtype=torch.float32, device=x.device)

    def snr(self, t) -> torch.Tensor:
        """Signal-to-noise ratio ((1 - t) / t)^2 (float64): log-SNR = 2 log((1 - t) / t), SD3 sec. 3."""
        t = torch.as_tensor(t, dtype=torch.float64)
        return ((1 - t) / t) ** 2

    # -- the forward process and the parameterisation -----------------------------------------------------

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t) -> torch.Tensor:
        """x_t = (1 - t) x0 + t eps (SD3 eq. 2 with a_t = 1 - t, b_t = t); t: FloatTensor [B] (or a float) in
        [0, 1]; any shape [B,...]. diffusers: FlowMatchEulerDiscreteScheduler.scale_noise."""
        if x0.shape != noise.shape:
            raise ValueError(f"x0 and noise must have the same shape, got {tuple(x0.shape)} and {tuple(noise.shape)}")
        t = _as_t(t, x0)  # [B,1,...]
        return ((1 - t) * x0 + t * noise).to(x0.dtype)

    def target(self, prediction: str, x0: torch.Tensor, noise: torch.Tensor, t=None) -> torch.Tensor:
        """What the model should output for x_t = add_noise(x0, noise, t): v = eps - x0 (the same at every t)."""
        self.parse_prediction(prediction)
        return noise - x0

    def to_x0(self, prediction: str, model_output: torch.Tensor, x_t: torch.Tensor, t) -> torch.Tensor:
        """The model's estimate of x0 from its velocity: x0 = x_t - t v (follow the straight line to t = 0)."""
        self.parse_prediction(prediction)
        return (x_t - _as_t(t, x_t) * model_output).to(x_t.dtype)

    def to_eps(self, prediction: str, model_output: torch.Tensor, x_t: torch.Tensor, t) -> torch.Tensor:
        """The model's estimate of eps: x_t + (1 - t) v (follow the line to t = 1)."""
        self.parse_prediction(prediction)
        return (x_t + (1 - _as_t(t, x_t)) * model_output).to(x_t.dtype)


@register("euler", FlowSchedule)
def euler_step(schedule: FlowSchedule, model_output: torch.Tensor, x: torch.Tensor, t: float, t_next: float,
               prediction: str = "v", noise: torch.Tensor | None = None, generator: torch.Generator | None = None,
               clip_x0: float | None = None, state: dict | None = None) -> torch.Tensor:
    """One Euler step of dx/dt = v from noise level t to t_next: x_next = x + (t_next - t) v (SD3 sec. 2).

    Equals diffusers' FlowMatchEulerDiscreteScheduler.step (computed in float32, or float64 for a float64 x).
    Deterministic: noise, generator and state are unused (a single-step method). clip_x0=c clamps the implied
    x0 = x - t v to [-c, c] and steps as (1 - t_next) x0 + t_next eps with the implied eps = x + (1 - t) v kept
    (the same step when nothing is clipped, as DDIM keeps eps). t_next > t runs the ODE backwards (inversion,
    image -> noise)."""
    schedule.parse_prediction(prediction)
    _check_output(model_output, x)
    dtype = compute_dtype(x)
    t_, t_next_ = (torch.tensor(float(_as_t(s, x[:1], what)), dtype=dtype, device=x.device)
                   for s, what in ((t, "t"), (t_next, "t_next")))
    if clip_x0 is None:
        return (x.to(dtype) + (t_next_ - t_) * model_output).to(x.dtype)
    x0 = _clip(x - t_ * model_output, clip_x0)
    eps = x + (1 - t_) * model_output
    return ((1 - t_next_) * x0 + t_next_ * eps).to(x.dtype)



# -----------------------------------------------------------------------------
# training


def sample_t(n: int, density: str = "logit_normal", m: float = 0.0, s: float = 1.0, mode_scale: float = 1.29,
             generator: torch.Generator | None = None, device: torch.device | str | None = None) -> torch.Tensor:
    """n training noise levels t in [0, 1] -> FloatTensor [n] (SD3 sec. 3.1, the same draws as diffusers'
    training_utils.compute_density_for_timestep_sampling with the same generator).

    "logit_normal" (SD3's default, m = 0, s = 1): t = sigmoid(m + s z), z ~ N(0, 1), more training at middle t;
    "uniform": t ~ U(0, 1) (plain rectified flow);
    "mode" (eq. 19, "mode sampling with heavy tails"): t = 1 - u - mode_scale (cos^2(pi u / 2) - 1 + u),
    u ~ U(0, 1), which is a density on [0, 1] for -1 <= mode_scale <= 2 / (pi - 2); 0 is uniform; 1.29 was the
    paper's best of this family."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be an int >= 0, got {n!r}")
    if density == "logit_normal":
        if not s > 0:
            raise ValueError(f"the logit-normal density needs a scale s > 0, got {s!r}")
        return torch.sigmoid(torch.normal(mean=float(m), std=float(s), size=(n,), device=device,
                                          generator=generator))
    if density == "uniform":
        return torch.rand(n, device=device, generator=generator)
    if density == "mode":
        if not -1 <= mode_scale <= 2 / (math.pi - 2):
            raise ValueError(f"mode_scale must lie in [-1, 2 / (pi - 2) = {2 / (math.pi - 2):.4f}] for t to stay in "
                             f"[0, 1], got {mode_scale!r}")
        u = torch.rand(n, device=device, generator=generator)
        return 1 - u - mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
    raise ValueError(f"unknown density {density!r}, expected one of {DENSITIES}")


def training_loss(model: Callable, schedule: FlowSchedule, x0: torch.Tensor, cond: dict[str, torch.Tensor],
                  uncond: dict[str, torch.Tensor] | None, p_uncond: float = 0.1, density: str = "logit_normal",
                  generator: torch.Generator | None = None, pair: Callable | None = None,
                  **density_options) -> torch.Tensor:
    """The rectified-flow loss (SD3 eq. 3 with the weighting folded into t's density): E || v_theta(x_t, t) -
    (eps - x0) ||^2 over t ~ `density` (sample_t; density_options: m, s, mode_scale), eps ~ N(0, I).

    x0 [B,...] (scaled latents), the model called as model(x_t, 1000 t [B], **cond) (as `model_timesteps`);
    each sample's conditions are dropped to their unconditional twins (`uncond`, [1,...] each) with probability
    p_uncond (sdlearn.pipeline.drop_conditions), for classifier-free guidance; cond = uncond = {}: unconditional.
    pair(x0, noise, t [B]) -> (x_t, v): what makes the training pair (notebook 08's exercise 1, the learner's
    flow_pair); None: the schedule's add_noise and target."""
    B = x0.shape[0]
    if cond and uncond:
        cond = drop_conditions(cond, uncond, p_uncond, generator)
    t = sample_t(B, density, generator=generator, device=x0.device, **density_options)      # [B]
    noise = torch.randn(x0.shape, device=x0.device, generator=generator)                  # [B,...]
    if pair is None:
        x_t, v = schedule.add_noise(x0, noise, t), schedule.target("v", x0, noise, t)   # (1 - t) x0 + t eps, eps - x0
    else:
        x_t, v = pair(x0, noise, t)
    out = model(x_t, t * schedule.num_train_timesteps, **(cond or {}))
    return F.mse_loss(out.float(), v.float())


# -----------------------------------------------------------------------------
# a toy whose exact velocity is known: sdlearn.diffusion's Gaussian mixture on a straight path


def mixture_velocity(mixture: GaussianMixture, x_t: torch.Tensor, t, weights: torch.Tensor | None = None
                     ) -> torch.Tensor:
    """The exact velocity v*(x_t, t) = E[eps - x0 | x_t] [B,D] for x0 ~ `mixture` (components N(mu_k, std^2 I))
    and x_t = (1 - t) x0 + t eps; t a float or [B] in [0, 1]; weights [K] or [B,K] replace the mixture's.

    Given component k, x_t ~ N((1 - t) mu_k, var I), var = (1 - t)^2 std^2 + t^2, and (x0, eps, x_t) are jointly
    Gaussian, so E[eps - x0 | x_t, k] = (t - (1 - t) std^2) / var (x_t - (1 - t) mu_k) - mu_k; averaging over k
    with the responsibilities r_k(x_t) gives v* = (t - (1 - t) std^2) / var (x_t - (1 - t) mbar) - mbar,
    mbar = sum_k r_k mu_k. (Equivalently v* = -(x_t + t score(x_t)) / (1 - t), finite at t = 1 in this form.)"""
    x = x_t.double()                                                          # [B,D]
    t = _as_t(t, x)                                                           # [B,1] or []
    a = 1 - t
    var = a**2 * mixture.std**2 + t**2                                        # [B,1]
    means = mixture.means.to(x.device)                                        # [K,D]
    w = mixture.weights if weights is None else torch.as_tensor(weights).double()
    d2 = ((x[:, None] - a[..., None] * means) ** 2).sum(-1)                   # [B,K]
    r = (w.to(x.device).clamp_min(1e-300).log() - d2 / (2 * var)).softmax(-1)   # [B,K], responsibilities
    mbar = r @ means                                                          # [B,D]
    v = (t - a * mixture.std**2) / var * (x - a * mbar) - mbar
    return v.to(x_t.dtype)


def velocity_model(mixture: GaussianMixture, schedule: FlowSchedule) -> Callable:
    """model(x, timesteps) -> v*, the perfect velocity predictor, reading timesteps = num_train_timesteps * t as
    `sample` feeds it."""
    def model(x: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return mixture_velocity(mixture, x, timesteps.double() / schedule.num_train_timesteps)
    return model
