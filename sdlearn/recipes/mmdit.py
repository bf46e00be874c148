"""The recipe of the released shapes MMDiT (notebook 08): SD3's transformer and rectified flow on shapes latents.

    python -m sdlearn train mmdit --steps 4000 --threads 2 --release   # shapes-mmdit-32
    python -m sdlearn eval mmdit                                       # judge it on 200 prompts, half held-out

Notebook 06's latent recipe (sdlearn.recipes.t2i.fit_denoiser: a bank of encoded training pairs, AdamW with
warm-up and cosine decay, an EMA) with SD3's parts: the 16-channel shapes-vae-sd3, three text encoders
(sdlearn.sd3.SD3Conditioner: shapes-clip, shapes-clip-g and shapes-clip-bidir in T5's role), an MMDiT with QK
RMSNorm (SD3.5), the rectified-flow loss with logit-normal times (sdlearn.flow.training_loss), and the third
encoder dropped on its own in a fraction of the samples, so that sampling may leave it out.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from sdlearn import flow, pretrained
from sdlearn.course import seed_everything
from sdlearn.data import ShapesDataset, render_pool
from sdlearn.flow import FlowSchedule
from sdlearn.mmdit import MMDiT, MMDiTConfig
from sdlearn.pipeline import TextToImage
from sdlearn.recipes.t2i import encode_pool, fit_denoiser, text_to_image_main
from sdlearn.sd3 import SD3Conditioner
from sdlearn.train import History

RELEASE = "python -m sdlearn train mmdit --steps 4000 --threads 2 --release"
TEXT_ENCODERS = ("shapes-clip-32", "shapes-clip-g-32", "shapes-clip-bidir-32")   # CLIP-L's, bigG's and T5's roles


def conditioner(device: str | torch.device = "cpu") -> SD3Conditioner:
    """SD3's three text encoders, the released shapes ones, frozen."""
    encoders = [pretrained.load(name.rsplit("-", 1)[0], 32, device).requires_grad_(False) for name in TEXT_ENCODERS]
    return SD3Conditioner(*encoders)


def mmdit_config(latent_channels: int, latent_size: int, cond: SD3Conditioner, width: int = 128, depth: int = 4,
                 heads: int = 4, patch_size: int = 2, qk_norm: bool = True, dual: int = 0) -> MMDiTConfig:
    """The shapes MMDiT: `depth` joint blocks of `width` (heads x head_dim), QK RMSNorm, the first `dual` of them
    MMDiT-X; the position embedding twice the latent grid (room for larger images, centre-cropped)."""
    if width % heads:
        raise ValueError(f"width {width} is not divisible by heads {heads}")
    return MMDiTConfig(in_channels=latent_channels, out_channels=latent_channels, patch_size=patch_size, depth=depth,
                       heads=heads, head_dim=width // heads, context_dim=cond.dims["context"],
                       pooled_dim=cond.dims["pooled"], pos_embed_max_size=2 * latent_size // patch_size,
                       qk_norm=qk_norm, dual_attention_layers=tuple(range(dual)))


def loss_with_third_dropped(model, schedule, z0, cond, uncond, p_uncond, cond_model: SD3Conditioner,
                            p_drop_third: float, density: str = "logit_normal"):
    """flow.training_loss after zeroing the third encoder's tokens in a fraction p_drop_third of the samples."""
    return flow.training_loss(model, schedule, z0, cond_model.drop_third(cond, p_drop_third), uncond, p_uncond,
                              density)


def train(size: int = 32, steps: int = 2000, batch_size: int = 64, lr: float = 1e-3, pool: int = 10000,
          width: int = 128, depth: int = 4, heads: int = 4, patch_size: int = 2, dual: int = 0,
          qk_norm: int = 1, vae: str = "shapes-vae-sd3", shift: float = 1.0, density: str = "logit_normal",
          p_uncond: float = 0.1, p_drop_third: float = 0.3, seed: int = 0,
          loss_fn: Callable = loss_with_third_dropped, device: str | torch.device = "cpu",
          checkpoint_dir: str | Path | None = None, checkpoint_every: int = 0,
          callback: Callable[[int, TextToImage], None] | None = None, callback_every: int = 0,
          progress: bool = True) -> tuple[TextToImage, History]:
    """Train the shapes MMDiT with rectified flow on `pool` shapes images -> (TextToImage with the EMA weights,
    History). loss_fn(model, schedule, z0, cond, uncond, p_uncond, cond_model, p_drop_third, density) -> loss."""
    seed_everything(seed)
    autoencoder = pretrained.load(vae, size, device).requires_grad_(False)
    cond_model = conditioner(device)
    images, captions = render_pool(ShapesDataset(size=size, split="train", seed=seed), pool, progress)
    latents, conds = encode_pool(autoencoder, cond_model, images, captions)
    config = mmdit_config(latents.shape[1], latents.shape[-1], cond_model, width, depth, heads, patch_size,
                          bool(qk_norm), dual)
    options = {"cond_model": cond_model, "p_drop_third": p_drop_third, "density": density}
    return fit_denoiser(MMDiT(config), cond_model, autoencoder, latents, conds, size, FlowSchedule(shift),
                        steps, batch_size, lr, p_uncond, seed, loss_fn, options, device, checkpoint_dir,
                        checkpoint_every, callback, callback_every, progress, f"mmdit {size}px")


HELP = {
    "size": "image size (the released VAE of this size is used)",
    "pool": "training images rendered and encoded once",
    "width": "the transformer's width (heads x head_dim)",
    "depth": "joint blocks",
    "heads": "attention heads",
    "patch_size": "latent pixels per patch side (SD3: 2)",
    "dual": "how many leading blocks are MMDiT-X (a second, image-only attention; SD3.5-medium: 13 of 24)",
    "qk_norm": "1: RMSNorm on each head's queries and keys (SD3.5); 0: none (SD3)",
    "vae": "the released VAE whose latents the MMDiT learns (shapes-vae-sd3: 16 channels, as SD3's)",
    "shift": "the flow schedule's timestep shift (SD3: 3.0 at 1024 px; 1.0: none, for small latents)",
    "density": "training-time density: logit_normal (SD3), uniform or mode",
    "p_uncond": "probability of training with the text dropped (for classifier-free guidance)",
    "p_drop_third": "probability of zeroing the third encoder's tokens alone (so sampling may leave it out)",
}


def main(argv: list[str] | None = None) -> int:
    return text_to_image_main("mmdit", "shapes-mmdit", __doc__, train, HELP, lambda args: {
        "vae": f"{args.vae}-{args.size}",
        **{f"conditioner.text_encoder{suffix}": name for suffix, name in zip(("", "_2", "_3"), TEXT_ENCODERS,
                                                                             strict=True)}}, argv)


if __name__ == "__main__":
    raise SystemExit(main())
