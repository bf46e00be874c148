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
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

from sdlearn import pretrained
from sdlearn.course import seed_everything
from sdlearn.data import ShapesDataset, render_pool
from sdlearn.diffusion import NoiseSchedule
from sdlearn.metrics import evaluate
from sdlearn.pipeline import TextConditioner, TextToImage, training_loss
from sdlearn.recipes import LATENT_HELP, add_options, command, exact_figures, options, parser, reproduce, set_threads
from sdlearn.train import History, TrainConfig, fit
from sdlearn.unet import UNet, UNetConfig
from sdlearn.vae import AutoencoderKL

RELEASE = "python -m sdlearn train t2i --steps 4000 --threads 2 --release"


def unet_config(latent_channels: int, context_dim: int, width: int = 64, layers: int = 1, heads: int = 4,
                prediction: str = "v", added_cond_dim: int = 0) -> UNetConfig:
    """The shapes UNet: two levels (8x8 and 4x4 on 32 px images), attention at both and in the mid block."""
    return UNetConfig(in_channels=latent_channels, out_channels=latent_channels, channels=(width, 2 * width),
                      layers_per_block=layers, attention=(True, True), heads=heads, context_dim=context_dim,
                      norm_groups=8, prediction=prediction, added_cond_dim=added_cond_dim)


@torch.no_grad()
def encode_pool(vae: AutoencoderKL, conditioner: nn.Module, images: torch.Tensor, captions: Sequence[str],
                conditions: dict[str, torch.Tensor] | None = None,
                batch_size: int = 500) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """A fixed bank of training pairs, encoded once, on the CPU: (scaled latents [N,C,h,w], conditions {name: [N,...]}).
    conditions: per-image inputs of the conditioner besides the captions ({name: [N, ...]}, e.g. SDXL's sizes)."""
    dev = next(vae.parameters()).device
    z = [vae.to_latent(images[i:i + batch_size].to(dev), sample=False).cpu() for i in range(0, len(images), batch_size)]
    conds = [conditioner(captions[i:i + batch_size], **{k: v[i:i + batch_size] for k, v in (conditions or {}).items()})
             for i in range(0, len(captions), batch_size)]
    return torch.cat(z), {k: torch.cat([c[k].cpu() for c in conds]) for k in conds[0]}


def fit_denoiser(denoiser: nn.Module, conditioner: nn.Module, vae: AutoencoderKL, latents: torch.Tensor,
                 conds: dict[str, torch.Tensor], size: int, schedule, steps: int, batch_size: int,
                 lr: float, p_uncond: float, seed: int, loss_fn: Callable, loss_options: dict, device,
                 checkpoint_dir, checkpoint_every: int, callback, callback_every: int, progress: bool,
                 desc: str) -> tuple[TextToImage, History]:
    """What every latent recipe shares, once its bank is encoded: a denoiser (a UNet, an MMDiT) trained on batches
    drawn from the bank with loss_fn(model, schedule, z0, cond, uncond, p_uncond, **loss_options) (uncond: the
    conditioner's twins of its dropout_keys), AdamW with warm-up and cosine decay, an EMA, checkpoints.
    -> (the TextToImage around the EMA weights, History)."""
    uncond = {k: v for k, v in conditioner.unconditional(1).items() if k in conditioner.dropout_keys}
    denoiser = denoiser.to(device)
    pipeline = functools.partial(TextToImage, conditioner, schedule=schedule, vae=vae, image_size=size)

    def batch(step):  # a pure function of the step: a resumed run sees the same batches
        idx = torch.randint(len(latents), (batch_size,), generator=torch.Generator().manual_seed(seed * 100003 + step))
        return latents[idx].to(device), {k: v[idx].to(device) for k, v in conds.items()}

    def loss(model, b):
        return loss_fn(model, schedule, *b, uncond, p_uncond, **loss_options)

    def on_step(step, model, ema):
        callback(step, pipeline(ema))
        model.train()

    hist = fit(denoiser, loss, batch,
               TrainConfig(steps=steps, lr=lr, warmup=100, ema_decay=1 - 3 / max(steps, 6),
                           callback_every=callback_every, checkpoint_every=checkpoint_every, desc=desc),
               callback=on_step if callback else None, progress=progress, checkpoint_dir=checkpoint_dir)
    return pipeline(hist.ema), hist


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
    unet = UNet(unet_config(vae.config.latent_channels, conditioner.dims["context"], width, layers,
                            prediction=prediction))
    return fit_denoiser(unet, conditioner, vae, latents, conds, size, NoiseSchedule(schedule, 1000), steps, batch_size,
                        lr, p_uncond, seed, loss_fn, {"prediction": prediction, "snr_gamma": snr_gamma or None},
                        device, checkpoint_dir, checkpoint_every, callback, callback_every, progress,
                        f"latent diffusion {size}px")


HELP = LATENT_HELP


def print_scores(scores: dict) -> None:
    for group, s in scores.items():
        print(f"{group:25} ({s['prompts']:3} prompts): exact {s['exact']:.3f}, colour {s['color']:.3f}, "
              f"shape {s['shape']:.3f}, position {s['position']:.3f}, count {s['count']:.3f}")


def train_from_command_line(train_fn: Callable, args, helps: dict[str, str],
                            start: float) -> tuple[TextToImage, History]:
    """A latent recipe's `train` run with the command line's options and threads -> (pipeline on the CPU, History)."""
    set_threads(args)
    pipe, hist = train_fn(**options(args, helps))
    print(f"trained {args.steps} steps in {hist.seconds / 60:.1f} min ({(time.perf_counter() - start) / 60:.1f} min "
          f"with rendering and encoding, {torch.get_num_threads()} threads)")
    return pipe.cpu(), hist


def add_judge_options(train_parser, eval_parser) -> None:
    """The judge's options of a text-to-image recipe's `train` (after training) and `eval` (a release)."""
    train_parser.add_argument("--eval", type=int, default=200, help="judge prompts (half held-out) to score; 0: none")
    train_parser.add_argument("--guidance", type=float, default=3.0, help="guidance scale of the evaluation")
    eval_parser.add_argument("--size", type=int, default=32, help="image size of the release")
    eval_parser.add_argument("--n", type=int, default=200, help="judge prompts, half held-out")
    eval_parser.add_argument("--steps", type=int, default=50, help="sampling steps")
    eval_parser.add_argument("--guidance", type=float, default=3.0, help="guidance scale")


def text_to_image_main(recipe: str, release: str, doc: str, train_fn: Callable, helps: dict[str, str],
                       released: Callable, argv: list[str] | None) -> int:
    """The command line of a one-model text-to-image recipe (t2i, mmdit): `eval` judges the release; `train` trains,
    judges and (with --release / --out) writes it, naming the releases it holds (released(args) -> {part: name})."""
    p, t, e = parser(recipe, doc)
    add_options(t, train_fn, helps)
    add_judge_options(t, e)
    args = p.parse_args(argv)
    start = time.perf_counter()
    if args.cmd == "eval":
        scores, _, _ = evaluate(pretrained.load(release, args.size), args.n, args.steps, args.guidance)
        print_scores(scores)
        reproduce(release, args.size, start)
        return 0
    pipe, hist = train_from_command_line(train_fn, args, helps, start)
    scores = evaluate(pipe, args.eval, guidance_scale=args.guidance)[0] if args.eval else {}
    print_scores(scores)
    if args.release or args.out:
        dest = pretrained.save(pipe, release, args.size, command(recipe, argv), Path(args.out) if args.out else None,
                               released=released(args), dtype=torch.float16, steps=str(args.steps),
                               train_minutes=f"{hist.seconds / 60:.1f}", guidance_scale=str(args.guidance),
                               **exact_figures(scores))
        print("wrote", dest)
    return 0


def main(argv: list[str] | None = None) -> int:
    return text_to_image_main("t2i", "shapes-t2i", __doc__, train, HELP, lambda args: {
        "vae": f"shapes-vae-{args.size}", "conditioner.text_encoder": "shapes-clip-32"}, argv)


if __name__ == "__main__":
    raise SystemExit(main())
