"""ControlNet against the LDM paper's concatenation, at equal training time, on the frozen released shapes-t2i.

    python benchmarks/controlnet_concat.py [--steps 800] [--n 200] [--threads 1]

Trains notebook 09's ControlNet (sdlearn.recipes.controlnet, method "controlnet": a trainable copy of the encoder,
the base frozen) for --steps steps, times it, then the concatenating UNet (method "concat": the segmentation map
resized to the latent grid and concatenated to the input, the whole UNet fine-tuned from shapes-t2i, Rombach et al.
2022 sec. 4.3) for as many steps as fit in the same seconds (its seconds per step measured on a short
probe), both at the recipe's learning rate (notebook 10's inpainting UNet, also a whole UNet fine-tuned, uses the
same). Judges both on --n free-layout scenes with their maps (layout IoU, exact adherence), and what each keeps of
the base: with control_scale 0 (the ControlNet is then the base bit for bit; the concatenating UNet reads a zero
map) exact adherence on the base's own judge prompts (sdlearn.metrics.eval_prompts, the five named positions).
Writes benchmarks/results/controlnet_concat.json (rewritten as it goes).
"""
import argparse
import time
from pathlib import Path

import record
import torch

from sdlearn import pretrained
from sdlearn.metrics import eval_prompts, prompt_adherence
from sdlearn.recipes import controlnet as recipe


@torch.no_grad()
def kept(pipe, n: int, steps: int) -> dict[str, float]:
    """Exact adherence on the base's judge prompts with control_scale 0 (a zero map for pipelines that take one)."""
    captions, _ = eval_prompts(n, pipe.image_size)
    takes = "control" in pipe.denoiser.cond_dims
    s = pipe.image_size
    extra = {"control": torch.zeros(n, 3, s, s), "control_scale": 0.0} if takes else {}
    images = pipe.generate(captions, steps, 3.0, seed=123, progress=False, **extra)
    return prompt_adherence(images, captions)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=800, help="the ControlNet's training steps (the cpu profile's)")
    ap.add_argument("--probe", type=int, default=30, help="steps that time the concatenating UNet")
    ap.add_argument("--n", type=int, default=200, help="judged scenes and prompts, half naming held-out pairs")
    ap.add_argument("--sample-steps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="controlnet_concat.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    out = Path(__file__).parent / "results" / args.out
    rows = {}
    base = pretrained.load("shapes-t2i", 32)
    rows["base (caption only)"] = {**recipe.evaluate(base, args.n, steps=args.sample_steps, control=False),
                                   "kept exact (named positions)": kept(base, args.n, args.sample_steps)["exact"]}
    record.write(out, __file__, args, start, rows)

    def run(label, settings):
        pipe, hist = recipe.train(settings, progress=False)
        trainable = sum(p.numel() for p in (pipe.denoiser.controlnet if settings.method == "controlnet"
                                            else pipe.denoiser).parameters())
        rows[label] = {**recipe.evaluate(pipe, args.n, steps=args.sample_steps),
                       "kept exact (named positions)": kept(pipe, args.n, args.sample_steps)["exact"],
                       "steps": settings.steps, "lr": settings.lr, "training seconds": round(hist.seconds, 1),
                       "trainable parameters": trainable,
                       "final loss (mean of last 50)": sum(hist.losses[-50:]) / len(hist.losses[-50:])}
        print(label, rows[label], flush=True)
        record.write(out, __file__, args, start, rows)
        return hist

    cn = run("ControlNet", recipe.ControlNetRecipe(steps=args.steps, method="controlnet"))
    _, probe = recipe.train(recipe.ControlNetRecipe(steps=args.probe, method="concat"),
                            progress=False)
    steps = round(cn.seconds / (probe.seconds / args.probe))
    rows["concat probe"] = {"steps": args.probe, "seconds per step": probe.seconds / args.probe,
                            "ControlNet seconds per step": cn.seconds / args.steps}
    run("concatenation (LDM)", recipe.ControlNetRecipe(steps=steps, method="concat"))
    print("wrote", out)


if __name__ == "__main__":
    main()
