"""The conditional UNet of Stable Diffusion (SD 1.x, SD 2.x; inside SDXL's): eps = unet(x_t, t, text).

    unet = UNet(UNetConfig(in_channels=3, out_channels=3, channels=(32, 64), context_dim=64))
    eps = unet(x, t, context)                          # [B,C,H,W], [B], [B,L,D] -> [B,C,H,W]

The network of Ho et al. 2020 (DDPM, appendix B) with the text conditioning of Rombach et al. 2022 (LDM,
sec. 3.3): a sinusoidal embedding of the timestep goes through an MLP and is added inside every ResBlock;
the down path halves the resolution level by level, the mid block works at the coarsest one, and the up path
doubles it back, concatenating the down path's activations (the skips, a stack: last in, first out).
At the levels marked in `config.attention` a spatial transformer follows each ResBlock: self-attention over
the pixels, cross-attention from the pixels to the text tokens, and a GEGLU feed-forward. The ResBlocks, the
resampling convolutions and the mid block are the VAE's (notebook 03), given the time embedding.

Two inputs beyond the text, each named for what it does, for the models that grow out of this one:
- `added_cond` [B, added_cond_dim]: a conditioning vector that goes through its own MLP and is added to the time
  embedding (Dhariwal & Nichol's class embedding; SDXL builds it from pooled text and image sizes, notebook 07);
- `residuals`: tensors added to the skips and to the mid block's output (`residual_shapes`), which is how a
  ControlNet steers a frozen UNet (notebook 09); or a function (skips, h) -> (skips, h) that adds them itself.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from sdlearn.attention import Attention
from sdlearn.diffusion import _prediction
from sdlearn.vae import Downsample, Level, MidBlock, ResBlock, Upsample


@dataclass
class UNetConfig:
    in_channels: int = 4
    out_channels: int = 4
    channels: tuple[int, ...] = (320, 640, 1280, 1280)  # per level; the time MLP is 4 * channels[0] wide
    layers_per_block: int = 2                        # ResBlocks per level on the down path (up path: one more)
    attention: tuple[bool, ...] = (True, True, True, False)  # a spatial transformer after each ResBlock?
    transformer_layers: int | tuple[int, ...] = 1     # transformer blocks per spatial transformer, per level
    heads: int | tuple[int, ...] | None = 8          # attention heads per level (SD 1.x) ...
    head_dim: int | tuple[int, ...] | None = None    # ... or the width of a head (SD 2.x, SDXL: 64)
    context_dim: int = 768                           # width of the text tokens
    linear_proj: bool = False                        # proj_in/out: Linear (SD 2.x, SDXL) or 1x1 conv (SD 1.x)
    added_cond_dim: int = 0                          # a vector added to the time embedding (SDXL: 2816; 0: none)
    norm_groups: int = 32
    dropout: float = 0.0
    prediction: str = "eps"                          # what it is trained to predict: eps, x0 or v

    def __post_init__(self):
        n = len(self.channels)

        def per_level(v):
            return tuple(v) if isinstance(v, (tuple, list)) else (v,) * n

        self.channels, self.attention = tuple(self.channels), tuple(bool(a) for a in self.attention)
        self.transformer_layers = per_level(self.transformer_layers)
        for name in ("attention", "transformer_layers"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"UNetConfig.{name} needs one value per level ({n}), got {getattr(self, name)}")
        if (self.heads is None) == (self.head_dim is None):
            raise ValueError(f"UNetConfig: give exactly one of heads and head_dim, got heads={self.heads}, "
                             f"head_dim={self.head_dim}")
        for name in ("heads", "head_dim"):
            v = getattr(self, name)
            if v is not None:
                setattr(self, name, per_level(v))
                if len(getattr(self, name)) != n:
                    raise ValueError(f"UNetConfig.{name} needs one value per level ({n}), got {v}")
        for c in self.channels:
            if c % self.norm_groups:
                raise ValueError(f"UNetConfig: channels {c} not divisible by norm_groups={self.norm_groups}")
        for i in range(n):  # levels with attention, and the last (the mid block uses its heads)
            split = self.heads[i] if self.heads is not None else self.head_dim[i]
            if (self.attention[i] or i == n - 1) and self.channels[i] % split:
                what = "heads" if self.heads is not None else "head_dim"
                raise ValueError(f"UNetConfig: level {i} has {self.channels[i]} channels, not divisible by "
                                 f"{what}={split}")
        self.prediction = _prediction(self.prediction)

    @property
    def levels(self) -> int:
        return len(self.channels)

    def level_heads(self, i: int) -> int:
        return self.heads[i] if self.heads is not None else self.channels[i] // self.head_dim[i]


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps, [B] -> [B,dim]: cos then sin halves.

    Frequencies f_i = max_period^(-i/half), i = 0..half-1 (Vaswani et al. 2017, sec. 3.5; DDPM appendix B),
    the cos half first as in Stable Diffusion (diffusers: flip_sin_to_cos=True, freq_shift=0).
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]                 # [B,half]
    emb = torch.cat([torch.cos(args), torch.sin(args)], -1)  # [B,2*half]
    return F.pad(emb, (0, dim % 2))                          # [B,dim]


class TimestepMLP(nn.Module):
    """Linear -> SiLU -> Linear: a sinusoidal embedding to the width the ResBlocks read."""

    def __init__(self, dim: int, out: int):
        super().__init__()
        self.linear_1, self.linear_2 = nn.Linear(dim, out), nn.Linear(out, out)

    def forward(self, x):
        return self.linear_2(F.silu(self.linear_1(x)))


class GEGLU(nn.Module):
    """The feed-forward of the transformer block: Linear to 2 * inner, x * gelu(gate), Linear back (Shazeer 2020)."""

    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0):
        super().__init__()
        self.proj = nn.Linear(dim, 2 * mult * dim)
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear(mult * dim, dim)

    def forward(self, x):
        x, gate = self.proj(x).chunk(2, dim=-1)
        return self.out(self.dropout(x * F.gelu(gate)))


class TransformerBlock(nn.Module):
    """Pre-LayerNorm: self-attention over pixels, cross-attention to the text, GEGLU feed-forward."""

    def __init__(self, dim: int, context_dim: int, heads: int, head_dim: int, dropout: float = 0.0):
        super().__init__()
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads=heads, head_dim=head_dim, dropout=dropout)
        self.attn2 = Attention(dim, context_dim, heads=heads, head_dim=head_dim, dropout=dropout)
        self.ff = GEGLU(dim, dropout=dropout)

    def forward(self, x, context):                         # x [B,HW,dim], context [B,L,context_dim]
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """GroupNorm, proj_in (1x1 conv or Linear), `depth` TransformerBlocks on the HW pixel tokens, proj_out; + x."""

    def __init__(self, channels: int, context_dim: int, heads: int, depth: int = 1, linear_proj: bool = False,
                 groups: int = 32, dropout: float = 0.0):
        super().__init__()
        head_dim = channels // heads
        inner = heads * head_dim
        self.linear_proj = linear_proj
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        proj = (lambda a, b: nn.Linear(a, b)) if linear_proj else (lambda a, b: nn.Conv2d(a, b, 1))
        self.proj_in = proj(channels, inner)
        self.blocks = nn.ModuleList(TransformerBlock(inner, context_dim, heads, head_dim, dropout)
                                    for _ in range(depth))
        self.proj_out = proj(inner, channels)

    def forward(self, x, context):                         # x [B,C,H,W]
        H, W = x.shape[-2:]
        h = self.norm(x)
        if self.linear_proj:
            h = self.proj_in(rearrange(h, "b c h w -> b (h w) c"))  # [B,HW,inner]
        else:
            h = rearrange(self.proj_in(h), "b c h w -> b (h w) c")
        for block in self.blocks:
            h = block(h, context)
        if self.linear_proj:
            h = rearrange(self.proj_out(h), "b (h w) c -> b c h w", h=H, w=W)
        else:
            h = self.proj_out(rearrange(h, "b (h w) c -> b c h w", h=H, w=W))
        return x + h


class UNet(nn.Module):
    """The conditional UNet: unet(x [B,C,H,W], t [B], context [B,L,D], added_cond=None, residuals=None) -> its
    prediction [B,out_channels,H,W] (a sdlearn.diffusion.Denoiser)."""

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = cfg = config
        ch, n, temb = cfg.channels, cfg.levels, 4 * cfg.channels[0]
        groups, drop = cfg.norm_groups, cfg.dropout
        self.time_embed = TimestepMLP(ch[0], temb)
        if cfg.added_cond_dim:
            self.add_embed = TimestepMLP(cfg.added_cond_dim, temb)
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)

        def resnet(cin, cout):
            return ResBlock(cin, cout, groups, eps=1e-5, temb=temb, dropout=drop)

        def transformer(i, c):
            return SpatialTransformer(c, cfg.context_dim, cfg.level_heads(i), cfg.transformer_layers[i],
                                      cfg.linear_proj, groups, drop)

        self.skip_levels = [(ch[0], 0)]  # (channels, level) of each activation the down path keeps for the up path
        self.down = nn.ModuleList()
        cin = ch[0]
        for i, c in enumerate(ch):
            resnets, attentions = [], []
            for _ in range(cfg.layers_per_block):
                resnets.append(resnet(cin, c))
                attentions += [transformer(i, c)] if cfg.attention[i] else []
                cin = c
                self.skip_levels.append((c, i))
            last = i == n - 1
            self.down.append(Level(resnets, attentions, None if last else Downsample(c, pad_right_bottom=False)))
            self.skip_levels += [] if last else [(c, i + 1)]
        self.mid = MidBlock(resnet(ch[-1], ch[-1]), transformer(n - 1, ch[-1]), resnet(ch[-1], ch[-1]))
        self.up = nn.ModuleList()  # coarsest level first
        widths = [c for c, _ in self.skip_levels]
        for i in reversed(range(n)):
            resnets, attentions = [], []
            for _ in range(cfg.layers_per_block + 1):
                resnets.append(resnet(cin + widths.pop(), ch[i]))
                attentions += [transformer(i, ch[i])] if cfg.attention[i] else []
                cin = ch[i]
            self.up.append(Level(resnets, attentions, Upsample(ch[i]) if i > 0 else None))
        self.norm_out = nn.GroupNorm(groups, ch[0], eps=1e-5)
        self.conv_out = nn.Conv2d(ch[0], cfg.out_channels, 3, padding=1)

    # -- what it is, as a denoiser -------------------------------------------------------------------------

    latent_channels = property(lambda self: self.config.in_channels)   # the channels of x and of the prediction
    prediction = property(lambda self: self.config.prediction)         # what it is trained to predict

    @property
    def cond_dims(self) -> dict[str, int]:
        """The conditions forward reads (as keywords) and their widths: context, and added_cond if configured."""
        cfg = self.config
        return {"context": cfg.context_dim, **({"added_cond": cfg.added_cond_dim} if cfg.added_cond_dim else {})}

    def residual_shapes(self, height: int, width: int) -> list[tuple[int, int, int]]:
        """(C, h, w) of each tensor `residuals` adds to, for an input of height x width: the skips in the order
        the down path makes them, then the mid block's output."""
        shapes = [(c, height >> level, width >> level) for c, level in self.skip_levels]
        n = self.config.levels - 1
        return shapes + [(self.config.channels[-1], height >> n, width >> n)]

    # -- the parts of the forward, apart so that notebooks can show (and learners write) each ----------------

    def embed(self, t, added_cond=None) -> torch.Tensor:
        """Timesteps [B] (+ an added conditioning vector [B,A]) -> the embedding [B,4*C0] the ResBlocks read."""
        cfg = self.config
        dtype = self.time_embed.linear_1.weight.dtype                             # float32 sinusoids, cast as diffusers
        emb = self.time_embed(timestep_embedding(t, cfg.channels[0]).to(dtype))  # [B,temb]
        if cfg.added_cond_dim:
            emb = emb + self.add_embed(added_cond.to(dtype))                       # [B,temb]
        return emb

    def down_path(self, h, emb, context, hint=None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """conv_in and the down levels; returns h at the coarsest level and the skips (a stack). hint [B,C0,H,W]
        (a ControlNet's embedded control image, notebook 09) is added to conv_in's output."""
        h = self.conv_in(h) if hint is None else self.conv_in(h) + hint
        skips = [h]
        for level in self.down:
            for j, resnet in enumerate(level.resnets):
                h = resnet(h, emb)
                if level.attentions:
                    h = level.attentions[j](h, context)
                skips.append(h)
            if level.resample is not None:
                h = level.resample(h)
                skips.append(h)
        return h, skips

    def up_path(self, h, skips, emb, context) -> torch.Tensor:
        """The up levels: before each ResBlock, concatenate the most recent skip (skips.pop()) along channels."""
        for level in self.up:
            for j, resnet in enumerate(level.resnets):
                h = resnet(torch.cat([h, skips.pop()], dim=1), emb)
                if level.attentions:
                    h = level.attentions[j](h, context)
            if level.resample is not None:
                h = level.resample(h)
        return h

    def forward(self, x, t, context, added_cond=None, residuals=None):
        t = self._check_inputs(x, t, context, added_cond, residuals)
        emb = self.embed(t, added_cond)                # [B,4*C0]
        h, skips = self.down_path(x, emb, context)     # [B,C_last,H/2^(n-1),W/2^(n-1)]
        h = self.mid(h, emb, context)
        if callable(residuals):                        # a function (skips, h) -> (skips, h) that adds them itself
            skips, h = residuals(skips, h)
        elif residuals is not None:                    # a ControlNet's: one per skip, then the mid block's
            skips = [s + r for s, r in zip(skips, residuals)]
            h = h + residuals[-1]
        h = self.up_path(h, skips, emb, context)       # [B,C0,H,W]
        return self.conv_out(F.silu(self.norm_out(h)))  # [B,out_channels,H,W]

    def _check_inputs(self, x, t, context, added_cond, residuals):
        cfg = self.config
        if not isinstance(x, torch.Tensor) or x.ndim != 4 or x.shape[1] != cfg.in_channels:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"UNet: x should be [B,{cfg.in_channels},H,W], got {got}")
        B, _, H, W = x.shape
        factor = 2 ** (cfg.levels - 1)
        if H % factor or W % factor:
            raise ValueError(f"UNet: height and width must be divisible by 2^(levels-1) = {factor} "
                             f"({cfg.levels} levels), got {H}x{W}")
        t = torch.as_tensor(t, device=x.device)
        if t.ndim == 0:
            t = t.expand(B)
        if t.ndim != 1 or t.shape[0] != B:
            raise ValueError(f"UNet: t should be a scalar or [B] = [{B}] timesteps, got shape {tuple(t.shape)}")
        if context is None or context.ndim != 3 or context.shape[-1] != cfg.context_dim or context.shape[0] != B:
            got = None if context is None else tuple(context.shape)
            raise ValueError(f"UNet: context should be [B,L,context_dim] = [{B},L,{cfg.context_dim}], got {got}")
        if cfg.added_cond_dim and (added_cond is None or tuple(added_cond.shape) != (B, cfg.added_cond_dim)):
            got = None if added_cond is None else tuple(added_cond.shape)
            raise ValueError(f"UNet: this config adds a conditioning vector to the time embedding: added_cond "
                             f"should be [B,added_cond_dim] = [{B},{cfg.added_cond_dim}], got {got}")
        if not cfg.added_cond_dim and added_cond is not None:
            raise ValueError("UNet: added_cond given, but this config has none (set added_cond_dim in UNetConfig)")
        if residuals is not None and not callable(residuals):
            want = [(B, *shape) for shape in self.residual_shapes(H, W)]
            got = [tuple(r.shape) for r in residuals]
            if got != want:
                raise ValueError(f"UNet: residuals should be {len(want)} tensors shaped {want} (one per skip, then "
                                 f"the mid block's), got {got}")
        return t


# -----------------------------------------------------------------------------
# the released models' hyper-parameters (diffusers' configs of the published checkpoints)

SD15 = UNetConfig()
SD21_BASE = UNetConfig(head_dim=64, heads=None, context_dim=1024, linear_proj=True)
SDXL = UNetConfig(channels=(320, 640, 1280), attention=(False, True, True), transformer_layers=(1, 2, 10),
                  heads=None, head_dim=64, context_dim=2048, linear_proj=True, added_cond_dim=1280 + 6 * 256)
SDXL_REFINER = UNetConfig(channels=(384, 768, 1536, 1536), attention=(False, True, True, False),
                          transformer_layers=4, heads=None, head_dim=64, context_dim=1280, linear_proj=True,
                          added_cond_dim=1280 + 5 * 256)

PRESETS = {
    "sd15-unet": lambda: UNet(replace(SD15)),
    "sd21base-unet": lambda: UNet(replace(SD21_BASE)),
    "sdxl-unet": lambda: UNet(replace(SDXL)),
    "sdxl-refiner-unet": lambda: UNet(replace(SDXL_REFINER)),
}


# -----------------------------------------------------------------------------
# where the words land: cross-attention maps (notebooks 05 and 06 measure them)


@torch.no_grad()
def cross_attention_maps(unet: UNet, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                         block: TransformerBlock | None = None) -> torch.Tensor:
    """Run unet(x, t, context) and return one transformer block's cross-attention weights (by default the mid
    block's first), averaged over heads: [B, h, w, L], each pixel's attention over the L text tokens (sums to 1)."""
    attn = (block or unet.mid.attention.blocks[0]).attn2
    seen = {}
    hook = attn.register_forward_hook(lambda module, args, out: seen.update(x=args[0], context=args[1]))
    try:
        unet(x, t, context)
    finally:
        hook.remove()
    maps = attn.weights(seen["x"], seen["context"]).mean(1)  # [B, h*w, L]
    side = math.isqrt(maps.shape[1])
    return maps.view(len(maps), side, side, -1)


def attention_share(maps: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """maps [h, w, L] (one image's cross-attention), mask [H, W] bool (an object's pixels, H a multiple of h) ->
    (the share of each token's attention mass that lands on the object [L], the object's share of the area: what a
    token that ignores the image would get)."""
    if maps.ndim != 3 or mask.ndim != 2:
        raise ValueError(f"expected maps [h, w, L] and a mask [H, W], got {tuple(maps.shape)} and {tuple(mask.shape)}")
    area = F.adaptive_avg_pool2d(mask[None, None].float(), maps.shape[:2])[0, 0].to(maps)  # [h, w]: cell covered
    return (maps * area[..., None]).sum((0, 1)) / maps.sum((0, 1)), area.mean()
