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

import functools
import time
from collections.abc import Callable
from pathlib import Path

import torch

from sdlearn import pretrained
from sdlearn.course import seed_everything
from sdlearn.data import ShapesDataset, render_samples
from sdlearn.diffusion import NoiseSchedule
from sdlearn.metrics import evaluate
from sdlearn.pipeline import TextToImage, training_loss
from sdlearn.recipes import LATENT_HELP, add_options, command, exact_figures, parser
from sdlearn.recipes.t2i import (
    add_judge_options,
    encode_pool,
    fit_denoiser,
    print_scores,
    train_from_command_line,
    unet_config,
)
from sdlearn.sdxl import SDXLConditioner, SDXLPipeline, SDXLUNet, vae_difference
from sdlearn.train import History
from sdlearn.unet import UNet

RELEASE = {"base": "python -m sdlearn train sdxl --part base --steps 4000 --threads 1 --release",
           "refiner": "python -m sdlearn train sdxl --part refiner --steps 2000 --threads 1 --release"}
TEXT_ENCODERS = ("shapes-clip-32", "shapes-clip-g-32")  # CLIP ViT-L's and OpenCLIP bigG's roles
REFINER_T_MAX = 200  # the refiner learns t < 200 of 1000 (SDXL sec. 2.5)


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
    extra = {"degrade": degrade} if part == "refiner" else {}
    samples = render_samples(ShapesDataset(size, "train", seed, augment=True, length=max(k, 1), **extra), k,
                             progress)
    samples += render_samples(ShapesDataset(size, "train", seed + 1, length=max(n - k, 1), **extra), n - k,
                              progress)
    conditions = {"original_size": torch.tensor([s.original_size for s in samples], dtype=torch.float32),
                  "crop_top_left": torch.tensor([s.crop_top_left for s in samples], dtype=torch.float32)}
    if part == "base":
        conditions["target_size"] = torch.tensor([s.target_size for s in samples], dtype=torch.float32)
    else:
        conditions["aesthetic_score"] = torch.tensor([s.quality for s in samples], dtype=torch.float32)
    return torch.stack([s.image for s in samples]), [s.caption for s in samples], conditions


def train(part: str = "base", size: int = 32, steps: int = 2000, batch_size: int = 64, lr: float = 1e-3,
          pool: int = 10000, width: int = 64, layers: int = 1, time_id_dim: int = 32, augment: float = 0.5,
          degrade: float = 0.5, vae: str = "shapes-vae-xl", prediction: str = "v", schedule: str = "cosine",
          snr_gamma: float = 5.0,
          p_uncond: float = 0.1, seed: int = 0, loss_fn: Callable = training_loss,
          device: str | torch.device = "cpu", checkpoint_dir: str | Path | None = None, checkpoint_every: int = 0,
          callback: Callable[[int, TextToImage], None] | None = None, callback_every: int = 0,
          progress: bool = True) -> tuple[TextToImage, History]:
    """Train SDXL's base or refiner UNet on `pool` shapes images -> (TextToImage with the EMA weights, History).

    loss_fn(unet, schedule, z0, cond, uncond, p_uncond, prediction, snr_gamma, t_max=...) -> loss: sdlearn.pipeline's
    training_loss, or a learner's; the refiner's is called with t_max=200. Caption dropout zeroes the text
    (context and pooled), never the ids. The learning rate is half notebook 06's: the penultimate states SDXL reads
    are not normalised (shapes-clip-g's have a standard deviation near 5), and at 2e-3 a base run diverged at step
    740 of 4000 (loss 0.04 -> 0.4)."""
    if part not in ("base", "refiner"):
        raise ValueError(f"part must be 'base' or 'refiner', got {part!r}")
    seed_everything(seed)
    autoencoder = pretrained.load(vae, size, device).requires_grad_(False)
    cond_model = conditioner(part, size, device)
    images, captions, conditions = training_samples(part, size, pool, seed, augment, degrade, progress)
    latents, conds = encode_pool(autoencoder, cond_model, images, captions, conditions)
    denoiser = sdxl_unet(autoencoder.config.latent_channels, cond_model, width, layers, time_id_dim, prediction)
    if part == "refiner":
        loss_fn = functools.partial(loss_fn, t_max=REFINER_T_MAX)
    loss_options = {"prediction": prediction, "snr_gamma": snr_gamma or None}
    return fit_denoiser(denoiser, cond_model, autoencoder, latents, conds, size, NoiseSchedule(schedule, 1000), steps,
                        batch_size, lr, p_uncond, seed, loss_fn, loss_options, device, checkpoint_dir,
                        checkpoint_every, callback, callback_every, progress, f"sdxl {part} {size}px")


HELP = {
    "part": "base or refiner",
    **LATENT_HELP,
    "time_id_dim": "sinusoid channels per size / crop / quality id (SDXL: 256)",
    "augment": "fraction of the images rendered at a random original size and randomly cropped",
    "degrade": "refiner: fraction of the images degraded (blur, noise, JPEG), labelled with a lower quality",
    "vae": "the released VAE whose latents the UNet learns (shapes-vae-xl: trained on SDXL-style and degraded images)",
}


def main(argv: list[str] | None = None) -> int:
    p, t, e = parser("sdxl", __doc__)
    add_options(t, train, HELP)
    add_judge_options(t, e)
    e.add_argument("--switch", type=float, default=0.8, help="where the refiner takes over; 1: the base alone")
    args = p.parse_args(argv)
    start = time.perf_counter()
    if args.cmd == "eval":
        base, refiner = (pretrained.load(f"shapes-sdxl-{part}", args.size) for part in ("base", "refiner"))
        pipe = SDXLPipeline(base, refiner, args.switch)
        print_scores(evaluate(pipe, args.n, args.steps, args.guidance)[0])
        print(f"({time.perf_counter() - start:.1f} s); reproduce with:", RELEASE["base"], "and", RELEASE["refiner"])
        return 0
    pipe, hist = train_from_command_line(train, args, HELP, start)
    scores, judged = {}, pipe
    if args.eval and args.part == "refiner":  # judged with the released base, if it shares the refiner's VAE
        has_base = f"shapes-sdxl-base-{args.size}" in pretrained.available()
        base = pretrained.load("shapes-sdxl-base", args.size) if has_base else None
        judged = SDXLPipeline(base, pipe) if base is not None and vae_difference(base.vae, pipe.vae) == "" else None
        if judged is None:
            print(f"not judged: the refiner is judged with a released base over the same VAE ({args.vae}), and "
                  f"shapes-sdxl-base-{args.size} is missing or was trained over another")
    if args.eval and judged is not None:
        scores = evaluate(judged, args.eval, guidance_scale=args.guidance)[0]
        print_scores(scores)
    if args.release or args.out:
        figures = exact_figures(scores)
        released = {"vae": f"{args.vae}-{args.size}", "conditioner.text_encoder_2": TEXT_ENCODERS[1],
                    **({"conditioner.text_encoder": TEXT_ENCODERS[0]} if args.part == "base" else {})}
        dest = pretrained.save(pipe, f"shapes-sdxl-{args.part}", args.size, command("sdxl", argv),
                               Path(args.out) if args.out else None, released=released, dtype=torch.float16,
                               steps=str(args.steps), train_minutes=f"{hist.seconds / 60:.1f}",
                               guidance_scale=str(args.guidance), **figures)
        print("wrote", dest)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
