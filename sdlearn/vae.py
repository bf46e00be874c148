"""Stable Diffusion's autoencoder (AutoencoderKL): images <-> a small latent grid the diffusion model works in.

    vae = AutoencoderKL(VAEConfig(channels=(32, 64, 128), latent_channels=4))
    posterior = vae.encode(x)             # x [B,3,H,W] in [-1,1] -> DiagonalGaussian over [B,4,H/4,W/4]
    z = posterior.sample()                # mean + std * noise (reparameterisation)
    x_rec = vae.decode(z)                 # [B,3,H,W]
    z = vae.to_latent(x); x = vae.from_latent(z)   # with SD's (z - shift) * scale, what diffusion sees

Latent diffusion (Rombach et al. 2022, sec. 3) trains the autoencoder first, with a reconstruction loss and a
small KL term pulling q(z|x) towards N(0, I) (the VAE of Kingma & Welling 2014, eq. 10), then runs diffusion on
the latents. The layout follows diffusers' AutoencoderKL (and the original ldm Encoder/Decoder): ResNet blocks
at each level, a downsampling conv between levels, a mid block with single-head self-attention, GroupNorm +
SiLU, and a conv to 2 x latent channels (mean and log-variance). The decoder mirrors it with one more ResNet
block per level and nearest-neighbour upsampling.

    python -m sdlearn train vae --size 32 --release     # the released shapes VAE's recipe (sdlearn.recipes.vae)
    python -m sdlearn eval vae --size 32                # its PSNR and judge scores on held-out images
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from sdlearn.attention import Attention


@dataclass
class VAEConfig:
    in_channels: int = 3                              # image channels (in and out)
    latent_channels: int = 4                          # 4: SD 1/2/XL, 16: SD3
    channels: tuple[int, ...] = (128, 256, 512, 512)  # per level; len(channels) - 1 downsamplings by 2
    layers_per_block: int = 2                         # ResNet blocks per encoder level (decoder: one more)
    norm_groups: int = 32                             # GroupNorm groups
    mid_attention: bool = True                        # self-attention in the mid blocks
    use_quant_conv: bool = True                       # 1x1 conv on (mean, logvar); SD3 drops it
    use_post_quant_conv: bool = True                  # 1x1 conv on z before decoding; SD3 drops it
    scaling_factor: float = 0.18215                   # latents for diffusion: (z - shift) * scale
    shift_factor: float = 0.0                         # SD3: 0.0609 (scale 1.5305)

    def __post_init__(self):
        self.channels = tuple(int(c) for c in self.channels)  # JSON round trips give lists
        if not self.channels:
            raise ValueError("VAEConfig.channels must name at least one level, got ()")
        bad = [c for c in self.channels if c % self.norm_groups]
        if bad:
            raise ValueError(f"VAEConfig: every entry of channels must be divisible by norm_groups="
                             f"{self.norm_groups}; got channels={self.channels}")

    @property
    def downsampling_factor(self) -> int:
        return 2 ** (len(self.channels) - 1)


# -----------------------------------------------------------------------------
# the Gaussian posterior q(z|x) and the VAE loss


def reparameterize(mean: torch.Tensor, logvar: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """z = mean + std * noise with std = exp(logvar / 2): a sample of N(mean, diag(exp(logvar))) through which
    gradients reach mean and logvar (Kingma & Welling 2014, sec. 2.4)."""
    return mean + torch.exp(0.5 * logvar) * noise


def kl_divergence(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, exp(logvar)) || N(0, I)) per sample, summed over every other axis -> [B].

    = 1/2 sum(mean^2 + var - 1 - log var) (Kingma & Welling 2014, appendix B)."""
    kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar)  # [B,C,h,w]
    return kl.flatten(1).sum(1)  # [B]


def vae_loss(x: torch.Tensor, x_rec: torch.Tensor, mean: torch.Tensor, logvar: torch.Tensor,
             kl_weight: float, recon: str = "l2") -> torch.Tensor:
    """The (beta-)VAE loss: reconstruction + kl_weight * KL, both summed over each image, averaged over the batch.

    recon="l2": squared error (a Gaussian likelihood); "l1": absolute error (what SD's autoencoder uses,
    besides its perceptual and adversarial terms). The per-image sums are how SD (ldm's LPIPSWithDiscriminator)
    reduces, so kl_weight means the same at any image size."""
    err = x_rec - x
    per_pixel = err.pow(2) if recon == "l2" else err.abs() if recon == "l1" else None
    if per_pixel is None:
        raise ValueError(f"recon must be 'l2' or 'l1', got {recon!r}")
    rec = per_pixel.flatten(1).sum(1).mean()  # scalar: per image sum, batch mean
    return rec + kl_weight * kl_divergence(mean, logvar).mean()


class DiagonalGaussian:
    """q(z|x) = N(mean, diag(var)), from the encoder's 2 x latent channels; logvar clamped to [-30, 20] as SD."""

    def __init__(self, params: torch.Tensor):
        self.mean, logvar = params.chunk(2, dim=1)  # [B,C,h,w] each
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """z = mean + std * eps, eps ~ N(0, I) (drawn with `generator`, on its device, when given)."""
        gen_device = generator.device if generator is not None else self.mean.device
        noise = torch.randn(self.mean.shape, generator=generator, device=gen_device, dtype=self.mean.dtype)
        return reparameterize(self.mean, self.logvar, noise.to(self.mean.device))

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL to N(0, I), per sample [B]."""
        return kl_divergence(self.mean, self.logvar)

    def __repr__(self) -> str:
        return f"DiagonalGaussian(shape={tuple(self.mean.shape)})"


# -----------------------------------------------------------------------------
# building blocks


class ResBlock(nn.Module):
    """GroupNorm, SiLU, conv3x3, twice, plus the input (through a 1x1 conv when the channels change); with temb > 0
    (the UNet's, notebook 05) the projected time embedding is added between the two convs, one value per channel."""

    def __init__(self, c_in: int, c_out: int, groups: int, eps: float = 1e-6, temb: int = 0, dropout: float = 0.0):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, c_in, eps=eps)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.time_proj = nn.Linear(temb, c_out) if temb else None
        self.norm2 = nn.GroupNorm(groups, c_out, eps=eps)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.shortcut = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:  # x [B,c_in,H,W], emb [B,temb]
        h = self.conv1(F.silu(self.norm1(x)))  # [B,c_out,H,W]
        if self.time_proj is not None:
            h = h + self.time_proj(F.silu(emb))[:, :, None, None]  # [B,c_out,1,1] broadcast over pixels
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.shortcut(x) + h


class AttnBlock(nn.Module):
    """GroupNorm, then one-head self-attention among the H*W positions (head dim = channels), plus the input."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        self.attn = Attention(channels, heads=1, head_dim=channels, qkv_bias=True, out_bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        H, W = x.shape[-2:]
        h = rearrange(self.norm(x), "b c h w -> b (h w) c")  # [B,HW,C]: one token per position
        h = self.attn(h)  # [B,HW,C]
        # h + x, not x + h: a sum takes the memory layout of its first operand, and this view of [B,HW,C] is
        # channels-last, so the convolutions after it run oneDNN's channels-last kernels, faster on a CPU
        # (diffusers' order; on 2 CPU cores the decode took 1.1-1.2x diffusers' time the other way round, 0.95-1x)
        return rearrange(h, "b (h w) c -> b c h w", h=H, w=W) + x


class MidBlock(nn.Module):
    """ResNet block, attention, ResNet block, at the lowest resolution. The VAE's attention is an AttnBlock (or
    none); the UNet's (notebook 05) a spatial transformer that also reads the text, and its ResNet blocks the time."""

    def __init__(self, resnet1: ResBlock, attention: nn.Module | None, resnet2: ResBlock):
        super().__init__()
        self.resnet1, self.attention, self.resnet2 = resnet1, attention, resnet2

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None, context: torch.Tensor | None = None):
        h = self.resnet1(x, emb)
        if self.attention is not None:
            h = self.attention(h) if context is None else self.attention(h, context)
        return self.resnet2(h, emb)


class Downsample(nn.Module):
    """Halve H and W with a 3x3 conv of stride 2: the VAE pads one pixel right and bottom only (as SD's VAE), the
    UNet one pixel on every side (pad_right_bottom=False)."""

    def __init__(self, channels: int, pad_right_bottom: bool = True):
        super().__init__()
        self.pad_right_bottom = pad_right_bottom
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0 if pad_right_bottom else 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)) if self.pad_right_bottom else x)  # [B,C,H/2,W/2]


class Upsample(nn.Module):
    """Double H and W: nearest-neighbour, then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))  # [B,C,2H,2W]


class Level(nn.Module):
    """One resolution: ResNet blocks (at the UNet's attention levels each followed by an attention block), then a
    Downsample / Upsample, or nothing at the last level."""

    def __init__(self, resnets: list[nn.Module], attentions: list[nn.Module] = (), resample: nn.Module | None = None):
        super().__init__()
        self.resnets, self.attentions, self.resample = nn.ModuleList(resnets), nn.ModuleList(attentions), resample

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # the VAE's: its levels have no attention
        for resnet in self.resnets:
            x = resnet(x)
        return x if self.resample is None else self.resample(x)


def _level(c_in: int, c_out: int, n_blocks: int, groups: int, resample: nn.Module | None) -> Level:
    return Level([ResBlock(c_in if i == 0 else c_out, c_out, groups) for i in range(n_blocks)], resample=resample)


def _mid(channels: int, groups: int, attention: bool) -> MidBlock:
    return MidBlock(ResBlock(channels, channels, groups), AttnBlock(channels, groups) if attention else None,
                    ResBlock(channels, channels, groups))


class Encoder(nn.Module):
    """x [B,3,H,W] -> [B, 2 * latent_channels, H/f, W/f], f = 2 ** (levels - 1)."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch, g = cfg.channels, cfg.norm_groups
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.down = nn.ModuleList([
            _level(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block, g, Downsample(ch[i]) if i < len(ch) - 1 else None)
            for i in range(len(ch))])
        self.mid = _mid(ch[-1], g, cfg.mid_attention)
        self.norm_out = nn.GroupNorm(g, ch[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(ch[-1], 2 * cfg.latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)  # [B,ch0,H,W]
        for level in self.down:
            h = level(h)  # [B,ch_i,H/2^(i+1),W/2^(i+1)] (no halving at the last level)
        h = self.mid(h)  # [B,ch_last,H/f,W/f]
        return self.conv_out(F.silu(self.norm_out(h)))  # [B,2*latent,H/f,W/f]


class Decoder(nn.Module):
    """z [B,latent_channels,h,w] -> [B,3,h*f,w*f]: the encoder mirrored, one more ResNet block per level."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch, g = cfg.channels[::-1], cfg.norm_groups  # deepest first
        self.conv_in = nn.Conv2d(cfg.latent_channels, ch[0], 3, padding=1)
        self.mid = _mid(ch[0], g, cfg.mid_attention)
        self.up = nn.ModuleList([
            _level(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block + 1, g, Upsample(ch[i]) if i < len(ch) - 1 else None)
            for i in range(len(ch))])
        self.norm_out = nn.GroupNorm(g, ch[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(ch[-1], cfg.in_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))  # [B,ch_last,h,w]
        for level in self.up:
            h = level(h)  # doubles H and W except at the last level
        return self.conv_out(F.silu(self.norm_out(h)))  # [B,3,H,W]


# -----------------------------------------------------------------------------
# the autoencoder


class AutoencoderKL(nn.Module):
    """encode(x) -> DiagonalGaussian; decode(z) -> x; to_latent / from_latent with the scaling (and shift)."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = config
        c = config.latent_channels
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quant_conv = nn.Conv2d(2 * c, 2 * c, 1) if config.use_quant_conv else None
        self.post_quant_conv = nn.Conv2d(c, c, 1) if config.use_post_quant_conv else None

    @property
    def downsampling_factor(self) -> int:
        return self.config.downsampling_factor

    def _check_image(self, x) -> None:
        cfg, f = self.config, self.downsampling_factor
        expected = f"an image batch [B,{cfg.in_channels},H,W] with H and W divisible by {f}"
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"encode expects {expected}; got {type(x).__name__}")
        if x.ndim != 4 or x.shape[1] != cfg.in_channels:
            raise ValueError(f"encode expects {expected}; got shape {tuple(x.shape)}")
        if x.shape[2] % f or x.shape[3] % f:
            raise ValueError(f"encode expects {expected} (the downsampling factor); got {x.shape[2]}x{x.shape[3]}")

    def _check_latent(self, z) -> None:
        c = self.config.latent_channels
        expected = f"a latent batch [B,{c},h,w]"
        if not isinstance(z, torch.Tensor):
            raise TypeError(f"decode expects {expected}; got {type(z).__name__}")
        if z.ndim != 4 or z.shape[1] != c:
            raise ValueError(f"decode expects {expected}; got shape {tuple(z.shape)}")

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        """x [B,3,H,W] in [-1,1] -> q(z|x) over [B,latent,H/f,W/f]."""
        self._check_image(x)
        h = self.encoder(x)  # [B,2*latent,h,w]
        if self.quant_conv is not None:
            h = self.quant_conv(h)
        return DiagonalGaussian(h)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z [B,latent,h,w] (unscaled) -> x [B,3,h*f,w*f]."""
        self._check_latent(z)
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def forward(self, x: torch.Tensor, sample: bool = True,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, DiagonalGaussian]:
        """(reconstruction, posterior): decode a sample of q(z|x) (or its mean, sample=False)."""
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample else posterior.mode()
        return self.decode(z), posterior

    def to_latent(self, x: torch.Tensor, sample: bool = True,
                  generator: torch.Generator | None = None) -> torch.Tensor:
        """Image -> the latent diffusion works on: (z - shift_factor) * scaling_factor, z ~ q(z|x) (or its mean)."""
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample else posterior.mode()
        return (z - self.config.shift_factor) * self.config.scaling_factor

    def from_latent(self, z: torch.Tensor) -> torch.Tensor:
        """Inverse of to_latent: decode(z / scaling_factor + shift_factor)."""
        return self.decode(z / self.config.scaling_factor + self.config.shift_factor)


PRESETS = {
    # SD 1.x / 2.x / SDXL layout (SDXL's VAE: the same shapes, scaling_factor 0.13025)
    "sd-vae": lambda: AutoencoderKL(VAEConfig()),
    # SD3 / SD3.5: 16 latent channels, no quant convs, latents (z - 0.0609) * 1.5305
    "sd3-vae": lambda: AutoencoderKL(VAEConfig(latent_channels=16, use_quant_conv=False, use_post_quant_conv=False,
                                               scaling_factor=1.5305, shift_factor=0.0609)),
}


# -----------------------------------------------------------------------------
# measuring an autoencoder, and the latent scale


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Peak signal-to-noise ratio per image, in dB, of images in [-1,1] measured on the [0,1] scale -> [B]."""
    x, y = (x.detach().float().clamp(-1, 1) + 1) / 2, (y.detach().float().clamp(-1, 1) + 1) / 2
    mse = (x - y).pow(2).flatten(1).mean(1).clamp_min(1e-10)
    return -10 * torch.log10(mse)


@torch.no_grad()
def reconstruct(vae: AutoencoderKL, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Decode the posterior mean of each image, in batches -> [N,3,H,W] clamped to [-1,1]."""
    dev = next(vae.parameters()).device
    out = [vae.decode(vae.encode(images[i:i + batch_size].to(dev)).mode()).clamp(-1, 1).cpu()
           for i in range(0, len(images), batch_size)]
    return torch.cat(out)


@torch.no_grad()
def latent_scale(vae: AutoencoderKL, images: torch.Tensor, batch_size: int = 256,
                 shift: bool = False) -> tuple[float, float]:
    """(scaling_factor, shift_factor) that make sampled latents of `images` unit-variance: SD's 1 / std with no
    shift, or (shift=True) SD3's mean as the shift and 1 / std about it, (z - mean) / std."""
    dev = next(vae.parameters()).device
    g = torch.Generator(device=dev).manual_seed(0)
    z = torch.cat([vae.encode(images[i:i + batch_size].to(dev)).sample(g).cpu()
                   for i in range(0, len(images), batch_size)])
    mean = z.mean().item() if shift else 0.0
    return 1.0 / (z - mean).flatten().std().item(), mean
