"""Training a ControlNet on the frozen released `shapes-t2i` (notebook 09): maps in, layout out.

    pipe, hist = train(ControlNetRecipe(steps=1000, kind="segmentation"))      # pipe.generate(prompts, control=maps)
    scores = evaluate(pipe, n=200)                       # {"iou", "exact", ...}: layout and text adherence on
                                                         # held-out free-layout scenes, each with its map

The recipe of Zhang et al. 2023 (sec. 3.3) at the course's scale: the base UNet frozen, its trainable copy and the
zero convolutions trained with the base's own loss (v-prediction, cosine schedule) on free-layout scenes and their
maps, the caption dropped with probability p_uncond (0.1, as the base was trained; the paper drops half of the
prompts so that the ControlNet learns to read the map alone, which at the course's budget cost text adherence:
benchmarks/controlnet.py, --p-uncond). No EMA: the curve of layout IoU against steps (`callback`) is the raw
weights', where the paper's "sudden convergence" (sec. 4.2) would show. zero_conv, add_residuals and strides are
notebook 09's exercises: the learner's functions are what trains.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from sdlearn import pretrained
from sdlearn.controlnet import ControlConditioner, Controlled, ControlNet, add_residuals, embedding_strides, zero_conv
from sdlearn.course import seed_everything
from sdlearn.data import MapShapesDataset
from sdlearn.metrics import layout_adherence
from sdlearn.pipeline import TextToImage, training_loss
from sdlearn.recipes import Recipe, option
from sdlearn.recipes.t2i import encode_pool
from sdlearn.train import History, TrainConfig, fit


@dataclass(frozen=True, kw_only=True)
class ControlNetRecipe(Recipe):
    """The settings of notebook 09's ControlNet on the released shapes-t2i (32 px)."""

    steps: int = 1000
    batch_size: int = 32
    lr: float = 1e-3
    base: str = option("shapes-t2i", "the released text-to-image pipeline to steer (kept frozen)")
    kind: str = option("segmentation", "the map: segmentation, edges or scribble")
    pool: int = option(4000, "training scenes rendered (image, caption, map) and encoded once")
    p_uncond: float = option(0.1, "probability of training with the caption dropped (the paper: 0.5)")
    size: int = option(32, "image size (the base's)")

    CHOICES = {"kind": {"segmentation": "", "edges": "", "scribble": ""}}


def scenes(kind: str, size: int, n: int, split: str = "train", seed: int = 0):
    """n scenes of MapShapesDataset: (images [n,3,H,W] in [-1,1], captions, maps [n,3,H,W] in [0,1], placements)."""
    ds = MapShapesDataset(size, kind, split, seed=seed, length=max(n, 1))
    items = [ds[i] for i in range(n)]
    images = torch.stack([it[0] for it in items]) if items else torch.zeros(0, 3, size, size)
    maps = torch.stack([it[2] for it in items]) if items else torch.zeros(0, 3, size, size)
    return images, [it[1] for it in items], maps, [ds.placements(i) for i in range(n)]


def controlled_pipeline(base: TextToImage, controlnet: ControlNet, add: Callable | None = None,
                        guess_mode: bool = False) -> TextToImage:
    """base steered by controlnet, the ControlNet left trainable (attach freezes a pipeline's every part)."""
    conditioner = ControlConditioner(base.conditioner, None, guess_mode)
    pipe = TextToImage(conditioner, Controlled(base.denoiser, controlnet, guess_mode, add), base.schedule, base.vae,
                       image_size=base.image_size)
    controlnet.requires_grad_(True)
    return pipe


def train(recipe: ControlNetRecipe, *, zero_conv: Callable = zero_conv, add_residuals: Callable = add_residuals,
          strides: Callable = embedding_strides, callback: Callable[[int, TextToImage], None] | None = None,
          callback_every: int = 0, progress: bool = True) -> tuple[TextToImage, History]:
    """A ControlNet for the frozen `recipe.base`, trained on `recipe.pool` free-layout scenes and their maps of
    `recipe.kind` -> (the controlled pipeline, History). zero_conv(channels), add_residuals(skips, mid, residuals,
    scale) and strides(image_size, latent_size) build and run it (notebook 09's exercises; default: the references).
    callback(step, pipeline) every `callback_every` steps, the ControlNet in eval mode."""
    r = recipe
    seed_everything(r.seed)
    base = pretrained.load(r.base, r.size, r.device)
    images, captions, maps, _ = scenes(r.kind, r.size, r.pool, "train", r.seed)
    latents, conds = encode_pool(base.vae, base.conditioner, images, captions)
    conds["control"] = maps
    latent_size = base.latent_shape[-1]
    controlnet = ControlNet.from_unet(base.denoiser, downscale=base.vae.downsampling_factor, zero_conv=zero_conv,
                                      strides=strides(r.size, latent_size))
    pipe = controlled_pipeline(base, controlnet, add_residuals)
    model, schedule = pipe.denoiser, base.schedule
    uncond = {k: v for k, v in base.conditioner.unconditional(1).items() if k in base.conditioner.dropout_keys}

    def batch(step):  # a pure function of the step
        g = torch.Generator().manual_seed(r.seed * 100003 + step)
        idx = torch.randint(len(latents), (r.batch_size,), generator=g)
        return latents[idx].to(r.device), {k: v[idx].to(r.device) for k, v in conds.items()}

    def loss(m, b):
        return training_loss(m, schedule, *b, uncond, r.p_uncond, prediction=m.prediction)

    def on_step(step, m, ema):
        callback(step, pipe)
        m.train()

    hist = fit(model, loss, batch, TrainConfig(steps=r.steps, lr=r.lr, warmup=min(100, r.steps // 5),
                                               callback_every=callback_every, desc=f"ControlNet ({r.kind})"),
               params=list(controlnet.parameters()), callback=on_step if callback else None, progress=progress,
               checkpoint_dir=r.checkpoint_dir)
    model.eval()
    return pipe, hist


def eval_scenes(kind: str, size: int, n: int, seed: int = 123):
    """The judge's scenes, as `scenes` gives them: the first half from the training split's colour-shape pairs (new
    layouts: seed 123), the rest naming a held-out pair (as metrics.eval_prompts)."""
    parts = [scenes(kind, size, k, split, seed) for split, k in (("train", n // 2), ("heldout", n - n // 2))]
    return (torch.cat([p[0] for p in parts]), parts[0][1] + parts[1][1], torch.cat([p[2] for p in parts]),
            parts[0][3] + parts[1][3])


@torch.no_grad()
def evaluate(pipe: TextToImage, n: int, kind: str = "segmentation", steps: int = 20, guidance_scale: float = 3.0,
             control: bool = True, control_scale: float = 1.0, seed: int = 123) -> dict[str, float]:
    """Layout and text adherence (layout_adherence: iou, exact, ...) of pipe on n free-layout scenes (eval_scenes),
    drawn with their maps (control=True; pipe must take control=) or from their captions alone."""
    _, captions, maps, placements = eval_scenes(kind, pipe.image_size, n, seed)
    extra = {"control": maps, "control_scale": control_scale} if control else {}
    images = pipe.generate(captions, steps, guidance_scale, seed=seed, progress=False, **extra)
    return layout_adherence(images, placements)
