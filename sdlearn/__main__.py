"""The course's command line.

    python -m sdlearn generate "a red circle on the left" [more prompts] --out out.png
    python -m sdlearn train t2i  [options]     # = python -m sdlearn.pipeline train  (latent diffusion, notebook 06)
    python -m sdlearn train vae  [options]     # = python -m sdlearn.vae train       (notebook 03)
    python -m sdlearn train clip [options]     # = python -m sdlearn.text train      (notebook 02)

`train <model> --help` lists a model's options; every trainer is sdlearn.train.fit.
"""
from __future__ import annotations

import argparse
import sys
import time

TRAINERS = {"t2i": "sdlearn.pipeline", "vae": "sdlearn.vae", "clip": "sdlearn.text"}


def generate(argv: list[str]) -> int:
    import torch
    from torchvision.utils import save_image

    from sdlearn import pretrained

    p = argparse.ArgumentParser(prog="python -m sdlearn generate",
                                description="images from the released shapes text-to-image model")
    p.add_argument("prompts", nargs="+", help='e.g. "a red circle on the left"')
    p.add_argument("--out", default="out.png", help="the image grid to write (PNG): a row per prompt")
    p.add_argument("--n", type=int, default=4, help="images per prompt")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps")
    p.add_argument("--guidance", type=float, default=3.0, help="classifier-free guidance scale")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sampler", choices=("ddim", "ddpm"), default="ddim")
    p.add_argument("--model", default="shapes-t2i")
    p.add_argument("--size", type=int, default=32, help="image size of the released model")
    p.add_argument("--scale", type=int, default=4, help="upscale the grid by this factor (nearest) for viewing")
    args = p.parse_args(argv)
    if args.n < 1:
        p.error(f"--n must be >= 1, got {args.n}")
    start = time.perf_counter()
    pipe = pretrained.load(args.model, args.size)
    prompts = [q for q in args.prompts for _ in range(args.n)]
    try:
        images = pipe.generate(prompts, args.steps, args.guidance, args.seed, args.sampler, progress=False)
    except ValueError as e:  # an unknown word, steps < 1, a negative guidance scale: say it, no traceback
        p.error(str(e))
    images = torch.nn.functional.interpolate(images, scale_factor=args.scale, mode="nearest")
    save_image((images + 1) / 2, args.out, nrow=args.n, padding=2, pad_value=0.5)
    print(f"wrote {args.out}: {len(args.prompts)} prompt(s) x {args.n} images in "
          f"{time.perf_counter() - start:.1f} s")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    if cmd == "generate":
        return generate(rest)
    if cmd == "train":
        if not rest or rest[0] not in TRAINERS:
            print(f"python -m sdlearn train <model>: model must be one of {', '.join(TRAINERS)}, "
                  f"got {rest[0] if rest else 'nothing'!r}", file=sys.stderr)
            return 2
        import importlib

        return importlib.import_module(TRAINERS[rest[0]]).main(["train", *rest[1:]])
    print(f"unknown command {cmd!r}: expected generate or train\n{__doc__}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
