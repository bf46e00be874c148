"""Denoising diffusion: noise schedules, the forward process, DDPM and DDIM reverse steps, guidance.

    schedule = NoiseSchedule("scaled_linear")                  # Stable Diffusion's, 1000 steps
    x_t = schedule.add_noise(x0, noise, t)                     # q(x_t | x_0) in closed form, t: LongTensor [B]
    loss = F.mse_loss(model(x_t, t), schedule.target("eps", x0, noise, t))
    x0 = sample(model, torch.randn(shape), schedule, steps=50, cond={"context": c}, uncond={"context": c_empty},
                guidance_scale=3.0)                           # model(x, t, context=...), guided

Notation (Ho et al. 2020): beta_t is the variance added at step t, alpha_t = 1 - beta_t,
abar_t = alpha_0 * ... * alpha_t (`alphas_cumprod`), x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps,
SNR(t) = abar_t / (1 - abar_t). Timesteps are 0-based as in diffusers: t in [0, num_steps), and a
reverse step t -> t_next = -1 lands on the clean sample (abar_{-1} = 1, diffusers' set_alpha_to_one).

Precision: betas and alphas_cumprod are float32 tensors on the CPU, computed exactly as diffusers
computes them (so `alphas_cumprod` is bit-identical to DDPMScheduler's for any num_steps; a float64
cumprod would drift from it by up to ~1e-6 at 1e5 steps). Coefficients derived from them (square roots,
1 - abar, posterior coefficients) are computed, like diffusers does, in float32, or in float64 when the
sample is float64, and moved to the sample's device when used ("index-time move"): a schedule works with
tensors on any device. So the steps match diffusers' schedulers to float32 rounding at every t; near t = 0
float32 loses digits in 1 - abar_t / abar_next (about 5e-4 relative at t = 1 of the linear schedule, as
in diffusers): pass float64 samples for the exact values. snr() is computed in float64.

The reverse steps are plain functions with one signature, in the k-diffusion manner, registered by name for
the schedule class they step (`register`, `samplers`, `find_sampler`):

    x_next = ddim_step(schedule, model_output, x, t, t_next, prediction="eps", noise=None, generator=None, eta=0.0)
    x_next = ddpm_step(schedule, model_output, x, t, t_next, prediction="eps", noise=None, generator=None)

and `sample` is the one loop around them, for every model of the course. Two contracts, written here once:
a **denoiser** (`Denoiser`) is called as model(x, t, **cond) -> a tensor shaped like x, with t what the schedule
feeds it and cond a dict of conditions (the text states "context", and whatever else it reads: SDXL's pooled
text and sizes, a control image), and says its latent channels, the conditions it reads and its prediction type;
a **schedule** (`Schedule`) says which points a sampler visits and what the model reads at each (`trajectory`,
`model_timesteps`), so notebook 08's rectified-flow schedule and its Euler step plug into the same loop.
Classifier-free guidance is done in one place, `guided`.
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple, Protocol, runtime_checkable

import numpy as np
import torch
from tqdm.auto import tqdm

SCHEDULES = ("linear", "scaled_linear", "cosine")
DEFAULT_BETAS = {"linear": (1e-4, 0.02), "scaled_linear": (0.00085, 0.012)}
_SCHEDULE_ALIASES = {"squaredcos_cap_v2": "cosine"}  # diffusers' name

PREDICTIONS = ("eps", "x0", "v")
_PREDICTION_ALIASES = {"epsilon": "eps", "sample": "x0", "v_prediction": "v"}  # diffusers' names

SPACINGS = ("leading", "trailing", "linspace")
FINALS = ("zero", "sigma_min")  # where the last step lands: sigma 0 (abar 1), or sigma_min (abar_0)
SAMPLING_DEFAULTS = {"sampler": None, "karras": False, "final": "zero", "zero_snr": False, "clip_x0": None}
# whose grid a schedule samples on, per default sampler: diffusers' schedulers disagree on "leading" and "linspace"
# (DPMSolverMultistep spaces steps + 1 points and drops the last; EulerDiscrete does not round linspace) and on the
# range Karras sigmas span (Euler: the timesteps' sigmas; DPM-Solver: the whole training range, timesteps rounded)
GRIDS = {None: "ddim", "ddim": "ddim", "ddpm": "ddim", "euler": "euler", "euler_a": "euler", "dpmpp_2m": "dpm"}
KARRAS_RHO = 7.0  # Karras et al. 2022 eq. 5


def _prediction(kind: str) -> str:
    kind = _PREDICTION_ALIASES.get(kind, kind)
    if kind not in PREDICTIONS:
        raise ValueError(f"unknown prediction type {kind!r}, expected one of {PREDICTIONS} "
                         f"(or diffusers' {tuple(_PREDICTION_ALIASES)})")
    return kind


def cosine_betas(num_steps: int, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """Nichol & Dhariwal 2021 eq. 17: abar(t) = cos^2((t/T + s)/(1 + s) pi/2),
    beta_t = 1 - abar_t/abar_{t-1} <= 0.999."""

    def f(u):
        return math.cos((u + s) / (1 + s) * math.pi / 2) ** 2

    betas = [min(1 - f((i + 1) / num_steps) / f(i / num_steps), max_beta) for i in range(num_steps)]
    return torch.tensor(betas, dtype=torch.float32)  # as diffusers' betas_for_alpha_bar


class NoiseSchedule:
    """The variances beta_0..beta_{T-1} of the forward process and everything derived from them.

    kind: "linear" (Ho et al. 2020, betas 1e-4..0.02), "scaled_linear" (Stable Diffusion: linear in
    sqrt(beta), 0.00085..0.012) or "cosine" (Nichol & Dhariwal 2021; diffusers' "squaredcos_cap_v2").
    spacing, offset: the sampling grid `timesteps` makes by default (diffusers' timestep_spacing, steps_offset;
    the released SD 1.x / 2.x / SDXL checkpoints sample on "leading" with offset 1).
    How a run samples (a checkpoint's scheduler config, `sdlearn.convert.schedule_from_diffusers`; all stored by
    init_args, so a saved pipeline keeps them):
      sampler: the default sampler of `sample` ("ddim" if None), and whose grid `trajectory` makes (GRIDS:
        DDIMScheduler's, EulerDiscreteScheduler's or DPMSolverMultistepScheduler's set_timesteps);
      karras: Karras et al. 2022 eq. 5 sigmas (rho = 7; diffusers' use_karras_sigmas): the points become
        `Level(t, sigma)`, the timestep interpolated from log sigma (fractional; DPM-Solver's rounded);
      final: where the last step lands, "zero" (sigma 0, abar 1: DDIM's set_alpha_to_one=True) or "sigma_min"
        (abar_0: set_alpha_to_one=False, SD 1.5's published config; final_sigmas_type="sigma_min");
      zero_snr: rescale the betas to zero terminal SNR (Lin et al. 2024 alg. 1; rescale_betas_zero_snr);
      clip_x0: clamp every predicted x0 to [-clip_x0, clip_x0] (clip_sample with clip_sample_range).
    Tensors (float32, CPU, as diffusers'): betas, alphas, alphas_cumprod, sigmas, each [num_steps].
    """

    def __init__(self, kind: str = "linear", num_steps: int = 1000, beta_start: float | None = None,
                 beta_end: float | None = None, spacing: str = "leading", offset: int = 0, sampler: str | None = None,
                 karras: bool = False, final: str = "zero", zero_snr: bool = False, clip_x0: float | None = None):
        kind = _SCHEDULE_ALIASES.get(kind, kind)
        if kind not in SCHEDULES:
            raise ValueError(f"unknown schedule kind {kind!r}, expected one of {SCHEDULES}")
        if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
            raise ValueError(f"num_steps must be a positive int, got {num_steps!r}")
        if kind == "cosine":
            if beta_start is not None or beta_end is not None:
                raise ValueError("the cosine schedule is defined by abar(t), it takes no beta_start / beta_end")
            betas = cosine_betas(num_steps)
        else:
            b0, b1 = DEFAULT_BETAS[kind]
            beta_start = b0 if beta_start is None else float(beta_start)
            beta_end = b1 if beta_end is None else float(beta_end)
            if not 0 < beta_start <= beta_end < 1:
                raise ValueError(f"need 0 < beta_start <= beta_end < 1, got {beta_start}, {beta_end}")
            if kind == "linear":
                betas = torch.linspace(beta_start, beta_end, num_steps, dtype=torch.float32)
            else:
                betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_steps, dtype=torch.float32) ** 2
        if spacing not in SPACINGS:
            raise ValueError(f"unknown timestep spacing {spacing!r}, expected one of {SPACINGS}")
        if isinstance(offset, bool) or not isinstance(offset, int) or not 0 <= offset < num_steps:
            raise ValueError(f"offset must be an int in 0..{num_steps - 1} (SD: 1), got {offset!r}")
        self.kind, self.num_steps = kind, num_steps
        self.beta_start, self.beta_end = beta_start, beta_end
        self.spacing, self.offset = spacing, offset
        self._set_sampling(sampler, karras, final, zero_snr, clip_x0)
        self.betas = rescale_zero_terminal_snr(betas) if zero_snr else betas  # [T] float32
        self.alphas = 1.0 - self.betas  # [T]
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)  # [T], bit-identical to diffusers'
        # sigma_t = sqrt((1 - abar_t) / abar_t) (Karras et al. 2022 eq. 4, s(t) = sqrt(abar)), float32 as diffusers';
        # with zero terminal SNR the last abar is 2^-24 here (diffusers' Euler and DPM-Solver: "so sigma is not inf")
        abar = self.alphas_cumprod.clone()
        if zero_snr:
            abar[-1] = 2.0**-24
        self.sigmas = ((1 - abar) / abar) ** 0.5  # [T]

    def _set_sampling(self, sampler, karras, final, zero_snr, clip_x0) -> None:
        """Check and keep the sampling settings (see the class docstring)."""
        if sampler is not None:
            find_sampler(self, sampler)  # a name registered for NoiseSchedule, or a clear error listing them
        for name, value in (("karras", karras), ("zero_snr", zero_snr)):
            if not isinstance(value, bool):
                raise TypeError(f"{name} must be a bool, got {type(value).__name__} {value!r}")
        if final not in FINALS:
            raise ValueError(f"final must be one of {FINALS} (diffusers' final_sigmas_type; DDIM's set_alpha_to_one="
                             f"False is 'sigma_min'), got {final!r}")
        _clip(torch.zeros(()), clip_x0)
        self.sampler, self.karras, self.final, self.zero_snr, self.clip_x0 = sampler, karras, final, zero_snr, clip_x0

    def __len__(self) -> int:
        return self.num_steps

    @staticmethod
    def parse_prediction(kind: str) -> str:
        """A model's prediction type, checked: "eps", "x0" or "v" (diffusers' "epsilon", "sample", "v_prediction")."""
        return _prediction(kind)

    def _settings(self) -> dict:
        """The grid and sampling settings that differ from the defaults (a course schedule has none)."""
        grid = {} if (self.spacing, self.offset) == ("leading", 0) else {"spacing": self.spacing, "offset": self.offset}
        return {**grid, **{k: getattr(self, k) for k, default in SAMPLING_DEFAULTS.items()
                           if getattr(self, k) != default}}

    def init_args(self) -> dict:
        """What rebuilds this schedule: NoiseSchedule(**init_args()) (a release stores it)."""
        return {"kind": self.kind, "num_steps": self.num_steps,
                "beta_start": self.beta_start, "beta_end": self.beta_end, **self._settings()}

    def replace(self, **changes) -> NoiseSchedule:
        """A copy with some settings changed, e.g. schedule.replace(karras=True, sampler="dpmpp_2m")."""
        return NoiseSchedule(**{**self.init_args(), **changes})

    def __repr__(self) -> str:
        betas = "" if self.kind == "cosine" else f", beta_start={self.beta_start}, beta_end={self.beta_end}"
        settings = self._settings()
        if "spacing" in settings:  # as before the sampling settings: spacing then offset
            settings = {"spacing": self.spacing, "offset": self.offset, **settings}
        return f"NoiseSchedule({self.kind!r}, num_steps={self.num_steps}{betas}" + \
            "".join(f", {k}={v!r}" for k, v in settings.items()) + ")"

    # -- timesteps ---------------------------------------------------------------------------------------

    def check_t(self, t, batch: int | None = None) -> torch.Tensor:
        """t as a LongTensor ([] or [B]), after checking its dtype, shape and range [0, num_steps)."""
        if isinstance(t, bool) or not isinstance(t, (numbers.Integral, torch.Tensor)):
            raise TypeError(f"timesteps must be an int or an integer tensor, got {type(t).__name__}")
        t = torch.as_tensor(t)
        if t.dtype.is_floating_point or t.dtype == torch.bool or t.dtype.is_complex:
            raise TypeError(f"timesteps must be integers (a LongTensor), got dtype {t.dtype}")
        if t.ndim > 1:
            raise ValueError(f"timesteps must be a scalar or a 1-D tensor [B], got shape {tuple(t.shape)}")
        if batch is not None and t.ndim == 1 and t.shape[0] != batch:
            raise ValueError(f"timestep tensor has batch size {t.shape[0]} but the sample has batch size {batch}")
        if t.numel() and (t.min() < 0 or t.max() >= self.num_steps):
            raise ValueError(f"timesteps must lie in [0, {self.num_steps}), got values in "
                             f"[{int(t.min())}, {int(t.max())}]")
        return t.long()

    def gather(self, values: torch.Tensor, t, x: torch.Tensor) -> torch.Tensor:
        """values[t] shaped to broadcast over x: [B,1,...,1] (or [] for a scalar t), on x's device,
        in x's compute dtype (float64 for a float64 x, else float32). At a Level (values must be alphas_cumprod),
        abar = 1 / (1 + sigma^2)."""
        if isinstance(t, Level):
            if values is not self.alphas_cumprod:
                raise TypeError("at a Level (t, sigma) only abar is defined: 1 / (1 + sigma^2)")
            return torch.tensor(1 / (1 + t.sigma**2), dtype=compute_dtype(x), device=x.device)
        t = self.check_t(t, batch=x.shape[0] if x.ndim else None)
        v = values[t.cpu()].to(compute_dtype(x))  # [B] or []; cast on the CPU: some devices (mps) lack float64
        if t.ndim == 1:
            v = v.view(-1, *([1] * (x.ndim - 1)))  # [B,1,...,1]: broadcast over every dim but the batch
        return v.to(x.device)

    def timesteps(self, steps: int, spacing: str | None = None, offset: int | None = None) -> torch.Tensor:
        """`steps` timesteps from noisy to clean, as diffusers' set_timesteps -> LongTensor [steps], descending.
        spacing and offset default to the schedule's.

        "leading" (diffusers' default): 0, k, 2k, ... with k = T // steps, reversed (plus `offset`, SD uses 1);
        "trailing": T-1, T-1-k, ... (always starts at the noisiest step; Lin et al. 2023 table 2);
        "linspace": round(linspace(0, T-1, steps)), reversed.
        """
        T = self.num_steps
        spacing = self.spacing if spacing is None else spacing
        offset = self.offset if offset is None else offset
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be a positive int, got {steps!r}")
        if steps > T:
            raise ValueError(f"asked for {steps} sampling steps but the schedule has only {T} timesteps")
        if spacing == "leading":
            ts = torch.arange(steps) * (T // steps) + offset
        elif spacing == "trailing":
            ts = torch.round(torch.arange(T, 0, -T / steps, dtype=torch.float64)).long() - 1
            ts = ts.flip(0)
        elif spacing == "linspace":
            ts = torch.linspace(0, T - 1, steps, dtype=torch.float64).round().long()
        else:
            raise ValueError(f"unknown timestep spacing {spacing!r}, expected one of {SPACINGS}")
        ts = ts.flip(0).long()
        self.check_t(ts)
        return ts

    def grid(self, steps: int) -> list:
        """The `steps` points of a whole run, noisy first, as the sampler's diffusers scheduler makes them
        (`sampler`, GRIDS): ints (the timesteps) or, with Karras sigmas or Euler's unrounded linspace, Levels."""
        kind = GRIDS.get(self.sampler, "ddim")
        if kind == "dpm" and self.spacing != "trailing":
            ts = self._dpm_timesteps(steps)
        else:
            ts = self.timesteps(steps).numpy()
            if kind == "euler" and self.spacing == "linspace":  # EulerDiscreteScheduler does not round linspace
                ts = np.linspace(0, self.num_steps - 1, steps, dtype=np.float32)[::-1].copy()
        if not self.karras and ts.dtype.kind == "i":
            return [int(t) for t in ts]
        table = self.sigmas.numpy()
        sigmas = np.interp(ts, np.arange(self.num_steps), table)  # exact at ints; linear between (diffusers')
        if self.karras:
            s_max, s_min = (table[-1], table[0]) if kind == "dpm" else (sigmas[0], sigmas[-1])
            sigmas = karras_sigmas(float(s_max), float(s_min), steps)
            ts = _sigma_to_t(sigmas, np.log(table))
            if kind == "dpm" and self.kind != "cosine":
                ts = ts.round()  # DPMSolverMultistepScheduler feeds the model integer timesteps
        return [Level(float(t), float(s)) for t, s in zip(ts.astype(np.float32), sigmas.astype(np.float32))]

    def _dpm_timesteps(self, steps: int) -> np.ndarray:
        """DPMSolverMultistepScheduler's "leading" and "linspace": steps + 1 points, the last (t = 0) dropped."""
        self.timesteps(steps)  # the same checks of steps
        T = self.num_steps
        if self.spacing == "linspace":
            return np.linspace(0, T - 1, steps + 1).round()[::-1][:-1].astype(np.int64)
        return (np.arange(0, steps + 1) * (T // (steps + 1))).round()[::-1][:-1].astype(np.int64) + self.offset

    def level(self, sigma: float) -> Level:
        """The trajectory point at noise level `sigma` > 0: Level(t, sigma), t interpolated linearly in log sigma
        between the training timesteps (diffusers' _sigma_to_t, as EulerDiscreteScheduler.set_timesteps(sigmas=...)
        places explicit noise levels: from sigma in float32). A descending list of them is a run's explicit `steps`."""
        if isinstance(sigma, bool) or not isinstance(sigma, numbers.Real) or not 0 < sigma < math.inf:
            raise ValueError(f"a noise level sigma must be a finite number > 0, got {sigma!r}")
        sigma = np.array([sigma], dtype=np.float32)  # [1]
        t = _sigma_to_t(sigma, np.log(self.sigmas.numpy()))[0]
        return Level(float(np.float32(t)), float(sigma[0]))

    def sigma(self, t) -> float:
        """The noise level sigma = sqrt((1 - abar) / abar) of trajectory point t: an int timestep, a Level, or -1,
        the end of the trajectory (0, or sigma_min = sigmas[0] when final="sigma_min")."""
        if isinstance(t, Level):
            return t.sigma if t.t != -1 else self.sigma(-1)
        t = int(t)
        if t == -1:
            return float(self.sigmas[0]) if self.final == "sigma_min" else 0.0
        return float(self.sigmas[int(self.check_t(t))])

    def trajectory(self, steps: int | Sequence[int], start: float = 0.0, end: float = 1.0,
                   spacing: str | None = None) -> list:
        """The points a sampler visits from fraction `start` to `end` of the way from noise to clean, followed
        by the one its last step lands on (-1, the end of the trajectory, when end = 1): [n + 1] descending points
        (ints, or Levels with Karras sigmas), [] for n = 0.

        steps: how many steps the whole trajectory has (`grid(steps)`, or `timesteps(steps, spacing)` when a
        spacing is given), an explicit descending sequence of timesteps, or of noise levels `level(sigma)` (diffusers'
        set_timesteps(sigmas=...)). The cut is diffusers' denoising_end /
        denoising_start: a step at t belongs to the part before fraction f when t >= round(T (1 - f)). So a base
        run to end=0.8 and a refiner run from start=0.8 share the trajectory: the base's last step lands where the
        refiner's first step starts.
        """
        if not 0 <= start <= end <= 1:
            raise ValueError(f"start and end are fractions of the trajectory, 0 <= start <= end <= 1; got "
                             f"start={start}, end={end}")
        if isinstance(steps, int) and not isinstance(steps, bool):
            full = self.grid(steps) if spacing is None else self.timesteps(steps, spacing).tolist()
        elif isinstance(steps, (list, tuple)) and steps and all(isinstance(p, Level) for p in steps):
            full = list(steps)
            if any(a.sigma <= b.sigma for a, b in zip(full, full[1:])):
                raise ValueError(f"explicit noise levels must be strictly decreasing in sigma, got "
                                 f"{[p.sigma for p in full]}")
        else:
            full = self.check_t(torch.as_tensor(list(steps))).tolist()
            if len(full) == 0 or any(a <= b for a, b in zip(full, full[1:])):
                raise ValueError(f"explicit timesteps must be a non-empty strictly decreasing sequence, got {full}")
        T = self.num_steps
        keep = [i for i, t in enumerate(_timestep(p) for p in full)
                if (start == 0 or t < round(T * (1 - start))) and (end == 1 or t >= round(T * (1 - end)))]
        if not keep:
            return []
        landing = Level(-1.0, self.sigma(-1)) if isinstance(full[0], Level) else -1  # a list of one kind: sortable
        return full[keep[0]:keep[-1] + 1] + (full + [landing])[keep[-1] + 1:keep[-1] + 2]

    def model_timesteps(self, t, x: torch.Tensor) -> torch.Tensor:
        """What a denoiser reads at trajectory point t, once per sample: the integer timestep -> LongTensor [B];
        a Level's (possibly fractional) timestep -> FloatTensor [B] (float32, as diffusers' Euler timesteps)."""
        if isinstance(t, Level):
            return torch.full((x.shape[0],), t.t, dtype=torch.float32, device=x.device)
        return torch.full((x.shape[0],), int(t), dtype=torch.long, device=x.device)

    def snr(self, t) -> torch.Tensor:
        """Signal-to-noise ratio abar_t / (1 - abar_t) (Kingma et al. 2021), float64."""
        abar = self.alphas_cumprod[self.check_t(t)].double()
        return abar / (1 - abar)

    def log_snr(self, t) -> torch.Tensor:
        return self.snr(t).log()

    # -- the forward process and the parameterisations ---------------------------------------------------

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t) -> torch.Tensor:
        """q(x_t | x_0) in closed form (Ho et al. eq. 4): sqrt(abar_t) x0 + sqrt(1 - abar_t) eps; any shape [B,...]."""
        if x0.shape != noise.shape:
            raise ValueError(f"x0 and noise must have the same shape, got {tuple(x0.shape)} and {tuple(noise.shape)}")
        abar = self.gather(self.alphas_cumprod, t, x0)  # [B,1,...]
        return (abar.sqrt() * x0 + (1 - abar).sqrt() * noise).to(x0.dtype)

    def velocity(self, x0: torch.Tensor, noise: torch.Tensor, t) -> torch.Tensor:
        """v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0 (Salimans & Ho 2022, section 4; SD 2.x 768-v)."""
        abar = self.gather(self.alphas_cumprod, t, x0)
        return (abar.sqrt() * noise - (1 - abar).sqrt() * x0).to(x0.dtype)

    def target(self, prediction: str, x0: torch.Tensor, noise: torch.Tensor, t) -> torch.Tensor:
        """What a model trained with `prediction` ("eps" | "x0" | "v") should output
        for x_t = add_noise(x0, noise, t)."""
        prediction = _prediction(prediction)
        if prediction == "eps":
            return noise
        if prediction == "x0":
            return x0
        return self.velocity(x0, noise, t)

    def to_x0(self, prediction: str, model_output: torch.Tensor, x_t: torch.Tensor, t) -> torch.Tensor:
        """The model's estimate of x_0: from eps, (x_t - sqrt(1-abar) eps) / sqrt(abar);
        from v, sqrt(abar) x_t - sqrt(1-abar) v."""
        prediction = _prediction(prediction)
        abar = self.gather(self.alphas_cumprod, t, x_t)
        if prediction == "eps":
            x0 = (x_t - (1 - abar).sqrt() * model_output) / abar.sqrt()
        elif prediction == "x0":
            x0 = model_output
        else:
            x0 = abar.sqrt() * x_t - (1 - abar).sqrt() * model_output
        return x0.to(x_t.dtype)

    def to_eps(self, prediction: str, model_output: torch.Tensor, x_t: torch.Tensor, t) -> torch.Tensor:
        """The model's estimate of eps: from x0, (x_t - sqrt(abar) x0) / sqrt(1-abar);
        from v, sqrt(abar) v + sqrt(1-abar) x_t."""
        prediction = _prediction(prediction)
        abar = self.gather(self.alphas_cumprod, t, x_t)
        if prediction == "eps":
            eps = model_output
        elif prediction == "x0":
            eps = (x_t - abar.sqrt() * model_output) / (1 - abar).sqrt()
        else:
            eps = abar.sqrt() * model_output + (1 - abar).sqrt() * x_t
        return eps.to(x_t.dtype)

    def abar_pair(self, t, t_next, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """(abar_t, abar_{t_next}) as 0-d tensors of `dtype` for one step t -> t_next; at the end of the trajectory
        (t_next = -1) abar is 1, or abar_0 when final="sigma_min" (DDIM's set_alpha_to_one=False); at a Level,
        1 / (1 + sigma^2)."""
        if isinstance(t, Level) or isinstance(t_next, Level):
            s, s_next = self.sigma(t), self.sigma(_point(t_next))
            if not s_next <= s:
                raise ValueError(f"a reverse step goes to a lower noise level, got sigma {s} -> {s_next}")
            return (torch.tensor(1 / (1 + s**2), dtype=dtype), torch.tensor(1 / (1 + s_next**2), dtype=dtype))
        if isinstance(t_next, bool) or not isinstance(t_next, (numbers.Integral, torch.Tensor)):
            raise TypeError(f"t_next must be an int or a Level, got {type(t_next).__name__}")
        t, t_next = int(self.check_t(t)), int(t_next)
        if not -1 <= t_next < t:
            raise ValueError(f"a reverse step goes from t to an earlier t_next in [-1, t), got t={t}, t_next={t_next}")
        abar = self.alphas_cumprod.to(dtype)
        if t_next >= 0:
            return abar[t], abar[t_next]
        return abar[t], abar[0] if self.final == "sigma_min" else torch.ones((), dtype=dtype)


class Level(NamedTuple):
    """A point of a trajectory off the integer timesteps (Karras sigmas): t, what the model reads (fractional, the
    timestep interpolated from log sigma as diffusers' _sigma_to_t), and sigma, its noise level, kept exact."""

    t: float
    sigma: float


def with_karras(schedule, karras: bool = True):
    """`schedule` with Karras sigmas on (NoiseSchedule.replace(karras=...)); any other schedule is a clear error."""
    if not isinstance(schedule, NoiseSchedule):
        raise ValueError(f"Karras sigmas (Karras et al. 2022 eq. 5) are a NoiseSchedule setting (they space a VP "
                         f"schedule's sigma = sqrt((1 - abar) / abar)); a {type(schedule).__name__} samples on its own "
                         f"grid: a FlowSchedule on SD3's shifted noise levels (its shift sets the spacing), or on "
                         f"explicit noise levels passed as `steps`")
    return schedule.replace(karras=karras)


def _timestep(p) -> float:
    return p.t if isinstance(p, Level) else p


def _point(p):
    """A trajectory point as given (int or Level), after checking its type."""
    if isinstance(p, Level) or (isinstance(p, (numbers.Integral, torch.Tensor)) and not isinstance(p, bool)):
        return p
    raise TypeError(f"a trajectory point is an int timestep or a Level(t, sigma), got {type(p).__name__}")


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Lin et al. 2024 ("Common diffusion noise schedules and sample steps are flawed") alg. 1: shift and scale
    sqrt(abar) so that abar_{T-1} = 0 (zero terminal SNR) and abar_0 is unchanged -> betas [T] (diffusers'
    rescale_zero_terminal_snr, same float32 arithmetic). A model must then predict v or x0: eps says nothing at
    abar = 0."""
    abar_sqrt = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = abar_sqrt[0].clone(), abar_sqrt[-1].clone()
    abar_sqrt = (abar_sqrt - last) * (first / (first - last))
    abar = abar_sqrt**2
    alphas = torch.cat([abar[0:1], abar[1:] / abar[:-1]])
    return 1 - alphas


def karras_sigmas(sigma_max: float, sigma_min: float, n: int) -> np.ndarray:
    """Karras et al. 2022 eq. 5: sigma_i = (smax^(1/rho) + i / (n - 1) (smin^(1/rho) - smax^(1/rho)))^rho,
    i = 0..n-1, rho = 7 -> float64 [n] (diffusers' _convert_to_karras). Dense near sigma_min, sparse near sigma_max."""
    ramp = np.linspace(0, 1, n)
    lo, hi = sigma_min ** (1 / KARRAS_RHO), sigma_max ** (1 / KARRAS_RHO)
    return (hi + ramp * (lo - hi)) ** KARRAS_RHO


def _sigma_to_t(sigmas: np.ndarray, log_table: np.ndarray) -> np.ndarray:
    """The fractional timesteps of noise levels `sigmas`: t linear in log sigma between the training timesteps
    (diffusers' _sigma_to_t, same arithmetic)."""
    log_sigma = np.log(np.maximum(sigmas, 1e-10))
    dists = log_sigma - log_table[:, None]
    low = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=log_table.shape[0] - 2)
    w = np.clip((log_table[low] - log_sigma) / (log_table[low] - log_table[low + 1]), 0, 1)
    return (1 - w) * low + w * (low + 1)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The precision schedule coefficients are computed in for a sample x: float64 for float64, else float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


# -----------------------------------------------------------------------------
# the two contracts the sampling loop relies on: a denoiser and a schedule


@runtime_checkable
class Denoiser(Protocol):
    """What the sampling loop and the pipeline call: model(x [B,C,H,W], t [B], **cond) -> prediction [B,C,H,W].

    latent_channels: C, the channels of x and of the prediction.
    cond_dims: the keyword conditions it reads and the width of each (the last axis of text states [B,L,D] or of a
        vector [B,D]; the channel axis of an image or a map [B,C,H,W]).
    prediction: what it outputs: "eps", "x0" or "v" for a NoiseSchedule, "v" (= eps - x0) for a FlowSchedule.
    The UNet (notebook 05), SDXL's UNet (07), the MMDiT (08) and any module that wraps one of them (a ControlNet, an
    adapter) are denoisers; a wrapper reports what the whole reads."""

    latent_channels: int
    cond_dims: dict[str, int]
    prediction: str

    def __call__(self, x: torch.Tensor, t: torch.Tensor, **cond) -> torch.Tensor: ...


@runtime_checkable
class Schedule(Protocol):
    """A forward process and the grid a sampler walks: NoiseSchedule (here), FlowSchedule (notebook 08).

    A point of the trajectory is whatever the schedule indexes noise levels with (an int timestep, a float sigma);
    `trajectory` lists the points a run visits, `model_timesteps` turns one into what the denoiser reads, and the
    step functions registered for the schedule's class (`register`, `samplers`) move x from one point to the next."""

    def __len__(self) -> int: ...                                       # the scale of the timesteps a model reads
    def init_args(self) -> dict: ...                                    # what rebuilds it: type(s)(**s.init_args())
    def parse_prediction(self, kind: str) -> str: ...                   # a prediction type it can sample, checked
    def trajectory(self, steps, start: float = 0.0, end: float = 1.0) -> list: ...   # [n + 1] points, noisy first
    def model_timesteps(self, t, x: torch.Tensor) -> torch.Tensor: ...  # point t -> what the model reads, [B]
    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t) -> torch.Tensor: ...     # the forward process
    def target(self, prediction: str, x0: torch.Tensor, noise: torch.Tensor, t) -> torch.Tensor: ...
    def to_x0(self, prediction: str, model_output: torch.Tensor, x_t: torch.Tensor, t) -> torch.Tensor: ...
    def to_eps(self, prediction: str, model_output: torch.Tensor, x_t: torch.Tensor, t) -> torch.Tensor: ...


# -----------------------------------------------------------------------------
# the reverse process: step functions, one signature
#
#     x_next = step(schedule, model_output, x, t, t_next, *, prediction, noise=None, generator=None, clip_x0=None,
#                   **options)
#
# from point t of the schedule's trajectory to the next one, t_next (-1, the clean sample, after a NoiseSchedule's
# last timestep). `register` records a step function for a schedule class under a name, with its options.


@dataclass(frozen=True)
class Sampler:
    """A registered step function: its name, the schedule class whose points it steps, its extra keywords."""

    name: str
    schedule: type
    step: Callable[..., torch.Tensor]
    options: tuple[str, ...] = ()


SAMPLERS: list[Sampler] = []  # in registration order: a schedule's first is its default


def register(name: str, schedule: type, options: Sequence[str] = ()) -> Callable:
    """Decorator: record `step` as sampler `name` for `schedule` (and its subclasses), taking `options`."""
    def record(step: Callable) -> Callable:
        if any(s.name == name and s.schedule is schedule for s in SAMPLERS):
            raise ValueError(f"a sampler {name!r} is already registered for {schedule.__name__}")
        SAMPLERS.append(Sampler(name, schedule, step, tuple(options)))
        return step
    return record


def samplers(schedule) -> list[Sampler]:
    """The samplers that step `schedule`, its default first."""
    return [s for s in SAMPLERS if isinstance(schedule, s.schedule)]


def find_sampler(schedule, name: str | None = None, options: Sequence[str] = ()) -> Sampler:
    """The sampler `name` of this schedule (None: its default), after checking that it takes `options`."""
    known = samplers(schedule)
    if not known:
        raise ValueError(f"no sampler is registered for a {type(schedule).__name__} (sdlearn.diffusion.register)")
    found = known[0] if name is None else next((s for s in known if s.name == name), None)
    if found is None:
        raise ValueError(f"unknown sampler {name!r} for a {type(schedule).__name__}, expected one of "
                         f"{tuple(s.name for s in known)}")
    for key in options:
        if key not in found.options:
            raise ValueError(f"the {found.name!r} sampler has no option {key!r} (its options: "
                             f"{', '.join(found.options) or 'none'})")
    return found


def posterior(schedule: NoiseSchedule, x0: torch.Tensor, x_t: torch.Tensor, t: int, t_next: int | None = None):
    """q(x_{t_next} | x_t, x_0) = N(mean, variance I) (Ho et al. eq. 6-7) -> (mean, variance as a float).

    With a_t = abar_t / abar_next (alpha_t for a single step, t_next = t - 1, the default) and b_t = 1 - a_t:
    mean = sqrt(abar_next) b_t / (1 - abar_t) x0 + sqrt(a_t) (1 - abar_next) / (1 - abar_t) x_t,
    variance = (1 - abar_next) / (1 - abar_t) b_t   ("fixed_small", beta tilde). At t_next = -1: mean = x0, variance 0.
    """
    abar_t, abar_next = schedule.abar_pair(t, int(t) - 1 if t_next is None else t_next, compute_dtype(x_t))
    a_t = abar_t / abar_next  # alpha_t of the (possibly strided) step
    b_t = 1 - a_t  # beta_t
    c_x0 = abar_next**0.5 * b_t / (1 - abar_t)
    c_xt = a_t**0.5 * (1 - abar_next) / (1 - abar_t)
    variance = (1 - abar_next) / (1 - abar_t) * b_t
    mean = float(c_x0) * x0 + float(c_xt) * x_t
    return mean, float(variance)


def _randn(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Standard normal noise shaped like x, drawn on the generator's device (as diffusers' randn_tensor)."""
    dev = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, device=dev, dtype=x.dtype).to(x.device)


def _check_output(model_output: torch.Tensor, x: torch.Tensor) -> None:
    if not isinstance(model_output, torch.Tensor) or model_output.shape != x.shape:
        got = tuple(model_output.shape) if isinstance(model_output, torch.Tensor) else type(model_output).__name__
        raise ValueError(f"the model output must have the sample's shape {tuple(x.shape)}, got {got}")


def _clip(x0: torch.Tensor, clip_x0: float | None) -> torch.Tensor:
    """x0 clamped to [-clip_x0, clip_x0] (diffusers' clip_sample / clip_sample_range); None: unchanged."""
    if clip_x0 is None:
        return x0
    if isinstance(clip_x0, bool) or not isinstance(clip_x0, numbers.Real) or not clip_x0 > 0:
        raise ValueError(f"clip_x0 must be a positive number (or None: no clipping), got {clip_x0!r}")
    return x0.clamp(-float(clip_x0), float(clip_x0))


@register("ddim", NoiseSchedule, options=("eta",))
def ddim_step(schedule: NoiseSchedule, model_output: torch.Tensor, x: torch.Tensor, t: int, t_next: int,
              prediction: str = "eps", noise: torch.Tensor | None = None,
              generator: torch.Generator | None = None, clip_x0: float | None = None, state: dict | None = None,
              eta: float = 0.0) -> torch.Tensor:
    """One DDIM step x_t -> x_{t_next} over any subset of timesteps (Song et al. 2021 eq. 12 and 16).

    x_next = sqrt(abar_next) x0_hat + sqrt(1 - abar_next - sigma^2) eps_hat + sigma z,
    sigma = eta sqrt((1 - abar_next) / (1 - abar_t)) sqrt(1 - abar_t / abar_next).
    eta = 0: deterministic (DDIM); eta = 1: the DDPM ancestral step. clip_x0=c clamps x0_hat to [-c, c]
    (eps_hat is kept as predicted). Equals diffusers' DDIMScheduler.step (clip_sample=False, or clip_sample=True with
    clip_sample_range=c when clip_x0=c; set_alpha_to_one=True, or False with the schedule's final="sigma_min").
    At Levels (Karras sigmas) abar = 1 / (1 + sigma^2): deterministic DDIM is then Euler in sigma space (Karras
    et al. 2022 sec. 3), up to the last step. state: unused (a single-step method).
    """
    _check_output(model_output, x)
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    abar_t, abar_next = schedule.abar_pair(t, t_next, compute_dtype(x))
    x0 = _clip(schedule.to_x0(prediction, model_output, x, t), clip_x0)
    eps = schedule.to_eps(prediction, model_output, x, t)
    sigma = eta * ((1 - abar_next) / (1 - abar_t) * (1 - abar_t / abar_next)) ** 0.5  # eq. 16
    direction = (1 - abar_next - sigma**2).clamp_min(0) ** 0.5  # "direction pointing to x_t"
    x_next = float(abar_next**0.5) * x0 + float(direction) * eps
    sigma = float(sigma)
    if eta > 0:  # as diffusers: noise is drawn whenever eta > 0
        z = _randn(x, generator) if noise is None else noise
        x_next = x_next + sigma * z
    return x_next


@register("ddpm", NoiseSchedule)
def ddpm_step(schedule: NoiseSchedule, model_output: torch.Tensor, x: torch.Tensor, t: int, t_next: int,
              prediction: str = "eps", noise: torch.Tensor | None = None,
              generator: torch.Generator | None = None, clip_x0: float | None = None,
              state: dict | None = None) -> torch.Tensor:
    """One ancestral step x_t -> x_{t_next} (Ho et al. algorithm 2, via eq. 6-7 with the predicted x0).

    x_next = posterior mean(x0_hat, x_t) + sqrt(posterior variance) z, z ~ N(0, I) (or `noise`), no noise at t = 0.
    clip_x0=c clamps x0_hat to [-c, c] first (Ho et al.'s pixel-space sampler, c = 1 for data in [-1, 1]).
    Equals diffusers' DDPMScheduler.step (variance_type="fixed_small"; clip_sample=False, or
    clip_sample=True with clip_sample_range=c when clip_x0=c). state: unused (a single-step method).
    """
    _check_output(model_output, x)
    x0 = _clip(schedule.to_x0(prediction, model_output, x, t), clip_x0)
    mean, variance = posterior(schedule, x0, x, t, t_next)
    if _timestep(t) > 0:  # diffusers draws noise for every t > 0 (variance is 0 only when t_next = -1)
        z = _randn(x, generator) if noise is None else noise
        mean = mean + variance**0.5 * z
    return mean


# -----------------------------------------------------------------------------
# sampling as solving an ODE: Euler in sigma space, Euler ancestral, DPM-Solver++(2M)
#
# In Karras et al.'s coordinates x_sigma = x / sqrt(abar) = x0 + sigma eps (sigma = sqrt((1 - abar) / abar)) the
# probability-flow ODE is dx_sigma / dsigma = (x_sigma - x0_hat) / sigma (Karras et al. 2022 eq. 3 with s = 1).
# The loop's x stays the sample the model reads, x_t = x_sigma / sqrt(sigma^2 + 1); each step converts.


def _sigma_space(schedule: NoiseSchedule, model_output: torch.Tensor, x: torch.Tensor, t, prediction: str,
                 clip_x0: float | None) -> tuple[float, torch.Tensor, torch.Tensor]:
    """(sigma, x_sigma, x0_hat) at point t: x_sigma = x sqrt(sigma^2 + 1), and x0_hat from the prediction in sigma
    terms as diffusers' Euler schedulers compute it (eps: x_sigma - sigma eps; v: x_sigma / (sigma^2 + 1) -
    sigma / sqrt(sigma^2 + 1) v), clamped to [-clip_x0, clip_x0] if given."""
    _check_output(model_output, x)
    prediction, sigma = _prediction(prediction), schedule.sigma(t)
    c = (sigma**2 + 1) ** 0.5
    x_sigma = x * c
    if prediction == "eps":
        x0 = x_sigma - sigma * model_output
    elif prediction == "v":
        x0 = model_output * (-sigma / c) + x_sigma / c**2
    else:
        x0 = model_output
    return sigma, x_sigma, _clip(x0, clip_x0)


def _leave_sigma_space(schedule: NoiseSchedule, x_sigma: torch.Tensor, t_next) -> torch.Tensor:
    """x_sigma at t_next back to the loop's x: / sqrt(sigma_next^2 + 1); at the end of the trajectory x_sigma itself
    (x0 + sigma_min eps with final="sigma_min", as diffusers' Euler returns it; x0 when the last sigma is 0)."""
    if _timestep(_point(t_next)) == -1:
        return x_sigma
    return x_sigma / (schedule.sigma(t_next) ** 2 + 1) ** 0.5


@register("euler", NoiseSchedule)
def euler_step(schedule: NoiseSchedule, model_output: torch.Tensor, x: torch.Tensor, t, t_next,
               prediction: str = "eps", noise: torch.Tensor | None = None, generator: torch.Generator | None = None,
               clip_x0: float | None = None, state: dict | None = None) -> torch.Tensor:
    """One Euler step of the probability-flow ODE in sigma space (Karras et al. 2022 alg. 1 without churn; diffusers'
    EulerDiscreteScheduler, SDXL's published sampler):

        d = (x_sigma - x0_hat) / sigma,   x_sigma_next = x_sigma + (sigma_next - sigma) d.

    On the training sigmas this is deterministic DDIM in other coordinates (Karras et al. sec. 3). t, t_next:
    int timesteps or Levels; state: unused (a single-step method); noise, generator: unused (deterministic)."""
    sigma, x_sigma, x0 = _sigma_space(schedule, model_output, x, t, prediction, clip_x0)
    x_sigma = x_sigma + (x_sigma - x0) / sigma * (schedule.sigma(_point(t_next)) - sigma)
    return _leave_sigma_space(schedule, x_sigma, t_next)


@register("euler_a", NoiseSchedule)
def euler_ancestral_step(schedule: NoiseSchedule, model_output: torch.Tensor, x: torch.Tensor, t, t_next,
                         prediction: str = "eps", noise: torch.Tensor | None = None,
                         generator: torch.Generator | None = None, clip_x0: float | None = None,
                         state: dict | None = None) -> torch.Tensor:
    """One Euler ancestral step (k-diffusion's sample_euler_ancestral; diffusers' EulerAncestralDiscreteScheduler):
    an Euler step down to sigma_down, then fresh noise up to sigma_next (Ho et al.'s ancestral step in sigma terms):

        sigma_up = sqrt(sigma_next^2 (sigma^2 - sigma_next^2) / sigma^2),  sigma_down = sqrt(sigma_next^2 - sigma_up^2),
        x_sigma_next = x_sigma + (sigma_down - sigma) (x_sigma - x0_hat) / sigma + sigma_up z.

    z is drawn at every step, the last included (as diffusers, so a generator's draws match), or `noise`."""
    sigma, x_sigma, x0 = _sigma_space(schedule, model_output, x, t, prediction, clip_x0)
    s_next = schedule.sigma(_point(t_next))
    up = (s_next**2 * (sigma**2 - s_next**2) / sigma**2) ** 0.5
    down = (s_next**2 - up**2) ** 0.5
    z = _randn(x, generator) if noise is None else noise
    x_sigma = x_sigma + (x_sigma - x0) / sigma * (down - sigma) + z * up
    return _leave_sigma_space(schedule, x_sigma, t_next)


@register("dpmpp_2m", NoiseSchedule)
def dpmpp_2m_step(schedule: NoiseSchedule, model_output: torch.Tensor, x: torch.Tensor, t, t_next,
                  prediction: str = "eps", noise: torch.Tensor | None = None, generator: torch.Generator | None = None,
                  clip_x0: float | None = None, state: dict | None = None) -> torch.Tensor:
    """One DPM-Solver++(2M) step (Lu et al. 2022, alg. 2; diffusers' DPMSolverMultistepScheduler with
    algorithm_type="dpmsolver++", solver_order=2, solver_type="midpoint", lower_order_final=True).

    With alpha = 1 / sqrt(sigma^2 + 1), sigma_t = sigma alpha, lambda = log(alpha / sigma_t) = -log sigma (half the
    log-SNR) and h = lambda_next - lambda: x_next = (sigma_t_next / sigma_t) x - alpha_next (e^-h - 1) D, where
    D = x0_hat on the first step (DPM-Solver++(1), which is DDIM) and on a lower-order final step (the last sigma 0,
    or fewer than 15 steps), else D = x0_hat + (h / 2 h_prev) (x0_hat - x0_hat_prev) (eq. of alg. 2, r = h_prev / h).

    A multistep method needs the previous step's data prediction: `state` is a dict the loop makes fresh for each
    run and hands to every step (it holds "steps", the run's step count, and this sampler's "x0" and "lambda").
    One dict per run keeps the one signature and the one loop, and runs cannot leak into each other; state=None
    gives the first-order step."""
    _check_output(model_output, x)
    prediction, sigma = _prediction(prediction), schedule.sigma(t)
    alpha = 1 / (sigma**2 + 1) ** 0.5  # x = alpha x0 + sigma alpha eps: diffusers' convert_model_output
    x0 = {"eps": lambda: (x - sigma * alpha * model_output) / alpha, "x0": lambda: model_output,
          "v": lambda: alpha * x - sigma * alpha * model_output}[prediction]()
    x0 = _clip(x0, clip_x0)
    s_next, state = schedule.sigma(_point(t_next)), {} if state is None else state
    previous = state.get("x0"), state.get("lambda")
    state["x0"], state["lambda"] = x0, -math.log(sigma)
    if s_next == 0:  # h = inf: the first-order step lands on x0_hat
        return x0
    alpha_next = 1 / (s_next**2 + 1) ** 0.5
    h = math.log(sigma) - math.log(s_next)
    d = x0
    final = _timestep(_point(t_next)) == -1 and state.get("steps", 0) < 15
    if previous[0] is not None and not final:
        h_prev = -math.log(sigma) - previous[1]
        d = x0 + 0.5 * (h / h_prev) * (x0 - previous[0])
    return (s_next * alpha_next) / (sigma * alpha) * x - alpha_next * math.expm1(-h) * d


# -----------------------------------------------------------------------------
# classifier-free guidance (Ho & Salimans 2022)


def classifier_free_guidance(pred_uncond: torch.Tensor, pred_cond: torch.Tensor, w: float) -> torch.Tensor:
    """Ho & Salimans 2022 eq. 6 in diffusers' convention: uncond + w (cond - uncond).

    w = 1: the conditional model alone; w = 0: the unconditional one; w > 1: pushed further towards the condition.
    """
    return pred_uncond + w * (pred_cond - pred_uncond)


def rescale_guidance(guided_pred: torch.Tensor, pred_cond: torch.Tensor, phi: float) -> torch.Tensor:
    """Lin et al. 2024 sec. 3.4 (eq. 15-16): rescale the guided prediction to the conditional one's standard
    deviation (per sample, over every axis but the batch), then mix: phi rescaled + (1 - phi) guided.
    With zero terminal SNR, strong guidance over-exposes; phi = 0.7 is the paper's. diffusers' rescale_noise_cfg."""
    if isinstance(phi, bool) or not isinstance(phi, numbers.Real) or not 0 <= phi <= 1:
        raise ValueError(f"guidance_rescale must be a number in [0, 1] (0: off; Lin et al.: 0.7), got {phi!r}")
    if phi == 0:
        return guided_pred
    axes = list(range(1, guided_pred.ndim))
    rescaled = guided_pred * (pred_cond.std(dim=axes, keepdim=True) / guided_pred.std(dim=axes, keepdim=True))
    return phi * rescaled + (1 - phi) * guided_pred


def guided(model: Callable, cond: dict, uncond: dict[str, torch.Tensor], w: float,
           rescale: float = 0.0) -> Callable:
    """Wrap model(x, t, **cond) into a guided model(x, t) that runs uncond and cond as one batch of 2B.

    cond: {name: [B, ...]}, e.g. {"context": text states}; uncond: the unconditional twin of each entry
    ([B, ...] or a batch of one, [1, ...]). An entry with no twin in uncond (SDXL's size ids, a control image) is the
    same in both halves; an entry that is not a tensor (a scale) is passed as it is. rescale: `rescale_guidance`'s
    phi (diffusers' guidance_rescale), 0 by default (off).
    """
    rescale_guidance(torch.zeros(1), torch.zeros(1), rescale)  # a bad value fails before the first model call
    tensors = {k: v for k, v in cond.items() if isinstance(v, torch.Tensor)}
    sizes = {k: v.shape[0] for k, v in tensors.items()}
    if len(set(sizes.values())) > 1:
        raise ValueError(f"every entry of cond must have the same batch size, got {sizes}")
    unknown = sorted(set(uncond) - set(tensors))
    if unknown:
        raise ValueError(f"uncond has entries {unknown} that cond lacks (cond has {sorted(cond)})")
    both = dict(cond)
    for k, c in tensors.items():
        u = uncond.get(k, c)
        if u.shape[0] == 1 and c.shape[0] != 1:
            u = u.expand(c.shape[0], *u.shape[1:])
        if u.shape != c.shape:
            raise ValueError(f"cond[{k!r}] {tuple(c.shape)} and its unconditional twin {tuple(u.shape)} must have "
                             "the same shape (or the twin a batch of 1)")
        both[k] = torch.cat([u, c])  # [2B, ...]: uncond first, as diffusers

    def guided_model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if sizes and x.shape[0] != next(iter(sizes.values())):
            raise ValueError(f"sample batch {x.shape[0]} != cond batch {next(iter(sizes.values()))}")
        pred = model(torch.cat([x, x]), torch.cat([t, t]), **_to_device(both, x.device))
        pred_uncond, pred_cond = pred.chunk(2)  # [B, ...] each
        return rescale_guidance(classifier_free_guidance(pred_uncond, pred_cond, w), pred_cond, rescale)

    return guided_model


def _to_device(cond: dict, device: torch.device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in cond.items()}


# -----------------------------------------------------------------------------
# the sampling loop


@torch.no_grad()
def sample(model: Callable, x: torch.Tensor, schedule: Schedule, steps: int | Sequence = 50,
           sampler: str | None = None, cond: dict | None = None, uncond: dict[str, torch.Tensor] | None = None,
           guidance_scale: float = 1.0, start: float = 0.0, end: float = 1.0, prediction: str = "eps",
           generator: torch.Generator | None = None, clip_x0: float | None = None, progress: bool = True,
           callback: Callable[[dict], None] | None = None, guidance_rescale: float = 0.0, **options) -> torch.Tensor:
    """The one sampling loop: run the reverse process on x from `start` to `end` of the trajectory; return x.

    model(x [B,...], t [B], **cond) -> its prediction (eps, x0 or v, per `prediction`) shaped like x; t is what
    the schedule feeds a model (`schedule.model_timesteps`). With `uncond` and a guidance scale w != 1 every step
    runs the model once on [uncond; cond] and combines the halves with classifier-free guidance (`guided`).
    The schedule owns everything else: `schedule.trajectory(steps, start, end)` lists the points visited (start
    and end are fractions of the way from noise to clean, as diffusers' denoising_start / denoising_end: img2img
    starts part-way, SDXL's base stops at 0.8 and its refiner starts there), and `sampler` names a step function
    registered for the schedule's class (default: the schedule's `sampler` setting if it has one, else the class's
    first; NoiseSchedule: "ddim" with option eta, "ddpm", "euler", "euler_a", "dpmpp_2m"), called as
    step(schedule, model_output, x, t, t_next, prediction=, generator=, clip_x0=, state=, **options), where
    state is one dict per run, {"steps": n} to begin with, that a multistep sampler keeps its history in.
    callback({"i", "t", "t_next", "x", "denoised", "x_next"}) after every step, e.g. to record a trajectory; a
    callback that sets info["x_next"] changes where the step lands (notebook 10's blended latents).
    clip_x0: clamp every predicted x0 to [-clip_x0, clip_x0] (1.0 for pixels in [-1, 1]; None, the default: the
    schedule's clip_x0 setting if it has one, else off). guidance_rescale: see `guided` (Lin et al. 2024 sec. 3.4).
    """
    step = find_sampler(schedule, getattr(schedule, "sampler", None) if sampler is None else sampler, options)
    clip_x0 = getattr(schedule, "clip_x0", None) if clip_x0 is None else clip_x0
    _clip(torch.zeros(()), clip_x0)  # a bad clip_x0 fails before the first model call
    ts = schedule.trajectory(steps, start, end)  # [n + 1]: where each of the n steps starts, and where the last lands
    cond = cond or {}
    if uncond is not None and guidance_scale != 1:
        denoiser = guided(model, cond, uncond, guidance_scale, guidance_rescale)
    else:
        def denoiser(x, t):
            return model(x, t, **_to_device(cond, x.device))
    state = {"steps": len(ts) - 1}  # this run's: a multistep sampler keeps its history here
    for i in tqdm(range(len(ts) - 1), desc=f"{step.name} sampling", disable=not progress, leave=False):
        t, t_next = ts[i], ts[i + 1]
        out = denoiser(x, schedule.model_timesteps(t, x))
        x_next = step.step(schedule, out, x, t, t_next, prediction=prediction, generator=generator, clip_x0=clip_x0,
                           state=state, **options)
        if callback is not None:
            info = {"i": i, "t": t, "t_next": t_next, "x": x, "denoised": _clip(schedule.to_x0(prediction, out, x, t),
                                                                                clip_x0), "x_next": x_next}
            callback(info)
            x_next = info["x_next"]   # a callback may replace it (diffusers' callback_on_step_end: blended latents)
        x = x_next
    return x
