"""What a ControlNet buys on the course's shapes: layout IoU with and without the map, text adherence kept.

    python benchmarks/controlnet.py [--base shapes-t2i] [--steps 800] [--batch 32] [--lr 1e-3] [--kind segmentation]
                                    [--n 200]

Trains notebook 09's ControlNet (sdlearn.recipes.controlnet, the cpu profile's settings unless told otherwise) on
the frozen released --base (shapes-t2i: the UNet's ControlNet; shapes-mmdit: SD3's, --depth joint blocks), then
judges, on --n free-layout scenes (half naming held-out colour-shape pairs):
the base from the captions alone (layout IoU against the scenes it was not told about, exact adherence), and the
ControlNet from captions and maps. The issue's goal: IoU >= 0.8 with the map, <= 0.4 without, exact no lower than
the base's by more than 0.02. Layout IoU is also measured every --every steps on --curve-n scenes (the curve where
the paper's "sudden convergence" would show). Writes benchmarks/results/controlnet.json (rewritten as it goes).
"""
import argparse
import time
from pathlib import Path

import record
import torch

from sdlearn import pretrained
from sdlearn.recipes import controlnet as recipe


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", default="shapes-t2i", choices=("shapes-t2i", "shapes-mmdit"),
                    help="the frozen released pipeline to steer (shapes-mmdit: SD3's ControlNet)")
    ap.add_argument("--depth", type=int, default=0, help="shapes-mmdit: joint blocks copied (0: half the base's)")
    ap.add_argument("--steps", type=int, default=800, help="training steps (notebook 09's cpu profile)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--pool", type=int, default=4000, help="training scenes")
    ap.add_argument("--p-uncond", type=float, default=0.1, help="caption dropout while training (the paper: 0.5)")
    ap.add_argument("--kind", default="segmentation", choices=("segmentation", "edges", "scribble"))
    ap.add_argument("--n", type=int, default=200, help="judged scenes, half naming held-out pairs")
    ap.add_argument("--sample-steps", type=int, default=20, help="sampling steps of the judged images")
    ap.add_argument("--every", type=int, default=100, help="steps between points of the IoU curve")
    ap.add_argument("--curve-n", type=int, default=32, help="scenes per point of the IoU curve")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="controlnet.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    out = Path(__file__).parent / "results" / args.out
    rows, curve = {}, []
    base = pretrained.load(args.base, 32)
    rows["base, caption only"] = recipe.evaluate(base, args.n, args.kind, args.sample_steps, control=False)
    print("base, caption only:", rows["base, caption only"], flush=True)

    def on_step(step, pipe):
        iou = recipe.evaluate(pipe, args.curve_n, args.kind, args.sample_steps)["iou"]
        curve.append((step, iou))
        print(f"step {step}: layout IoU {iou:.3f} ({time.perf_counter() - start:.0f} s)", flush=True)
        record.write(out, __file__, args, start, rows, iou_curve=curve)

    settings = recipe.ControlNetRecipe(steps=args.steps, batch_size=args.batch, lr=args.lr, pool=args.pool,
                                       p_uncond=args.p_uncond, kind=args.kind, base=args.base, depth=args.depth)
    t0 = time.perf_counter()
    pipe, hist = recipe.train(settings, callback=on_step, callback_every=args.every, progress=False)
    train_s = time.perf_counter() - t0
    rows["ControlNet, caption and map"] = recipe.evaluate(pipe, args.n, args.kind, args.sample_steps)
    rows["ControlNet, caption and map"]["training seconds (incl. curve)"] = round(train_s)
    rows["ControlNet, trainable parameters"] = sum(p.numel() for p in pipe.denoiser.controlnet.parameters())
    rows["ControlNet, final loss (mean of last 50)"] = sum(hist.losses[-50:]) / len(hist.losses[-50:])
    print("ControlNet:", rows["ControlNet, caption and map"], flush=True)
    record.write(out, __file__, args, start, rows, iou_curve=curve)
    print("wrote", out)


if __name__ == "__main__":
    main()
