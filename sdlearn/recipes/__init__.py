"""The training recipes of the course's released models: one module per model, with its command line.

    python -m sdlearn train --help                         # the models
    python -m sdlearn train t2i --help                     # every option of one, with its default
    python -m sdlearn train t2i --checkpoint-dir runs/t2i  # interrupted? run the same command again: it resumes
    python -m sdlearn eval t2i                             # judge the released model

A recipe module holds the training data it renders, its settings (a frozen dataclass such as `T2IRecipe`, whose
fields carry their defaults and help), its `train(settings, *, loss_fn, callback, ...)`, how the release is judged,
and `RELEASE`, the exact command that made the shipped weights. The command line is made from the dataclasses'
fields (`add_options`), so its options and the settings cannot drift, and `parse` turns a stored command back into
the settings it ran with. The notebooks call the same `train` with a smaller budget, so what a notebook prints and
what ships come from one code path. Model modules (sdlearn.vae, sdlearn.unet, ...) hold only what their notebook
teaches.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import shlex
import sys
import time
from dataclasses import MISSING, dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from sdlearn import pretrained

# model name on the command line -> the recipe module
RECIPES = {"clip": "sdlearn.recipes.clip", "vae": "sdlearn.recipes.vae", "t2i": "sdlearn.recipes.t2i",
           "vae-xl": "sdlearn.recipes.vae_xl", "sdxl": "sdlearn.recipes.sdxl", "mmdit": "sdlearn.recipes.mmdit",
           "ip-adapter": "sdlearn.recipes.ip_adapter", "inpaint": "sdlearn.recipes.inpaint",
           "controlnet": "sdlearn.recipes.controlnet"}


def option(default: Any, help: str, *, command_line: bool = True) -> Any:
    """A field of a settings dataclass: its default and the help of its --option (command_line=False: a setting only
    Python passes, such as a model's configuration object). A subclass that gives a field another default with a
    plain `steps: int = 1200` keeps the help written here."""
    return dataclasses.field(default=default, metadata={"help": help, "command_line": command_line})


@dataclass(frozen=True, kw_only=True)
class Recipe:
    """The settings every recipe has; each recipe's dataclass adds its own and gives steps, batch_size and lr their
    defaults."""

    steps: int = option(MISSING, "training steps")
    batch_size: int = option(MISSING, "training batch")
    lr: float = option(MISSING, "AdamW peak learning rate (warm-up, then cosine decay)")
    seed: int = option(0, "seed of the weights, the data and the batches")
    device: str | torch.device = option("cpu", "cpu, cuda, ...")
    checkpoint_dir: str | Path | None = option(
        None, "save checkpoints here; run the same command again to resume from the latest")
    checkpoint_every: int = option(0, "steps between checkpoints (0: only at the end)")

    # the values a field may take, with what each means (or ""): {field: {value: meaning}}, checked on creation
    CHOICES: ClassVar[dict[str, dict[str, str]]] = {}

    def __post_init__(self):
        for name, choices in self.CHOICES.items():
            if getattr(self, name) not in choices:
                said = [repr(c) + (f" ({meaning})" if meaning else "") for c, meaning in choices.items()]
                raise ValueError(f"{name} must be {' or '.join(said)}, got {getattr(self, name)!r}")


@dataclass(frozen=True, kw_only=True)
class Release:
    """The options of `train` on the command line around the recipe: threads, and where the release goes."""

    threads: int = option(0, "torch CPU threads (0: torch's default)")
    release: bool = option(False, "write the release into sdlearn/weights/")
    out: str | None = option(None, "write the release file here instead")


def _declared(cls: type, name: str) -> dataclasses.Field:
    """Field `name` as first declared with option() along cls's bases (a subclass may change only its default)."""
    for base in cls.__mro__:
        f = getattr(base, "__dataclass_fields__", {}).get(name)
        if f is not None and "help" in f.metadata:
            return f
    raise TypeError(f"{cls.__name__}.{name} has no help: declare it with sdlearn.recipes.option")


def command_line_options(cls: type) -> list[tuple[dataclasses.Field, str]]:
    """The fields of a settings dataclass that are --options, each with its help."""
    declared = [(f, _declared(cls, f.name).metadata) for f in dataclasses.fields(cls)]
    return [(f, meta["help"]) for f, meta in declared if meta["command_line"]]


def add_options(p: argparse.ArgumentParser, cls: type) -> None:
    """One --option per field of the settings dataclass cls: its name with dashes, its default, the type of its
    default (str for None) and its help; a bool that defaults to False is a flag."""
    for f, help in command_line_options(cls):
        flag = "--" + f.name.replace("_", "-")
        if f.default is False:
            p.add_argument(flag, action="store_true", help=help)
        else:
            p.add_argument(flag, type=str if f.default is None else type(f.default), default=f.default, help=help)


def parser(name: str, doc: str, recipe: type[Recipe],
           release: type[Release]) -> tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    """The command line of recipe `name`: (parser, its `eval` subparser, for the recipe to fill). The `train`
    subparser has an option per field of `recipe` and of `release`; `settings(args)` reads them back."""
    p = argparse.ArgumentParser(prog=f"python -m sdlearn.recipes.{name}", description=doc,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    fmt = argparse.ArgumentDefaultsHelpFormatter
    train = sub.add_parser("train", help=f"train the shapes {name} model", formatter_class=fmt)
    for cls in (recipe, release):
        add_options(train, cls)
    train.set_defaults(settings_classes=(recipe, release))
    evaluate = sub.add_parser("eval", help=f"judge the released shapes {name} model", formatter_class=fmt)
    return p, evaluate


def settings(args: argparse.Namespace) -> tuple[Recipe, Release]:
    """A parsed `train` command line -> (the settings the recipe's train takes, the options around it)."""
    return tuple(cls(**{f.name: getattr(args, f.name) for f, _ in command_line_options(cls)})
                 for cls in args.settings_classes)


def parse(command: str) -> tuple[Recipe, Release]:
    """A command as `command()` records it in a release (`python -m sdlearn train t2i --steps 4000 ...`) -> the
    settings it ran with: (the recipe's, the options around it)."""
    words = shlex.split(command)
    if words[:4] != ["python", "-m", "sdlearn", "train"] or len(words) < 5 or words[4] not in RECIPES:
        raise ValueError(f"not a recipe's command (python -m sdlearn train <{'|'.join(RECIPES)}> ...): {command!r}")
    module = importlib.import_module(RECIPES[words[4]])
    return settings(module.command_line().parse_args(["train", *words[5:]]))


def reproduce(name: str, size: int, start: float) -> None:
    """After an evaluation: how long it took, and the command that made the release."""
    print(f"({time.perf_counter() - start:.1f} s); reproduce with:", pretrained.metadata(name, size)["command"])


def exact_figures(scores: dict[str, dict[str, float]]) -> dict[str, str]:
    """The judge's exact rates by group, as release metadata: {"exact_1_object": "0.981", ...}."""
    return {f"exact_{k.replace(' ', '_').replace(',', '')}": f"{s['exact']:.3f}" for k, s in scores.items()}


def save_trained(obj, name: str, recipe: Recipe, run: Release, made_by: str, seconds: float,
                 released: dict[str, str], **figures: str) -> None:
    """With --release or --out: write a trained model or composite (into sdlearn/weights/, or to run.out) in float16,
    with the command that made it, its steps and training minutes, and the figures it was judged at."""
    if run.release or run.out:
        dest = pretrained.save(obj, name, recipe.size, made_by, Path(run.out) if run.out else None, released=released,
                               dtype=torch.float16, steps=str(recipe.steps), train_minutes=f"{seconds / 60:.1f}",
                               **figures)
        print("wrote", dest)


def set_threads(run: Release) -> None:
    if run.threads:
        torch.set_num_threads(run.threads)


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
