"""The training recipes of the course's released models: one module per model, with its command line.

    python -m sdlearn train --help                         # the models
    python -m sdlearn train t2i --help                     # every option of one, with its default
    python -m sdlearn train t2i --checkpoint-dir runs/t2i  # interrupted? run the same command again: it resumes
    python -m sdlearn eval t2i                             # judge the released model

A recipe module holds the training data it renders, its `train` function (whose defaults are the command line's:
`add_options` reads them from its signature), how the release is judged, and `RELEASE`, the exact command that
made the shipped weights. The notebooks call the same `train` with a smaller budget, so what a notebook prints and
what ships come from one code path. Model modules (sdlearn.vae, sdlearn.unet, ...) hold only what their notebook
teaches.
"""
from __future__ import annotations

import argparse
import inspect
import sys
import time
from collections.abc import Callable

import torch

from sdlearn import pretrained

# model name on the command line -> the recipe module
RECIPES = {"clip": "sdlearn.recipes.clip", "vae": "sdlearn.recipes.vae", "t2i": "sdlearn.recipes.t2i",
           "sdxl": "sdlearn.recipes.sdxl", "mmdit": "sdlearn.recipes.mmdit"}


def parser(name: str, doc: str) -> tuple[argparse.ArgumentParser, argparse.ArgumentParser, argparse.ArgumentParser]:
    """The command line of recipe `name`: (parser, its `train` subparser, its `eval` subparser). The train
    subparser already has the options every recipe shares (threads, checkpoints, release)."""
    p = argparse.ArgumentParser(prog=f"python -m sdlearn.recipes.{name}", description=doc,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    fmt = argparse.ArgumentDefaultsHelpFormatter
    train = sub.add_parser("train", help=f"train the shapes {name} model", formatter_class=fmt)
    train.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    train.add_argument("--release", action="store_true", help="write the release into sdlearn/weights/")
    train.add_argument("--out", default=None, help="write the release file here instead")
    evaluate = sub.add_parser("eval", help=f"judge the released shapes {name} model", formatter_class=fmt)
    return p, train, evaluate


# the options every recipe's train() has
COMMON_HELP = {
    "steps": "training steps",
    "batch_size": "training batch",
    "lr": "AdamW peak learning rate (warm-up, then cosine decay)",
    "seed": "seed of the weights, the data and the batches",
    "device": "cpu, cuda, ...",
    "checkpoint_dir": "save checkpoints here; run the same command again to resume from the latest",
    "checkpoint_every": "steps between checkpoints (0: only at the end)",
}
# and the latent diffusion recipes' (t2i, sdxl)
LATENT_HELP = {
    "size": "image size (the released VAE of this size is used)",
    "pool": "training images rendered and encoded once",
    "width": "channels of the UNet's first level (the second has twice)",
    "layers": "ResBlocks per level",
    "prediction": "what the UNet predicts: eps, v or x0",
    "schedule": "noise schedule: linear, scaled_linear or cosine",
    "snr_gamma": "min-SNR-gamma loss weighting (0: a plain mean)",
    "p_uncond": "probability of training with the text dropped (for classifier-free guidance)",
}


def add_options(p: argparse.ArgumentParser, fn: Callable, helps: dict[str, str]) -> None:
    """One --option per parameter of fn named in helps or COMMON_HELP, with fn's default (so the two cannot
    drift) and its type."""
    params = inspect.signature(fn).parameters
    for name, help in {**COMMON_HELP, **helps}.items():
        default = params[name].default
        p.add_argument("--" + name.replace("_", "-"), type=str if default is None else type(default),
                       default=default, help=help)


def options(args: argparse.Namespace, helps: dict[str, str]) -> dict:
    """The values of the options `add_options` made, as keyword arguments."""
    return {name: getattr(args, name) for name in {**COMMON_HELP, **helps}}


def reproduce(name: str, size: int, start: float) -> None:
    """After an evaluation: how long it took, and the command that made the release."""
    print(f"({time.perf_counter() - start:.1f} s); reproduce with:", pretrained.metadata(name, size)["command"])


def exact_figures(scores: dict[str, dict[str, float]]) -> dict[str, str]:
    """The judge's exact rates by group, as release metadata: {"exact_1_object": "0.981", ...}."""
    return {f"exact_{k.replace(' ', '_').replace(',', '')}": f"{s['exact']:.3f}" for k, s in scores.items()}


def set_threads(args: argparse.Namespace) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)


def command(name: str, argv: list[str] | None) -> str:
    """The command line that ran this recipe, as `python -m sdlearn train <name> ...` (stored in a release),
    without the checkpoint options, which change where a run is saved, not what it makes."""
    rest = sys.argv[2:] if argv is None else argv[1:]  # drop the subcommand, "train"
    kept, skip = [], False
    for arg in rest:
        if skip:
            skip = False
        elif arg.split("=")[0] in ("--checkpoint-dir", "--checkpoint-every"):
            skip = "=" not in arg  # its value is the next argument
        else:
            kept.append(arg)
    return " ".join(["python -m sdlearn train", name, *kept])
