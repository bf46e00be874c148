"""SDXL (Podell et al. 2023): two text encoders, pooled text, size and crop conditioning, and a refiner.

    conditioner = SDXLConditioner(clip_l, clip_g, image_size=32)   # prompts -> {"context", "pooled", "time_ids"}
    base = TextToImage(conditioner, SDXLUNet(unet), schedule, vae, image_size=32)   # unet: with added_cond_dim
    refiner = TextToImage(SDXLConditioner(None, clip_g, 32, aesthetic_score=6.0), SDXLUNet(refiner_unet, 5),
                          schedule, vae, image_size=32)
    pipe = SDXLPipeline(base, refiner, switch=0.8)
    images = pipe.generate(["a red circle on the left"])           # base to 0.8 of the trajectory, refiner after
    sharper = pipe.refine(base.generate(prompts), prompts, strength=0.3)   # the refiner as img2img (SDEdit)

What SDXL adds to latent diffusion, each a few lines here:
- **Two text encoders** (sec. 2.1): the context is the penultimate hidden states of CLIP ViT-L (768) and OpenCLIP
  bigG (1280) concatenated on channels (2048); the pooled vector is bigG's projected <eos> state (1280).
- **Micro-conditioning** (sec. 2.2): the original image size, the crop's top-left corner and the target size
  (six numbers, `time_ids`), each a 256-channel sinusoid, concatenated with the pooled text (`text_time_input`,
  diffusers' "text_time") and added to the timestep embedding through the UNet's added-conditioning MLP
  (1280 + 6 x 256 = 2816): `SDXLUNet` wraps notebook 05's UNet with it. Training on every image, small or
  cropped, and telling the model which, instead of throwing small images away or teaching it to cut objects off.
- **The refiner** (sec. 2.5): a second UNet trained only on the first 200 of 1000 noise levels, conditioned on
  bigG alone and on an aesthetic score instead of the target size (1280 + 5 x 256 = 2560). An "ensemble of
  experts": the base denoises from pure noise to 0.8 of the trajectory and hands over its latents; the refiner
  finishes. Or it refines a finished image as img2img (SDEdit at strength ~0.3).
- The unconditional twin of the text is zeros (diffusers' force_zeros_for_empty_prompt: SDXL dropped captions
  to zero embeddings in training); the size ids are the same in both halves of guidance, and the refiner's
  negative aesthetic score is 2.5 against the positive 6.0.
"""
from __future__ import annotations

import io
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from einops import rearrange
from PIL import Image
from torch import nn
from torch.utils.data import Dataset

from sdlearn.data import ShapesDataset, ShapesSample, caption, draw
from sdlearn.pipeline import Conditioner, TextToImage
from sdlearn.text import TextEncoder, Tokenizer
from sdlearn.unet import UNet, timestep_embedding

# -----------------------------------------------------------------------------
# SDXL's data: images of every size and crop, told apart by their ids (sec. 2.2); and a quality label


QUALITY_CLEAN, QUALITY_WORST = 6.0, 2.0  # the quality label of a clean render and of the most degraded one
DEGRADATIONS = ("blur", "noise", "jpeg")


def degrade_image(image: torch.Tensor, kind: str, severity: float) -> torch.Tensor:
    """An image [3,H,W] in [-1,1] made worse, by `severity` in [0, 1]: a Gaussian blur (sigma 0.4 to 1.5 px),
    Gaussian noise (std 0.05 to 0.3) or JPEG compression (quality 60 down to 5)."""
    if kind == "blur":
        sigma = 0.4 + 1.1 * severity
        return TF.gaussian_blur(image[None], kernel_size=2 * math.ceil(3 * sigma) + 1, sigma=sigma)[0].clamp(-1, 1)
    if kind == "noise":
        g = torch.Generator().manual_seed(int(severity * 1e6))
        return (image + (0.05 + 0.25 * severity) * torch.randn(image.shape, generator=g)).clamp(-1, 1)
    if kind == "jpeg":
        pixels = ((image + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()  # [H,W,3]
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=round(60 - 55 * severity))
        back = torch.from_numpy(np.array(Image.open(buffer).convert("RGB"))).permute(2, 0, 1)  # [3,H,W]
        return back.float() / 127.5 - 1
    raise ValueError(f"unknown degradation {kind!r}, expected one of {DEGRADATIONS}")


@dataclass
class SDXLSample(ShapesSample):
    original_size: tuple[int, int] = (32, 32)  # (h, w) the scene was rendered at
    crop_top_left: tuple[int, int] = (0, 0)    # (top, left) of the crop, in rescaled pixels
    target_size: tuple[int, int] = (32, 32)    # (h, w) of image
    quality: float = QUALITY_CLEAN             # the aesthetic score's analogue: 6 clean, down to 2 for the worst


class SDXLShapes(Dataset):
    """The shapes scenes of `dataset` rendered as SDXL's training data; ds.item(i) -> SDXLSample.

    augment=True: each scene at a random original size (half to twice the image size), rescaled to 1 to 1.25 times
    the image size and randomly cropped, with those numbers recorded (SDXL sec. 2.2: train on every image, small or
    cropped, and tell the model which). degrade=p: a fraction p of the images blurred, noised or JPEG-compressed
    (degrade_image), labelled from QUALITY_CLEAN down to QUALITY_WORST by severity: the refiner's aesthetic score."""

    def __init__(self, dataset: ShapesDataset, augment: bool = False, degrade: float = 0.0):
        if not 0 <= degrade <= 1:
            raise ValueError(f"degrade is the fraction of degraded images, in [0, 1], got {degrade!r}")
        self.dataset, self.augment, self.degrade = dataset, augment, degrade

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, str]:
        sample = self.item(i)
        return sample.image, sample.caption

    def item(self, i: int) -> SDXLSample:
        objects, placements, rng = self.dataset.scene(i)
        size = self.dataset.size
        sample = SDXLSample(draw(placements, size), caption(objects), tuple(objects), (size, size), (0, 0),
                            (size, size))
        if self.augment:  # a really smaller/larger original, rescaled to [1, 1.25] x size, then a random crop
            o = int(rng.integers(size // 2, 2 * size + 1))
            side = round(size * rng.uniform(1.0, 1.25))
            top, left = (int(v) for v in rng.integers(0, side - size + 1, size=2))
            image = F.interpolate(draw(placements, o)[None], size=(side, side), mode="bilinear", antialias=True,
                                  align_corners=False)                                     # [1,3,side,side]
            sample.image = image[0, :, top:top + size, left:left + size].clamp(-1, 1).contiguous()  # [3,size,size]
            sample.original_size, sample.crop_top_left = (o, o), (top, left)
        if self.degrade:  # its own random stream: the scene does not depend on `degrade`
            rng = self.dataset.rng(i % len(self), stream=1)
            if rng.random() < self.degrade:
                severity = float(rng.uniform())
                sample.image = degrade_image(sample.image, DEGRADATIONS[int(rng.integers(3))], severity)
                sample.quality = QUALITY_CLEAN - (QUALITY_CLEAN - QUALITY_WORST) * severity
        return sample


# -----------------------------------------------------------------------------
# micro-conditioning, and the UNet that reads it


def _pairs(name: str, value) -> torch.Tensor:
    """(h, w), or [B,2] -> a float tensor [B,2] of non-negative numbers (a clear error otherwise)."""
    t = torch.as_tensor(value, dtype=torch.float32)
    t = t[None] if t.ndim == 1 else t
    if t.ndim != 2 or t.shape[1] != 2:
        raise ValueError(f"{name} must be (height, width) or a [B, 2] tensor of them, got {tuple(t.shape)}")
    if (t < 0).any():
        raise ValueError(f"{name} must not be negative, got {t.tolist()}")
    return t


def _batch(*ids: torch.Tensor) -> torch.Tensor:
    """Concatenate per-row ids [B_i, k_i] along the last axis, broadcasting batches of 1 -> [B, sum k_i]."""
    B = max(t.shape[0] for t in ids)
    if any(t.shape[0] not in (1, B) for t in ids):
        raise ValueError(f"micro-conditions have different batch sizes: {[t.shape[0] for t in ids]}")
    return torch.cat([t.expand(B, -1) for t in ids], dim=1)


def time_ids(original_size, crop_top_left, target_size) -> torch.Tensor:
    """SDXL's base micro-conditioning -> [B, 6]: (orig_h, orig_w, crop_top, crop_left, target_h, target_w),
    as diffusers' StableDiffusionXLPipeline._get_add_time_ids. Each argument (h, w) or [B, 2]."""
    original, crop, target = (_pairs(n, v) for n, v in (("original_size", original_size),
                                                         ("crop_top_left", crop_top_left),
                                                         ("target_size", target_size)))
    for name, size in (("original_size", original), ("target_size", target)):
        if (size <= 0).any():
            raise ValueError(f"{name} must be positive, got {size.tolist()}")
    return _batch(original, crop, target)


def refiner_time_ids(original_size, crop_top_left, aesthetic_score) -> torch.Tensor:
    """The refiner's micro-conditioning -> [B, 5]: (orig_h, orig_w, crop_top, crop_left, aesthetic_score), as
    diffusers' StableDiffusionXLImg2ImgPipeline._get_add_time_ids with requires_aesthetics_score=True."""
    original, crop = _pairs("original_size", original_size), _pairs("crop_top_left", crop_top_left)
    if (original <= 0).any():
        raise ValueError(f"original_size must be positive, got {original.tolist()}")
    score = torch.as_tensor(aesthetic_score, dtype=torch.float32).reshape(-1, 1)  # [B, 1]
    return _batch(original, crop, score)


def text_time_input(pooled: torch.Tensor, time_ids: torch.Tensor, dim: int) -> torch.Tensor:
    """SDXL's "text_time" input (Podell et al. 2023, sec. 2.2): pooled text [B,P] and K micro-conditions [B,K],
    each id its own dim-channel sinusoid, concatenated -> [B, P + K*dim] (SDXL base: 1280 + 6 x 256 = 2816)."""
    ids = timestep_embedding(time_ids.flatten(), dim)                   # [B*K, dim]
    ids = rearrange(ids, "(b k) d -> b (k d)", b=pooled.shape[0])       # [B, K*dim], id 0's channels first
    return torch.cat([pooled, ids.to(pooled.dtype)], dim=-1)


class SDXLUNet(nn.Module):
    """SDXL's UNet: notebook 05's UNet reading the pooled text and the micro-conditions through its added-conditioning
    vector: sdxl_unet(x [B,C,H,W], t [B], context [B,L,D], pooled [B,P], time_ids [B,K]) -> its prediction.

    unet.config.added_cond_dim = P + K * time_id_dim (SDXL base: 1280 + 6 x 256; refiner: 1280 + 5 x 256)."""

    def __init__(self, unet: UNet, num_time_ids: int = 6, time_id_dim: int = 256):
        super().__init__()
        pooled = unet.config.added_cond_dim - num_time_ids * time_id_dim
        if pooled < 1:
            raise ValueError(f"the UNet's added_cond_dim ({unet.config.added_cond_dim}) must hold the pooled text and "
                             f"{num_time_ids} time ids of {time_id_dim} channels each: set added_cond_dim = pooled "
                             f"width + {num_time_ids * time_id_dim}")
        self.unet, self.num_time_ids, self.time_id_dim, self.pooled_dim = unet, num_time_ids, time_id_dim, pooled

    def init_args(self) -> dict:
        return {"unet": self.unet, "num_time_ids": self.num_time_ids, "time_id_dim": self.time_id_dim}

    latent_channels = property(lambda self: self.unet.latent_channels)
    prediction = property(lambda self: self.unet.prediction)

    @property
    def cond_dims(self) -> dict[str, int]:
        return {"context": self.unet.config.context_dim, "pooled": self.pooled_dim, "time_ids": self.num_time_ids}

    def residual_shapes(self, height: int, width: int) -> list[tuple[int, int, int]]:
        return self.unet.residual_shapes(height, width)

    def forward(self, x, t, context, pooled, time_ids, residuals=None):
        for name, v, width in (("pooled", pooled, self.pooled_dim), ("time_ids", time_ids, self.num_time_ids)):
            if not isinstance(v, torch.Tensor) or v.ndim != 2 or v.shape != (x.shape[0], width):
                got = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
                raise ValueError(f"SDXLUNet: {name} should be [B,{width}] = [{x.shape[0]},{width}], got {got}")
        added = text_time_input(pooled, time_ids, self.time_id_dim)       # [B, P + K * time_id_dim]
        return self.unet(x, t, context, added, residuals)


class SDXLConditioner(Conditioner):
    """Prompts -> {"context" [N, L, D1 + D2], "pooled" [N, P2], "time_ids" [N, 6 or 5]}.

    text_encoder (CLIP ViT-L's role) and text_encoder_2 (OpenCLIP bigG's): each tokenises the prompt, and the
    penultimate block's states of both are concatenated on channels; the pooled vector is text_encoder_2's.
    The refiner has no text_encoder (None) and an aesthetic_score: its ids are refiner_time_ids. image_size is the
    default original and target size."""

    dropout_keys = ("context", "pooled")  # caption dropout zeroes the text, never the sizes
    takes = ("original_size", "crop_top_left", "target_size", "aesthetic_score")

    def __init__(self, text_encoder: TextEncoder | None, text_encoder_2: TextEncoder, image_size: int = 32,
                 aesthetic_score: float | None = None, negative_aesthetic_score: float = 2.5,
                 tokenizer: Tokenizer | None = None, tokenizer_2: Tokenizer | None = None, zero_negative: bool = True):
        super().__init__()
        self.text_encoder, self.text_encoder_2 = text_encoder, text_encoder_2
        self.tokenizer = tokenizer or (Tokenizer.for_encoder(text_encoder) if text_encoder is not None else None)
        self.tokenizer_2 = tokenizer_2 or Tokenizer.for_encoder(text_encoder_2)
        if self.tokenizer is not None and self.tokenizer.context_length != self.tokenizer_2.context_length:
            raise ValueError(f"the two tokenizers pad to different lengths ({self.tokenizer.context_length} and "
                             f"{self.tokenizer_2.context_length}): their states are concatenated token by token")
        self.image_size, self.aesthetic_score = image_size, aesthetic_score
        self.negative_aesthetic_score, self.zero_negative = negative_aesthetic_score, zero_negative

    def init_args(self) -> dict:
        return {"text_encoder": self.text_encoder, "text_encoder_2": self.text_encoder_2,
                "image_size": self.image_size, "aesthetic_score": self.aesthetic_score,
                "negative_aesthetic_score": self.negative_aesthetic_score, "zero_negative": self.zero_negative}

    @property
    def refiner(self) -> bool:
        return self.aesthetic_score is not None

    @property
    def dims(self) -> dict[str, int]:
        width = (self.text_encoder.config.width if self.text_encoder is not None else 0)
        return {"context": width + self.text_encoder_2.config.width,
                "pooled": self.text_encoder_2.config.pooled_dim, "time_ids": 5 if self.refiner else 6}

    def encode_text(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(context [N, L, D1 + D2], pooled [N, P2]): penultimate states of both encoders, pooled from the second."""
        device = next(self.text_encoder_2.parameters()).device
        hidden_2, pooled = self.text_encoder_2(self.tokenizer_2(list(prompts)).to(device), hidden_layer=-2)
        if self.text_encoder is None:
            return hidden_2, pooled
        hidden_1, _ = self.text_encoder(self.tokenizer(list(prompts)).to(device), hidden_layer=-2)
        return torch.cat([hidden_1, hidden_2], dim=-1), pooled

    def ids(self, n: int, original_size=None, crop_top_left=(0, 0), target_size=None, aesthetic_score=None,
            negative: bool = False) -> torch.Tensor:
        """The micro-conditions of n images -> [n, 6] (base) or [n, 5] (refiner); sizes default to image_size."""
        size = (self.image_size, self.image_size)
        original_size = size if original_size is None else original_size
        if self.refiner:
            score = self.negative_aesthetic_score if negative else \
                (self.aesthetic_score if aesthetic_score is None else aesthetic_score)
            ids = refiner_time_ids(original_size, crop_top_left, score)
        else:
            if aesthetic_score is not None:
                raise ValueError("aesthetic_score conditions the refiner; this is a base conditioner (its ids are "
                                 "original_size, crop_top_left, target_size)")
            ids = time_ids(original_size, crop_top_left, size if target_size is None else target_size)
        if ids.shape[0] not in (1, n):
            raise ValueError(f"{n} prompts but micro-conditions for {ids.shape[0]} images")
        return ids.expand(n, -1)

    def encode(self, prompts: list[str], **conditions) -> dict[str, torch.Tensor]:
        context, pooled = self.encode_text(prompts)
        return {"context": context, "pooled": pooled, "time_ids": self.ids(len(prompts), **conditions).to(context)}

    def encode_unconditional(self, n: int, **conditions) -> dict[str, torch.Tensor]:
        """Zeros for the text (diffusers' force_zeros_for_empty_prompt, as SDXL's base was trained; zero_negative=False:
        the empty prompt, as the published refiner's pipeline) and the same sizes (the refiner: the negative
        aesthetic score)."""
        context, pooled = self.encode_text([""])
        if self.zero_negative:
            context, pooled = torch.zeros_like(context), torch.zeros_like(pooled)
        return {"context": context.expand(n, -1, -1), "pooled": pooled.expand(n, -1),
                "time_ids": self.ids(n, **conditions, negative=True).to(context)}


def handoff(timesteps: Sequence[int], switch: float, num_train_timesteps: int = 1000) -> tuple[list[int], list[int]]:
    """Split a sampler's timesteps at fraction `switch` of the trajectory -> (the base's, the refiner's), as
    diffusers' denoising_end / denoising_start: the base runs every t >= round(T (1 - switch)), the refiner the rest."""
    if not 0 < switch <= 1:
        raise ValueError(f"the switch is a fraction of the trajectory in (0, 1], got {switch!r}")
    cutoff = round(num_train_timesteps * (1 - switch))
    return [t for t in timesteps if t >= cutoff], [t for t in timesteps if t < cutoff]


def refiner_timesteps(n: int, t_max: int = 200) -> torch.Tensor:
    """n training timesteps of SDXL's refiner (sec. 2.5: it learns only the first 200 of the 1000 noise levels, the
    low-noise end, t = 0 being the clean image): uniform over 0 .. t_max - 1 -> [n] int64."""
    return torch.randint(0, t_max, (n,))


def vae_difference(a: nn.Module, b: nn.Module) -> str:
    """'' when a and b are one VAE (the same object, or the same config and weights), else how they differ."""
    if a is b:
        return ""
    if a.config != b.config:
        other = vars(b.config)
        return "their configs differ: " + ", ".join(f"{k}={v!r} vs {other.get(k)!r}"
                                                   for k, v in vars(a.config).items() if other.get(k) != v)
    sa, sb = a.state_dict(), b.state_dict()
    if sa.keys() != sb.keys():
        return f"their weights have different names: {sorted(sa.keys() ^ sb.keys())[:3]}"
    for k in sa:
        if sa[k].dtype != sb[k].dtype:
            return f"their weights have different dtypes, first {k}: {sa[k].dtype} vs {sb[k].dtype}"
        if not torch.equal(sa[k], sb[k]):
            return f"their weights differ, first {k} (max abs difference {(sa[k] - sb[k]).abs().max().item():.3g})"
    return ""


class SDXLPipeline(nn.Module):
    """SDXL's ensemble of experts: `base` denoises from noise to fraction `switch` of the trajectory and hands its
    latents (not images) to `refiner`, which finishes; `refine` runs the refiner on finished images (SDEdit).
    Both are TextToImage pipelines over the same VAE; with the same seed, the same images."""

    def __init__(self, base: TextToImage, refiner: TextToImage, switch: float = 0.8):
        super().__init__()
        handoff([], switch)  # checks the switch
        if refiner.latent_shape != base.latent_shape:
            raise ValueError(f"the refiner works on latents {refiner.latent_shape} but the base makes "
                             f"{base.latent_shape}")
        difference = vae_difference(base.vae, refiner.vae)
        if difference:
            raise ValueError(f"the base and the refiner must share one VAE: the base hands over latents, which "
                             f"only mean the same image in the same latent space; got two VAEs: {difference}")
        self.base, self.refiner, self.switch = base, refiner, switch

    def init_args(self) -> dict:
        return {"base": self.base, "refiner": self.refiner, "switch": self.switch}

    @property
    def image_size(self) -> int:
        return self.base.image_size

    @torch.no_grad()
    def generate(self, prompts: str | Sequence[str], steps: int = 50, guidance_scale: float = 3.0, seed: int = 0,
                 switch: float | None = None, refiner_guidance_scale: float | None = None,
                 refiner_conditions: dict | None = None, progress: bool = True, output: str = "image",
                 sampler: str | None = None, sampler_options: dict | None = None,
                 callback: Callable[[dict], None] | None = None, **conditions) -> torch.Tensor:
        """Base to `switch` (default self.switch), refiner from there: images [N,3,H,W] in [-1,1] (or latents).
        The two share one trajectory of `steps` steps; switch=1 is the base alone. **conditions go to the base's
        conditioner (original_size, crop_top_left, target_size), refiner_conditions to the refiner's."""
        switch = self.switch if switch is None else switch
        handoff([], switch)
        common = dict(progress=progress, sampler=sampler, sampler_options=sampler_options, callback=callback)
        if switch == 1:
            return self.base.generate(prompts, steps, guidance_scale, seed, output=output, **common, **conditions)
        latents = self.base.generate(prompts, steps, guidance_scale, seed, end=switch, output="latent", **common,
                                     **conditions)
        w = guidance_scale if refiner_guidance_scale is None else refiner_guidance_scale
        return self.refiner.generate(prompts, steps, w, seed, start=switch, latents=latents, output=output, **common,
                                     **(refiner_conditions or {}))

    @torch.no_grad()
    def refine(self, images: torch.Tensor, prompts: str | Sequence[str], strength: float = 0.3, steps: int = 50,
               guidance_scale: float = 3.0, seed: int = 0, progress: bool = True, sampler: str | None = None,
               sampler_options: dict | None = None, callback: Callable[[dict], None] | None = None,
               **conditions) -> torch.Tensor:
        """The refiner as img2img on finished images [N,3,H,W] in [-1,1]: SDEdit at `strength`."""
        return self.refiner.img2img(images, prompts, strength, steps, guidance_scale, seed, sampler, progress,
                                    sampler_options, callback, **conditions)
