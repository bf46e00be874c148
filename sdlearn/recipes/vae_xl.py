"""The recipe of the released shapes-vae-xl (notebook 07): notebook 03's VAE recipe on SDXL's data.

    python -m sdlearn train vae-xl --size 32 --steps 2000 --threads 1 --release    # shapes-vae-xl-32 (17 min)
    python -m sdlearn eval vae-xl                                                  # its PSNR and judge scores

SDXL shipped its own VAE, and so does the course: a fraction `augment` of the training images is rendered as SDXL's
data (a random original size, rescaled and cropped: sdlearn.sdxl.SDXLShapes) and a fraction `degrade` blurred,
noised or JPEG-compressed, so that SDXL's size and quality conditions have latents to act on (a VAE that only saw
clean renders cleans up a blurred image: the refiner's quality score would then have nothing to change).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from sdlearn.data import ShapesDataset
from sdlearn.recipes import option
from sdlearn.recipes import vae as vae_recipe
from sdlearn.sdxl import SDXLShapes
from sdlearn.train import History
from sdlearn.vae import AutoencoderKL

RELEASE = "python -m sdlearn train vae-xl --size 32 --steps 2000 --threads 1 --release"


@dataclass(frozen=True, kw_only=True)
class VAEXLRecipe(vae_recipe.VAERecipe):
    """Notebook 03's VAE settings, and the fractions of SDXL-style and of degraded training images."""

    augment: float = option(0.5, "fraction of the images rendered at a random original size and cropped (SDXL's data)")
    degrade: float = option(0.5, "fraction of the images blurred, noised or JPEG-compressed")


@dataclass(frozen=True, kw_only=True)
class VAEXLRelease(vae_recipe.VAERelease):
    name: str = option("shapes-vae-xl", "release name")


def images(recipe: VAEXLRecipe) -> Callable[[int], torch.Tensor]:
    """image(i) -> training image i [3,H,W]: a fraction `augment` of the indices, spread evenly, from the SDXL-style
    renders, all of them degraded with probability `degrade`."""
    r = recipe
    scenes = ShapesDataset(size=r.size, split="train", seed=r.seed, length=r.steps * r.batch_size)
    plain, varied = SDXLShapes(scenes, degrade=r.degrade), SDXLShapes(scenes, augment=True, degrade=r.degrade)

    def image(i: int) -> torch.Tensor:
        return (varied if (i * r.augment) % 1 + r.augment >= 1 else plain)[i][0]
    return image


def train(recipe: VAEXLRecipe, *, loss_fn: Callable | None = None,
          progress: bool = True) -> tuple[AutoencoderKL, History]:
    """sdlearn.recipes.vae.train on SDXL's data -> (vae, History)."""
    return vae_recipe.train(recipe, loss_fn=loss_fn, progress=progress, images=images(recipe))


def command_line():
    return vae_recipe.command_line("vae-xl", __doc__, VAEXLRecipe, VAEXLRelease)


def main(argv: list[str] | None = None) -> int:
    return vae_recipe.main(argv, command_line, train, "vae-xl")


if __name__ == "__main__":
    raise SystemExit(main())
