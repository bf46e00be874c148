"""Parity of sdlearn.diffusion's schedules and reverse steps with diffusers' schedulers, as max abs differences.

    python benchmarks/scheduler_parity.py

Over the three beta schedules, the three prediction types, number of training steps from 1 to 100,000 and a spread
of timesteps: alphas_cumprod against DDPMScheduler, ddpm_step against DDPMScheduler.step, ddim_step (eta 0, 0.5, 1)
against DDIMScheduler.step with set_alpha_to_one=True. tests/test_diffusion.py asserts the same equalities; this
prints the figures the README quotes.
"""
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from sdlearn.diffusion import NoiseSchedule, ddim_step, ddpm_step


def parity_report() -> dict[str, float]:
    """Max abs difference from diffusers' DDPMScheduler / DDIMScheduler, over schedules, predictions and t."""
    names = {"linear": "linear", "scaled_linear": "scaled_linear", "cosine": "squaredcos_cap_v2"}
    preds = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}
    g = torch.Generator().manual_seed(0)
    worst: dict[str, float] = {}

    def note(key, a, b):
        worst[key] = max(worst.get(key, 0.0), (a.double() - b.double()).abs().max().item())

    for kind, dk in names.items():
        betas = {"beta_start": 0.00085, "beta_end": 0.012} if kind == "scaled_linear" else {}
        for T in (1, 7, 1000, 4000, 100_000):
            note("alphas_cumprod", NoiseSchedule(kind, T).alphas_cumprod,
                 DDPMScheduler(num_train_timesteps=T, beta_schedule=dk, **betas).alphas_cumprod)
        s = NoiseSchedule(kind)
        for p, dp in preds.items():
            kw = dict(beta_schedule=dk, prediction_type=dp, clip_sample=False, **betas)
            x, out, z = (torch.randn(2, 4, 8, 8, generator=g) for _ in range(3))
            ddpm = DDPMScheduler(**kw)
            for t in (999, 500, 100, 10, 2, 1, 0):
                ref = ddpm.step(out, t, x, generator=torch.Generator().manual_seed(t)).prev_sample
                ours = ddpm_step(s, out, x, t, t - 1, p, generator=torch.Generator().manual_seed(t))
                note(f"ddpm_step[{p}]", ours, ref)
            for steps in (50, 1000):
                ddim = DDIMScheduler(**kw, set_alpha_to_one=True)
                ddim.set_timesteps(steps)
                ts = ddim.timesteps.tolist()
                for i in (0, len(ts) // 2, len(ts) - 2, len(ts) - 1):
                    t, t_next = ts[i], ts[i + 1] if i + 1 < len(ts) else -1
                    for eta in (0.0, 0.5, 1.0):
                        ref = ddim.step(out, t, x, eta=eta, variance_noise=z if eta else None).prev_sample
                        note(f"ddim_step[{p}]", ddim_step(s, out, x, t, t_next, p, noise=z, eta=eta), ref)
    return worst


if __name__ == "__main__":
    for key, err in parity_report().items():
        print(f"{key:16} max abs diff vs diffusers {err:.2e}")
