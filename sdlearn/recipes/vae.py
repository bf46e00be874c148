"""The recipe of the released shapes VAEs (notebook 03): an AutoencoderKL trained on freshly rendered shapes images,
then given the latent scaling factor that makes its latents unit-variance.

    python -m sdlearn train vae --size 32 --steps 1200 --threads 1 --release   # shapes-vae-32 (13 min, 1 thread)
    python -m sdlearn train vae --size 64 --steps 600 --threads 1 --release    # shapes-vae-64 (26 min)
    python -m sdlearn eval vae --size 32                                       # its PSNR and judge scores

SD3's VAE (notebook 08) is the same recipe with another latent: RELEASE_SD3 (shapes-vae-sd3-32: 16 latent channels,
no quant convs, shifted latents); SDXL's (notebook 07) the same recipe on SDXL's data, sdlearn.recipes.vae_xl.
"""
from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from sdlearn import pretrained
from sdlearn.course import seed_everything
from sdlearn.data import ShapesDataset, render_pool
from sdlearn.metrics import prompt_adherence
from sdlearn.recipes import Recipe, Release, command, option, parser, reproduce, set_threads, settings
from sdlearn.train import History, TrainConfig, fit
from sdlearn.vae import AutoencoderKL, VAEConfig, latent_scale, psnr, reconstruct, vae_loss

RELEASE_SD3 = ("python -m sdlearn train vae --name shapes-vae-sd3 --latent-channels 16 --layout sd3 --size 32 "
               "--steps 1200 --threads 1 --release")
RELEASE = {32: "python -m sdlearn train vae --size 32 --steps 1200 --threads 1 --release",
           64: "python -m sdlearn train vae --size 64 --steps 600 --threads 1 --release"}

# the released shapes VAEs: 32 px -> 8x8x4, 64 px -> 16x16x4 latents (downsampling factor 4)
SHAPES_CONFIG = dict(channels=(32, 64, 64), layers_per_block=1, norm_groups=8, latent_channels=4)


@dataclass(frozen=True, kw_only=True)
class VAERecipe(Recipe):
    """The settings of notebook 03's AutoencoderKL (the releases: RELEASE, RELEASE_SD3).

    latent_channels: 4 (SD 1.x - SDXL) or 16 (SD3); layout "sd3": no quant convs, and latents shifted by their mean
    before scaling, (z - shift) * scale, as SD3's VAE."""

    CHOICES = {"layout": {"sd": "quant convs, latents scaled", "sd3": "none, latents shifted and scaled"}}

    size: int = option(32, "image size")
    steps: int = 1200
    batch_size: int = 32
    lr: float = 2e-3
    kl_weight: float = option(1e-4, "weight of the KL term")
    recon: str = option("l2", "reconstruction loss: l2 or l1")
    l1_weight: float = option(0.0, "weight of an extra per-image L1 term")
    latent_channels: int = option(4, "channels of the latent (SD 1.x - SDXL: 4, SD3: 16)")
    layout: str = option("sd", "sd: quant convs, latents scaled; sd3: no quant convs, latents shifted and scaled")
    scale_images: int = option(512, "other training images whose latents' standard deviation sets the scaling "
                                    "factor (1 / it)")
    architecture: dict | None = option(None, "VAEConfig fields over SHAPES_CONFIG, the latent channels and the layout",
                                       command_line=False)


@dataclass(frozen=True, kw_only=True)
class VAERelease(Release):
    """The command line's options around the VAE recipe: the release's name and the held-out score."""

    name: str = option("shapes-vae", "release name")
    eval: int = option(1000, "held-out images to score; 0: none")


def training_loss(vae: AutoencoderKL, images: torch.Tensor, kl_weight: float, recon: str = "l2",
                  l1_weight: float = 0.0) -> tuple[torch.Tensor, dict[str, float]]:
    """vae_loss on a batch (a posterior sample decoded), plus l1_weight x the per-image L1; and what to log."""
    x_rec, post = vae(images)
    loss = vae_loss(images, x_rec, post.mean, post.logvar, kl_weight, recon)
    if l1_weight:
        loss = loss + l1_weight * (x_rec - images).abs().flatten(1).sum(1).mean()
    with torch.no_grad():
        logs = {"mse": F.mse_loss(x_rec, images).item(), "kl": post.kl().mean().item()}
    return loss, logs


def shapes_images(size: int, n: int, split: str = "train", seed: int = 0) -> tuple[torch.Tensor, list[str]]:
    """The first n images of a shapes split and their captions -> ([n,3,size,size], captions)."""
    return render_pool(ShapesDataset(size=size, split=split, seed=seed, length=max(n, 1)), n, progress=False)


@torch.no_grad()
def evaluate(vae: AutoencoderKL, size: int, n: int = 500, split: str = "heldout") -> dict[str, float]:
    """PSNR (dB, mean over images) and the judge's adherence on reconstructions of n `split` images."""
    images, captions = shapes_images(size, n, split)
    rec = reconstruct(vae.eval(), images)
    return {"psnr": psnr(rec, images).mean().item(), **prompt_adherence(rec, captions)}


def train(recipe: VAERecipe, *, loss_fn: Callable | None = None, progress: bool = True,
          images: Callable[[int], torch.Tensor] | None = None) -> tuple[AutoencoderKL, History]:
    """Train an AutoencoderKL (SHAPES_CONFIG, with recipe.architecture over it) on the shapes training split and set
    its latent scale -> (vae, History).

    Fresh images every step: images(i) -> image i [3,H,W] (default: the shapes training split's; a pure function of
    the index). loss_fn(vae, images [B,3,H,W]) -> loss or (loss, logs): training_loss with kl_weight, recon and
    l1_weight, or a learner's (notebook 03). The scaling factor is 1 / std of the latents of `recipe.scale_images`
    other training images."""
    r = recipe
    seed_everything(r.seed)
    fmt = torch.channels_last  # on CPU, convolutions train several times faster in NHWC
    sd3 = r.layout == "sd3"
    config = {**SHAPES_CONFIG, "latent_channels": r.latent_channels, "use_quant_conv": not sd3,
              "use_post_quant_conv": not sd3, **(r.architecture or {})}
    vae = AutoencoderKL(VAEConfig(**config)).to(r.device, memory_format=fmt)
    if images is None:
        ds = ShapesDataset(size=r.size, split="train", seed=r.seed, length=r.steps * r.batch_size)
        images = (lambda i: ds[i][0])  # noqa: E731
    loss_fn = loss_fn or functools.partial(training_loss, kl_weight=r.kl_weight, recon=r.recon, l1_weight=r.l1_weight)

    def batch(step):  # a pure function of the step: a resumed run sees the same images
        x = torch.stack([images(i) for i in range(step * r.batch_size, (step + 1) * r.batch_size)])  # [B,3,size,size]
        return x.to(r.device, memory_format=fmt)

    hist = fit(vae, loss_fn, batch,
               TrainConfig(steps=r.steps, lr=r.lr, warmup=100, checkpoint_every=r.checkpoint_every,
                           desc=f"vae {r.size}px"),
               progress=progress, checkpoint_dir=r.checkpoint_dir)
    vae = vae.to(memory_format=torch.contiguous_format)
    scale, shift = latent_scale(vae, shapes_images(r.size, r.scale_images, "train", seed=r.seed + 1)[0], shift=sd3)
    vae.config.scaling_factor, vae.config.shift_factor = scale, shift
    return vae.eval(), hist


def _print_scores(what: str, scores: dict) -> None:
    print(f"{what}: PSNR {scores['psnr']:.2f} dB, "
          + ", ".join(f"{k} {v:.3f}" for k, v in scores.items() if k != "psnr"))


def command_line(name: str = "vae", doc: str = __doc__, recipe: type = VAERecipe, release: type = VAERelease):
    """The command line of `python -m sdlearn train|eval <name>` (this recipe's, or a variant's: vae_xl)."""
    p, e = parser(name, doc, recipe, release)
    e.add_argument("--name", default=release.name, help="the release to measure")
    e.add_argument("--size", type=int, default=32)
    e.add_argument("--n", type=int, default=1000, help="held-out images to score")
    return p


def main(argv: list[str] | None = None, command_line: Callable = command_line, train_fn: Callable = train,
         name: str = "vae") -> int:
    args = command_line().parse_args(argv)
    start = time.perf_counter()
    if args.cmd == "eval":
        scores = evaluate(pretrained.load(args.name, size=args.size), args.size, args.n)
        _print_scores(f"{args.name}-{args.size} on {args.n} held-out images", scores)
        reproduce(args.name, args.size, start)
        return 0
    r, run = settings(args)
    set_threads(run)
    vae, hist = train_fn(r)
    vae = vae.cpu()
    minutes = (time.perf_counter() - start) / 60
    print(f"trained {r.steps} steps in {minutes:.1f} min ({hist.steps_per_second:.2f} steps/s, "
          f"{torch.get_num_threads()} threads); scaling_factor {vae.config.scaling_factor:.4f}")
    scores = evaluate(vae, r.size, run.eval) if run.eval else {}
    if scores:
        _print_scores(f"held-out ({run.eval} images)", scores)
    if run.release or run.out:
        figures = {"heldout_psnr": f"{scores['psnr']:.2f}", "heldout_exact": f"{scores['exact']:.3f}"} if scores else {}
        dest = pretrained.save(vae, run.name, r.size, command(name, argv), Path(run.out) if run.out else None,
                               steps=str(r.steps), train_minutes=f"{minutes:.1f}", **figures)
        print("wrote", dest)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
