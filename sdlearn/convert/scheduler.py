"""A checkpoint's scheduler config, both ways: diffusers' scheduler_config.json <-> sdlearn's schedule and sampler.

    schedule, prediction = schedule_from_diffusers(json.load(open("scheduler/scheduler_config.json")))
    scheduler = schedule_to_diffusers(schedule, prediction)      # the diffusers scheduler that samples the same

The scheduler class picks the schedule's default sampler (SAMPLERS: DDIMScheduler -> "ddim", EulerDiscreteScheduler
-> "euler", EulerAncestralDiscreteScheduler -> "euler_a", DPMSolverMultistepScheduler -> "dpmpp_2m", DDPMScheduler
-> "ddpm"; FlowMatchEulerDiscreteScheduler -> FlowSchedule's "euler"), and every field of that class is either read
(READ: the betas, prediction_type, timestep_spacing, steps_offset, rescale_betas_zero_snr, and per class
set_alpha_to_one, clip_sample / clip_sample_range, use_karras_sigmas, final_sigmas_type) or, when it differs from
what sdlearn does, a warning naming the field and what sdlearn does instead (UNSUPPORTED: value sdlearn implements).
A class sdlearn does not implement (SD 1.x's published PNDMScheduler: PLMS) samples with DDIM on the same grid, with
a warning saying so. Keys a class does not take (SDXL's Euler config carries DDIM's clip_sample) are ignored, as
diffusers' from_config ignores them. A field of the wrong type is a TypeError naming it.
"""
from __future__ import annotations

import math
import numbers
import warnings

from sdlearn.diffusion import NoiseSchedule, with_karras
from sdlearn.flow import FlowSchedule

BETA_SCHEDULES = {"linear": "linear", "scaled_linear": "scaled_linear", "squaredcos_cap_v2": "cosine"}
PREDICTIONS = {"epsilon": "eps", "sample": "x0", "v_prediction": "v"}
SAMPLERS = {"DDIMScheduler": "ddim", "DDPMScheduler": "ddpm", "EulerDiscreteScheduler": "euler",
            "EulerAncestralDiscreteScheduler": "euler_a", "DPMSolverMultistepScheduler": "dpmpp_2m"}
FALLBACK = "ddim"  # what a class sdlearn does not implement samples with (PNDM/PLMS: SD 1.x's published default)

# the fields sdlearn reads, per class, with their type and diffusers' default
_COMMON = {"num_train_timesteps": (int, 1000), "beta_start": (numbers.Real, 1e-4), "beta_end": (numbers.Real, 0.02),
           "beta_schedule": (str, "linear"), "prediction_type": (str, "epsilon"),
           "timestep_spacing": (str, "leading"), "steps_offset": (int, 0), "rescale_betas_zero_snr": (bool, False)}
_CLIP = {"clip_sample": (bool, True), "clip_sample_range": (numbers.Real, 1.0)}
_SIGMAS = {"use_karras_sigmas": (bool, False), "final_sigmas_type": (str, "zero")}
READ = {"DDIMScheduler": {**_CLIP, "set_alpha_to_one": (bool, True)}, "DDPMScheduler": _CLIP,
        "EulerDiscreteScheduler": {**_SIGMAS, "timestep_spacing": (str, "linspace")},
        "EulerAncestralDiscreteScheduler": {"timestep_spacing": (str, "linspace")},
        "DPMSolverMultistepScheduler": {**_SIGMAS, "timestep_spacing": (str, "linspace")},
        "PNDMScheduler": {"set_alpha_to_one": (bool, False)}}
# the fields sdlearn does not implement: the value it samples as (a config saying otherwise gets a warning)
_THRESHOLD = {"thresholding": False}
UNSUPPORTED = {
    "DDIMScheduler": _THRESHOLD, "DDPMScheduler": {**_THRESHOLD, "variance_type": "fixed_small"},
    "EulerDiscreteScheduler": {"interpolation_type": "linear", "use_exponential_sigmas": False,
                               "use_beta_sigmas": False, "timestep_type": "discrete", "sigma_min": None,
                               "sigma_max": None},
    "EulerAncestralDiscreteScheduler": {},
    "DPMSolverMultistepScheduler": {**_THRESHOLD, "solver_order": 2, "algorithm_type": "dpmsolver++",
                                    "solver_type": "midpoint", "lower_order_final": True, "euler_at_final": False,
                                    "use_lu_lambdas": False, "use_exponential_sigmas": False, "use_beta_sigmas": False,
                                    "use_flow_sigmas": False, "lambda_min_clipped": -math.inf, "variance_type": None},
}


def _field(c: dict, key: str, spec: tuple, name: str):
    """c[key] (or its default), checked against its type."""
    kind, default = spec
    value = c.get(key, default)
    if value is None and default is None:
        return value
    ok = isinstance(value, kind) and not (kind in (int, numbers.Real) and isinstance(value, bool))
    if not ok:
        raise TypeError(f"scheduler {name}: {key} must be {getattr(kind, '__name__', kind)} (e.g. {default!r}), got "
                        f"{type(value).__name__} {value!r}")
    return value


def _warn_unsupported(c: dict, name: str, sampler: str) -> None:
    for key, ours in UNSUPPORTED.get(name, {}).items():
        value = c.get(key, ours)
        if value != ours:
            warnings.warn(f"scheduler {name}: {key}={value!r} is not implemented in sdlearn; it samples with "
                          f"{sampler} as if {key}={ours!r}", stacklevel=3)


def _flow(c: dict, name: str) -> FlowSchedule:
    if c.get("use_karras_sigmas") or c.get("use_exponential_sigmas") or c.get("use_beta_sigmas"):
        with_karras(FlowSchedule())  # the error: what applies to a flow schedule instead
    if c.get("use_dynamic_shifting"):
        raise ValueError(f"scheduler {name} uses dynamic shifting (a shift per resolution); sdlearn's "
                         f"FlowSchedule has one shift")
    shift = _field(c, "shift", (numbers.Real, 1.0), name)
    return FlowSchedule(shift=float(shift), num_train_timesteps=_field(c, "num_train_timesteps", (int, 1000), name))


def schedule_from_diffusers(config: dict) -> tuple[NoiseSchedule | FlowSchedule, str]:
    """(schedule, prediction) of a diffusers scheduler config (scheduler_config.json, or scheduler.config): the
    schedule's sampler is the class's (SAMPLERS), its settings the fields sdlearn implements (READ); the rest warn.
    config may also be a diffusers scheduler (its class and config are read)."""
    if hasattr(config, "config") and not isinstance(config, dict):
        config = {"_class_name": type(config).__name__, **config.config}
    if not isinstance(config, dict) or not isinstance(config.get("_class_name"), str):
        raise ValueError("expected a diffusers scheduler config naming its class (_class_name, as in "
                         f"scheduler_config.json) or a diffusers scheduler, got {config!r:.200}")
    c = dict(config)
    name = c["_class_name"]
    if name.startswith("FlowMatch"):
        return _flow(c, name), "v"
    sampler = SAMPLERS.get(name)
    if sampler is None:
        warnings.warn(f"scheduler {name} is not implemented in sdlearn: it samples with {FALLBACK} on the same "
                      f"timesteps instead (samplers: {', '.join(sorted(set(SAMPLERS.values())))})", stacklevel=2)
    got = {k: _field(c, k, spec, name) for k, spec in {**_COMMON, **READ.get(name, {})}.items()}
    _warn_unsupported(c, name, sampler or FALLBACK)
    if c.get("trained_betas") is not None or got["beta_schedule"] not in BETA_SCHEDULES:
        raise ValueError(f"scheduler {name}: beta_schedule {got['beta_schedule']!r} with trained_betas "
                         f"{c.get('trained_betas') is not None}; sdlearn's NoiseSchedule makes "
                         f"{', '.join(BETA_SCHEDULES)}")
    if got["prediction_type"] not in PREDICTIONS:
        raise ValueError(f"scheduler {name}: prediction_type {got['prediction_type']!r}, expected one of "
                         f"{', '.join(PREDICTIONS)}")
    kind = BETA_SCHEDULES[got["beta_schedule"]]
    betas = {} if kind == "cosine" else dict(beta_start=got["beta_start"], beta_end=got["beta_end"])
    final = got.get("final_sigmas_type", "sigma_min" if got.get("set_alpha_to_one", True) is False else "zero")
    clip = float(got["clip_sample_range"]) if got.get("clip_sample") else None
    schedule = NoiseSchedule(kind, got["num_train_timesteps"], **betas, spacing=got["timestep_spacing"],
                             offset=got["steps_offset"], sampler=sampler, karras=got.get("use_karras_sigmas", False),
                             final=final, zero_snr=got["rescale_betas_zero_snr"], clip_x0=clip)
    return schedule, PREDICTIONS[got["prediction_type"]]


def _lost(schedule: NoiseSchedule, cls: str) -> None:
    """Warn about a setting of `schedule` that diffusers' `cls` cannot say."""
    lost = {"karras": schedule.karras and cls not in ("EulerDiscreteScheduler", "DPMSolverMultistepScheduler"),
            "final": schedule.final != "zero" and cls in ("DDPMScheduler", "EulerAncestralDiscreteScheduler"),
            "clip_x0": schedule.clip_x0 is not None and cls not in ("DDIMScheduler", "DDPMScheduler")}
    for key in (k for k, v in lost.items() if v):
        warnings.warn(f"diffusers' {cls} has no equivalent of the schedule's {key}={getattr(schedule, key)!r}: "
                      f"it is written without it (diffusers will sample differently)", stacklevel=3)


def schedule_to_diffusers(schedule, prediction: str):
    """The diffusers scheduler that samples as sdlearn does with `schedule` by default: the class of its sampler
    (DDIM for a course schedule, with set_alpha_to_one=True), its grid and settings; flow-matching Euler for a
    FlowSchedule."""
    import diffusers

    if isinstance(schedule, FlowSchedule):
        return diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=schedule.num_train_timesteps,
                                                         shift=schedule.shift)
    cls = {v: k for k, v in SAMPLERS.items()}[schedule.sampler or "ddim"]
    _lost(schedule, cls)
    betas = {} if schedule.kind == "cosine" else dict(beta_start=schedule.beta_start, beta_end=schedule.beta_end)
    kw = dict(num_train_timesteps=schedule.num_steps, **betas, timestep_spacing=schedule.spacing,
              beta_schedule={v: k for k, v in BETA_SCHEDULES.items()}[schedule.kind], steps_offset=schedule.offset,
              prediction_type={v: k for k, v in PREDICTIONS.items()}[prediction],
              rescale_betas_zero_snr=schedule.zero_snr)
    if cls in ("DDIMScheduler", "DDPMScheduler"):
        kw.update(clip_sample=schedule.clip_x0 is not None, clip_sample_range=schedule.clip_x0 or 1.0)
    if cls == "DDIMScheduler":
        kw["set_alpha_to_one"] = schedule.final == "zero"
    if cls in ("EulerDiscreteScheduler", "DPMSolverMultistepScheduler"):
        kw.update(use_karras_sigmas=schedule.karras, final_sigmas_type=schedule.final)
    return getattr(diffusers, cls)(**kw)
