"""Latent diffusion (Rombach et al. 2022): a text-to-image pipeline made of four parts.

    conditioner = TextConditioner(text_encoder)             # prompts -> cond {"context": [N, L, D]}
    pipe = TextToImage(conditioner, unet, schedule, vae, prediction="v", image_size=32)
    images = pipe.generate(["a red circle on the left"], steps=50, guidance_scale=3.0, seed=0)  # [N,3,H,W] in [-1,1]
    edits = pipe.img2img(images, ["a blue circle on the left"], strength=0.6)                   # SDEdit

The parts: a **conditioner** turns prompts into the dict of tensors the denoiser reads (SD 1.x / 2.x: one text
encoder's token states; SDXL adds pooled text and size ids, SD3 a third encoder); a **denoiser** (the UNet, later
the MMDiT) called as denoiser(z_t, t, **cond); a **schedule** that says which points a sampler visits and how it
steps (sdlearn.diffusion; notebook 08 adds rectified flow); and the **VAE** whose latents the denoiser works in.
The denoising loop is sdlearn.diffusion.sample, the same for every model.

Training (LDM sec. 3.3, eq. 2): z_0 = the VAE's scaled latent of an image, tau(y) = the conditioner's output for
its caption (the empty prompt's one time in ten, so the same network learns the unconditional prediction
classifier-free guidance needs), t uniform, eps ~ N(0, I), and the loss || eps - eps_theta(z_t, t, tau(y)) ||^2.
The course's shapes model predicts v instead of eps (SD 2.x; Salimans & Ho 2022) on the cosine schedule, with
min-SNR-5 loss weights (Hang et al. 2023): the choices that measured best within a laptop's ten minutes
(its recipe: sdlearn.recipes.t2i).
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence

import torch
from torch import nn

from sdlearn.diffusion import Denoiser, NoiseSchedule, Schedule, _prediction, sample
from sdlearn.text import TextEncoder, Tokenizer
from sdlearn.vae import AutoencoderKL


def min_snr_weight(schedule: NoiseSchedule, t: torch.Tensor, prediction: str, gamma: float) -> torch.Tensor:
    """Min-SNR-gamma loss weights [B] (Hang et al. 2023, eq. 8 and sec. 3.4): weight each timestep's loss so that
    it counts as the x0 error times min(SNR, gamma). An eps error is an x0 error times SNR, a v error times
    SNR + 1, so w = min(SNR, gamma) / SNR (eps), / (SNR + 1) (v), min(SNR, gamma) (x0). The clamp keeps the
    low-noise steps, easy and many, from dominating training."""
    snr = schedule.snr(t.cpu()).float()                                         # [B]
    clamped = snr.clamp(max=gamma)
    return {"eps": clamped / snr, "v": clamped / (snr + 1), "x0": clamped}[_prediction(prediction)]


def drop_conditions(cond: dict[str, torch.Tensor], uncond: dict[str, torch.Tensor], p: float,
                    generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """Caption dropout for classifier-free guidance: each sample's entries that have an unconditional twin in
    `uncond` ([1, ...]) are replaced by it with probability p, all together; entries without a twin are kept."""
    first = next(iter(cond.values()))
    drop = torch.rand(first.shape[0], device=first.device, generator=generator) < p   # [B]
    out = dict(cond)
    for k, u in uncond.items():
        mask = drop.view(-1, *[1] * (cond[k].ndim - 1))                                 # [B,1,...]
        out[k] = torch.where(mask, u.to(cond[k].device, cond[k].dtype), cond[k])
    return out


def training_loss(model: nn.Module, schedule: NoiseSchedule, z0: torch.Tensor, cond: dict[str, torch.Tensor],
                  uncond: dict[str, torch.Tensor], p_uncond: float = 0.1, prediction: str = "eps",
                  snr_gamma: float | None = None, generator: torch.Generator | None = None,
                  t_max: int | None = None, timesteps: Callable[[int], torch.Tensor] | None = None) -> torch.Tensor:
    """The latent-diffusion loss (LDM eq. 2) on scaled latents z0 [B,C,h,w] with conditions cond (e.g.
    {"context": [B,L,D]}), the model called as model(z_t, t, **cond).

    Conditions are dropped to their unconditional twins (`uncond`, [1,...] each) with probability p_uncond; t is
    uniform over the schedule (or over [0, t_max): SDXL's refiner only learns the low-noise end; or drawn by
    timesteps(B) -> [B] ints, e.g. a learner's refiner_timesteps, notebook 07); the target is
    eps (or v / x0, per `prediction`); with snr_gamma, each sample's squared error is weighted by min_snr_weight
    (else a plain mean)."""
    B = z0.shape[0]
    cond = drop_conditions(cond, uncond, p_uncond, generator)
    if timesteps is None:
        t = torch.randint(0, t_max or len(schedule), (B,), device=z0.device, generator=generator)  # [B]
    else:
        t = timesteps(B).to(z0.device)                                              # [B]
        if t.shape != (B,) or t.is_floating_point():
            raise ValueError(f"timesteps({B}) must give {B} integer timesteps [B], got {t.dtype} {tuple(t.shape)}")
    noise = torch.randn(z0.shape, device=z0.device, generator=generator)            # [B,C,h,w]
    z_t = schedule.add_noise(z0, noise, t)                                          # sqrt(abar) z0 + sqrt(1-abar) eps
    err = (model(z_t, t, **cond).float() - schedule.target(prediction, z0, noise, t)) ** 2
    err = err.mean(dim=tuple(range(1, err.dim())))                                  # [B]
    if snr_gamma is not None:
        err = err * min_snr_weight(schedule, t, prediction, snr_gamma).to(err.device)
    return err.mean()


class Conditioner(nn.Module, ABC):
    """tau_theta, the conditioning network of LDM (sec. 3.3): prompts (and other conditions) -> the dict of tensors
    a denoiser reads (`sdlearn.diffusion.Denoiser`), and its unconditional twin (guidance, caption dropout).

    A conditioner says what it makes (`dims`: entry -> width), which of those entries caption dropout replaces by
    their twins (`dropout_keys`) and which keyword conditions it encodes itself (`takes`: SDXL's sizes), and
    implements `encode` and `encode_unconditional`. Any other condition (an image, a map, a mask) passes through to
    the denoiser as it came, and is the same in both halves of a guided batch: T_theta for text, a module of its
    own (a ControlNet, an adapter) for the rest."""

    dropout_keys: tuple[str, ...] = ()
    takes: tuple[str, ...] = ()

    @property
    @abstractmethod
    def dims(self) -> dict[str, int]:
        """The width of each entry it makes (the last axis)."""

    @abstractmethod
    def encode(self, prompts: list[str], **conditions) -> dict[str, torch.Tensor]:
        """N prompts and the conditions it takes -> its entries, each [N, ...]."""

    @abstractmethod
    def encode_unconditional(self, n: int, **conditions) -> dict[str, torch.Tensor]:
        """The unconditional twin of each entry, [n, ...]."""

    def _split(self, conditions: dict) -> tuple[dict, dict]:
        own = {k: v for k, v in conditions.items() if k in self.takes}
        return own, {k: v for k, v in conditions.items() if k not in self.takes}

    def forward(self, prompts: Sequence[str], **conditions) -> dict:
        own, passed = self._split(conditions)
        return {**self.encode(list(prompts), **own), **passed}

    def unconditional(self, n: int = 1, **conditions) -> dict[str, torch.Tensor]:
        own, _ = self._split(conditions)
        return self.encode_unconditional(n, **own)


class TextConditioner(Conditioner):
    """tau_theta of SD 1.x / 2.x: prompts -> {"context": the text encoder's token states [N, L, D]}.

    The unconditional twin (guidance, caption dropout) is the empty prompt "" through the same encoder."""

    dropout_keys = ("context",)

    def __init__(self, text_encoder: TextEncoder, tokenizer: Tokenizer | None = None):
        super().__init__()
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer or Tokenizer.for_encoder(text_encoder)

    def init_args(self) -> dict:
        return {"text_encoder": self.text_encoder}

    @property
    def dims(self) -> dict[str, int]:
        return {"context": self.text_encoder.config.width}

    def encode(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        device = next(self.text_encoder.parameters()).device
        tokens = self.tokenizer(prompts).to(device)                  # [N, L]; an unknown word: a ValueError naming it
        return {"context": self.text_encoder(tokens)[0]}             # [N, L, D]

    def encode_unconditional(self, n: int) -> dict[str, torch.Tensor]:
        return self.encode([""] * n)


def _check_prompts(prompts) -> list[str]:
    if isinstance(prompts, str):
        prompts = [prompts]
    if not isinstance(prompts, Sequence) or len(prompts) == 0:
        raise ValueError(f"expected a prompt or a non-empty list of prompts, got {prompts!r}")
    return list(prompts)


class TextToImage(nn.Module):
    """Prompts -> images: a conditioner, a denoiser, a schedule and a VAE, with the one sampling loop.

    The denoiser says what it predicts (`prediction`; passing one here only checks it) and which conditions it reads;
    the conditioner must make each of its entries at the width the denoiser reads, and any other condition the
    denoiser reads (a control image, a mask) comes as a keyword of `generate`. image_size: the side of the images.
    Image i of a call starts from noise seeded `seed + i`, so with a deterministic sampler a prompt's image does not
    depend on the batch it is in."""

    def __init__(self, conditioner: Conditioner, denoiser: Denoiser, schedule: Schedule, vae: AutoencoderKL,
                 prediction: str | None = None, image_size: int = 32):
        super().__init__()
        self.conditioner, self.denoiser, self.vae, self.schedule = conditioner, denoiser, vae, schedule
        name = type(denoiser).__name__
        self.prediction = schedule.parse_prediction(denoiser.prediction)
        if prediction is not None and schedule.parse_prediction(prediction) != self.prediction:
            raise ValueError(f"the {name} predicts {denoiser.prediction!r}, not {prediction!r} (its config says what "
                             f"it was trained to predict)")
        f = vae.downsampling_factor
        if image_size % f:
            raise ValueError(f"image_size {image_size} is not a multiple of the VAE's downsampling factor {f}")
        self.image_size = image_size
        self.latent_shape = (vae.config.latent_channels, image_size // f, image_size // f)  # (C, h, w)
        if denoiser.latent_channels != vae.config.latent_channels:
            raise ValueError(f"the {name} works on {denoiser.latent_channels} latent channels but the VAE's latents "
                             f"have {vae.config.latent_channels}")
        reads, makes = denoiser.cond_dims, conditioner.dims
        wrong = {k: w for k, w in makes.items() if reads.get(k) != w}
        if wrong:
            raise ValueError(f"the {name} reads conditions of widths {reads} but the conditioner makes {makes}")
        self.requires_grad_(False).eval()

    def init_args(self) -> dict:
        return {"conditioner": self.conditioner, "denoiser": self.denoiser, "schedule": self.schedule,
                "vae": self.vae, "image_size": self.image_size}

    @property
    def device(self) -> torch.device:
        return next(self.denoiser.parameters()).device

    @torch.no_grad()
    def encode_prompts(self, prompts: str | Sequence[str], **conditions) -> dict[str, torch.Tensor]:
        """Prompts (and the conditioner's other conditions, e.g. SDXL's sizes) -> what the denoiser reads
        (SD 1.x: {"context": [N, L, D]})."""
        return self.conditioner(_check_prompts(prompts), **conditions)

    def noise(self, n: int, seed: int) -> torch.Tensor:
        """z_T for n images: image i from a generator seeded seed + i -> [n, C, h, w] on the pipeline's device."""
        return torch.stack([torch.randn(self.latent_shape, generator=torch.Generator().manual_seed(seed + i))
                            for i in range(n)]).to(self.device)

    @torch.no_grad()
    def denoise(self, z: torch.Tensor, cond: dict, steps: int = 50, guidance_scale: float = 3.0,
                start: float = 0.0, end: float = 1.0, sampler: str | None = None, seed: int = 0,
                progress: bool = True, callback: Callable[[dict], None] | None = None,
                uncond: dict[str, torch.Tensor] | None = None, sampler_options: dict | None = None,
                guidance_rescale: float = 0.0) -> torch.Tensor:
        """Latents z [B,C,h,w] at fraction `start` of the trajectory -> latents at fraction `end` (1: clean), by
        sdlearn.diffusion.sample with classifier-free guidance against `uncond` (default: the conditioner's
        unconditional twin). seed seeds the fresh noise a stochastic sampler draws (DDPM, DDIM with eta > 0,
        euler_a); sampler_options go to the step function (DDIM: {"eta": 0.5}); guidance_rescale: Lin et al. 2024
        sec. 3.4 (sdlearn.diffusion.rescale_guidance; 0: off). steps: a count, or the explicit points of the run
        (a list: timesteps, or noise levels `schedule.level(sigma)`; the schedule checks them)."""
        explicit = isinstance(steps, (list, tuple))
        if not explicit and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
            raise ValueError(f"steps must be an int >= 1 or a list of the run's points, got {steps!r}")
        if not isinstance(guidance_scale, (int, float)) or not math.isfinite(guidance_scale) or guidance_scale < 0:
            raise ValueError(f"guidance_scale must be a number >= 0 (1: no guidance, 0: unconditional), "
                             f"got {guidance_scale!r}")
        uncond = self.conditioner.unconditional(1) if uncond is None else uncond
        generator = torch.Generator(device=z.device).manual_seed(seed)
        return sample(self._model(), z, self.schedule, steps, sampler, cond, uncond, guidance_scale, start, end,
                      self.prediction, generator, progress=progress, callback=callback,
                      guidance_rescale=guidance_rescale, **(sampler_options or {}))

    def _model(self) -> Callable:
        """The denoiser as the sampling loop calls it. A half-precision denoiser (real checkpoints on a GPU) reads
        its inputs in its dtype and hands back float32: the loop's arithmetic stays in float32."""
        dtype = next(self.denoiser.parameters()).dtype
        if dtype == torch.float32:
            return self.denoiser

        def model(x, t, **cond):
            cond = {k: v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v
                    for k, v in cond.items()}
            return self.denoiser(x.to(dtype), t, **cond).float()
        return model

    @property
    def _vae_dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Scaled latents [B,C,h,w] -> images [B,3,H,W] in [-1, 1] (float32)."""
        return self.vae.from_latent(z.to(self._vae_dtype)).float().clamp(-1, 1)

    @torch.no_grad()
    def generate(self, prompts: str | Sequence[str], steps: int = 50, guidance_scale: float = 3.0, seed: int = 0,
                 sampler: str | None = None, batch_size: int = 256, progress: bool = True,
                 callback: Callable[[dict], None] | None = None, start: float = 0.0, end: float = 1.0,
                 latents: torch.Tensor | None = None, output: str = "image", sampler_options: dict | None = None,
                 guidance_rescale: float = 0.0, **conditions) -> torch.Tensor:
        """Text to images [N,3,H,W] in [-1,1] on the CPU, or (output="latent") to latents [N,C,h,w].

        By default from fresh noise over the whole trajectory; `end` < 1 stops part-way and `latents` with
        `start` > 0 continues latents already there (img2img; SDXL's base hands over to its refiner at 0.8).
        **conditions go to the conditioner, which encodes those it takes (SDXL: original_size, crop_top_left, ...)
        and passes the others to the denoiser (a control image [N or 1, ...]: the same in both halves of guidance).
        sampler: a name registered for the schedule (NoiseSchedule: ddim, ddpm, euler, euler_a, dpmpp_2m; default:
        the schedule's, e.g. a checkpoint's scheduler class); sampler_options go to the step function (DDIM:
        {"eta": 0.5}); guidance_rescale: Lin et al. 2024 sec. 3.4 (diffusers' argument of that name; 0: off)."""
        prompts = _check_prompts(prompts)
        if output not in ("image", "latent"):
            raise ValueError(f"output must be 'image' or 'latent', got {output!r}")
        if latents is not None and (not isinstance(latents, torch.Tensor)
                                    or tuple(latents.shape) != (len(prompts), *self.latent_shape)):
            got = tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
            raise ValueError(f"latents must be [N, C, h, w] = {[len(prompts), *self.latent_shape]}, got {got}")
        cond = _per_prompt(self.encode_prompts(prompts, **conditions), len(prompts))   # checks every word
        missing = [k for k in self.denoiser.cond_dims if k not in cond]
        if missing:
            raise ValueError(f"the {type(self.denoiser).__name__} reads {missing}, which the conditioner does not make "
                             f"from text: pass {' and '.join(f'{k}=...' for k in missing)} to generate")
        uncond = self.conditioner.unconditional(1, **conditions)
        out = []
        for i in range(0, len(prompts), batch_size):
            z = self.noise(len(prompts[i:i + batch_size]), seed + i) if latents is None else \
                latents[i:i + batch_size].to(self.device)                        # [b, C, h, w]
            part = {k: v[i:i + batch_size] if isinstance(v, torch.Tensor) else v for k, v in cond.items()}
            z = self.denoise(z, part, steps, guidance_scale, start, end, sampler, seed + i, progress, callback,
                             uncond, sampler_options, guidance_rescale)
            out.append((self.decode(z) if output == "image" else z).cpu())
        return torch.cat(out)

    @torch.no_grad()
    def img2img(self, images: torch.Tensor, prompts: str | Sequence[str], strength: float = 0.5, steps: int = 50,
                guidance_scale: float = 3.0, seed: int = 0, sampler: str | None = None, progress: bool = True,
                sampler_options: dict | None = None, callback: Callable[[dict], None] | None = None,
                **conditions) -> torch.Tensor:
        """SDEdit (Meng et al. 2022): encode images [N,3,H,W] in [-1,1], noise them to where the last `strength` of
        the trajectory starts, and denoise from there with the prompts. strength 0 returns the (re-decoded) input,
        1 keeps almost nothing of it."""
        prompts = _check_prompts(prompts)
        if not 0 <= strength <= 1:
            raise ValueError(f"strength must be in [0, 1], got {strength!r}")
        if not isinstance(images, torch.Tensor) or images.shape[1:] != (3, self.image_size, self.image_size):
            got = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"expected images [N, 3, {self.image_size}, {self.image_size}] in [-1, 1], got {got}")
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts: give one prompt per image")
        z0 = self.vae.to_latent(images.to(self.device, self._vae_dtype), sample=False).float()  # [N, C, h, w]
        start = 1.0 - strength
        trajectory = self.schedule.trajectory(steps, start)
        if not trajectory:
            return self.decode(z0).cpu()
        t = torch.full((len(z0),), trajectory[0], device=self.device)
        z = self.schedule.add_noise(z0, self.noise(len(z0), seed), t)           # q(z_t | z_0) where sampling starts
        return self.generate(prompts, steps, guidance_scale, seed, sampler, progress=progress, callback=callback,
                             start=start, latents=z, sampler_options=sampler_options, **conditions)


def _per_prompt(cond: dict, n: int) -> dict:
    """Every tensor entry of cond with one row per prompt: a batch of one (a control image for all) expanded to n."""
    out = {}
    for k, v in cond.items():
        if isinstance(v, torch.Tensor) and v.ndim and v.shape[0] == 1 and n != 1:
            v = v.expand(n, *v.shape[1:])
        if isinstance(v, torch.Tensor) and (not v.ndim or v.shape[0] != n):
            raise ValueError(f"condition {k!r} must have one row per prompt ({n}) or one for all, got shape "
                             f"{tuple(v.shape)}")
        out[k] = v
    return out
