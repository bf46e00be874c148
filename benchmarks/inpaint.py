"""Inpainting on the course's shapes: the 9-channel UNet against blended latents, on the same cases at equal steps.

    python benchmarks/inpaint.py [--steps 2000] [--batch 32] [--lr 1e-3] [--n 200] [--sample-steps 20]

Fine-tunes notebook 10's inpainting UNet (sdlearn.recipes.inpaint, the cpu profile's settings unless told otherwise)
from the released shapes-t2i, then repaints --n cases (a free-layout scene, a box over one object, the caption asking
for another object there) with it and with blended latents on the plain shapes-t2i, and judges both
(recipe.judge_cases: the asked-for object inside the mask, the untouched object, the whole image, the unmasked
region's PSNR before paste-back, the seam at the mask's border), beside the VAE's own reconstruction of the sources
(the ceiling of PSNR and of the kept object's verdict). The issue's goals: inside >= 0.9, PSNR >= 30 dB, whole above
the blended baseline's. Writes benchmarks/results/<--out>.
"""
import argparse
import datetime
import json
import platform
import time
from pathlib import Path

import torch

from sdlearn import pretrained
from sdlearn.recipes import inpaint as recipe


def main():
    r = recipe.InpaintRecipe()                                        # the recipe's defaults
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=2000, help="fine-tuning steps (notebook 10's cpu profile)")
    ap.add_argument("--batch", type=int, default=r.batch_size)
    ap.add_argument("--lr", type=float, default=r.lr)
    ap.add_argument("--pool", type=int, default=r.pool, help="training images, each with a mask")
    ap.add_argument("--n", type=int, default=200, help="repaint cases")
    ap.add_argument("--sample-steps", type=int, default=20, help="sampling steps, both methods")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="inpaint.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    out = Path(__file__).parent / "results" / args.out
    base = pretrained.load("shapes-t2i", 32)
    cases = recipe.cases(args.n)
    rows = {"VAE reconstruction of the source": recipe.judge_cases(
        base.decode(base.vae.to_latent(cases.images, sample=False)), cases)}
    settings = recipe.InpaintRecipe(steps=args.steps, batch_size=args.batch, lr=args.lr, pool=args.pool)
    t0 = time.perf_counter()
    pipe, hist = recipe.train(settings, progress=False)
    rows["training"] = {"seconds": float(round(time.perf_counter() - t0)),
                        "final loss (mean of last 50)": sum(hist.losses[-50:]) / len(hist.losses[-50:])}
    rows["inpainting UNet (9 channels)"] = recipe.judge_cases(recipe.run_cases(pipe, cases, "unet", args.sample_steps),
                                                              cases)
    rows["blended latents (plain UNet)"] = recipe.judge_cases(recipe.run_cases(base, cases, "blend", args.sample_steps),
                                                              cases)
    out.write_text(json.dumps({
        "command": "python benchmarks/inpaint.py " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()),
        "date": datetime.date.today().isoformat(), "machine": f"{platform.machine()}, {args.threads} threads "
                                                              "(a 2-core machine shared with other jobs)",
        "minutes": round((time.perf_counter() - start) / 60, 1), "args": vars(args), "results": rows}, indent=1)
        + "\n")
    print(json.dumps(rows, indent=1))
    print("wrote", out)


if __name__ == "__main__":
    main()
