"""The recipe of the released shapes-inpaint (notebook 10): shapes-t2i's UNet widened to 9 input channels and
fine-tuned to repaint masked regions; and the benchmark that sets it against blended latents.

    python -m sdlearn train inpaint --steps 2000 --threads 1 --release    # the released shapes-inpaint-32 (11 min)
    python -m sdlearn eval inpaint                                        # both methods on 200 repaint cases

The recipe of SD's inpainting checkpoints (the model card of stable-diffusion-inpainting) at the course's scale: the
text-to-image UNet, its first convolution widened with zero-initialised channels for the mask and the masked image's
latents (sdlearn.inpaint.widen_conv_in), the whole UNet fine-tuned with the base's loss (v-prediction, cosine
schedule, min-SNR-5, an EMA) on training images each with a mask: a quarter of the masks the whole image (so it keeps
drawing from text alone), the rest random rectangles and ellipses, and (beyond SD's recipe, because it is the task
the course measures) one mask in three a box around one of the scene's objects. The caption is always the whole
scene's. inpaint_input and mask_to_latent are notebook 10's exercises: the learner's functions are what trains.

The cases (`cases`): a scene, a box mask over one of its objects, and the caption with that object changed to
another colour and shape at the same place. `judge_cases` measures what the issue asks: the asked-for object inside
the mask (the judge on the image with everything outside the mask blacked out), the untouched object (the judge with
the mask blacked out), the whole image against the new caption (coherence), the unmasked region's PSNR against the
source (before any paste-back) and the seam (the mean step across the mask's border, against the target scene's).
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from sdlearn import pretrained
from sdlearn.course import seed_everything
from sdlearn.data import (
    MapShapesDataset,
    ShapesDataset,
    caption,
    draw,
    free_layout,
    object_masks,
    place,
    render_samples,
)
from sdlearn.inpaint import (
    InpaintConditioner,
    Inpainting,
    blended,
    box_mask,
    inpaint,
    inpaint_input,
    mask_to_latent,
    masked_image,
    random_mask,
    widen_conv_in,
)
from sdlearn.metrics import judge_report
from sdlearn.pipeline import TextToImage, training_loss
from sdlearn.recipes import Release, command, option, parser, reproduce, save_trained, set_threads, settings
from sdlearn.recipes.t2i import LatentRecipe, encode_pool, fit_denoiser
from sdlearn.train import History

RELEASE = "python -m sdlearn train inpaint --steps 2000 --threads 1 --release"
NAME = "shapes-inpaint"
MIN_SIDE = 0.25                                   # the smallest object side in a case (8 px at 32 px)
PAIRS = [(c, s) for c in ("red", "yellow", "green", "cyan", "blue", "magenta")
         for s in ("circle", "square", "triangle", "cross")]


@dataclass(frozen=True, kw_only=True)
class InpaintRecipe(LatentRecipe):
    """The settings of notebook 10's inpainting UNet, fine-tuned from the released shapes-t2i (32 px)."""

    steps: int = 1500
    batch_size: int = 32
    lr: float = 1e-3
    pool: int = 4000
    base: str = option("shapes-t2i", "the released text-to-image pipeline whose UNet is widened and fine-tuned")
    p_whole: float = option(0.25, "share of masks that are the whole image")
    p_object: float = option(1 / 3, "share of masks that are a box around one of the scene's objects")


def training_masks(scenes, size: int, rng: np.random.Generator, p_whole: float, p_object: float) -> torch.Tensor:
    """One mask per scene (its placements) [N,1,H,W]: a box around one of its objects with probability p_object, else
    random_mask (the whole image with probability p_whole / (1 - p_object) of the rest, so p_whole of all)."""
    out = []
    for placements in scenes:
        if rng.random() < p_object:
            p = placements[int(rng.integers(len(placements)))]
            out.append(box_mask(p.cx, p.cy, p.s, size))
        else:
            out.append(random_mask(size, rng, whole=p_whole / (1 - p_object)))
    return torch.stack(out)


def train(recipe: InpaintRecipe, *, assemble: Callable = inpaint_input, to_latent: Callable = mask_to_latent,
          callback: Callable[[int, TextToImage], None] | None = None, callback_every: int = 0,
          progress: bool = True) -> tuple[TextToImage, History]:
    """The inpainting UNet: recipe.base's UNet widened (widen_conv_in) and fine-tuned on recipe.pool images, each with
    a training mask -> (the inpainting pipeline with the EMA weights, History). assemble(z_t, mask, masked_latents) and
    to_latent(mask, size) are notebook 10's exercises (default: the references)."""
    r = recipe
    seed_everything(r.seed)
    base = pretrained.load(r.base, r.size, r.device)
    ds = MapShapesDataset(size=r.size, split="train", seed=r.seed)
    samples = render_samples(ds, r.pool, progress)
    images = torch.stack([s.image for s in samples])
    masks = training_masks([ds.scene(i)[1] for i in range(r.pool)], r.size, np.random.default_rng(r.seed), r.p_whole,
                           r.p_object)                                                               # [N,1,H,W]
    latents, conds = encode_pool(base.vae, base.conditioner, images, [s.caption for s in samples])
    masked, _ = encode_pool(base.vae, base.conditioner, masked_image(images, masks), [""] * len(images))
    conds.update(mask=to_latent(masks, latents.shape[-2:]), masked_latents=masked)
    conditioner = InpaintConditioner(base.conditioner, base.vae, to_latent)
    denoiser = Inpainting(widen_conv_in(base.denoiser), assemble)
    return fit_denoiser(denoiser, conditioner, base.vae, latents, conds, base.schedule, r, training_loss,
                        {"snr_gamma": 5.0}, callback=callback, callback_every=callback_every, progress=progress,
                        desc="inpainting UNet")


# -----------------------------------------------------------------------------
# the cases and the judge


@dataclass
class Cases:
    """n repaint cases: sources [n,3,H,W] in [-1,1], masks [n,1,H,W], the new captions, the targets (the scene as
    asked, rendered), the asked-for objects' one-object captions, and the untouched objects' (None: a one-object
    scene)."""

    images: torch.Tensor
    masks: torch.Tensor
    prompts: list[str]
    targets: torch.Tensor
    asked: list[str]
    kept: list[str | None]


def _touches(mask: torch.Tensor, kept: torch.Tensor, factor: int) -> bool:
    """Whether mask [1,H,W] reaches the kept object's pixels kept [H,W], in pixels or on the latent grid (a latent cell
    is repainted when mask_to_latent marks it)."""
    h, w = mask.shape[-2] // factor, mask.shape[-1] // factor
    cells = F.interpolate(mask_to_latent(mask[None], (h, w)), scale_factor=factor)[0, 0] > 0.5   # [H,W]
    return bool(((mask[0] > 0.5) | cells)[kept].any())


def cases(n: int, size: int = 32, seed: int = 123, factor: int = 4) -> Cases:
    """n repaint cases from new scenes of one or two objects laid out freely (notebook 09's free_layout: anywhere, at
    any size from MIN_SIDE to 0.4, so that the caption cannot say where the kept object is and a model that ignores
    the source cannot redraw it): the first object replaced by another colour-shape pair (different in both) at the
    same place and size, its box (box_mask) to repaint. Two-object scenes whose box reaches the other object, in
    pixels or on the latent grid (factor: the VAE's), are drawn again, so the kept object is wholly outside the
    region. Objects are at least MIN_SIDE, the size the judge reads reliably."""
    ds = ShapesDataset(size=size, split="train", seed=seed)
    rng = np.random.default_rng(seed)
    out = Cases([], [], [], [], [], [])
    while len(out.prompts) < n:
        objects = ds.sample_objects(rng)
        placements = free_layout(objects, rng, size_range=(MIN_SIDE, 0.4), margin=1 / size)
        old = placements[0]
        mask = box_mask(old.cx, old.cy, old.s, size)
        if len(placements) > 1 and _touches(mask, object_masks(placements[1:], size).any(0), factor):
            continue                                 # the region, on the latent grid, would reach the kept object
        choices = [(c, s) for c, s in PAIRS if c != old.obj.color and s != old.obj.shape]
        c, s = choices[int(rng.integers(len(choices)))]
        target = [place(c, s, old.cx, old.cy, old.s), *placements[1:]]
        out.images.append(draw(placements, size))
        out.masks.append(mask)
        out.prompts.append(caption([target[0].obj, *objects[1:]]))
        out.targets.append(draw(target, size))
        out.asked.append(caption([target[0].obj]))
        out.kept.append(caption(objects[1:]) if len(objects) > 1 else None)
    return Cases(torch.stack(out.images), torch.stack(out.masks), out.prompts, torch.stack(out.targets), out.asked,
                 out.kept)


def psnr(a: torch.Tensor, b: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
    """PSNR in dB of images a, b [N,3,H,W] in [-1,1] (peak 1 after mapping to [0, 1]) over the pixels where `where`
    [N,1,H,W] is 1 -> [N]."""
    err = (((a - b) / 2) ** 2 * where).sum((1, 2, 3)) / (3 * where.sum((1, 2, 3))).clamp(min=1)
    return 10 * torch.log10(1 / err.clamp(min=1e-10))


def seam(images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """The mean step across the mask's border: |x[p] - x[q]| averaged over neighbouring pixel pairs (p, q), one inside
    the mask and one outside, horizontal and vertical, over the channels -> [N]."""
    m = masks > 0.5
    steps, counts = [], []
    for dim in (2, 3):
        a, b = images.narrow(dim + 0, 0, images.shape[dim] - 1), images.narrow(dim, 1, images.shape[dim] - 1)
        ma, mb = m.narrow(dim, 0, m.shape[dim] - 1), m.narrow(dim, 1, m.shape[dim] - 1)
        cross = (ma != mb).float()                                                  # [N,1,.,.]
        steps.append(((a - b).abs().mean(1, keepdim=True) * cross).sum((1, 2, 3)))
        counts.append(cross.sum((1, 2, 3)))
    return sum(steps) / sum(counts).clamp(min=1)


def _exact(images: torch.Tensor, captions: list[str | None]) -> list[bool | None]:
    idx = [i for i, c in enumerate(captions) if c is not None]
    report = judge_report(images[idx], [captions[i] for i in idx]) if idx else []
    out: list[bool | None] = [None] * len(captions)
    for i, r in zip(idx, report):
        out[i] = r["exact"]
    return out


def judge_cases(out: torch.Tensor, c: Cases) -> dict[str, float]:
    """The repainted images out [n,3,H,W] judged on the cases: inside (the asked-for object, the image outside the
    mask blacked out), kept (the untouched object, the mask blacked out; two-object scenes), whole (the new caption on
    the whole image), psnr (dB, unmasked region against the source), seam (and target_seam: the target scene's)."""
    m = c.masks
    inside = _exact(torch.where(m > 0.5, out, -1.0), c.asked)
    kept = [k for k in _exact(torch.where(m > 0.5, -1.0, out), c.kept) if k is not None]
    whole = _exact(out, c.prompts)
    return {"inside": sum(inside) / len(inside), "kept": sum(kept) / max(len(kept), 1),
            "whole": sum(whole) / len(whole),
            "psnr": psnr(out, c.images, 1 - m).mean().item(), "seam": seam(out, m).mean().item(),
            "target_seam": seam(c.targets, m).mean().item(), "n": len(c.prompts), "n_kept": len(kept)}


@torch.no_grad()
def run_cases(pipe: TextToImage, c: Cases, method: str = "unet", steps: int = 20, guidance_scale: float = 3.0,
              seed: int = 123, batch: int = 100, **options) -> torch.Tensor:
    """The cases repainted by `method`: "unet" (inpaint, pipe an inpainting pipeline) or "blend" (blended, pipe a
    plain one; options such as step_fn, a learner's blend_step, go to it) -> images [n,3,H,W]."""
    fn = {"unet": inpaint, "blend": blended}[method]
    return torch.cat([fn(pipe, c.images[i:i + batch], c.masks[i:i + batch], c.prompts[i:i + batch], steps=steps,
                         guidance_scale=guidance_scale, seed=seed + i, progress=False, **options)
                      for i in range(0, len(c.prompts), batch)])


def compare(inpainting: TextToImage, plain: TextToImage, n: int, steps: int = 20,
            guidance_scale: float = 3.0) -> dict[str, dict[str, float]]:
    """Both methods on the same n cases at equal steps -> {"unet": judge_cases, "blend": judge_cases}."""
    c = cases(n, plain.image_size)
    return {m: judge_cases(run_cases(p, c, m, steps, guidance_scale), c)
            for m, p in (("unet", inpainting), ("blend", plain))}


def command_line():
    p, e = parser("inpaint", __doc__, InpaintRecipe, Release)
    e.add_argument("--n", type=int, default=200, help="repaint cases")
    e.add_argument("--steps", type=int, default=20, help="sampling steps, both methods")
    return p


def main(argv: list[str] | None = None) -> int:
    args = command_line().parse_args(argv)
    start = time.perf_counter()
    if args.cmd == "eval":
        print(compare(pretrained.load(NAME, 32), pretrained.load("shapes-t2i", 32), args.n, args.steps))
        reproduce(NAME, 32, start)
        return 0
    r, run = settings(args)
    set_threads(run)
    pipe, hist = train(r)
    pipe = pipe.cpu()
    scores = compare(pipe, pretrained.load(r.base, r.size), 200)
    print(f"trained {r.steps} steps in {hist.seconds / 60:.1f} min; {scores}")
    u = scores["unet"]
    save_trained(pipe, NAME, r, run, command("inpaint", argv), hist.seconds,
                 {"vae": f"shapes-vae-{r.size}", "conditioner.vae": f"shapes-vae-{r.size}",
                  "conditioner.conditioner.text_encoder": "shapes-clip-32"},
                 inside_exact=f"{u['inside']:.3f}", psnr_db=f"{u['psnr']:.1f}", whole_exact=f"{u['whole']:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
