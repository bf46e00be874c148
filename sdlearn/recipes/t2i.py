"""The recipe of the released shapes-t2i model (notebook 06): a latent UNet trained on the shapes data, with the
released VAE and text encoder frozen.

    python -m sdlearn train t2i --steps 4000 --threads 2 --release   # the released shapes-t2i-32 (17 min, 2 cores)
    python -m sdlearn eval t2i                                       # judge it on 200 prompts, half held-out

The choices, each measured on a laptop's budget (benchmarks/latent_diffusion.py): a fixed bank of training images
encoded once (the frozen encoders then cost nothing per step), v-prediction on the cosine schedule with min-SNR-5
weights, batch 64, AdamW at 2e-3 with warm-up and cosine decay, and an EMA of the weights to sample with.
"""
from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from sdlearn import pretrained
from sdlearn.course import seed_everything
from sdlearn.data import ShapesDataset, render_pool
from sdlearn.diffusion import Denoiser, NoiseSchedule, Schedule
from sdlearn.metrics import evaluate
from sdlearn.pipeline import Conditioner, TextConditioner, TextToImage, training_loss
from sdlearn.recipes import Recipe, Release, command, exact_figures, option, parser, reproduce, set_threads, settings
from sdlearn.train import History, TrainConfig, fit
from sdlearn.unet import UNet, UNetConfig
from sdlearn.vae import AutoencoderKL

RELEASE = "python -m sdlearn train t2i --steps 4000 --threads 2 --release"


@dataclass(frozen=True, kw_only=True)
class LatentRecipe(Recipe):
    """What every latent recipe (t2i, sdxl, mmdit) has, and `fit_denoiser` reads, besides the shared settings."""

    steps: int = 2000
    batch_size: int = 64
    size: int = option(32, "image size (the released VAE of this size is used)")
    pool: int = option(10000, "training images rendered and encoded once")
    p_uncond: float = option(0.1, "probability of training with the text dropped (for classifier-free guidance)")


@dataclass(frozen=True, kw_only=True)
class T2IRecipe(LatentRecipe):
    """The settings of notebook 06's latent text-to-image UNet (the release: steps=4000)."""

    lr: float = 2e-3
    width: int = option(64, "channels of the UNet's first level (the second has twice)")
    layers: int = option(1, "ResBlocks per level")
    prediction: str = option("v", "what the UNet predicts: eps, v or x0")
    schedule: str = option("cosine", "noise schedule: linear, scaled_linear or cosine")
    snr_gamma: float = option(5.0, "min-SNR-gamma loss weighting (0: a plain mean)")


@dataclass(frozen=True, kw_only=True)
class JudgedRelease(Release):
    """The command line's options around a text-to-image recipe: the judge's, after training."""

    eval: int = option(200, "judge prompts (half held-out) to score; 0: none")
    guidance: float = option(3.0, "guidance scale of the evaluation")


def unet_config(latent_channels: int, context_dim: int, width: int = 64, layers: int = 1, heads: int = 4,
                prediction: str = "v", added_cond_dim: int = 0) -> UNetConfig:
    """The shapes UNet: two levels (8x8 and 4x4 on 32 px images), attention at both and in the mid block."""
    return UNetConfig(in_channels=latent_channels, out_channels=latent_channels, channels=(width, 2 * width),
                      layers_per_block=layers, attention=(True, True), heads=heads, context_dim=context_dim,
                      norm_groups=8, prediction=prediction, added_cond_dim=added_cond_dim)


@torch.no_grad()
def encode_pool(vae: AutoencoderKL, conditioner: nn.Module, images: torch.Tensor, captions: Sequence[str],
                conditions: dict[str, torch.Tensor] | None = None,
                batch_size: int = 500) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """A fixed bank of training pairs, encoded once, on the CPU: (scaled latents [N,C,h,w], conditions {name: [N,...]}).
    conditions: per-image inputs of the conditioner besides the captions ({name: [N, ...]}, e.g. SDXL's sizes)."""
    dev = next(vae.parameters()).device
    z = [vae.to_latent(images[i:i + batch_size].to(dev), sample=False).cpu() for i in range(0, len(images), batch_size)]
    conds = [conditioner(captions[i:i + batch_size], **{k: v[i:i + batch_size] for k, v in (conditions or {}).items()})
             for i in range(0, len(captions), batch_size)]
    return torch.cat(z), {k: torch.cat([c[k].cpu() for c in conds]) for k in conds[0]}


def fit_denoiser(denoiser: Denoiser, conditioner: Conditioner, vae: AutoencoderKL, latents: torch.Tensor,
                 conds: dict[str, torch.Tensor], schedule: Schedule, recipe: LatentRecipe, loss_fn: Callable,
                 loss_options: dict, *, callback: Callable[[int, TextToImage], None] | None = None,
                 callback_every: int = 0, progress: bool = True,
                 desc: str = "latent diffusion") -> tuple[TextToImage, History]:
    """What every latent recipe shares, once its bank is encoded: a denoiser (a UNet, an MMDiT) trained on batches
    drawn from the bank with loss_fn(denoiser, schedule, z0, cond, uncond, p_uncond, prediction=denoiser.prediction,
    **loss_options) (uncond: the conditioner's twins of its dropout_keys), AdamW with warm-up and cosine decay, an EMA,
    checkpoints. recipe: steps, batch_size, lr, p_uncond, seed, device, checkpoint_dir, checkpoint_every and the
    image size. callback(step, pipeline with the EMA weights) every `callback_every` steps.
    -> (the TextToImage around the EMA weights, History)."""
    r = recipe
    prediction = schedule.parse_prediction(denoiser.prediction)  # a denoiser the schedule cannot sample: an error now
    uncond = {k: v for k, v in conditioner.unconditional(1).items() if k in conditioner.dropout_keys}
    denoiser = denoiser.to(r.device)
    pipeline = functools.partial(TextToImage, conditioner, schedule=schedule, vae=vae, image_size=r.size)

    def batch(step):  # a pure function of the step: a resumed run sees the same batches
        g = torch.Generator().manual_seed(r.seed * 100003 + step)
        idx = torch.randint(len(latents), (r.batch_size,), generator=g)
        return latents[idx].to(r.device), {k: v[idx].to(r.device) for k, v in conds.items()}

    def loss(model, b):
        return loss_fn(model, schedule, *b, uncond, r.p_uncond, prediction=prediction, **loss_options)

    def on_step(step, model, ema):
        callback(step, pipeline(ema))
        model.train()

    hist = fit(denoiser, loss, batch,
               TrainConfig(steps=r.steps, lr=r.lr, warmup=100, ema_decay=1 - 3 / max(r.steps, 6),
                           callback_every=callback_every, checkpoint_every=r.checkpoint_every, desc=desc),
               callback=on_step if callback else None, progress=progress, checkpoint_dir=r.checkpoint_dir)
    return pipeline(hist.ema), hist


def train(recipe: T2IRecipe, *, loss_fn: Callable = training_loss,
          callback: Callable[[int, TextToImage], None] | None = None, callback_every: int = 0,
          progress: bool = True) -> tuple[TextToImage, History]:
    """Train the latent text-to-image UNet on `recipe.pool` shapes images -> (TextToImage with the EMA weights,
    History).

    loss_fn(unet, schedule, z0, cond, uncond, p_uncond, prediction, snr_gamma) -> loss: sdlearn.pipeline's
    training_loss, or a learner's (notebook 06). snr_gamma 0: a plain mean. callback(step, pipeline with the EMA
    weights) every `callback_every` steps. With recipe.checkpoint_dir, a stopped run resumes where it stopped."""
    r = recipe
    seed_everything(r.seed)
    vae = pretrained.load("shapes-vae", r.size, r.device).requires_grad_(False)
    conditioner = TextConditioner(pretrained.load("shapes-clip", 32, r.device).requires_grad_(False))
    images, captions = render_pool(ShapesDataset(size=r.size, split="train", seed=r.seed), r.pool, progress)
    latents, conds = encode_pool(vae, conditioner, images, captions)
    unet = UNet(unet_config(vae.config.latent_channels, conditioner.dims["context"], r.width, r.layers,
                            prediction=r.prediction))
    return fit_denoiser(unet, conditioner, vae, latents, conds, NoiseSchedule(r.schedule, 1000), r, loss_fn,
                        {"snr_gamma": r.snr_gamma or None}, callback=callback, callback_every=callback_every,
                        progress=progress, desc=f"latent diffusion {r.size}px")


def print_scores(scores: dict) -> None:
    for group, s in scores.items():
        print(f"{group:25} ({s['prompts']:3} prompts): exact {s['exact']:.3f}, colour {s['color']:.3f}, "
              f"shape {s['shape']:.3f}, position {s['position']:.3f}, count {s['count']:.3f}")


def train_from_command_line(train_fn: Callable, recipe: LatentRecipe, run: Release,
                            start: float) -> tuple[TextToImage, History]:
    """A latent recipe's `train` run with the command line's settings and threads -> (pipeline on the CPU, History)."""
    set_threads(run)
    pipe, hist = train_fn(recipe)
    print(f"trained {recipe.steps} steps in {hist.seconds / 60:.1f} min ({(time.perf_counter() - start) / 60:.1f} min "
          f"with rendering and encoding, {torch.get_num_threads()} threads)")
    return pipe.cpu(), hist


def save_release(pipe: TextToImage, name: str, recipe: LatentRecipe, run: JudgedRelease, hist: History,
                 made_by: str, released: dict[str, str], scores: dict) -> None:
    """Write a text-to-image release (into sdlearn/weights/, or to run.out) in float16, with how it was made and
    judged; released: {part: the release it holds}."""
    dest = pretrained.save(pipe, name, recipe.size, made_by, Path(run.out) if run.out else None, released=released,
                           dtype=torch.float16, steps=str(recipe.steps), train_minutes=f"{hist.seconds / 60:.1f}",
                           guidance_scale=str(run.guidance), **exact_figures(scores))
    print("wrote", dest)


def judged_parser(name: str, doc: str, recipe: type[LatentRecipe]):
    """The command line of a text-to-image recipe: (parser, its eval subparser). `train` takes the recipe's
    settings and the judge's options (JudgedRelease); `eval` judges the release."""
    p, e = parser(name, doc, recipe, JudgedRelease)
    e.add_argument("--size", type=int, default=32, help="image size of the release")
    e.add_argument("--n", type=int, default=200, help="judge prompts, half held-out")
    e.add_argument("--steps", type=int, default=50, help="sampling steps")
    e.add_argument("--guidance", type=float, default=3.0, help="guidance scale")
    return p, e


def text_to_image_main(recipe: str, release: str, p, train_fn: Callable, released: Callable,
                       argv: list[str] | None) -> int:
    """The command line of a one-model text-to-image recipe (t2i, mmdit), parsed by p (judged_parser): `eval` judges
    the release; `train` trains, judges and (with --release / --out) writes it, naming the releases it holds
    (released(settings) -> {part: name})."""
    args = p.parse_args(argv)
    start = time.perf_counter()
    if args.cmd == "eval":
        scores, _, _ = evaluate(pretrained.load(release, args.size), args.n, args.steps, args.guidance)
        print_scores(scores)
        reproduce(release, args.size, start)
        return 0
    r, run = settings(args)
    pipe, hist = train_from_command_line(train_fn, r, run, start)
    scores = evaluate(pipe, run.eval, guidance_scale=run.guidance)[0] if run.eval else {}
    print_scores(scores)
    if run.release or run.out:
        save_release(pipe, release, r, run, hist, command(recipe, argv), released(r), scores)
    return 0


def command_line():
    return judged_parser("t2i", __doc__, T2IRecipe)[0]


def main(argv: list[str] | None = None) -> int:
    return text_to_image_main("t2i", "shapes-t2i", command_line(), train, lambda r: {
        "vae": f"shapes-vae-{r.size}", "conditioner.text_encoder": "shapes-clip-32"}, argv)


if __name__ == "__main__":
    raise SystemExit(main())
