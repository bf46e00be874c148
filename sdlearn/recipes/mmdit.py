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
from dataclasses import dataclass

import torch

from sdlearn import flow, pretrained
from sdlearn.course import seed_everything
from sdlearn.data import ShapesDataset, render_pool
from sdlearn.flow import FlowSchedule
from sdlearn.mmdit import MMDiT, MMDiTConfig
from sdlearn.pipeline import TextToImage
from sdlearn.recipes import option
from sdlearn.recipes.t2i import LatentRecipe, encode_pool, fit_denoiser, judged_parser, text_to_image_main
from sdlearn.sd3 import SD3Conditioner
from sdlearn.train import History

RELEASE = "python -m sdlearn train mmdit --steps 4000 --threads 2 --release"
TEXT_ENCODERS = ("shapes-clip-32", "shapes-clip-g-32", "shapes-clip-bidir-32")   # CLIP-L's, bigG's and T5's roles


@dataclass(frozen=True, kw_only=True)
class MMDiTRecipe(LatentRecipe):
    """The settings of notebook 08's shapes MMDiT with rectified flow (the release: steps=4000)."""

    lr: float = 1e-3
    width: int = option(128, "the transformer's width (heads x head_dim)")
    depth: int = option(4, "joint blocks")
    heads: int = option(4, "attention heads")
    patch_size: int = option(2, "latent pixels per patch side (SD3: 2)")
    dual: int = option(0, "how many leading blocks are MMDiT-X (a second, image-only attention; SD3.5-medium: 13 "
                          "of 24)")
    qk_norm: int = option(1, "1: RMSNorm on each head's queries and keys (SD3.5); 0: none (SD3)")
    vae: str = option("shapes-vae-sd3", "the released VAE whose latents the MMDiT learns (shapes-vae-sd3: 16 "
                                        "channels, as SD3's)")
    shift: float = option(1.0, "the flow schedule's timestep shift (SD3: 3.0 at 1024 px; 1.0: none, for small "
                               "latents)")
    density: str = option("logit_normal", "training-time density: logit_normal (SD3), uniform or mode")
    p_drop_third: float = option(0.3, "probability of zeroing the third encoder's tokens alone (so sampling may "
                                      "leave it out)")


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
                            p_drop_third: float, density: str = "logit_normal", prediction: str = "v",
                            pair: Callable | None = None):
    """flow.training_loss after zeroing the third encoder's tokens in a fraction p_drop_third of the samples.
    prediction: the denoiser's, which fit_denoiser passes to every loss; on the flow schedule it is "v".
    pair(x0, noise, t) -> (x_t, v): the training pair (notebook 08 passes the learner's flow_pair); None: the
    schedule's."""
    return flow.training_loss(model, schedule, z0, cond_model.drop_third(cond, p_drop_third), uncond, p_uncond,
                              density, pair=pair)


def train(recipe: MMDiTRecipe, *, loss_fn: Callable = loss_with_third_dropped, attention: Callable | None = None,
          callback: Callable[[int, TextToImage], None] | None = None, callback_every: int = 0,
          progress: bool = True) -> tuple[TextToImage, History]:
    """Train the shapes MMDiT with rectified flow on `recipe.pool` shapes images -> (TextToImage with the EMA weights,
    History). loss_fn(model, schedule, z0, cond, uncond, p_uncond, cond_model, p_drop_third, density, prediction)
    -> loss (notebook 08: loss_with_third_dropped with the learner's flow_pair as `pair`); attention: the joint
    attention every block calls (MMDiT.use_attention; notebook 08: the learner's joint_attention)."""
    r = recipe
    seed_everything(r.seed)
    autoencoder = pretrained.load(r.vae, r.size, r.device).requires_grad_(False)
    cond_model = conditioner(r.device)
    images, captions = render_pool(ShapesDataset(size=r.size, split="train", seed=r.seed), r.pool, progress)
    latents, conds = encode_pool(autoencoder, cond_model, images, captions)
    config = mmdit_config(latents.shape[1], latents.shape[-1], cond_model, r.width, r.depth, r.heads, r.patch_size,
                          bool(r.qk_norm), r.dual)
    options = {"cond_model": cond_model, "p_drop_third": r.p_drop_third, "density": r.density}
    model = MMDiT(config).use_attention(*([attention] if attention is not None else []))
    return fit_denoiser(model, cond_model, autoencoder, latents, conds, FlowSchedule(r.shift), r, loss_fn,
                        options, callback=callback, callback_every=callback_every, progress=progress,
                        desc=f"mmdit {r.size}px")


def command_line():
    return judged_parser("mmdit", __doc__, MMDiTRecipe)[0]


def main(argv: list[str] | None = None) -> int:
    return text_to_image_main("mmdit", "shapes-mmdit", command_line(), train, lambda r: {
        "vae": f"{r.vae}-{r.size}",
        **{f"conditioner.text_encoder{suffix}": name for suffix, name in zip(("", "_2", "_3"), TEXT_ENCODERS,
                                                                             strict=True)}}, argv)


if __name__ == "__main__":
    raise SystemExit(main())
