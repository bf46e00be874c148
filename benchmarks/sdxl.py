"""What each SDXL idea buys, measured on the released shapes-sdxl-base and shapes-sdxl-refiner (notebook 07).

    python benchmarks/sdxl.py [--n 200] [--steps 50] [--threads 2]

On --n judge prompts (half naming held-out colour-shape pairs), the same seeds everywhere: the base alone, base +
refiner, refiner as img2img (equal steps, equal compute); crop offsets and original sizes asked of the base; the
base with each text encoder's share zeroed; the refiner's quality score high and low; and notebook 06's shapes-t2i
next to them. Writes benchmarks/results/sdxl.json.
"""
import argparse
import json
import time
from pathlib import Path

import torch

from sdlearn import pretrained
from sdlearn.data import ShapesDataset, render_pool
from sdlearn.measure import encoder_ablation, image_scores, print_table, refinement_table, sweep
from sdlearn.metrics import eval_prompts
from sdlearn.sdxl import SDXLPipeline


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=200, help="judge prompts, half held-out")
    ap.add_argument("--steps", type=int, default=50, help="DDIM steps")
    ap.add_argument("--guidance", type=float, default=3.0)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    base, refiner = (pretrained.load(f"shapes-sdxl-{part}", args.size) for part in ("base", "refiner"))
    pipe = SDXLPipeline(base, refiner, 0.8)
    captions, _ = eval_prompts(args.n, args.size)
    s, w = args.size, args.guidance
    clean, clean_captions = render_pool(ShapesDataset(s, "train", seed=7), args.n, progress=False)
    results = {"clean renders": image_scores(clean, clean_captions)}
    crops, originals = [(o, o) for o in (0, s // 16, s // 8, s // 4)], [(o, o) for o in (s // 2, s, 2 * s)]
    sections = {
        "refinement": refinement_table(pipe, captions, args.steps, w)[0],
        "crop": sweep(base, captions, "crop_top_left", crops, args.steps, w)[0],
        "original size": sweep(base, captions, "original_size", originals, args.steps, w)[0],
        "encoders": encoder_ablation(base, captions, args.steps, w),
        "quality": {f"quality {q}": image_scores(pipe.generate(captions, args.steps, w, progress=False,
                                                               refiner_conditions={"aesthetic_score": q}), captions)
                    for q in (6.0, 2.0)},
        "notebook 06": {"shapes-t2i": image_scores(pretrained.load("shapes-t2i", s).generate(
            captions, args.steps, w, progress=False), captions)},
    }
    for name, rows in sections.items():
        print(f"\n{name}:")
        print_table(rows)
        results[name] = {str(k): v for k, v in rows.items()}
    minutes = (time.perf_counter() - start) / 60
    print(f"\n({minutes:.1f} min, {torch.get_num_threads()} threads)")
    out = Path(__file__).parent / "results" / "sdxl.json"
    out.write_text(json.dumps({"args": vars(args), "minutes": round(minutes, 1), "results": results}, indent=1) + "\n")
    print("wrote", out)


if __name__ == "__main__":
    main()
