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
from pathlib import Path
from typing import Callable, Sequence

import torch

from sdlearn import pretrained
from sdlearn.course import seed_everything
from sdlearn.data import ShapesDataset, render_pool
from sdlearn.diffusion import NoiseSchedule
from sdlearn.metrics import evaluate
from sdlearn.pipeline import TextConditioner, TextToImage, training_loss
from sdlearn.recipes import add_options, command, options, parser, set_threads
from sdlearn.train import History, TrainConfig, fit
from sdlearn.unet import UNet, UNetConfig
from sdlearn.vae import AutoencoderKL

RELEASE = "python -m sdlearn train t2i --steps 4000 --threads 2 --release"


def unet_config(latent_channels: int, context_dim: int, width: int = 64, layers: int = 1,
                heads: int = 4) -> UNetConfig:
    """The shapes UNet: two levels (8x8 and 4x4 on 32 px images), attention at both and in the mid block."""
    return UNetConfig(in_channels=latent_channels, out_channels=latent_channels, channels=(width, 2 * width),
                      layers_per_block=layers, attention=(True, True), heads=heads, context_dim=context_dim,
                      norm_groups=8)


@torch.no_grad()
def encode_pool(vae: AutoencoderKL, conditioner: TextConditioner, images: torch.Tensor, captions: Sequence[str],
                batch_size: int = 500) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """A fixed bank of training pairs, encoded once, on the CPU: (scaled latents [N,C,h,w], conditions {name: [N,...]})."""
    dev = next(vae.parameters()).device
    z = [vae.to_latent(images[i:i + batch_size].to(dev), sample=False).cpu() for i in range(0, len(images), batch_size)]
    conds = [conditioner(captions[i:i + batch_size]) for i in range(0, len(captions), batch_size)]
    return torch.cat(z), {k: torch.cat([c[k].cpu() for c in conds]) for k in conds[0]}


def train(size: int = 32, steps: int = 2000, batch_size: int = 64, lr: float = 2e-3, pool: int = 10000,
          width: int = 64, layers: int = 1, prediction: str = "v", schedule: str = "cosine", snr_gamma: float = 5.0,
          p_uncond: float = 0.1, seed: int = 0, loss_fn: Callable = training_loss,
          device: str | torch.device = "cpu", checkpoint_dir: str | Path | None = None, checkpoint_every: int = 0,
          callback: Callable[[int, TextToImage], None] | None = None, callback_every: int = 0,
          progress: bool = True) -> tuple[TextToImage, History]:
    """Train the latent text-to-image UNet on `pool` shapes images -> (TextToImage with the EMA weights, History).

    loss_fn(unet, schedule, z0, cond, uncond, p_uncond, prediction, snr_gamma) -> loss: sdlearn.pipeline's
    training_loss, or a learner's (notebook 06). snr_gamma 0: a plain mean. callback(step, pipeline with the EMA
    weights) every `callback_every` steps. With checkpoint_dir, a stopped run resumes where it stopped."""
    seed_everything(seed)
    vae = pretrained.load("shapes-vae", size, device).requires_grad_(False)
    conditioner = TextConditioner(pretrained.load("shapes-clip", 32, device).requires_grad_(False))
    images, captions = render_pool(ShapesDataset(size=size, split="train", seed=seed), pool, progress)
    latents, conds = encode_pool(vae, conditioner, images, captions)
    uncond = conditioner.unconditional(1)                                     # {"context": [1, L, D]}
    sched = NoiseSchedule(schedule, 1000)
    unet = UNet(unet_config(vae.config.latent_channels, conditioner.dims["context"], width, layers)).to(device)

    def batch(step):  # a pure function of the step: a resumed run sees the same batches
        idx = torch.randint(len(latents), (batch_size,), generator=torch.Generator().manual_seed(seed * 100003 + step))
        return latents[idx].to(device), {k: v[idx].to(device) for k, v in conds.items()}

    def loss(model, b):
        return loss_fn(model, sched, *b, uncond, p_uncond, prediction, snr_gamma or None)

    pipeline = functools.partial(TextToImage, conditioner, schedule=sched, vae=vae, prediction=prediction,
                                 image_size=size)

    def on_step(step, model, ema):
        callback(step, pipeline(ema))
        model.train()

    hist = fit(unet, loss, batch,
               TrainConfig(steps=steps, lr=lr, warmup=100, ema_decay=1 - 3 / max(steps, 6),
                           callback_every=callback_every, checkpoint_every=checkpoint_every,
                           desc=f"latent diffusion {size}px"),
               callback=on_step if callback else None, progress=progress, checkpoint_dir=checkpoint_dir)
    return pipeline(hist.ema), hist


HELP = {
    "size": "image size (the released VAE of this size is used)",
    "steps": "training steps",
    "batch_size": "training batch",
    "lr": "AdamW peak learning rate (warm-up, then cosine decay)",
    "pool": "training images rendered and encoded once",
    "width": "channels of the UNet's first level (the second has twice)",
    "layers": "ResBlocks per level",
    "prediction": "what the UNet predicts: eps, v or x0",
    "schedule": "noise schedule: linear, scaled_linear or cosine",
    "snr_gamma": "min-SNR-gamma loss weighting (0: a plain mean)",
    "p_uncond": "probability of training on the empty prompt (for classifier-free guidance)",
    "seed": "seed of the weights, the data and the batches",
    "device": "cpu, cuda, ...",
    "checkpoint_dir": "save checkpoints here; run the same command again to resume from the latest",
    "checkpoint_every": "steps between checkpoints (0: only at the end)",
}


def _print_scores(scores: dict) -> None:
    for group, s in scores.items():
        print(f"{group:25} ({s['prompts']:3} prompts): exact {s['exact']:.3f}, colour {s['color']:.3f}, "
              f"shape {s['shape']:.3f}, position {s['position']:.3f}, count {s['count']:.3f}")


def main(argv: list[str] | None = None) -> int:
    p, t, e = parser("t2i", __doc__)
    add_options(t, train, HELP)
    t.add_argument("--eval", type=int, default=200, help="judge prompts (half held-out) to score; 0: none")
    t.add_argument("--guidance", type=float, default=3.0, help="guidance scale of the evaluation")
    e.add_argument("--size", type=int, default=32)
    e.add_argument("--n", type=int, default=200, help="judge prompts, half held-out")
    e.add_argument("--steps", type=int, default=50, help="DDIM steps")
    e.add_argument("--guidance", type=float, default=3.0)
    args = p.parse_args(argv)
    start = time.perf_counter()
    if args.cmd == "eval":
        scores, _, _ = evaluate(pretrained.load("shapes-t2i", args.size), args.n, args.steps, args.guidance)
        _print_scores(scores)
        print(f"({time.perf_counter() - start:.1f} s); reproduce with:",
              pretrained.metadata("shapes-t2i", args.size)["command"])
        return 0
    set_threads(args)
    pipe, hist = train(**options(args, HELP))
    pipe = pipe.cpu()
    print(f"trained {args.steps} steps in {hist.seconds / 60:.1f} min ({(time.perf_counter() - start) / 60:.1f} min "
          f"with rendering and encoding, {torch.get_num_threads()} threads)")
    scores = evaluate(pipe, args.eval, guidance_scale=args.guidance)[0] if args.eval else {}
    _print_scores(scores)
    if args.release or args.out:
        figures = {f"exact_{k.replace(' ', '_').replace(',', '')}": f"{s['exact']:.3f}" for k, s in scores.items()}
        dest = pretrained.save(pipe, "shapes-t2i", args.size, command("t2i", argv),
                               Path(args.out) if args.out else None,
                               released={"vae": f"shapes-vae-{args.size}", "conditioner.text_encoder": "shapes-clip-32"},
                               dtype=torch.float16, steps=str(args.steps), train_minutes=f"{hist.seconds / 60:.1f}",
                               guidance_scale=str(args.guidance), **figures)
        print("wrote", dest)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
