"""What an image prompt buys on the shapes: exact adherence to the prompt image, and the image against the text.

    python benchmarks/ip_adapter.py [--steps 800] [--lr 6e-3] [--tokens 8] [--p-text 0.5] [--n 200]

Trains notebook 10's IP-Adapter (sdlearn.recipes.ip_adapter, the cpu profile's settings unless told otherwise) on the
frozen released shapes-t2i and shapes-clip-image, then judges, on --n image prompts (half with a held-out colour-shape
pair): the base from the empty text (chance) and from each image's exact caption (the ceiling: the adapter only
steers the frozen UNet), the adapter from the image with the empty text and with the image's own caption, and with
another scene's caption at image scales 0 .. 1.5 (which one it follows). The issue's goal: exact adherence to the
prompt image's caption >= 0.8 with the empty text. Writes benchmarks/results/<--out>.
"""
import argparse
import json
import time
from pathlib import Path

import record
import torch

from sdlearn import pretrained
from sdlearn.recipes import ip_adapter as recipe


def main():
    r = recipe.IPAdapterRecipe()                                      # the recipe's defaults
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=800, help="training steps (notebook 10's cpu profile)")
    ap.add_argument("--batch", type=int, default=r.batch_size)
    ap.add_argument("--lr", type=float, default=r.lr)
    ap.add_argument("--pool", type=int, default=r.pool, help="training images")
    ap.add_argument("--p-text", type=float, default=r.p_text, help="text dropout while training (the paper: 0.05)")
    ap.add_argument("--tokens", type=int, default=r.tokens, help="image tokens")
    ap.add_argument("--n", type=int, default=200, help="judged image prompts, half with held-out pairs")
    ap.add_argument("--sample-steps", type=int, default=20, help="sampling steps of the judged images")
    ap.add_argument("--every", type=int, default=250, help="steps between points of the adherence curve")
    ap.add_argument("--curve-n", type=int, default=32, help="image prompts per point of the curve")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="ip_adapter.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    out = Path(__file__).parent / "results" / args.out
    rows, curve = {}, []
    base = pretrained.load("shapes-t2i", 32)
    rows["shapes-t2i, empty text"] = recipe.evaluate(base, args.n, "empty", steps=args.sample_steps)
    rows["shapes-t2i, the image's caption"] = recipe.evaluate(base, args.n, "same", steps=args.sample_steps)
    print(rows, flush=True)

    def on_step(step, pipe):
        curve.append((step, recipe.evaluate(pipe, args.curve_n, "empty", steps=args.sample_steps)["image_exact"]))
        print(f"step {step}: exact {curve[-1][1]:.3f} ({time.perf_counter() - start:.0f} s)", flush=True)
        record.write(out, __file__, args, start, rows, exact_curve=curve)

    settings = recipe.IPAdapterRecipe(steps=args.steps, batch_size=args.batch, lr=args.lr, pool=args.pool,
                                      p_text=args.p_text, tokens=args.tokens)
    t0 = time.perf_counter()
    pipe, hist = recipe.train(settings, callback=on_step, callback_every=args.every, progress=False)
    rows["training"] = {"seconds (incl. curve)": float(round(time.perf_counter() - t0)),
                        "final loss (mean of last 50)": sum(hist.losses[-50:]) / len(hist.losses[-50:])}
    rows["image prompt, empty text"] = recipe.evaluate(pipe, args.n, "empty", steps=args.sample_steps)
    rows["image prompt, its caption"] = recipe.evaluate(pipe, args.n, "same", steps=args.sample_steps)
    for s in (0.0, 0.25, 0.5, 0.75, 1.0, 1.5):
        rows[f"image prompt, another caption, scale {s}"] = recipe.evaluate(pipe, args.n, "other", image_scale=s,
                                                                             steps=args.sample_steps)
        print(s, rows[f"image prompt, another caption, scale {s}"], flush=True)
    record.write(out, __file__, args, start, rows, exact_curve=curve)
    print(json.dumps(rows, indent=1))
    print("wrote", out)


if __name__ == "__main__":
    main()
