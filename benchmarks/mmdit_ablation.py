"""Notebook 08's two ablations: what each text encoder of the released shapes-mmdit carries, and what a wrong answer
to the notebook's exercises trains.

    python benchmarks/mmdit_ablation.py [--part encoders|mistakes|all] [--n 200] [--steps 400] [--threads 2]
    python benchmarks/mmdit_ablation.py --part mistakes --steps 200 --n 60 --pool 500 --batch-size 32   # the filed one

encoders: the released shapes-mmdit on --n judge prompts (half naming held-out colour-shape pairs), 50 Euler steps,
w = 3, with all three encoders and with each one's share of the text zeroed (sdlearn.sd3.WithoutEncoder).
mistakes: notebook 08's recipe (sdlearn.recipes.mmdit.train, the release's width and depth) trained --steps steps
on --pool images, once with the right flow_pair and joint_attention and once with each usual mistake in their
place (the velocity's sign, t and 1 - t swapped, two separate attentions), the same seed, batches and prompts;
judged on --n prompts at 25 steps. Writes benchmarks/results/mmdit_ablation.json after every row (a part
run again replaces that part).
"""
import argparse
import functools
import json
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from sdlearn import pretrained
from sdlearn.metrics import evaluate
from sdlearn.mmdit import joint_attention
from sdlearn.pipeline import TextToImage
from sdlearn.recipes import mmdit as recipe
from sdlearn.sd3 import WithoutEncoder

ENCODERS = {"all three encoders": None, "without the first (CLIP-L's role)": 1,
            "without the second (bigG's role), pooled part too": 2, "without the third (T5's role)": 3}


def right_pair(x0, noise, t):
    t = t.view(-1, *[1] * (x0.ndim - 1))
    return (1 - t) * x0 + t * noise, noise - x0


def sign_flipped(x0, noise, t):
    x_t, v = right_pair(x0, noise, t)
    return x_t, -v


def t_swapped(x0, noise, t):
    t = t.view(-1, *[1] * (x0.ndim - 1))
    return t * x0 + (1 - t) * noise, noise - x0


def separate(qx, kx, vx, qc, kc, vc):
    return F.scaled_dot_product_attention(qx, kx, vx), F.scaled_dot_product_attention(qc, kc, vc)


MISTAKES = {"right flow_pair and joint_attention": (right_pair, joint_attention),
            "flow_pair: v = x0 - noise (the sign)": (sign_flipped, joint_attention),
            "flow_pair: t and 1 - t swapped": (t_swapped, joint_attention),
            "joint_attention: two separate attentions": (right_pair, separate)}


def summary(scores: dict) -> dict:
    return {group: round(s["exact"], 3) for group, s in scores.items() if group in ("all", "1 object", "2 objects")}


def encoders(args, rows: dict):
    """Fill rows, one ablation each; yields after each."""
    released = pretrained.load("shapes-mmdit", 32)
    for label, which in ENCODERS.items():
        cond = released.conditioner if which is None else WithoutEncoder(released.conditioner, which)
        pipe = TextToImage(cond, released.denoiser, released.schedule, released.vae, "v", released.image_size)
        rows[label] = summary(evaluate(pipe, args.n, 50, 3.0, progress=False)[0])
        print(label, rows[label], flush=True)
        yield label


def mistakes(args, rows: dict):
    """Fill rows, one training run each; yields after each."""
    for label, (pair, attend) in MISTAKES.items():
        r = recipe.MMDiTRecipe(steps=args.steps, pool=args.pool, batch_size=args.batch_size)
        pipe, hist = recipe.train(r, loss_fn=functools.partial(recipe.loss_with_third_dropped, pair=pair),
                                  attention=attend, progress=False)
        rows[label] = {"final loss (mean of the last 50)": round(sum(hist.losses[-50:]) / 50, 4),
                       **summary(evaluate(pipe.eval(), args.n, 25, 3.0, progress=False)[0])}
        print(label, rows[label], flush=True)
        yield label


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=200, help="judge prompts, half held-out")
    ap.add_argument("--steps", type=int, default=400, help="training steps of each mistakes run")
    ap.add_argument("--pool", type=int, default=2000)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--part", choices=("encoders", "mistakes", "all"), default="all")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(__file__).parent / "results" / "mmdit_ablation.json"
    results = json.loads(out.read_text()) if out.exists() else {}
    for part, run in (("encoders", encoders), ("mistakes", mistakes)):
        if args.part in (part, "all"):
            start, rows = time.perf_counter(), {}
            results[part] = {"command": "python benchmarks/mmdit_ablation.py " + " ".join(sys.argv[1:]),
                             "date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, "
                             f"{torch.get_num_threads()} threads", "args": vars(args), "rows": rows}
            for _ in run(args, rows):  # after every row: a run cut short keeps what it measured
                results[part]["minutes"] = round((time.perf_counter() - start) / 60, 1)
                out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
