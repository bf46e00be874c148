"""Does the refiner's timestep sampler matter? Notebook 07's exercise 4, right and wrong, each training a refiner.

    python benchmarks/sdxl_refiner_timesteps.py [--steps 300] [--pool 8000] [--n 100] [--sample-steps 25]

The refiner of notebook 07's cpu profile (its recipe, --steps training steps on --pool images) is trained three
times, changing only the function that draws its training timesteps: the right one (uniform over t < 200, the
low-noise end, SDXL sec. 2.5), the high-noise end (t >= 800: "the first 200" counted from the noisy side), and all
1000 levels (the refiner as a second base). Each then finishes the released shapes-sdxl-base's trajectory from 0.8
on --n judge prompts (half naming held-out colour-shape pairs), the same seeds for all; the base alone is the
reference row. Writes benchmarks/results/sdxl_refiner_timesteps.json.
"""
import argparse
import time
from pathlib import Path

import record
import torch

from sdlearn import pretrained
from sdlearn.measure import image_scores, print_table
from sdlearn.metrics import eval_prompts
from sdlearn.recipes import sdxl as sdxl_recipe
from sdlearn.sdxl import SDXLPipeline

SAMPLERS = {  # n -> [n] training timesteps of the refiner
    "t < 200 (right)": lambda n: torch.randint(0, 200, (n,)),
    "t >= 800 (the high-noise end)": lambda n: torch.randint(800, 1000, (n,)),
    "all 1000 levels": lambda n: torch.randint(0, 1000, (n,)),
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=300, help="refiner training steps (notebook 07's cpu profile: 300)")
    ap.add_argument("--pool", type=int, default=8000, help="training images (the cpu profile's sdxl_pool)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--n", type=int, default=100, help="judge prompts, half held-out")
    ap.add_argument("--sample-steps", type=int, default=25, help="DDIM steps of the judged trajectory")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    base = pretrained.load("shapes-sdxl-base", 32)
    captions, _ = eval_prompts(args.n, 32)
    rows = {"base alone": image_scores(base.generate(captions, args.sample_steps, 3.0, progress=False), captions)}
    print(f"base alone: {rows['base alone']}", flush=True)
    out = Path(__file__).parent / "results" / "sdxl_refiner_timesteps.json"
    for label, sampler in SAMPLERS.items():  # the results file is rewritten after each row
        settings = sdxl_recipe.SDXLRecipe(part="refiner", size=32, steps=args.steps, batch_size=args.batch,
                                          pool=args.pool, width=64)
        refiner, _ = sdxl_recipe.train(settings, timesteps=sampler, progress=False)
        images = SDXLPipeline(base, refiner, 0.8).generate(captions, args.sample_steps, 3.0, progress=False)
        rows[f"+ refiner on {label}"] = image_scores(images, captions)
        print(f"{label}: {rows[f'+ refiner on {label}']} ({time.perf_counter() - start:.0f} s)", flush=True)
        record.write(out, __file__, args, start, rows)
    print_table(rows)
    print("wrote", out)


if __name__ == "__main__":
    main()
