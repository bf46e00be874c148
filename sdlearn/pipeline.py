"""Latent diffusion (Rombach et al. 2022): a text-to-image model from a frozen VAE, a frozen text encoder and a
UNet trained on the VAE's latents.

    pipe = TextToImage(vae, text_encoder, tokenizer, unet, schedule, prediction="eps", image_size=32)
    images = pipe.generate(["a red circle on the left"], steps=50, guidance_scale=3.0, seed=0)  # [N,3,H,W] in [-1,1]
    edits = pipe.img2img(images, ["a blue circle on the left"], strength=0.6)                   # SDEdit

Training (LDM sec. 3.3, eq. 2): z_0 = the VAE's scaled latent of an image, tau(y) = the text encoder's token
states of its caption (the empty prompt one time in ten, so the same UNet learns the unconditional prediction
classifier-free guidance needs), t uniform, eps ~ N(0, I), and the loss || eps - eps_theta(z_t, t, tau(y)) ||^2.
The course's shapes model predicts v instead of eps (SD 2.x; Salimans & Ho 2022) on the cosine schedule, with
min-SNR-5 loss weights (Hang et al. 2023): the choices that measured best within a laptop's ten minutes.
Sampling: seeded latent noise z_T, at each step the guided prediction eps_u + w (eps_c - eps_u) (Ho & Salimans
2022 eq. 6) and a DDIM or DDPM step (notebook 04), then the VAE decoder D(z_0 / scale + shift).

    python -m sdlearn.pipeline train --release       # retrain the released shapes-t2i model
    python -m sdlearn.pipeline eval                  # judge it on 200 prompts, half held-out
    python -m sdlearn generate "a red circle on the left" --out out.png
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from sdlearn.diffusion import SAMPLERS, NoiseSchedule, _prediction, cfg
from sdlearn.metrics import adherence_by_group, eval_prompts
from sdlearn.text import TextEncoder, Tokenizer
from sdlearn.unet import UNet, UNetConfig
from sdlearn.vae import AutoencoderKL


def min_snr_weight(schedule: NoiseSchedule, t: torch.Tensor, prediction: str, gamma: float) -> torch.Tensor:
    """Min-SNR-gamma loss weights [B] (Hang et al. 2023, eq. 8 and sec. 3.4): weight each timestep's loss so that
    it counts as the x0 error times min(SNR, gamma). An eps error is an x0 error times SNR, a v error times
    SNR + 1, so w = min(SNR, gamma) / SNR (eps), / (SNR + 1) (v), min(SNR, gamma) (x0). The clamp keeps the
    low-noise steps, easy and many, from dominating training."""
    snr = schedule.snr(t.cpu()).float()                                         # [B]
    clamped = snr.clamp(max=gamma)
    return {"eps": clamped / snr, "v": clamped / (snr + 1), "x0": clamped}[_prediction(prediction)]


def training_loss(unet: nn.Module, schedule: NoiseSchedule, z0: torch.Tensor, context: torch.Tensor,
                  uncond_context: torch.Tensor, p_uncond: float = 0.1, prediction: str = "eps",
                  snr_gamma: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """The latent-diffusion loss (LDM eq. 2) on scaled latents z0 [B,C,h,w] with text states context [B,L,D].

    Each caption is replaced by uncond_context ([1,L,D], the empty prompt) with probability p_uncond; t is
    uniform over the schedule; the target is eps (or v / x0, per `prediction`); with snr_gamma, each sample's
    squared error is weighted by min_snr_weight (else a plain mean)."""
    B = z0.shape[0]
    drop = torch.rand(B, device=z0.device, generator=generator) < p_uncond          # [B]
    context = torch.where(drop[:, None, None], uncond_context.to(context.dtype), context)  # [B,L,D]
    t = torch.randint(0, len(schedule), (B,), device=z0.device, generator=generator)  # [B]
    noise = torch.randn(z0.shape, device=z0.device, generator=generator)            # [B,C,h,w]
    z_t = schedule.add_noise(z0, noise, t)                                          # sqrt(abar) z0 + sqrt(1-abar) eps
    err = (unet(z_t, t, context).float() - schedule.target(prediction, z0, noise, t)) ** 2
    err = err.mean(dim=tuple(range(1, err.dim())))                                  # [B]
    if snr_gamma is not None:
        err = err * min_snr_weight(schedule, t, prediction, snr_gamma).to(err.device)
    return err.mean()


def _sha256(file: Path) -> str:
    return hashlib.sha256(Path(file).read_bytes()).hexdigest()


class TextToImage(nn.Module):
    """Prompts -> images: tokenizer, text encoder, UNet denoising loop in latent space, VAE decoder.

    prediction: what the UNet outputs ("eps", "v" or "x0"); image_size: the side of the images it makes.
    Image i of a call starts from noise seeded `seed + i`, so with DDIM (eta 0) a prompt's image does not depend
    on the batch it is in."""

    def __init__(self, vae: AutoencoderKL, text_encoder: TextEncoder, tokenizer: Tokenizer, unet: UNet,
                 schedule: NoiseSchedule, prediction: str = "eps", image_size: int = 32):
        super().__init__()
        self.vae, self.text_encoder, self.unet = vae, text_encoder, unet
        self.tokenizer, self.schedule, self.prediction = tokenizer, schedule, _prediction(prediction)
        f = vae.downsampling_factor
        if image_size % f:
            raise ValueError(f"image_size {image_size} is not a multiple of the VAE's downsampling factor {f}")
        self.image_size = image_size
        self.latent_shape = (vae.config.latent_channels, image_size // f, image_size // f)  # (C, h, w)
        if unet.config.in_channels != vae.config.latent_channels:
            raise ValueError(f"the UNet takes {unet.config.in_channels} channels but the VAE's latents have "
                             f"{vae.config.latent_channels}")
        if unet.config.context_dim != text_encoder.config.width:
            raise ValueError(f"the UNet cross-attends to {unet.config.context_dim}-wide text states but the text "
                             f"encoder makes {text_encoder.config.width}-wide ones")
        self.requires_grad_(False).eval()

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    # ------------------------------------------------------------------ inputs
    @staticmethod
    def _check_prompts(prompts) -> list[str]:
        if isinstance(prompts, str):
            prompts = [prompts]
        if not isinstance(prompts, Sequence) or len(prompts) == 0:
            raise ValueError(f"expected a prompt or a non-empty list of prompts, got {prompts!r}")
        return list(prompts)

    @staticmethod
    def _check_sampling(steps, guidance_scale, sampler, eta):
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be an int >= 1, got {steps!r}")
        if not isinstance(guidance_scale, (int, float)) or not math.isfinite(guidance_scale) or guidance_scale < 0:
            raise ValueError(f"guidance_scale must be a number >= 0 (1: no guidance, 0: unconditional), "
                             f"got {guidance_scale!r}")
        if sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r}, expected one of {tuple(SAMPLERS)}")
        if sampler == "ddpm" and eta != 0:
            raise ValueError("eta is DDIM's; the DDPM sampler is DDIM with eta=1 (use sampler='ddim', eta=...)")

    @torch.no_grad()
    def encode_prompts(self, prompts: str | Sequence[str]) -> torch.Tensor:
        """Prompts -> the text encoder's token states [N, L, D] (unknown words: a ValueError naming them)."""
        tokens = self.tokenizer(self._check_prompts(prompts)).to(self.device)  # [N, L]
        return self.text_encoder(tokens)[0]                                      # [N, L, D]

    def noise(self, n: int, seed: int) -> torch.Tensor:
        """z_T for n images: image i from a generator seeded seed + i -> [n, C, h, w] on the pipeline's device."""
        return torch.stack([torch.randn(self.latent_shape, generator=torch.Generator().manual_seed(seed + i))
                            for i in range(n)]).to(self.device)

    # ------------------------------------------------------------------ the denoising loop
    @torch.no_grad()
    def denoise(self, z: torch.Tensor, context: torch.Tensor, timesteps: Sequence[int], guidance_scale: float,
                sampler: str = "ddim", eta: float = 0.0, seed: int = 0, progress: bool = True,
                callback: Callable[[dict], None] | None = None) -> torch.Tensor:
        """Run the reverse process over `timesteps` (descending) from latents z [B,C,h,w] -> z_0.

        Every step runs the UNet once on [uncond; cond] (a batch of 2B), combines the two predictions with
        classifier-free guidance, and takes one DDIM / DDPM step. callback({"i", "t", "z", "z0"}) after each."""
        step = SAMPLERS[sampler]
        B = z.shape[0]
        uncond = self.encode_prompts([""]).expand(B, -1, -1)                   # [B, L, D]
        both = torch.cat([uncond, context])                                      # [2B, L, D]
        g = torch.Generator(device=z.device).manual_seed(seed)                   # DDPM's / eta's fresh noise
        extra = {"eta": eta} if sampler == "ddim" else {}
        timesteps = list(timesteps)
        for i in tqdm(range(len(timesteps)), desc=f"{sampler} sampling", disable=not progress, leave=False):
            t, t_prev = timesteps[i], timesteps[i + 1] if i + 1 < len(timesteps) else -1
            t_batch = torch.full((2 * B,), t, dtype=torch.long, device=z.device)  # [2B]
            out_uncond, out_cond = self.unet(torch.cat([z, z]), t_batch, both).chunk(2)  # 2 x [B,C,h,w]
            out = cfg(out_uncond, out_cond, guidance_scale)                      # uncond + w (cond - uncond)
            if callback is not None:
                callback({"i": i, "t": t, "z": z, "z0": self.schedule.to_x0(self.prediction, out, z, t)})
            z = step(self.schedule, out, z, t, t_prev, prediction=self.prediction, generator=g, **extra)
        return z

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Scaled latents [B,C,h,w] -> images [B,3,H,W] in [-1, 1]."""
        return self.vae.from_latent(z).clamp(-1, 1)

    @torch.no_grad()
    def generate(self, prompts: str | Sequence[str], steps: int = 50, guidance_scale: float = 3.0, seed: int = 0,
                 sampler: str = "ddim", eta: float = 0.0, batch_size: int = 256, progress: bool = True,
                 callback: Callable[[dict], None] | None = None) -> torch.Tensor:
        """Text to images [N,3,H,W] in [-1,1], on the CPU: `steps` DDIM (or DDPM) steps with guidance scale w."""
        prompts = self._check_prompts(prompts)
        self._check_sampling(steps, guidance_scale, sampler, eta)
        context = self.encode_prompts(prompts)                                   # [N, L, D], checks every word
        timesteps = self.schedule.timesteps(steps).tolist()
        images = []
        for i in range(0, len(prompts), batch_size):
            z = self.noise(len(prompts[i:i + batch_size]), seed + i)                 # z_T [b, C, h, w]
            z = self.denoise(z, context[i:i + batch_size], timesteps, guidance_scale, sampler, eta, seed + i,
                             progress, callback)
            images.append(self.decode(z).cpu())
        return torch.cat(images)

    @torch.no_grad()
    def img2img(self, images: torch.Tensor, prompts: str | Sequence[str], strength: float = 0.5, steps: int = 50,
                guidance_scale: float = 3.0, seed: int = 0, sampler: str = "ddim", eta: float = 0.0,
                progress: bool = True) -> torch.Tensor:
        """SDEdit (Meng et al. 2022): encode images [N,3,H,W] in [-1,1], noise them to t = strength * T, and
        denoise from there with the prompts. strength 0 returns the (re-decoded) input, 1 ignores it."""
        prompts = self._check_prompts(prompts)
        self._check_sampling(steps, guidance_scale, sampler, eta)
        if not 0 <= strength <= 1:
            raise ValueError(f"strength must be in [0, 1], got {strength!r}")
        if not isinstance(images, torch.Tensor) or images.shape[1:] != (3, self.image_size, self.image_size):
            got = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"expected images [N, 3, {self.image_size}, {self.image_size}] in [-1, 1], got {got}")
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts: give one prompt per image")
        context = self.encode_prompts(prompts)
        z0 = self.vae.to_latent(images.to(self.device), sample=False)            # [N, C, h, w]
        # the last `strength` of the sampling schedule: its first step is where we noise to
        timesteps = self.schedule.timesteps(steps).tolist()
        timesteps = timesteps[len(timesteps) - int(round(strength * steps)):]
        if not timesteps:
            return self.decode(z0).cpu()
        t = torch.full((len(z0),), timesteps[0], dtype=torch.long, device=self.device)
        z = self.schedule.add_noise(z0, self.noise(len(z0), seed), t)           # q(z_t | z_0)
        return self.decode(self.denoise(z, context, timesteps, guidance_scale, sampler, eta, seed, progress)).cpu()

    # ------------------------------------------------------------------ release
    def release_metadata(self, vae: str, text_encoder: str) -> dict[str, str]:
        """What `from_release` needs besides the UNet's weights: the configs and the frozen parts' releases."""
        from sdlearn import pretrained

        s = self.schedule
        return {
            "unet_config": json.dumps(asdict(self.unet.config)),
            "schedule": json.dumps({"kind": s.kind, "num_steps": s.num_steps, "beta_start": s.beta_start,
                                    "beta_end": s.beta_end}),
            "prediction": self.prediction, "image_size": str(self.image_size),
            "vae": vae, "vae_sha256": _sha256(pretrained.WEIGHTS / f"{vae}.safetensors"),
            "text_encoder": text_encoder,
            "text_encoder_sha256": _sha256(pretrained.WEIGHTS / f"{text_encoder}.safetensors"),
        }

    @classmethod
    def from_release(cls, state: dict[str, torch.Tensor], meta: dict[str, str], source: str) -> "TextToImage":
        """Rebuild a released pipeline: the UNet from `state`, the VAE and text encoder from their releases."""
        from sdlearn import pretrained

        parts = {}
        for key in ("vae", "text_encoder"):
            name = meta[key]
            file = pretrained.WEIGHTS / f"{name}.safetensors"
            if not file.exists():
                raise FileNotFoundError(f"{source} needs the released {name}, which is missing")
            if _sha256(file) != meta[f"{key}_sha256"]:
                raise ValueError(f"{source} was trained on another {name} than the one installed (its sha256 "
                                 f"differs): retrain it with the command in its metadata")
            stem, _, size = name.rpartition("-")
            parts[key] = pretrained.load(stem, int(size))
        unet = UNet(UNetConfig(**json.loads(meta["unet_config"])))
        pretrained.load_state_checked(unet, {k: v.float() for k, v in state.items()}, source)
        schedule = NoiseSchedule(**json.loads(meta["schedule"]))
        return cls(parts["vae"], parts["text_encoder"], Tokenizer.for_encoder(parts["text_encoder"]), unet, schedule,
                   meta["prediction"], int(meta["image_size"]))


# ----------------------------------------------------------------------------
# judging a pipeline (the judge set: sdlearn.metrics.eval_prompts), and training the released shapes model


@torch.no_grad()
def evaluate(pipe: TextToImage, n: int = 200, steps: int = 50, guidance_scale: float = 3.0, seed: int = 123,
             progress: bool = True) -> tuple[dict[str, dict[str, float]], torch.Tensor, list[str]]:
    """Generate one image for each of n judge prompts (half held-out) and score them.
    -> (scores by group, images, captions)."""
    captions, n_train = eval_prompts(n, pipe.image_size, seed)
    images = torch.cat([pipe.generate(captions[i:i + 100], steps, guidance_scale, seed=seed + i, progress=False)
                        for i in tqdm(range(0, n, 100), desc="judging", disable=not progress)])
    return adherence_by_group(images, captions, n_train), images, captions


@torch.no_grad()
def encode_pool(vae: AutoencoderKL, text_encoder: TextEncoder, tokenizer: Tokenizer, images: torch.Tensor,
                captions: Sequence[str], batch_size: int = 500) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed bank of training pairs, encoded once: (scaled latents [N,C,h,w], text states [N,L,D]) on the CPU.
    The frozen encoders then cost nothing per training step."""
    dev = next(vae.parameters()).device
    z = [vae.to_latent(images[i:i + batch_size].to(dev), sample=False).cpu() for i in range(0, len(images), batch_size)]
    c = [text_encoder(tokenizer(list(captions[i:i + batch_size])).to(dev))[0].cpu()
         for i in range(0, len(captions), batch_size)]
    return torch.cat(z), torch.cat(c)


def shapes_unet_config(latent_channels: int, context_dim: int, width: int = 64, layers: int = 1,
                       heads: int = 4) -> UNetConfig:
    """The shapes UNet: two levels (8x8 and 4x4 on 32 px images), attention at both and in the mid block."""
    return UNetConfig(in_channels=latent_channels, out_channels=latent_channels, channels=(width, 2 * width),
                      layers_per_block=layers, attention=(True, True), heads=heads, context_dim=context_dim,
                      norm_groups=8)


def train_shapes_t2i(size: int = 32, steps: int = 2000, batch_size: int = 64, lr: float = 2e-3, pool: int = 10000,
                     width: int = 64, layers: int = 1, prediction: str = "v", schedule: str = "cosine",
                     snr_gamma: float | None = 5.0, p_uncond: float = 0.1, seed: int = 0,
                     device: str | torch.device = "cpu", progress: bool = True, checkpoint_dir: str | Path | None = None, callback: Callable[[int, TextToImage], None] | None = None,
                     callback_every: int = 0):
    """Train a latent text-to-image UNet on the shapes data with the released VAE and text encoder (frozen).
    callback(step, pipeline with the EMA weights) every `callback_every` steps.
    -> (TextToImage with the EMA weights, History)."""
    from sdlearn import pretrained
    from sdlearn.course import seed_everything
    from sdlearn.data import ShapesDataset
    from sdlearn.text import render_pool
    from sdlearn.train import TrainConfig, fit

    seed_everything(seed)
    vae = pretrained.load("shapes-vae", size, device).requires_grad_(False)
    text_encoder = pretrained.load("shapes-clip", 32, device).requires_grad_(False)
    tokenizer = Tokenizer.for_encoder(text_encoder)
    images, captions = render_pool(ShapesDataset(size=size, split="train", seed=seed), pool, progress)
    latents, contexts = encode_pool(vae, text_encoder, tokenizer, images, captions)
    empty = text_encoder(tokenizer([""]).to(device))[0]                        # [1, L, D]
    sched = NoiseSchedule(schedule, 1000)
    unet = UNet(shapes_unet_config(vae.config.latent_channels, text_encoder.config.width, width, layers)).to(device)

    def batch(step):  # a pure function of the step: resuming from a checkpoint sees the same batches
        idx = torch.randint(len(latents), (batch_size,), generator=torch.Generator().manual_seed(seed * 100003 + step))
        return latents[idx].to(device), contexts[idx].to(device)

    pipeline = lambda ema: TextToImage(vae, text_encoder, tokenizer, ema, sched, prediction, size)

    def on_step(step, model, ema):
        callback(step, pipeline(ema))
        model.train()

    hist = fit(unet, lambda m, b: training_loss(m, sched, *b, empty, p_uncond, prediction, snr_gamma), batch,
               TrainConfig(steps=steps, lr=lr, warmup=100, ema_decay=1 - 3 / max(steps, 6), callback_every=callback_every,
                           desc=f"latent diffusion {size}px"),
               callback=on_step if callback else None, progress=progress, checkpoint_dir=checkpoint_dir)
    return pipeline(hist.ema), hist


def main(argv: list[str] | None = None) -> int:
    import sys

    from sdlearn import pretrained

    parser = argparse.ArgumentParser(prog="python -m sdlearn.pipeline")
    sub = parser.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="train the shapes text-to-image model (and release it with --release)")
    t.add_argument("--size", type=int, default=32)
    t.add_argument("--steps", type=int, default=2000)
    t.add_argument("--batch-size", type=int, default=64)
    t.add_argument("--lr", type=float, default=2e-3)
    t.add_argument("--pool", type=int, default=10000, help="training images rendered and encoded once")
    t.add_argument("--width", type=int, default=64, help="channels of the UNet's first level")
    t.add_argument("--layers", type=int, default=1, help="ResBlocks per level")
    t.add_argument("--prediction", choices=("eps", "v", "x0"), default="v")
    t.add_argument("--schedule", default="cosine")
    t.add_argument("--snr-gamma", type=float, default=5.0, help="min-SNR loss weighting (0: a plain mean)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    t.add_argument("--device", default="cpu")
    t.add_argument("--checkpoint-dir", default=None, help="save checkpoints here, and resume from them")
    t.add_argument("--eval", type=int, default=200, help="judge prompts (half held-out) to score")
    t.add_argument("--guidance", type=float, default=3.0, help="guidance scale for the evaluation")
    t.add_argument("--release", action="store_true", help="write sdlearn/weights/shapes-t2i-<size>.safetensors")
    t.add_argument("--out", default=None, help="write the weights here instead")
    e = sub.add_parser("eval", help="judge the released shapes-t2i model")
    e.add_argument("--size", type=int, default=32)
    e.add_argument("--n", type=int, default=200)
    e.add_argument("--steps", type=int, default=50)
    e.add_argument("--guidance", type=float, default=3.0)
    args = parser.parse_args(argv)
    if args.cmd == "eval":
        start = time.perf_counter()
        scores, _, _ = evaluate(pretrained.load("shapes-t2i", args.size), args.n, args.steps, args.guidance)
        for group, s in scores.items():
            print(f"{group:25} ({s.pop('prompts'):3} prompts): " + ", ".join(f"{k} {v:.3f}" for k, v in s.items()))
        print(f"({time.perf_counter() - start:.1f} s); reproduce with:", pretrained.metadata("shapes-t2i", args.size)["command"])
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    pipe, hist = train_shapes_t2i(args.size, args.steps, args.batch_size, args.lr, args.pool, args.width, args.layers,
                                  args.prediction, args.schedule, args.snr_gamma or None, seed=args.seed, device=args.device,
                                  checkpoint_dir=args.checkpoint_dir)
    pipe = pipe.cpu()
    minutes = (time.perf_counter() - start) / 60
    print(f"trained {args.steps} steps in {hist.seconds / 60:.1f} min ({minutes:.1f} min with rendering and "
          f"encoding, {torch.get_num_threads()} threads)")
    scores, _, _ = evaluate(pipe, args.eval, guidance_scale=args.guidance)
    for group, s in scores.items():
        print(f"{group:25} ({s['prompts']:3} prompts): exact {s['exact']:.3f}, colour {s['color']:.3f}, "
              f"shape {s['shape']:.3f}, position {s['position']:.3f}")
    if args.release or args.out:
        command = "python -m sdlearn.pipeline " + " ".join(argv if argv is not None else sys.argv[1:])
        meta = pipe.release_metadata(vae=f"shapes-vae-{args.size}", text_encoder="shapes-clip-32")
        meta.update({"class": "sdlearn.pipeline.TextToImage",
                     "command": command, "steps": str(args.steps), "train_minutes": f"{hist.seconds / 60:.1f}",
                     "guidance_scale": str(args.guidance),
                     **{f"exact_{k.replace(' ', '_').replace(',', '')}": f"{s['exact']:.3f}" for k, s in scores.items()}})
        dest = Path(args.out) if args.out else pretrained.path("shapes-t2i", args.size)
        pretrained.save_file_atomic({k: v.half() for k, v in pipe.unet.state_dict().items()}, dest, meta)
        print("wrote", dest)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
