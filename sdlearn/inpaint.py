"""Inpainting: repaint a masked region of an image, the rest kept; two ways, measured against each other (notebook 10).

    unet9 = widen_conv_in(pipe.denoiser)                  # 4 + 1 + 4 input channels, the new ones zero-initialised
    ipipe = inpainting_pipeline(pipe, unet9)              # a TextToImage whose denoiser is Inpainting(unet9)
    out = inpaint(ipipe, image, mask, ["a blue square on the left"])      # mask [N or 1,1,H,W]: 1 = repaint
    out = blended(pipe, image, mask, ["a blue square on the left"])       # the plain model, blended latents

**The inpainting UNet** (SD's inpainting checkpoints; diffusers' StableDiffusionInpaintPipeline): the text-to-image
UNet with its first convolution widened to in_channels = 4 + 1 + 4 and fine-tuned on random masks. Its input is
cat([z_t (4), the mask at the latent grid (1), the latents of the masked image (4)]): mask 1 = repaint, the mask
resized by nearest interpolation, the masked image = image * (mask < 0.5) (the repainted region set to 0, grey in
[-1, 1]). The model sees what surrounds the hole at every step, so it can make the new object fit it.

**Blended latents** (the baseline; diffusers' inpaint pipeline with a 4-channel UNet, Avrahami et al. 2023): the plain
model, and after every step the known region replaced by the source's latents noised to the level the step landed
on. The model never sees that the region is fixed, only its noisy copy, and nothing ties the two sides of the
border: the usual source of seams.

Where the mask goes: `InpaintConditioner` wraps the text conditioner and takes `image` and `mask`, and makes the
entries the wrapper `Inpainting(unet)` reads ("mask" at the latent grid, "masked_latents"), the same in both halves
of guidance. The masked image is encoded to the posterior's mean (diffusers samples the posterior: with a VAE whose
variance is small the two agree, which is how the parity test matches them).
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import replace

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from sdlearn.controlnet import widen_conv_in  # notebook 09's concatenation; here 9 channels
from sdlearn.diffusion import Level
from sdlearn.pipeline import Conditioner, TextToImage, _check_prompts
from sdlearn.unet import SD15, UNet
from sdlearn.vae import AutoencoderKL

MASK_CHANNELS = 1


# -----------------------------------------------------------------------------
# the inputs


def mask_to_latent(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """A pixel mask [B,1,H,W] (1 = repaint) -> the latent grid [B,1,h,w] by nearest interpolation, as diffusers'
    prepare_mask_latents (F.interpolate's default mode): each latent cell takes the mask value of one pixel."""
    return F.interpolate(mask, size=size)


def inpaint_input(z_t: torch.Tensor, mask: torch.Tensor, masked_latents: torch.Tensor) -> torch.Tensor:
    """The inpainting UNet's input: cat([z_t [B,C,h,w], mask [B,1,h,w], masked_latents [B,C,h,w]]) along channels
    -> [B,2C+1,h,w], in that order (the order of SD's inpainting checkpoints; notebook 10, exercise 3)."""
    return torch.cat([z_t, mask.to(z_t.dtype), masked_latents.to(z_t.dtype)], dim=1)


def masked_image(image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The image with the region to repaint set to 0 (diffusers: image * (mask < 0.5)): [B,3,H,W] in [-1, 1]."""
    return image * (mask < 0.5).to(image.dtype)


def check_mask(mask, image: torch.Tensor | None = None, size: int | None = None) -> torch.Tensor:
    """A mask: a float tensor [N,1,H,W] (or [N,H,W], [H,W]) in [0, 1], 1 = repaint, at the image's size -> [N,1,H,W]
    in {0, 1}: a pixel >= 0.5 is repainted, as diffusers' mask processor binarizes (do_binarize), so a soft mask
    means the same in the UNet's mask channel, in the masked image and in blending."""
    if not isinstance(mask, torch.Tensor):
        raise ValueError(f"mask should be a tensor [N,1,H,W] in [0, 1] (1 = repaint), got {type(mask).__name__}")
    if mask.ndim == 2:
        mask = mask[None, None]
    elif mask.ndim == 3 and (image is None or mask.shape[0] in (1, len(image))) and mask.shape[0] != 3:
        mask = mask[:, None]
    if mask.ndim != 4 or mask.shape[1] != MASK_CHANNELS:
        raise ValueError(f"mask should be single-channel, [N,1,H,W] (1 = repaint), got shape {tuple(mask.shape)}"
                         + (" (an RGB image? take one channel, e.g. mask[:, :1])" if mask.ndim == 4
                            and mask.shape[1] == 3 else ""))
    mask = mask.float()
    if not torch.isfinite(mask).all() or mask.min() < 0 or mask.max() > 1:
        raise ValueError(f"mask values should be in [0, 1] (1 = repaint, 0 = keep), got [{mask.min().item():.3g}, "
                         f"{mask.max().item():.3g}]")
    want = tuple(image.shape[-2:]) if image is not None else (size, size) if size else None
    if want is not None and tuple(mask.shape[-2:]) != want:
        raise ValueError(f"mask is {mask.shape[-2]}x{mask.shape[-1]} but the image is {want[0]}x{want[1]}: "
                         f"give a mask of the image's size")
    return (mask >= 0.5).float()


def check_image(image, size: int | None = None) -> torch.Tensor:
    """A source image [N,3,size,size] (any H, W when size is None) float in [-1, 1]."""
    want = (3, size, size) if size else None
    if not isinstance(image, torch.Tensor) or image.ndim != 4 or image.shape[1] != 3 or \
            (want and tuple(image.shape[1:]) != want):
        got = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        side = size or "H"
        raise ValueError(f"image should be [N,3,{side},{size or 'W'}] (RGB in [-1, 1], the pipeline's size), got {got}")
    if not image.is_floating_point() or image.min() < -1 or image.max() > 1:
        raise ValueError(f"image should be float in [-1, 1], got {image.dtype} in [{image.min().item():.3g}, "
                         f"{image.max().item():.3g}]")
    return image


# -----------------------------------------------------------------------------
# the inpainting UNet


class Inpainting(nn.Module):
    """The inpainting UNet as a denoiser: inpainting(z_t [B,C,h,w], t, mask [B,1,h,w], masked_latents [B,C,h,w],
    **the UNet's conditions) = unet(cat([z_t, mask, masked_latents]), t, ...) -> [B,C,h,w]."""

    def __init__(self, unet: UNet, assemble: Callable = inpaint_input):
        super().__init__()
        cfg = unet.config
        if cfg.in_channels != 2 * cfg.out_channels + MASK_CHANNELS:
            raise ValueError(f"an inpainting UNet reads 2 x {cfg.out_channels} + 1 = {2 * cfg.out_channels + 1} "
                             f"channels (latents, mask, masked latents), this one {cfg.in_channels}: widen_conv_in")
        self.unet, self.assemble = unet, assemble   # assemble(z_t, mask, masked_latents): notebook 10's exercise

    def init_args(self) -> dict:
        return {"unet": self.unet}

    latent_channels = property(lambda self: self.unet.config.out_channels)
    prediction = property(lambda self: self.unet.prediction)
    cond_dims = property(lambda self: {**self.unet.cond_dims, "mask": MASK_CHANNELS,
                                       "masked_latents": self.latent_channels})

    def residual_shapes(self, height: int, width: int) -> list:
        return self.unet.residual_shapes(height, width)

    def forward(self, x, t, mask, masked_latents, **cond):
        B, C, h, w = x.shape
        for name, v, c in (("mask", mask, MASK_CHANNELS), ("masked_latents", masked_latents, C)):
            if not isinstance(v, torch.Tensor) or tuple(v.shape) != (B, c, h, w):
                got = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
                raise ValueError(f"Inpainting: {name} should be [B,{c},h,w] = {[B, c, h, w]} (the latent grid), "
                                 f"got {got}")
        return self.unet(self.assemble(x, mask, masked_latents), t, **cond)


class InpaintConditioner(Conditioner):
    """A conditioner, the VAE and the region to repaint: conditioner(prompts, image=[N or 1,3,H,W] in [-1,1],
    mask=[N or 1,1,H,W] in [0,1]) -> its entries, "mask" at the latent grid [N,1,h,w] and "masked_latents" [N,C,h,w]
    (the scaled latents of image * (mask < 0.5)), the same in both halves of guidance."""

    takes = ("image", "mask")

    def __init__(self, conditioner: Conditioner, vae: AutoencoderKL, to_latent: Callable = mask_to_latent):
        super().__init__()
        self.conditioner, self.vae, self.to_latent = conditioner, vae, to_latent
        self.takes = (*conditioner.takes, *InpaintConditioner.takes)
        self.dropout_keys = conditioner.dropout_keys

    def init_args(self) -> dict:
        return {"conditioner": self.conditioner, "vae": self.vae}

    @property
    def dims(self) -> dict[str, int]:
        return self.conditioner.dims

    def encode_mask(self, image, mask) -> dict[str, torch.Tensor]:
        if image is None or mask is None:
            raise ValueError("this pipeline inpaints: pass image=[N,3,H,W] in [-1, 1] and mask=[N,1,H,W] in [0, 1] "
                             "(1 = repaint)")
        f = self.vae.downsampling_factor
        image = check_image(image)
        mask = check_mask(mask, image)
        p = next(self.vae.parameters())
        masked = self.vae.to_latent(masked_image(image, mask).to(p.device, p.dtype), sample=False).float()
        grid = (image.shape[-2] // f, image.shape[-1] // f)
        return {"mask": self.to_latent(mask.to(p.device), grid).float(), "masked_latents": masked}

    def encode(self, prompts: list[str], image=None, mask=None, **conditions) -> dict[str, torch.Tensor]:
        return {**self.conditioner.encode(prompts, **conditions), **self.encode_mask(image, mask)}

    def encode_unconditional(self, n: int, image=None, mask=None, **conditions) -> dict[str, torch.Tensor]:
        return self.conditioner.encode_unconditional(n, **conditions)


def inpainting_pipeline(pipe: TextToImage, unet: UNet | None = None, assemble: Callable = inpaint_input,
                        to_latent: Callable = mask_to_latent) -> TextToImage:
    """pipe's parts around an inpainting UNet (default: pipe's UNet widened, untrained in the new channels)."""
    unet = widen_conv_in(pipe.denoiser) if unet is None else unet
    return TextToImage(InpaintConditioner(pipe.conditioner, pipe.vae, to_latent), Inpainting(unet, assemble),
                       pipe.schedule, pipe.vae, image_size=pipe.image_size)


# -----------------------------------------------------------------------------
# the two methods


def _inputs(pipe: TextToImage, image, mask, prompts) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    prompts = _check_prompts(prompts)
    image = check_image(image, pipe.image_size)
    mask = check_mask(mask, image)
    n = len(prompts)
    for name, v in (("image", image), ("mask", mask)):
        if v.shape[0] not in (1, n):
            raise ValueError(f"{name} has {v.shape[0]} rows for {n} prompts: give one per prompt or one for all")
    return image.expand(n, *image.shape[1:]), mask.expand(n, *mask.shape[1:]), prompts


def _nothing_to_repaint(image, mask) -> bool:
    empty = mask.flatten(1).amax(1) < 0.5                                     # [N]: no pixel marked for repainting
    if empty.any():
        warnings.warn(f"the mask marks no pixel to repaint (all < 0.5) for {int(empty.sum())} of {len(mask)} "
                      f"images: those are returned as they came", stacklevel=3)
    return bool(empty.all())


@torch.no_grad()
def inpaint(pipe: TextToImage, image, mask, prompts, strength: float = 1.0, steps: int = 50,
            guidance_scale: float = 3.0, seed: int = 0, progress: bool = True, **options) -> torch.Tensor:
    """Repaint the masked region with an inpainting pipeline (its denoiser reads mask and masked_latents): images
    [N,3,H,W] in [-1, 1]. strength 1 (the default) starts from pure noise, as diffusers' inpaint pipeline;
    < 1 from the source's latents noised to where the last `strength` of the trajectory starts (SDEdit). Images whose
    mask is empty come back as the source, with a warning."""
    if "mask" not in pipe.denoiser.cond_dims:
        raise ValueError(f"the {type(pipe.denoiser).__name__} does not read a mask: inpaint needs an inpainting "
                         f"pipeline (inpainting_pipeline); with a plain one, use blended")
    image, mask, prompts = _inputs(pipe, image, mask, prompts)
    if _nothing_to_repaint(image, mask):
        return image.clone()
    cond = {"image": image, "mask": mask}
    if strength >= 1:
        out = pipe.generate(prompts, steps, guidance_scale, seed, progress=progress, **options, **cond)
    else:
        out = pipe.img2img(image, prompts, strength, steps, guidance_scale, seed, progress=progress, **options,
                           **cond)
    return _keep_empty(out, image, mask)


def _keep_empty(out, image, mask):
    empty = (mask.flatten(1).amax(1) < 0.5).view(-1, 1, 1, 1)
    return torch.where(empty, image.to(out), out)


def blend_step(x_next: torch.Tensor, source: torch.Tensor, noise: torch.Tensor, mask: torch.Tensor, t_next,
               schedule) -> torch.Tensor:
    """Blended latents, one step (diffusers' inpaint pipeline with a 4-channel UNet): where mask [B,1,h,w] is 1 keep
    the model's x_next, elsewhere put the source's latents noised to t_next with the run's initial noise
    (schedule.add_noise), or the source itself after the last step (t_next = -1) (notebook 10, exercise 4)."""
    known = source if _is_end(t_next) else schedule.add_noise(source, noise, _at(t_next, source))
    return mask * x_next + (1 - mask) * known


def _is_end(t) -> bool:
    return not isinstance(t, Level) and int(t) < 0


def _at(t, x):
    return t if isinstance(t, Level) else torch.full((x.shape[0],), int(t), device=x.device)


@torch.no_grad()
def blended(pipe: TextToImage, image, mask, prompts, strength: float = 1.0, steps: int = 50,
            guidance_scale: float = 3.0, seed: int = 0, progress: bool = True, step_fn: Callable = blend_step,
            sampler: str | None = None, callback: Callable | None = None, **conditions) -> torch.Tensor:
    """Repaint the masked region with a plain text-to-image pipeline by blended latents: after every step the known
    region is the source's latents noised to the step's level (`step_fn`, default blend_step). Images [N,3,H,W]."""
    image, mask, prompts = _inputs(pipe, image, mask, prompts)
    if _nothing_to_repaint(image, mask):
        return image.clone()
    p = next(pipe.vae.parameters())
    source = pipe.vae.to_latent(image.to(pipe.device, p.dtype), sample=False).float()        # [N,C,h,w]
    m = mask_to_latent(mask.to(pipe.device), source.shape[-2:])                               # [N,1,h,w]
    noise = pipe.noise(len(prompts), seed)                                                    # z_T, as generate's
    if not 0 <= strength <= 1:
        raise ValueError(f"strength must be in [0, 1], got {strength!r}")
    start = 1.0 - float(strength)
    trajectory = pipe.schedule.trajectory(steps, start)
    if not trajectory:
        return pipe.decode(source).cpu()
    z = noise if start == 0 else pipe.schedule.add_noise(source, noise, _at(trajectory[0], source))

    def on_step(info):
        info["x_next"] = step_fn(info["x_next"], source, noise, m, info["t_next"], pipe.schedule)
        if callback is not None:
            callback(info)

    cond = pipe.encode_prompts(prompts, **conditions)
    z = pipe.denoise(z, cond, steps, guidance_scale, start, 1.0, sampler, seed, progress, on_step,
                     pipe.conditioner.unconditional(1, **conditions))
    return _keep_empty(pipe.decode(z).cpu(), image, mask)


# -----------------------------------------------------------------------------
# masks for training and for the benchmark


def random_mask(size: int, rng: np.random.Generator, whole: float = 0.25) -> torch.Tensor:
    """A training mask [1,size,size] in {0, 1} as SD's inpainting recipe draws them: the whole image with probability
    `whole`, else a union of 1-3 rectangles and ellipses ("blobs") of random size and place."""
    if rng.random() < whole:
        return torch.ones(1, size, size)
    u = (torch.arange(size, dtype=torch.float32) + 0.5) / size
    y, x = torch.meshgrid(u, u, indexing="ij")
    mask = torch.zeros(size, size, dtype=torch.bool)
    for _ in range(int(rng.integers(1, 4))):
        cx, cy = rng.uniform(0.1, 0.9, 2)
        w, h = rng.uniform(0.15, 0.6, 2)
        if rng.random() < 0.5:
            mask |= ((x - cx).abs() <= w / 2) & ((y - cy).abs() <= h / 2)
        else:
            mask |= ((x - cx) / (w / 2)) ** 2 + ((y - cy) / (h / 2)) ** 2 <= 1
    return mask[None].float()


def box_mask(cx: float, cy: float, side: float, size: int, margin: float = 1.25) -> torch.Tensor:
    """A square mask [1,size,size] centred at (cx, cy) (unit coordinates), `margin` x `side` wide, snapped outwards to
    whole pixels: the region of one object, with room for another shape in it."""
    half = margin * side / 2
    lo = [max(0, math.floor((c - half) * size)) for c in (cx, cy)]
    hi = [min(size, math.ceil((c + half) * size)) for c in (cx, cy)]
    mask = torch.zeros(1, size, size)
    mask[:, lo[1]:hi[1], lo[0]:hi[0]] = 1
    return mask


# -----------------------------------------------------------------------------
# the released models' hyper-parameters

PRESETS = {
    # runwayml/stable-diffusion-inpainting's UNet: SD 1.5's with in_channels 9 (latents, mask, masked latents)
    "sd15-inpaint-unet": lambda: UNet(replace(SD15, in_channels=9)),
}
