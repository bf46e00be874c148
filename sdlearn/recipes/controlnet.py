"""Training a ControlNet on the frozen released `shapes-t2i` (notebook 09): maps in, layout out. The same recipe
steers `shapes-mmdit` with SD3's ControlNet (base="shapes-mmdit") and trains the LDM paper's concatenation
(method="concat"), for the notebook's comparisons.

    python -m sdlearn train controlnet --steps 4000 --threads 1 --release   # the released shapes-controlnet-seg-32
    python -m sdlearn eval controlnet                                        # judge it on 200 free-layout scenes

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

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from sdlearn import flow, pretrained
from sdlearn.controlnet import (
    ControlConditioner,
    Controlled,
    ControlNet,
    SD3ControlNet,
    add_residuals,
    concatenate,
    embedding_strides,
    zero_conv,
)
from sdlearn.course import seed_everything
from sdlearn.data import MapShapesDataset
from sdlearn.metrics import layout_adherence
from sdlearn.mmdit import MMDiT
from sdlearn.pipeline import TextToImage, training_loss
from sdlearn.recipes import Recipe, Release, command, option, parser, reproduce, save_trained, set_threads, settings
from sdlearn.recipes.t2i import encode_pool
from sdlearn.train import History, TrainConfig, fit
from sdlearn.unet import UNet

RELEASE = "python -m sdlearn train controlnet --steps 4000 --threads 1 --release"
NAME = "shapes-controlnet-seg"   # the segmentation-map ControlNet (--kind segmentation, the default)


@dataclass(frozen=True, kw_only=True)
class ControlNetRecipe(Recipe):
    """The settings of notebook 09's ControlNet on the released shapes-t2i (32 px), or SD3's on shapes-mmdit."""

    steps: int = 1000
    batch_size: int = 32
    lr: float = 1e-3
    base: str = option("shapes-t2i", "the released text-to-image pipeline to steer (kept frozen): shapes-t2i (a "
                                     "UNet: its ControlNet) or shapes-mmdit (an MMDiT: SD3's ControlNet)")
    kind: str = option("segmentation", "the map: segmentation, edges or scribble")
    method: str = option("controlnet", "controlnet (a trainable copy, the base frozen) or concat (the map "
                                       "concatenated to the input, the whole UNet fine-tuned: LDM sec. 4.3)")
    pool: int = option(4000, "training scenes rendered (image, caption, map) and encoded once")
    p_uncond: float = option(0.1, "probability of training with the caption dropped (the paper: 0.5)")
    depth: int = option(0, "an MMDiT base: the joint blocks its ControlNet copies (diffusers' num_layers; 0: half "
                           "the base's, at least 1)")
    size: int = option(32, "image size (the base's)")

    CHOICES = {"kind": {"segmentation": "", "edges": "", "scribble": ""}, "method": {"controlnet": "", "concat": ""}}


def scenes(kind: str, size: int, n: int, split: str = "train", seed: int = 0):
    """n scenes of MapShapesDataset: (images [n,3,H,W] in [-1,1], captions, maps [n,3,H,W] in [0,1], placements)."""
    ds = MapShapesDataset(size, kind, split, seed=seed, length=max(n, 1))
    items = [ds[i] for i in range(n)]
    images = torch.stack([it[0] for it in items]) if items else torch.zeros(0, 3, size, size)
    maps = torch.stack([it[2] for it in items]) if items else torch.zeros(0, 3, size, size)
    return images, [it[1] for it in items], maps, [ds.placements(i) for i in range(n)]


def copied_blocks(mmdit: MMDiT, depth: int = 0) -> int:
    """The joint blocks SD3's ControlNet copies from mmdit (diffusers' num_layers): depth, or (0) half of mmdit's, at
    least 1. The published SD3-medium canny ControlNet copies 6 of 24 (SD3_CONTROLNET_CANNY); the course's
    MMDiT has few blocks, and its ControlNet copies half of them by default."""
    if not 0 <= depth <= mmdit.config.depth:
        raise ValueError(f"depth: expected 0 (half) to {mmdit.config.depth} (the MMDiT's joint blocks), got {depth}")
    return depth or max(1, mmdit.config.depth // 2)


def controlled_pipeline(base: TextToImage, controlnet: ControlNet | SD3ControlNet, add: Callable | None = None,
                        guess_mode: bool = False) -> TextToImage:
    """base steered by controlnet, the ControlNet left trainable (a TextToImage freezes its every part). The UNet's
    ControlNet reads the maps as pixels; SD3's their VAE latents, which the conditioner encodes with the base's VAE
    (as sdlearn.controlnet.attach: without the VAE's shift when the ControlNet reads zeros for the pooled text,
    diffusers' StableDiffusion3ControlNetPipeline)."""
    vae = base.vae if controlnet.reads_latents else None
    shift = not (vae is not None and controlnet.config.zero_pooled)
    conditioner = ControlConditioner(base.conditioner, vae, guess_mode, shift)
    pipe = TextToImage(conditioner, Controlled(base.denoiser, controlnet, guess_mode, add), base.schedule, base.vae,
                       image_size=base.image_size)
    controlnet.requires_grad_(True)
    return pipe


def _check(r: ControlNetRecipe, base: TextToImage, custom: list[str]) -> None:
    """A clear error for a base no ControlNet fits, and for the UNet's options (custom: the exercises' functions
    given) on an MMDiT or the MMDiT's (depth) on a UNet."""
    mmdit = isinstance(base.denoiser, MMDiT)
    if not mmdit and not isinstance(getattr(base.denoiser, "unet", base.denoiser), UNet):   # an SDXLUNet: its UNet
        raise ValueError(f"ControlNetRecipe: base {r.base!r} has a {type(base.denoiser).__name__} denoiser; a "
                         f"ControlNet steers a UNet (shapes-t2i) or an MMDiT (shapes-mmdit)")
    if mmdit and (custom or r.method != "controlnet"):
        raise ValueError(f"ControlNetRecipe: base {r.base!r} is an MMDiT, steered by SD3's ControlNet (method "
                         f"'controlnet', its own zero linears added to the joint blocks); got method {r.method!r} "
                         f"and the UNet's {custom or 'nothing'} (notebook 09's exercises: for a UNet base only)")
    if r.depth and not mmdit:
        raise ValueError(f"ControlNetRecipe: depth ({r.depth}) is the joint blocks an MMDiT's ControlNet copies; "
                         f"base {r.base!r} is a UNet, whose ControlNet copies the whole down path: leave depth 0")


def _build(r: ControlNetRecipe, base: TextToImage, maps: torch.Tensor, zero_conv: Callable, add_residuals: Callable,
           strides: Callable) -> tuple[TextToImage, torch.nn.Module, torch.Tensor]:
    """(the pipeline to train, the module that trains, the pool's maps [N,3,H,W] as that module reads them)."""
    if r.method == "concat":            # the LDM paper's way: a new whole UNet, the map as input channels
        pipe = concatenate(base)
        return pipe, pipe.denoiser.requires_grad_(True), maps
    if isinstance(base.denoiser, MMDiT):  # SD3's: a copy of the first joint blocks, reading the map's VAE latents
        trained = SD3ControlNet.from_mmdit(base.denoiser, copied_blocks(base.denoiser, r.depth))
        pipe = controlled_pipeline(base, trained)
        with torch.no_grad():           # the maps as the ControlNet reads them, encoded once as the pool's latents
            latents = torch.cat([pipe.conditioner.encode_control(maps[i:i + 500]).cpu()
                                 for i in range(0, len(maps), 500)])                     # [N,C,h,w]
        return pipe, trained, latents
    trained = ControlNet.from_unet(base.denoiser, downscale=base.vae.downsampling_factor, zero_conv=zero_conv,
                                   strides=strides(r.size, base.latent_shape[-1]))
    return controlled_pipeline(base, trained, add_residuals), trained, maps


def train(recipe: ControlNetRecipe, *, zero_conv: Callable = zero_conv, add_residuals: Callable = add_residuals,
          strides: Callable = embedding_strides, callback: Callable[[int, TextToImage], None] | None = None,
          callback_every: int = 0, progress: bool = True) -> tuple[TextToImage, History]:
    """A ControlNet for the frozen `recipe.base`, trained on `recipe.pool` free-layout scenes and their maps of
    `recipe.kind` -> (the controlled pipeline, History). zero_conv(channels), add_residuals(skips, mid, residuals,
    scale) and strides(image_size, latent_size) build and run it (notebook 09's exercises; default: the references).
    An MMDiT base (shapes-mmdit): SD3's ControlNet (SD3ControlNet.from_mmdit, `recipe.depth` joint blocks), the maps
    encoded once to VAE latents, the base's rectified-flow loss (flow.training_loss); the three functions are the
    UNet's and must be left at their defaults. callback(step, pipeline) every `callback_every` steps, the ControlNet
    in eval mode."""
    r = recipe
    seed_everything(r.seed)
    base = pretrained.load(r.base, r.size, r.device)
    custom = [k for k, f in (("zero_conv", zero_conv), ("add_residuals", add_residuals), ("strides", strides))
              if f is not train.__kwdefaults__[k]]
    _check(r, base, custom)
    images, captions, maps, _ = scenes(r.kind, r.size, r.pool, "train", r.seed)
    latents, conds = encode_pool(base.vae, base.conditioner, images, captions)
    pipe, trained, conds["control"] = _build(r, base, maps, zero_conv, add_residuals, strides)
    model, schedule = pipe.denoiser, base.schedule
    schedule.parse_prediction(model.prediction)    # a denoiser the schedule cannot sample: an error now
    uncond = {k: v for k, v in base.conditioner.unconditional(1).items() if k in base.conditioner.dropout_keys}

    def batch(step):  # a pure function of the step
        g = torch.Generator().manual_seed(r.seed * 100003 + step)
        idx = torch.randint(len(latents), (r.batch_size,), generator=g)
        return latents[idx].to(r.device), {k: v[idx].to(r.device) for k, v in conds.items()}

    def loss(m, b):
        if isinstance(schedule, flow.FlowSchedule):   # the MMDiT's: rectified flow, logit-normal t, v = eps - x0
            return flow.training_loss(m, schedule, *b, uncond, r.p_uncond)
        return training_loss(m, schedule, *b, uncond, r.p_uncond, prediction=m.prediction)

    def on_step(step, m, ema):
        callback(step, pipe)
        m.train()

    hist = fit(model, loss, batch, TrainConfig(steps=r.steps, lr=r.lr, warmup=min(100, r.steps // 5),
                                               callback_every=callback_every, desc=f"{r.method} ({r.kind})"),
               params=list(trained.parameters()), callback=on_step if callback else None, progress=progress,
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


@torch.no_grad()
def reconstruct(vae, images: torch.Tensor) -> torch.Tensor:
    """images [N,3,H,W] in [-1,1] encoded (the posterior's mean) and decoded by vae -> [N,3,H,W] in [-1,1], on the
    images' device."""
    p = next(vae.parameters())
    return vae.decode(vae.encode(images.to(p.device, p.dtype)).mean).float().clamp(-1, 1).to(images.device)


def ceiling(vae, n: int, kind: str = "segmentation", size: int = 32, seed: int = 123) -> dict[str, float]:
    """What any model decoded by `vae` can reach on the judge's scenes: layout_adherence of the scenes' own images
    through the VAE (reconstruct). The smallest free-layout objects (a side of 5 px at 32 px) do not survive a 4x
    VAE whole."""
    images, _, _, placements = eval_scenes(kind, size, n, seed)
    return layout_adherence(reconstruct(vae, images), placements)


def command_line():
    p, e = parser("controlnet", __doc__, ControlNetRecipe, Release)
    e.add_argument("--n", type=int, default=200, help="free-layout scenes to judge (half naming held-out pairs)")
    e.add_argument("--control-scale", type=float, default=1.0, help="the ControlNet's conditioning scale")
    return p


def main(argv: list[str] | None = None) -> int:
    args = command_line().parse_args(argv)
    start = time.perf_counter()
    if args.cmd == "eval":
        pipe = pretrained.load(NAME, 32)
        print({"ControlNet, caption and map": evaluate(pipe, args.n, control_scale=args.control_scale),
               "VAE reconstruction (ceiling)": ceiling(pipe.vae, args.n)})
        reproduce(NAME, 32, start)
        return 0
    r, run = settings(args)
    if r.base != "shapes-t2i" or r.method != "controlnet":
        raise SystemExit(f"train controlnet saves a ControlNet of shapes-t2i; got --base {r.base} --method "
                         f"{r.method}: benchmarks/controlnet.py --base shapes-mmdit and "
                         f"benchmarks/controlnet_concat.py train and judge those without saving them")
    set_threads(run)
    pipe, hist = train(r)
    pipe = pipe.cpu()
    scores = evaluate(pipe, 200, r.kind)
    print(f"trained {r.steps} steps in {hist.seconds / 60:.1f} min; {scores}; "
          f"VAE reconstruction (ceiling): {ceiling(pipe.vae, 200, r.kind)}")
    name = NAME if r.kind == "segmentation" else f"shapes-controlnet-{r.kind}"
    save_trained(pipe, name, r, run, command("controlnet", argv), hist.seconds,
                 {"vae": f"shapes-vae-{r.size}", "conditioner.conditioner.text_encoder": "shapes-clip-32",
                  "denoiser.base": f"shapes-t2i-{r.size}:denoiser"},            # the frozen base, by reference
                 iou=f"{scores['iou']:.3f}", exact=f"{scores['exact']:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
