"""The MMDiT with rectified flow (notebook 08) against notebook 06's UNet with DDPM, for the same wall-clock budget.

    python benchmarks/mmdit.py [--minutes 15] [--n 200] [--threads 2]

Both learn the same bank of shapes-vae-sd3 latents (16 channels) with the same text (sdlearn.sd3's three-encoder
context; the UNet cross-attends to it, the MMDiT also reads the pooled vector), the same batch, pool, warm-up,
cosine decay and EMA: notebook 06's UNet recipe (v-prediction, cosine schedule, min-SNR-5, lr 2e-3) and notebook
08's MMDiT recipe (flow, logit-normal times, QK RMSNorm, lr 1e-3). Each is timed for a few steps first and then
given as many steps as fit in --minutes. Judged on --n prompts (half naming held-out colour-shape pairs) at 50
steps (the MMDiT also with its third encoder zeroed, as SD3 without T5), then adherence against sampling steps
(Euler on the flow, DDIM on the UNet) on half of them. Writes
benchmarks/results/mmdit.json.
"""
import argparse
import json
import time
from pathlib import Path

import torch

from sdlearn import pretrained
from sdlearn.course import seed_everything
from sdlearn.data import ShapesDataset, render_pool
from sdlearn.diffusion import NoiseSchedule
from sdlearn.flow import FlowSchedule
from sdlearn.metrics import eval_prompts, evaluate, prompt_adherence
from sdlearn.mmdit import MMDiT
from sdlearn.pipeline import Conditioner, TextToImage, training_loss
from sdlearn.recipes import mmdit as recipe
from sdlearn.recipes.mmdit import MMDiTRecipe
from sdlearn.recipes.t2i import T2IRecipe, encode_pool, fit_denoiser, unet_config
from sdlearn.sd3 import without_third
from sdlearn.unet import UNet


class ContextOnly(Conditioner):
    """The SD3 conditioner's context alone, zeros as its unconditional twin: what a UNet without pooled text reads."""

    dropout_keys = ("context",)

    def __init__(self, conditioner):
        super().__init__()
        self.conditioner = conditioner

    @property
    def dims(self):
        return {"context": self.conditioner.dims["context"]}

    def encode(self, prompts):
        return {"context": self.conditioner.encode(prompts)["context"]}

    def encode_unconditional(self, n):
        return {"context": self.conditioner.encode_unconditional(n)["context"]}


def seconds_per_step(make, probe_steps: int) -> float:
    """Train `probe_steps` steps (make(steps) -> (pipeline, History)) and time them."""
    _, hist = make(probe_steps)
    return hist.seconds / probe_steps


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--minutes", type=float, default=15.0, help="training budget of each model")
    ap.add_argument("--n", type=int, default=200, help="judge prompts, half held-out")
    ap.add_argument("--pool", type=int, default=10000, help="training images, encoded once, shared")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--guidance", type=float, default=3.0)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    seed_everything(0)
    vae = pretrained.load("shapes-vae-sd3", 32).requires_grad_(False)
    sd3 = recipe.conditioner()
    images, captions = render_pool(ShapesDataset(size=32, split="train", seed=0), args.pool, progress=False)
    latents, conds = encode_pool(vae, sd3, images, captions)
    context_only = ContextOnly(sd3)
    unet_conds = {"context": conds["context"]}
    C = latents.shape[1]

    def train_unet(steps):  # notebook 06's recipe: v-prediction, cosine schedule, min-SNR-5, lr 2e-3
        seed_everything(0)
        r = T2IRecipe(steps=steps, batch_size=args.batch_size)
        unet = UNet(unet_config(C, sd3.dims["context"], r.width, r.layers, prediction=r.prediction))
        return fit_denoiser(unet, context_only, vae, latents, unet_conds, NoiseSchedule(r.schedule), r, training_loss,
                            {"snr_gamma": r.snr_gamma}, progress=False, desc="unet")

    def train_mmdit(steps):  # notebook 08's recipe: flow, logit-normal times, QK RMSNorm, lr 1e-3
        seed_everything(0)
        r = MMDiTRecipe(steps=steps, batch_size=args.batch_size)
        config = recipe.mmdit_config(C, latents.shape[-1], sd3, r.width, r.depth, r.heads, r.patch_size,
                                     bool(r.qk_norm), r.dual)
        return fit_denoiser(MMDiT(config), sd3, vae, latents, conds, FlowSchedule(r.shift), r,
                            recipe.loss_with_third_dropped,
                            {"cond_model": sd3, "p_drop_third": r.p_drop_third, "density": r.density},
                            progress=False, desc="mmdit")

    results, sweep_captions = {}, eval_prompts(args.n // 2, 32)[0]
    sweep_steps = [2, 4, 8, 16, 32, 50]
    for name, make in (("UNet + DDPM (notebook 06)", train_unet), ("MMDiT + rectified flow (notebook 08)",
                                                                   train_mmdit)):
        per_step = seconds_per_step(make, 30)
        steps = max(100, int(args.minutes * 60 / per_step))
        pipe, hist = make(steps)
        scores = evaluate(pipe.eval(), args.n, 50, args.guidance, progress=False)[0]
        adherence = {n: prompt_adherence(pipe.generate(sweep_captions, n, args.guidance, progress=False),
                                         sweep_captions)["exact"] for n in sweep_steps}
        results[name] = {"parameters": sum(p.numel() for p in pipe.denoiser.parameters()), "steps": steps,
                         "train_minutes": round(hist.seconds / 60, 1), "final_loss": sum(hist.losses[-100:]) / 100,
                         "scores": scores, "exact_by_sampling_steps": adherence}
        if name.startswith("MMDiT"):  # SD3 without T5: zeros in the third encoder's place
            no_third = TextToImage(without_third(sd3), pipe.denoiser, pipe.schedule, vae, "v", 32)
            results[name]["scores without the third encoder"] = evaluate(no_third.eval(), args.n, 50, args.guidance,
                                                                         progress=False)[0]
        print(name, json.dumps({k: v for k, v in results[name].items() if not k.startswith("scores")}),
              {g: round(s["exact"], 3) for g, s in scores.items()}, flush=True)
    minutes = (time.perf_counter() - start) / 60
    out = Path(__file__).parent / "results" / "mmdit.json"
    out.write_text(json.dumps({"args": vars(args), "minutes": round(minutes, 1), "results": results}, indent=1)
                   + "\n")
    print(f"wrote {out} ({minutes:.1f} min)")


if __name__ == "__main__":
    main()
