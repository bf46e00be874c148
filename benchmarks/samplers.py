"""Fewer steps for the same images: each sampler's steps to reach DDIM-50's adherence, and its images per second.

    python benchmarks/samplers.py [--models shapes-t2i shapes-sdxl-base] [--n 200]
                                  [--steps 1,2,3,4,5,6,8,10,12,15,20,30,50]
                                  [--threshold 0.98] [--full-curve] [--time-batch 16] [--repeats 3] [--threads 2]
    python benchmarks/samplers.py --retime [--repeats 3] [--time-batch 16] [--threads 1]

On each released model, --n single-object judge prompts (half naming a held-out colour-shape pair, the same seeds for
every sampler) are drawn with DDIM at 50 steps, the reference; then each sampler (DDIM, Euler, Euler with Karras sigmas,
DPM-Solver++(2M), DPM-Solver++(2M) with Karras sigmas, Euler ancestral) at the step counts of --steps in increasing
order, until its exact adherence (sdlearn.metrics.prompt_adherence) reaches --threshold of the reference's (all of
them with --full-curve). The fewest such steps, and the images per second at that count (--time-batch images, timed
after a warm-up, the fastest of --repeats calls, DDIM-50 timed in the same run for the ratio), go to
benchmarks/results/samplers.json. --retime times the file's samplers again at their step counts and keeps the rest.
"""
import argparse
import datetime
import json
import platform
import time
from pathlib import Path

import torch

from sdlearn import pretrained
from sdlearn.data import ShapesDataset
from sdlearn.metrics import prompt_adherence

SAMPLERS = {  # label -> (sampler, Karras sigmas); each samples on its diffusers scheduler's grid
    "ddim": ("ddim", False), "euler": ("euler", False), "euler, karras": ("euler", True),
    "dpmpp_2m": ("dpmpp_2m", False), "dpmpp_2m, karras": ("dpmpp_2m", True), "euler_a": ("euler_a", False),
}
GUIDANCE = 3.0  # the course's judged guidance scale (notebook 06)


def single_object_prompts(n: int, seed: int = 123) -> list[str]:
    """n one-object judge prompts: the first half from the training split, the rest naming a held-out pair."""
    train, heldout = (ShapesDataset(32, split=s, seed=seed, max_objects=1, length=max(n, 1))
                      for s in ("train", "heldout"))
    return [train[i][1] for i in range(n // 2)] + [heldout[i][1] for i in range(n - n // 2)]


def with_sampler(pipe, label: str):
    """The pipeline sampling with `label`'s sampler on its own grid (the schedule's sampler and karras settings)."""
    name, karras = SAMPLERS[label]
    pipe.schedule = pipe.schedule.replace(sampler=name, karras=karras)
    return pipe


def exact(pipe, captions: list[str], steps: int) -> float:
    images = pipe.generate(captions, steps, GUIDANCE, seed=0, progress=False)
    return prompt_adherence(images, captions)["exact"]


def images_per_second(pipe, captions: list[str], steps: int, repeats: int = 1) -> float:
    """Images per second of one generate call on `captions`, after a warm-up; the best of `repeats` calls (on a
    shared machine the fastest call is the one least disturbed by other jobs)."""
    pipe.generate(captions[:2], 1, GUIDANCE, progress=False)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        pipe.generate(captions, steps, GUIDANCE, seed=1, progress=False)
        best = min(best, time.perf_counter() - start)
    return len(captions) / best


def retime(path: Path, args) -> None:
    """--retime: time again, best of --repeats, each sampler of a results file at the steps it needed (and
    DDIM-50), keeping its adherence; the file records the re-timing command."""
    data = json.loads(path.read_text())
    timed = single_object_prompts(args.time_batch)
    for model, r in data["results"].items():
        pipe = pretrained.load(model, 32)
        base = pipe.schedule
        r["DDIM-50 images/s"] = images_per_second(with_sampler(pipe, "ddim"), timed, 50, args.repeats)
        for label, row in r["samplers"].items():
            pipe.schedule = base
            if row["steps to target"]:
                row["images/s"] = images_per_second(with_sampler(pipe, label), timed, row["steps to target"],
                                                    args.repeats)
                row["x DDIM-50 images/s"] = row["images/s"] / r["DDIM-50 images/s"]
            print(f"{model} {label:18} {row['images/s'] or float('nan'):.2f} images/s", flush=True)
    data["timing"] = {"command": f"python benchmarks/samplers.py --retime --repeats {args.repeats} --time-batch "
                                 f"{args.time_batch} --threads {args.threads}",
                      "date": datetime.date.today().isoformat(), "machine": f"{platform.machine()}, {args.threads} "
                      f"threads (a 2-core machine shared with other jobs)"}
    path.write_text(json.dumps(data, indent=1) + "\n")
    print("re-timed", path)


def measure(model: str, args, captions: list[str]) -> dict:
    """One released model: the reference, then each sampler's curve, fewest steps and speed."""
    pipe = pretrained.load(model, 32)
    base = pipe.schedule
    reference = exact(with_sampler(pipe, "ddim"), captions, 50)
    target = args.threshold * reference
    timed = captions[:args.time_batch]
    ref_speed = images_per_second(pipe, timed, 50, args.repeats)
    print(f"{model}: DDIM-50 exact {reference:.3f} (target {target:.3f}), {ref_speed:.2f} images/s", flush=True)
    rows = {}
    for label in SAMPLERS:
        pipe.schedule = base
        with_sampler(pipe, label)
        curve, fewest = {}, None
        for steps in args.steps:
            curve[steps] = exact(pipe, captions, steps)
            if fewest is None and curve[steps] >= target:
                fewest = steps
                if not args.full_curve:
                    break
        speed = images_per_second(pipe, timed, fewest, args.repeats) if fewest else None
        rows[label] = {"steps to target": fewest, "exact at those steps": curve.get(fewest),
                       "images/s": speed, "x DDIM-50 images/s": speed / ref_speed if speed else None,
                       "curve": curve}
        print(f"  {label:18} steps {fewest}  images/s {speed or float('nan'):.2f}  curve {curve}", flush=True)
    pipe.schedule = base
    return {"DDIM-50 exact": reference, "target": target, "DDIM-50 images/s": ref_speed, "samplers": rows}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=["shapes-t2i", "shapes-sdxl-base"])
    ap.add_argument("--n", type=int, default=200, help="single-object judge prompts, half held-out")
    ap.add_argument("--steps", type=lambda s: [int(v) for v in s.split(",")],
                    default=[1, 2, 3, 4, 5, 6, 8, 10, 12, 15, 20, 30, 50], help="step counts tried, increasing")
    ap.add_argument("--threshold", type=float, default=0.98, help="fraction of DDIM-50's exact adherence to reach")
    ap.add_argument("--full-curve", action="store_true", help="every step count, not only up to the target")
    ap.add_argument("--time-batch", type=int, default=16, help="images per timed call")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3, help="timed calls per speed, the fastest kept")
    ap.add_argument("--retime", action="store_true", help="only time again the samplers of results/samplers.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(__file__).parent / "results" / "samplers.json"
    if args.retime:
        return retime(out, args)
    start = time.perf_counter()
    captions = single_object_prompts(args.n)
    results = {model: measure(model, args, captions) for model in args.models}
    minutes = (time.perf_counter() - start) / 60
    command = "python benchmarks/samplers.py --models " + " ".join(args.models) + \
        f" --n {args.n} --steps {','.join(map(str, args.steps))} --threshold {args.threshold}" + \
        (" --full-curve" if args.full_curve else "") + f" --time-batch {args.time_batch} --repeats {args.repeats}" + \
        f" --threads {args.threads}"
    out.write_text(json.dumps({
        "command": command, "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()}, {args.threads} threads (a 2-core machine shared with other jobs)",
        "minutes": round(minutes, 1), "guidance_scale": GUIDANCE, "results": results}, indent=1) + "\n")
    print(f"({minutes:.1f} min) wrote", out)


if __name__ == "__main__":
    main()
