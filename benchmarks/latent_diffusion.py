"""Adherence against training minutes for the latent text-to-image recipe (notebook 06, cpu profile).

    python benchmarks/latent_diffusion.py [--steps 1600] [--points 4] [--prediction v] [--schedule cosine]
                                          [--snr-gamma 5] [--batch-size 64] [--guidance 3]

Trains the shapes text-to-image model once (sdlearn.recipes.t2i.train, the release's and notebook 06's recipe) and
judges the EMA weights `--points` times along the way on the same `--n` prompts (half held-out), at guidance
`--guidance` with 50 DDIM steps. Minutes count rendering and encoding the image bank and training, not judging.
Each point is the run as configured (its learning rate still decaying), not a separate run of that length.
Writes benchmarks/results/<name>.json.
"""
import argparse
import json
import time
from pathlib import Path

import torch

from sdlearn.metrics import evaluate
from sdlearn.recipes import t2i


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=1600)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--points", type=int, default=4)
    ap.add_argument("--prediction", default="v")
    ap.add_argument("--schedule", default="cosine")
    ap.add_argument("--snr-gamma", type=float, default=5.0, help="min-SNR weighting (0: a plain mean)")
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--guidance", type=float, default=3.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--name", default=None, help="results file name (default: from the options)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows, clock = [], {"judging": 0.0, "start": time.perf_counter()}

    def judge(step, pipe):
        start = time.perf_counter()
        minutes = (start - clock["start"] - clock["judging"]) / 60  # rendering + encoding the bank + training
        scores, _, _ = evaluate(pipe, args.n, guidance_scale=args.guidance, progress=False)
        clock["judging"] += time.perf_counter() - start
        row = {"step": step, "train_minutes": round(minutes, 2),
               **{g: round(s["exact"], 3) for g, s in scores.items()},
               "1 object colour": round(scores["1 object"]["color"], 3),
               "1 object shape": round(scores["1 object"]["shape"], 3)}
        rows.append(row)
        print(json.dumps(row), flush=True)

    every = max(1, args.steps // args.points)
    t2i.train(t2i.T2IRecipe(steps=args.steps, batch_size=args.batch_size, width=args.width, prediction=args.prediction,
                            schedule=args.schedule, snr_gamma=args.snr_gamma),
              progress=False, callback=judge, callback_every=every)
    name = args.name or (f"latent_diffusion_{args.prediction}_{args.schedule}_snr{args.snr_gamma:g}"
                         f"_b{args.batch_size}_{args.steps}" + (f"_w{args.width}" if args.width != 64 else ""))
    out = Path(__file__).parent / "results" / f"{name}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "threads": torch.get_num_threads(), "rows": rows}, indent=1) + "\n")
    print(f"\n{'step':>5} {'minutes':>8} {'1-obj':>6} {'1-obj held-out':>15} {'2-obj':>6}")
    for r in rows:
        print(f"{r['step']:5} {r['train_minutes']:8.1f} {r['1 object']:6.3f} "
              f"{r.get('1 object, held-out pair', float('nan')):15.3f} {r.get('2 objects', float('nan')):6.3f}")
    import matplotlib  # optional: only the plot needs it (and Agg must be chosen before pyplot is imported)
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    for group in ("1 object", "1 object, held-out pair", "2 objects"):
        ax.plot([r["train_minutes"] for r in rows], [r.get(group, float("nan")) for r in rows], "o-", label=group)
    ax.set(xlabel=f"minutes ({args.threads} CPU threads)", ylabel="exact adherence", ylim=(0, 1.02),
           title=f"{args.prediction}, {args.schedule}, min-SNR {args.snr_gamma:g}, batch {args.batch_size}")
    ax.axhline(0.9, color="grey", lw=0.8, ls="--")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=100)
    print("wrote", out, "and", out.with_suffix(".png"))


if __name__ == "__main__":
    main()
