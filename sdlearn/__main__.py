"""The course's command line.

    python -m sdlearn generate "a red circle on the left" [more prompts] --out out.png
    python -m sdlearn generate "an astronaut riding a horse" --checkpoint <diffusers folder or .safetensors file>
    python -m sdlearn generate "a blue square" --image src.png --mask mask.png   # inpaint (mask white = repaint)
    python -m sdlearn generate "a blue square" --image src.png --mask mask.png --blend   # a plain model: blended
    python -m sdlearn generate "a red circle" --model <a pipeline with an image prompt> --image-prompt src.png
    python -m sdlearn train <model> [options]     # retrain a released model with its recipe (sdlearn.recipes)
    python -m sdlearn eval <model> [options]      # measure the released model

`train --help` lists the models, `train <model> --help` every option with its default.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
import time

import torch
from torchvision.utils import save_image

from sdlearn import convert, pretrained
from sdlearn.diffusion import with_karras
from sdlearn.recipes import RECIPES
from sdlearn.sdxl import SDXLPipeline
from sdlearn.text import course_words


def _generate_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m sdlearn generate",
                                description="images from a released model or a published checkpoint",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("prompts", nargs="+", help='e.g. "a red circle on the left"')
    p.add_argument("--out", default="out.png", help="the image grid to write (PNG): a row per prompt")
    p.add_argument("--n", type=int, default=4, help="images per prompt")
    p.add_argument("--steps", type=int, default=50, help="sampling steps")
    p.add_argument("--guidance", type=float, default=3.0, help="classifier-free guidance scale")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sampler", default=None,
                   help="the schedule's sampler (ddim, ddpm, euler, euler_a or dpmpp_2m; euler for a flow model such "
                        "as shapes-mmdit; default: the schedule's, a checkpoint's scheduler class)")
    p.add_argument("--karras", action="store_true",
                   help="Karras et al.'s sigma spacing (rho = 7) for euler, euler_a, dpmpp_2m (a NoiseSchedule)")
    p.add_argument("--guidance-rescale", type=float, default=0.0,
                   help="Lin et al. 2024's guidance rescale phi (0: off; 0.7 with zero-terminal-SNR models)")
    p.add_argument("--model", default=None, help=f"a released pipeline ({', '.join(pretrained.available())}); "
                   "shapes-sdxl is shapes-sdxl-base (default: shapes-t2i; with --control, shapes-controlnet-seg)")
    p.add_argument("--refiner", action="store_true", help="SDXL: hand over to <model>-refiner part-way")
    p.add_argument("--switch", type=float, default=0.8, help="with --refiner: where the refiner takes over")
    p.add_argument("--size", type=int, default=32, help="image size of the released model")
    p.add_argument("--scale", type=int, default=None,
                   help="upscale the grid by this factor (nearest) for viewing (default: 4 for a released model, "
                        "1 for a checkpoint)")
    p.add_argument("--checkpoint", default=None,
                   help="a published checkpoint instead of a released model: a diffusers folder, or an original "
                        ".safetensors file with --config (sdlearn.convert.load)")
    p.add_argument("--config", default=None, help="with a single-file --checkpoint: a diffusers folder of that model")
    p.add_argument("--device", default="cpu", help="with --checkpoint: where to run it (e.g. cuda)")
    p.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"),
                   help="with --checkpoint: the weights' precision (float16 on a GPU)")
    p.add_argument("--control", default=None,
                   help="a map image (PNG, at the model's image size) for a pipeline with a ControlNet")
    p.add_argument("--control-scale", type=float, default=1.0, help="with --control: the ControlNet's scale")
    p.add_argument("--controlnet", default=None,
                   help="with --checkpoint: a published ControlNet for it (a diffusers folder or a single file)")
    p.add_argument("--image", default=None,
                   help="the source image to repaint (PNG, RGB, at the model's image size), with --mask")
    p.add_argument("--mask", default=None,
                   help="with --image: the region to repaint (PNG at the image's size; one channel, the first of an "
                        "RGB file: white = repaint, black = keep); an inpainting model reads it (sdlearn.inpaint)")
    p.add_argument("--blend", action="store_true",
                   help="with --mask and a plain text-to-image model: repaint by blended latents (sdlearn.inpaint."
                        "blended: the known region replaced by the source's noised latents after every step)")
    p.add_argument("--strength", type=float, default=1.0,
                   help="with --mask: how much of the trajectory to run (1: from pure noise, as diffusers' inpaint "
                        "pipeline; < 1: from the source's latents noised part-way)")
    p.add_argument("--image-prompt", default=None,
                   help="an image prompt (PNG, RGB) for a pipeline with an image-prompt adapter (sdlearn.adapters)")
    p.add_argument("--image-scale", type=float, default=1.0, help="with --image-prompt: the adapter's scale")
    return p


def _control(p: argparse.ArgumentParser, args, pipe) -> dict:
    """generate's control=, control_scale= from --control (a map image file), when the pipeline reads a map."""
    if args.control is None:
        return {}
    if "control" not in getattr(getattr(pipe, "denoiser", None), "cond_dims", {}):
        p.error(f"--control: {args.checkpoint or args.model} has no ControlNet (a released ControlNet pipeline, or "
                f"--checkpoint with --controlnet)")
    from sdlearn.controlnet import read_control  # notebook 09's

    return {"control": read_control(args.control), "control_scale": args.control_scale}


def read_image(path, what: str) -> torch.Tensor:
    """An image file -> [1,3,H,W] RGB in [-1, 1] (a source image, an image prompt)."""
    rgb = _open(path, what, "a PNG or JPEG image").convert("RGB")
    data = torch.frombuffer(bytearray(rgb.tobytes()), dtype=torch.uint8).view(rgb.height, rgb.width, 3)
    return data.permute(2, 0, 1)[None].float() / 127.5 - 1


def read_mask(path) -> torch.Tensor:
    """A mask file -> [1,1,H,W] in [0, 1] (1 = repaint): a grey-level file as it is, an RGB one's first channel."""
    image = _open(path, "--mask", "a PNG mask, white = repaint, black = keep")
    grey = image.convert("L") if image.mode in ("1", "L", "LA", "I", "I;16", "F") else image.convert("RGB")
    data = torch.frombuffer(bytearray(grey.tobytes()), dtype=torch.uint8)
    data = data.view(grey.height, grey.width, -1)[..., 0]                        # [H, W]: L, or RGB's first channel
    return data[None, None].float() / 255


def _open(path, what: str, expected: str):
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image.load()
            return image
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"{what} {path}: not an image file (expected {expected}): {e}") from e


def _images(p: argparse.ArgumentParser, args) -> dict:
    """--image, --mask, --image-prompt read and checked against each other (sizes: against the model later)."""
    if args.mask is not None and args.image is None:
        p.error("--mask marks the region of a source image to repaint: give the image with --image")
    if args.image is not None and args.mask is None:
        p.error("--image is the source to repaint: give the region to repaint with --mask (white = repaint)")
    if args.blend and args.mask is None:
        p.error("--blend repaints the --mask region of --image with a plain model: give --image and --mask")
    if not 0 < args.strength <= 1:
        p.error(f"--strength must be in (0, 1], got {args.strength}")
    if args.strength != 1 and args.mask is None:
        p.error(f"--strength {args.strength}: how much of the trajectory repaints the --mask region; give --image "
                f"and --mask")
    out = {}
    try:
        if args.image is not None:
            out["image"], out["mask"] = read_image(args.image, "--image"), read_mask(args.mask)
            (h, w), (mh, mw) = out["image"].shape[-2:], out["mask"].shape[-2:]
            if (h, w) != (mh, mw):
                p.error(f"--mask {args.mask} is {mw}x{mh} but --image {args.image} is {w}x{h}: the mask must have "
                        f"the image's size")
        if args.image_prompt is not None:
            out["image_prompt"] = read_image(args.image_prompt, "--image-prompt")
    except ValueError as e:
        p.error(str(e))
    return out


def _draw(p: argparse.ArgumentParser, args, pipe, prompts: list[str], images: dict, **options) -> torch.Tensor:
    """generate, inpaint or blended, as the flags and the pipeline say."""
    from sdlearn import inpaint
    from sdlearn.pipeline import TextToImage

    name = args.checkpoint or args.model
    conditions = {}
    if "image_prompt" in images:
        if "image_prompt" not in getattr(getattr(pipe, "conditioner", None), "takes", ()):
            p.error(f"--image-prompt: {name} does not read an image prompt (a pipeline with an image-prompt "
                    f"adapter, sdlearn.adapters.attach)")
        conditions = {"image_prompt": images["image_prompt"], "image_scale": args.image_scale}
    if "mask" not in images:
        return pipe.generate(prompts, args.steps, args.guidance, args.seed, sampler=args.sampler, progress=False,
                             **options, **conditions)
    if not isinstance(pipe, TextToImage):
        p.error(f"--mask: {name} is a {type(pipe).__name__}; inpainting takes one text-to-image pipeline (no "
                f"--refiner)")
    reads_mask = "mask" in pipe.denoiser.cond_dims
    if reads_mask and args.blend:
        p.error(f"--blend is for a plain text-to-image model; {name} is an inpainting model, which reads the mask "
                f"itself: leave --blend out")
    if not reads_mask and not args.blend:
        p.error(f"--mask: {name} is a plain text-to-image model, its denoiser does not read a mask (an inpainting "
                f"checkpoint's UNet reads 9 channels): add --blend to repaint by blended latents")
    if not reads_mask and options.get("guidance_rescale"):
        p.error("--guidance-rescale: blended latents (--blend) sample without it; leave it out")
    draw = inpaint.inpaint if reads_mask else inpaint.blended
    return draw(pipe, images["image"], images["mask"], prompts,
                strength=args.strength, steps=args.steps, guidance_scale=args.guidance, seed=args.seed,
                sampler=args.sampler, progress=False, **options, **conditions)


def generate(argv: list[str]) -> int:
    p = _generate_parser()
    args = p.parse_args(argv)
    args.scale = args.scale or (1 if args.checkpoint else 4)
    args.model = args.model or ("shapes-controlnet-seg" if args.control and not args.checkpoint else "shapes-t2i")
    if args.checkpoint and args.refiner:
        p.error("--refiner pairs the released shapes-sdxl models; a checkpoint folder holding base/ and refiner/ "
                "(as sdlearn.convert.save writes an SDXL pair) loads both by itself")
    for flag, value, least in (("--n", args.n, 1), ("--steps", args.steps, 1), ("--scale", args.scale, 1)):
        if value < least:
            p.error(f"{flag} must be >= {least}, got {value}")
    if args.guidance < 0:
        p.error(f"--guidance must be >= 0 (1: no guidance; 3: the course's), got {args.guidance}")
    if any(not q.strip() for q in args.prompts) and args.image_prompt is None:  # with an image prompt: the image alone
        p.error(f"a prompt is empty: describe the image with the words the model knows ({', '.join(course_words())}"
                f"), e.g. \"a red circle on the left\" (an empty prompt draws from an --image-prompt alone)")
    out_dir = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(out_dir):
        p.error(f"--out {args.out}: the folder {out_dir} does not exist")
    if not args.out.lower().endswith(".png"):
        p.error(f"--out {args.out}: the grid is written as PNG; give a file name ending in .png")
    images = _images(p, args)
    start = time.perf_counter()
    name = args.model
    if f"{name}-{args.size}" not in pretrained.available() and f"{name}-base-{args.size}" in pretrained.available():
        name = f"{name}-base"
    try:
        if args.checkpoint:
            pipe = convert.load(args.checkpoint, config=args.config, device=args.device,
                                dtype=getattr(torch, args.dtype), controlnet=args.controlnet)
        else:
            pipe = pretrained.load(name, args.size)
        if not hasattr(pipe, "generate"):
            p.error(f"{args.model} is a {type(pipe).__name__}, not a text-to-image pipeline")
        if args.refiner and not args.checkpoint:
            refiner = pretrained.load(f"{name.removesuffix('-base')}-refiner", args.size)
            pipe = SDXLPipeline(pipe, refiner, args.switch)
        if args.karras:
            for part in (pipe.base, pipe.refiner) if isinstance(pipe, SDXLPipeline) else (pipe,):
                part.schedule = with_karras(part.schedule)
        prompts = [q for q in args.prompts for _ in range(args.n)]
        rescale = {"guidance_rescale": args.guidance_rescale} if args.guidance_rescale else {}
        if rescale and isinstance(pipe, SDXLPipeline):  # the refiner's keywords go apart
            rescale["refiner_conditions"] = dict(rescale)
        images = _draw(p, args, pipe, prompts, images, **rescale, **_control(p, args, pipe))
    except (ValueError, FileNotFoundError) as e:  # an unknown word or model, steps < 1, ...: say it, no traceback
        p.error(str(e))
    images = torch.nn.functional.interpolate(images, scale_factor=args.scale, mode="nearest")
    save_image((images + 1) / 2, args.out, nrow=args.n, padding=2, pad_value=0.5)
    print(f"wrote {args.out}: {len(args.prompts)} prompt(s) x {args.n} images in "
          f"{time.perf_counter() - start:.1f} s")
    return 0


def recipe(cmd: str, argv: list[str]) -> int:
    """`train <model> ...` / `eval <model> ...`: hand over to the model's recipe module."""
    if not argv or argv[0] in ("-h", "--help"):
        print(f"usage: python -m sdlearn {cmd} <model> [options]   (<model> --help: its options and defaults)\n\n"
              "models:\n" + "".join(f"  {name:5} {importlib.import_module(m).__doc__.splitlines()[0]}\n"
                                    for name, m in RECIPES.items()))
        return 0 if argv else 2
    if argv[0] not in RECIPES:
        print(f"python -m sdlearn {cmd} <model>: model must be one of {', '.join(RECIPES)}, got {argv[0]!r}",
              file=sys.stderr)
        return 2
    return importlib.import_module(RECIPES[argv[0]]).main([cmd, *argv[1:]])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    if cmd == "generate":
        return generate(rest)
    if cmd in ("train", "eval"):
        return recipe(cmd, rest)
    print(f"unknown command {cmd!r}: expected generate, train or eval\n{__doc__}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
