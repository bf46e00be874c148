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
from typing import Callable

import torch

# model name on the command line -> the recipe module
RECIPES = {"clip": "sdlearn.recipes.clip", "vae": "sdlearn.recipes.vae", "t2i": "sdlearn.recipes.t2i"}


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


def add_options(p: argparse.ArgumentParser, fn: Callable, helps: dict[str, str]) -> None:
    """One --option per parameter of fn named in helps, with fn's default (so the two cannot drift) and its type."""
    params = inspect.signature(fn).parameters
    for name, help in helps.items():
        default = params[name].default
        p.add_argument("--" + name.replace("_", "-"), type=str if default is None else type(default),
                       default=default, help=help)


def options(args: argparse.Namespace, helps: dict[str, str]) -> dict:
    """The values of the options `add_options` made, as keyword arguments."""
    return {name: getattr(args, name) for name in helps}


def set_threads(args: argparse.Namespace) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)


def command(name: str, argv: list[str] | None) -> str:
    """The command line that ran this recipe, as `python -m sdlearn train <name> ...` (stored in a release)."""
    rest = sys.argv[2:] if argv is None else argv[1:]  # drop the subcommand, "train"
    return " ".join(["python -m sdlearn train", name, *rest])
