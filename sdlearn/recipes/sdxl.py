"""The recipe of the released shapes SDXL base and refiner (notebook 07).

    python -m sdlearn train sdxl --part base --steps 4000 --threads 1 --release       # shapes-sdxl-base-32
    python -m sdlearn train sdxl --part refiner --steps 2000 --threads 1 --release    # shapes-sdxl-refiner-32
    python -m sdlearn eval sdxl                                                       # judge base + refiner

Both are notebook 06's latent recipe (sdlearn.recipes.t2i.fit_denoiser) with SDXL's conditioning:
- the base reads both text encoders (shapes-clip, CLIP-L's role, and the wider shapes-clip-g, bigG's), the pooled
  text and six size/crop ids; half of its training images are rendered at a random original size (16 to 64 px),
  rescaled and randomly cropped, with those numbers as their ids (the other half plain renders);
- the refiner reads shapes-clip-g alone and five ids, the last a quality score (the aesthetic score's analogue):
  half of its images are blurred, noised or JPEG-compressed and labelled lower; it learns only the first 200 of
  the 1000 noise levels, where detail is decided.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from sdlearn import pretrained
from sdlearn.course import seed_everything
from sdlearn.data import ShapesDataset, render_samples
from sdlearn.diffusion import NoiseSchedule
from sdlearn.metrics import evaluate
from sdlearn.pipeline import TextToImage, training_loss
from sdlearn.recipes import command, option, settings
from sdlearn.recipes.t2i import (
    T2IRecipe,
    encode_pool,
    fit_denoiser,
    judged_parser,
    print_scores,
    save_release,
    train_from_command_line,
    unet_config,
)
from sdlearn.sdxl import SDXLConditioner, SDXLPipeline, SDXLShapes, SDXLUNet, vae_difference
from sdlearn.train import History
from sdlearn.unet import UNet

RELEASE = {"base": "python -m sdlearn train sdxl --part base --steps 4000 --threads 1 --release",
           "refiner": "python -m sdlearn train sdxl --part refiner --steps 2000 --threads 1 --release"}
TEXT_ENCODERS = ("shapes-clip-32", "shapes-clip-g-32")  # CLIP ViT-L's and OpenCLIP bigG's roles
REFINER_T_MAX = 200  # the refiner learns t < 200 of 1000 (SDXL sec. 2.5)


@dataclass(frozen=True, kw_only=True)
class SDXLRecipe(T2IRecipe):
    """The settings of notebook 07's base or refiner: notebook 06's (T2IRecipe) with SDXL's data and conditioning.

    The learning rate is half notebook 06's: the penultimate states SDXL reads are not normalised (shapes-clip-g's
    have a standard deviation near 5), and at 2e-3 a base run diverged at step 740 of 4000 (loss 0.04 -> 0.4)."""

    CHOICES = {"part": {"base": "", "refiner": ""}}

    part: str = option("base", "base or refiner")
    lr: float = 1e-3
    time_id_dim: int = option(32, "sinusoid channels per size / crop / quality id (SDXL: 256)")
    augment: float = option(0.5, "fraction of the images rendered at a random original size and randomly cropped")
    degrade: float = option(0.5, "refiner: fraction of the images degraded (blur, noise, JPEG), labelled with a lower "
                                 "quality")
    vae: str = option("shapes-vae-xl", "the released VAE whose latents the UNet learns (shapes-vae-xl: trained on "
                                       "SDXL-style and degraded images)")


def sdxl_unet(latent_channels: int, conditioner: SDXLConditioner, width: int = 64, layers: int = 1,
              time_id_dim: int = 32, prediction: str = "v") -> SDXLUNet:
    """notebook 06's shapes UNet, reading SDXL's conditions: the conditioner's context width, and an added
    conditioning vector of its pooled text and its ids (6 for the base, 5 for the refiner), each id a
    time_id_dim-channel sinusoid (SDXL: 256)."""
    dims = conditioner.dims
    added = dims["pooled"] + dims["time_ids"] * time_id_dim
    config = unet_config(latent_channels, dims["context"], width, layers, prediction=prediction, added_cond_dim=added)
    return SDXLUNet(UNet(config), dims["time_ids"], time_id_dim)


def conditioner(part: str, size: int, device: str | torch.device = "cpu") -> SDXLConditioner:
    """The released text encoders, frozen, in the base's or the refiner's conditioner."""
    clip_l, clip_g = (pretrained.load(n.rsplit("-", 1)[0], 32, device).requires_grad_(False) for n in TEXT_ENCODERS)
    if part == "base":
        return SDXLConditioner(clip_l, clip_g, size)
    return SDXLConditioner(None, clip_g, size, aesthetic_score=6.0)


def training_samples(part: str, size: int, n: int, seed: int = 0, augment: float = 0.5, degrade: float = 0.5,
                     progress: bool = True):
    """n training samples: a fraction `augment` rendered at a random original size and cropped (SDXL's data), the
    rest plain; for the refiner a fraction `degrade` of all of them degraded with a quality label.
    -> (images [n,3,H,W], captions, micro-conditions {name: [n, ...]} for the conditioner)."""
    k = round(n * augment)
    d = degrade if part == "refiner" else 0.0
    samples = render_samples(SDXLShapes(ShapesDataset(size, "train", seed, length=max(k, 1)), True, d), k, progress)
    samples += render_samples(SDXLShapes(ShapesDataset(size, "train", seed + 1, length=max(n - k, 1)), False, d), n - k,
                              progress)
    conditions = {"original_size": torch.tensor([s.original_size for s in samples], dtype=torch.float32),
                  "crop_top_left": torch.tensor([s.crop_top_left for s in samples], dtype=torch.float32)}
    if part == "base":
        conditions["target_size"] = torch.tensor([s.target_size for s in samples], dtype=torch.float32)
    else:
        conditions["aesthetic_score"] = torch.tensor([s.quality for s in samples], dtype=torch.float32)
    return torch.stack([s.image for s in samples]), [s.caption for s in samples], conditions


def train(recipe: SDXLRecipe, *, loss_fn: Callable = training_loss,
          timesteps: Callable[[int], torch.Tensor] | None = None,
          callback: Callable[[int, TextToImage], None] | None = None, callback_every: int = 0,
          progress: bool = True) -> tuple[TextToImage, History]:
    """Train SDXL's base or refiner UNet (recipe.part) on `recipe.pool` shapes images -> (TextToImage with the EMA
    weights, History).

    loss_fn(unet, schedule, z0, cond, uncond, p_uncond, prediction, snr_gamma, t_max=...) -> loss: sdlearn.pipeline's
    training_loss, or a learner's; the refiner's is called with t_max=200, or with timesteps: n -> [n] ints, the
    refiner's noise levels (a learner's refiner_timesteps, notebook 07). Caption dropout zeroes the text (context
    and pooled), never the ids."""
    r = recipe
    if timesteps is not None and r.part != "refiner":
        raise ValueError("timesteps draws the refiner's training noise levels; the base learns all of them")
    seed_everything(r.seed)
    autoencoder = pretrained.load(r.vae, r.size, r.device).requires_grad_(False)
    cond_model = conditioner(r.part, r.size, r.device)
    images, captions, conditions = training_samples(r.part, r.size, r.pool, r.seed, r.augment, r.degrade, progress)
    latents, conds = encode_pool(autoencoder, cond_model, images, captions, conditions)
    denoiser = sdxl_unet(autoencoder.config.latent_channels, cond_model, r.width, r.layers, r.time_id_dim,
                         r.prediction)
    low_noise = {"t_max": REFINER_T_MAX} if timesteps is None else {"timesteps": timesteps}
    loss_options = {"snr_gamma": r.snr_gamma or None, **(low_noise if r.part == "refiner" else {})}
    return fit_denoiser(denoiser, cond_model, autoencoder, latents, conds, NoiseSchedule(r.schedule, 1000), r, loss_fn,
                        loss_options, callback=callback, callback_every=callback_every, progress=progress,
                        desc=f"sdxl {r.part} {r.size}px")


def judged_pipeline(pipe: TextToImage, recipe: SDXLRecipe):
    """What the judge scores after training: the base alone, or the refiner with the released base if that shares
    the refiner's VAE (else None, said)."""
    if recipe.part == "base":
        return pipe
    name = f"shapes-sdxl-base-{recipe.size}"
    base = pretrained.load("shapes-sdxl-base", recipe.size) if name in pretrained.available() else None
    if base is not None and vae_difference(base.vae, pipe.vae) == "":
        return SDXLPipeline(base, pipe)
    print(f"not judged: the refiner is judged with a released base over the same VAE ({recipe.vae}), and {name} is "
          f"missing or was trained over another")
    return None


def command_line():
    p, e = judged_parser("sdxl", __doc__, SDXLRecipe)
    e.add_argument("--switch", type=float, default=0.8, help="where the refiner takes over; 1: the base alone")
    return p


def main(argv: list[str] | None = None) -> int:
    args = command_line().parse_args(argv)
    start = time.perf_counter()
    if args.cmd == "eval":
        base, refiner = (pretrained.load(f"shapes-sdxl-{part}", args.size) for part in ("base", "refiner"))
        pipe = SDXLPipeline(base, refiner, args.switch)
        print_scores(evaluate(pipe, args.n, args.steps, args.guidance)[0])
        print(f"({time.perf_counter() - start:.1f} s); reproduce with:", RELEASE["base"], "and", RELEASE["refiner"])
        return 0
    r, run = settings(args)
    pipe, hist = train_from_command_line(train, r, run, start)
    judged = judged_pipeline(pipe, r) if run.eval else None
    scores = evaluate(judged, run.eval, guidance_scale=run.guidance)[0] if judged is not None else {}
    print_scores(scores)
    if run.release or run.out:
        released = {"vae": f"{r.vae}-{r.size}", "conditioner.text_encoder_2": TEXT_ENCODERS[1],
                    **({"conditioner.text_encoder": TEXT_ENCODERS[0]} if r.part == "base" else {})}
        save_release(pipe, f"shapes-sdxl-{r.part}", r, run, hist, command("sdxl", argv), released, scores)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
