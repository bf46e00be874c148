"""ControlNet (Zhang, Rao, Agrawala 2023): steering a frozen denoiser with a map, for the UNet and the MMDiT.

    controlnet = ControlNet.from_unet(pipe.denoiser, downscale=pipe.vae.downsampling_factor)  # a trainable copy
    cpipe = attach(pipe, controlnet)                     # a TextToImage whose denoiser is Controlled(base, controlnet)
    images = cpipe.generate(["a red circle"], control=maps, control_scale=1.0)   # maps [N,3,H,W] in [0,1]

The recipe (paper sec. 3, fig. 3; diffusers' ControlNetModel, StableDiffusionControlNetPipeline):
- a **trainable copy** of the UNet's conv_in, time embedding, down path and mid block, initialised from the frozen
  base (`from_unet`); the base stays frozen;
- a **conditioning embedding** (`ConditioningEmbedding`, diffusers' ControlNetConditioningEmbedding): the control
  image at pixel size down to the latent grid, one stride-2 conv per halving (SD's 8x VAE: three; the course's 4x
  VAE: two), its zero-initialised output added after the copy's conv_in;
- **zero convolutions**: one zero-initialised 1x1 conv per skip and one for the mid block; their outputs, times
  the conditioning scale, are added to the frozen UNet's skips and mid block (`UNet.forward(residuals=...)`). At
  initialisation every residual is exactly zero: the controlled model starts as the base, bit for bit.
- guidance: the control image reaches both halves of the classifier-free batch (sdlearn.diffusion.guided passes an
  entry with no unconditional twin to both). **Guess mode** (diffusers' guess_mode): the unconditional half gets no
  control (the conditioner's twin of `control_scale` is 0) and the residuals are scaled 0.1 ... 1.0 across levels
  (torch.logspace(-1, 0, n)), coarse levels strongest.

SD3's ControlNet (diffusers' SD3ControlNetModel; `SD3ControlNet`): a copy of the first N joint blocks of the MMDiT
(none of them context-pre-only), the control image's VAE latents patchified by a zero-initialised patch embedding
(`pos_embed_input`) and added to the image tokens, one zero-initialised linear per block; the transformer adds
control i to its image tokens after block j for i = int(j / (depth / N)), in every block but the last (pre-only).

The LDM paper's way, for comparison (Rombach et al. 2022, sec. 4.3): `concatenate(pipe)` gives the UNet the map,
resized to the latent grid, as extra input channels (`widen_conv_in`: zero-initialised, so it too starts as the
base) and the whole UNet trains (`Concatenated`).

Where the control image is encoded: in the conditioner. `ControlConditioner` wraps the text conditioner and takes
`control` (images [N,3,H,W] in [0,1]) and `control_scale`; with a VAE (SD3) it encodes the images to latents (the
posterior's mean), without one (the UNet's ControlNet embeds pixels itself) it checks and passes them on. The
denoiser wrapper `Controlled(base, controlnet)` reads whatever `control` the ControlNet takes. Neither the
pipeline nor pretrained.save / load names a ControlNet: `Controlled` and `ControlConditioner` are composites
(init_args); the two ControlNets are models with a config dataclass.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from sdlearn.mmdit import SD3_MEDIUM, MMDiT, MMDiTConfig, PatchEmbed
from sdlearn.pipeline import Conditioner, TextToImage
from sdlearn.sdxl import text_time_input
from sdlearn.unet import SD15, SDXL, UNet, UNetConfig
from sdlearn.vae import AutoencoderKL

SD_EMBEDDING_CHANNELS = (16, 32, 96, 256)  # diffusers' conditioning_embedding_out_channels for SD's 8x VAE


def zero_module(module: nn.Module) -> nn.Module:
    """Every parameter of `module` set to zero (the paper's "zero convolution"): its output starts at 0."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def zero_conv(channels: int) -> nn.Conv2d:
    """A zero convolution (paper sec. 3.1, fig. 2b): a 1x1 conv from `channels` to `channels`, weight and bias 0,
    so that its output, added to the frozen UNet, is exactly 0 until training moves it (notebook 09, exercise 1)."""
    conv = nn.Conv2d(channels, channels, kernel_size=1)
    nn.init.zeros_(conv.weight)
    nn.init.zeros_(conv.bias)
    return conv


def add_residuals(skips: list[torch.Tensor], mid: torch.Tensor, residuals: list[torch.Tensor],
                  scale) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The frozen UNet's skips and mid-block output with a ControlNet's residuals added, times the conditioning
    scale (a float or [B,1,1,1]): residuals[i] to skips[i] (the order the down path makes both), the last to mid
    (diffusers' down_block_additional_residuals / mid_block_additional_residual; notebook 09, exercise 2)."""
    skips = [s + r * scale for s, r in zip(skips, residuals[:-1])]
    return skips, mid + residuals[-1] * scale


def embedding_strides(image_size: int, latent_size: int) -> list[int]:
    """The strides of the conditioning embedding's convs after conv_in, for a control image of image_size pixels
    per side and a latent grid of latent_size: one pair per stage, a width-keeping conv (stride 1) then a conv to
    the next width (stride 2), one stage per halving (SD's 8x VAE: three; the course's 4x VAE: two; notebook 09,
    exercise 3)."""
    factor = image_size // latent_size if latent_size > 0 else 0
    if factor < 1 or factor * latent_size != image_size or factor & (factor - 1):
        raise ValueError(f"the control image ({image_size} px) must be a power-of-2 multiple of the latent grid "
                         f"({latent_size}), got a ratio of {image_size / max(latent_size, 1):g}")
    return [1, 2] * (factor.bit_length() - 1)


def check_scale(scale, batch: int, name: str = "control_scale") -> torch.Tensor | float:
    """A conditioning scale: a finite number, or a tensor [B] of them (one per sample) -> a float or [B,1]."""
    if isinstance(scale, torch.Tensor) and scale.ndim == 1 and scale.shape[0] == batch:
        if not torch.isfinite(scale).all():
            raise ValueError(f"{name} must be finite numbers, got {scale.tolist()}")
        return scale[:, None]
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        got = tuple(scale.shape) if isinstance(scale, torch.Tensor) else repr(scale)
        raise ValueError(f"{name} must be a finite number (or a tensor [B] = [{batch}] of them), got {got}")
    return float(scale)


def _scaled(outputs: list[torch.Tensor], scale, guess: bool) -> list[torch.Tensor]:
    """outputs[i] * scale (a float or [B,1]), times logspace(-1, 0, n)[i] in guess mode (diffusers' order)."""
    levels = torch.logspace(-1, 0, len(outputs)).tolist() if guess else [1.0] * len(outputs)
    out = []
    for o, level in zip(outputs, levels):
        s = scale.to(o.dtype).view(-1, *[1] * (o.ndim - 1)) if isinstance(scale, torch.Tensor) else scale
        out.append(o * (s * level))
    return out


# -----------------------------------------------------------------------------
# the UNet's ControlNet


@dataclass
class ControlNetConfig(UNetConfig):
    """The UNet's config (the copy's) plus the conditioning embedding's and SDXL's micro-conditions."""

    conditioning_channels: int = 3                               # channels of the control image
    embedding_channels: tuple[int, ...] = SD_EMBEDDING_CHANNELS  # one stride-2 stage between each pair
    num_time_ids: int = 0    # > 0: reads SDXL's pooled text and time ids as an SDXLUNet (in added_cond_dim)
    time_id_dim: int = 256
    embedding_strides: tuple[int, ...] = ()  # the embedding's convs after conv_in; () = (1, 2) per pair (diffusers')

    def __post_init__(self):
        super().__post_init__()
        self.embedding_channels = tuple(int(c) for c in self.embedding_channels)
        self.embedding_strides = tuple(int(s) for s in self.embedding_strides)
        pairs = 2 * (len(self.embedding_channels) - 1)
        if self.embedding_strides and (len(self.embedding_strides) != pairs or min(self.embedding_strides) < 1):
            raise ValueError(f"ControlNetConfig: embedding_strides needs one positive stride per conv after conv_in, "
                             f"{pairs} for embedding_channels {self.embedding_channels}, got {self.embedding_strides}")
        if not self.embedding_channels or min(self.embedding_channels) < 1 or self.conditioning_channels < 1:
            raise ValueError(f"ControlNetConfig: embedding_channels needs at least one positive width and "
                             f"conditioning_channels >= 1, got {self.embedding_channels}, {self.conditioning_channels}")
        if self.num_time_ids and self.added_cond_dim <= self.num_time_ids * self.time_id_dim:
            raise ValueError(f"ControlNetConfig: added_cond_dim {self.added_cond_dim} must hold the pooled text and "
                             f"{self.num_time_ids} time ids of {self.time_id_dim}")

    @property
    def strides(self) -> tuple[int, ...]:
        """The strides of the embedding's convs after conv_in: a width-keeping conv (1), then one to the next
        width (2), per pair of widths, unless embedding_strides says otherwise."""
        return self.embedding_strides or (1, 2) * (len(self.embedding_channels) - 1)

    @property
    def downscale(self) -> int:
        """How much smaller than the control image the latent grid is: the product of the strides."""
        return math.prod(self.strides)


def _embedding_layout(downscale, channels, strides) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(embedding widths, strides; () for the default) of a conditioning embedding that shrinks maps downscale x."""
    stages = round(math.log2(downscale)) if isinstance(downscale, int) and downscale >= 1 else -1
    if stages < 0 or 2 ** stages != downscale or (channels is None and stages > 3):
        raise ValueError(f"downscale must be the VAE's downsampling factor, a power of 2 (up to 8 with SD's "
                         f"embedding widths), got {downscale!r}")
    if strides is not None:
        strides = tuple(int(s) for s in strides)
        if len(strides) % 2 or math.prod(strides) != downscale:
            raise ValueError(f"strides {list(strides)} should be one pair per stage (a width-keeping conv, a conv to "
                             f"the next width) shrinking maps {downscale}x (the VAE's factor), got "
                             f"{len(strides)} strides shrinking {math.prod(strides)}x")
        stages = len(strides) // 2
    channels = tuple(channels or SD_EMBEDDING_CHANNELS[:stages + 1])
    if len(channels) - 1 != stages:
        raise ValueError(f"embedding_channels {channels} make {len(channels) - 1} stride-2 stages, but a "
                         f"{downscale}x VAE needs {stages}: give {stages + 1} widths")
    return channels, () if strides is None or strides == (1, 2) * stages else strides


class ConditioningEmbedding(nn.Module):
    """The control image [B,c,H,W] -> features [B,C0,H/2^s,W/2^s] (diffusers' ControlNetConditioningEmbedding):
    conv_in 3x3, then for each pair of widths a 3x3 conv keeping the width and a 3x3 stride-2 conv to the next,
    SiLU after every conv, then conv_out 3x3, zero-initialised."""

    def __init__(self, in_channels: int, channels: tuple[int, ...], out_channels: int,
                 strides: tuple[int, ...] | None = None):
        super().__init__()
        strides = strides or (1, 2) * (len(channels) - 1)            # notebook 09's exercise 3: embedding_strides
        self.conv_in = nn.Conv2d(in_channels, channels[0], 3, padding=1)
        self.blocks = nn.ModuleList()
        for i, (a, b) in enumerate(zip(channels, channels[1:])):
            self.blocks.append(nn.Conv2d(a, a, 3, padding=1, stride=strides[2 * i]))
            self.blocks.append(nn.Conv2d(a, b, 3, padding=1, stride=strides[2 * i + 1]))
        self.conv_out = zero_module(nn.Conv2d(channels[-1], out_channels, 3, padding=1))

    def forward(self, x):
        h = F.silu(self.conv_in(x))
        for conv in self.blocks:
            h = F.silu(conv(h))
        return self.conv_out(h)


class ControlNet(UNet):
    """The UNet's first half, made to steer the whole: controlnet(x, t, control, context, ...) -> residuals, one per
    skip of the base UNet then the mid block's (`UNet.residual_shapes`), times `scale`."""

    def __init__(self, config: ControlNetConfig, zero_conv: Callable[[int], nn.Module] = zero_conv):
        super().__init__(config)
        del self.up, self.norm_out, self.conv_out                   # the copy stops after the mid block
        cfg = self.config
        self.hint = ConditioningEmbedding(cfg.conditioning_channels, cfg.embedding_channels, cfg.channels[0],
                                          cfg.strides)
        self.zero_skips = nn.ModuleList(zero_conv(c) for c, _ in self.skip_levels)
        self.zero_mid = zero_conv(cfg.channels[-1])

    @classmethod
    def from_unet(cls, base: nn.Module, downscale: int = 8, embedding_channels: tuple[int, ...] | None = None,
                  conditioning_channels: int = 3, zero_conv: Callable[[int], nn.Module] = zero_conv,
                  strides: Sequence[int] | None = None) -> ControlNet:
        """A ControlNet whose copy starts as `base` (a UNet, or an SDXLUNet around one; diffusers' from_unet).
        downscale: the VAE's downsampling factor, which sets the stride-2 stages (SD: 8, three; course: 4, two);
        embedding_channels default to SD's (16, 32, 96, 256), cut to that many stages. zero_conv(channels) makes
        each zero convolution, strides are the embedding's (`embedding_strides`): notebook 09's exercises."""
        channels, strides = _embedding_layout(downscale, embedding_channels, strides)
        unet = getattr(base, "unet", base)                           # an SDXLUNet holds its UNet
        config = replace(cls.config_for(base, channels, conditioning_channels), embedding_strides=strides)
        controlnet = cls(config, zero_conv).to(next(unet.parameters()).device)
        missing, unexpected = controlnet.load_state_dict(
            {k: v for k, v in unet.state_dict().items() if k.split(".")[0] in cls.COPIED}, strict=False)
        assert not unexpected and all(k.split(".")[0] in ("hint", "zero_skips", "zero_mid") for k in missing)
        return controlnet

    @staticmethod
    def config_for(base: nn.Module, embedding_channels: tuple[int, ...], conditioning_channels: int = 3):
        """The ControlNetConfig of a ControlNet for `base` (a UNet, or an SDXLUNet: its time ids too)."""
        unet = getattr(base, "unet", base)
        ids = {"num_time_ids": base.num_time_ids, "time_id_dim": base.time_id_dim} if unet is not base else {}
        return ControlNetConfig(**asdict(unet.config), conditioning_channels=conditioning_channels,
                                embedding_channels=tuple(embedding_channels), **ids)

    reads_latents = False                                            # it embeds the control image at pixel size
    COPIED = ("conv_in", "time_embed", "add_embed", "down", "mid")   # what from_unet copies from the base

    @property
    def control_channels(self) -> int:
        return self.config.conditioning_channels

    @property
    def cond_dims(self) -> dict[str, int]:
        cfg = self.config
        if cfg.num_time_ids:
            return {"context": cfg.context_dim, "pooled": cfg.added_cond_dim - cfg.num_time_ids * cfg.time_id_dim,
                    "time_ids": cfg.num_time_ids}
        return super().cond_dims

    def mismatches(self, base: nn.Module, size: int = 64) -> list[str]:
        """What differs between this ControlNet and the denoiser it is attached to (empty: it fits)."""
        out = []
        if base.latent_channels != self.latent_channels:
            out.append(f"latent channels: {self.latent_channels} here, {base.latent_channels} in the base")
        mine, theirs = self.residual_shapes(size, size), base.residual_shapes(size, size)
        if mine != theirs:
            out.append(f"skips (width, levels) at {size}x{size}: {mine} here, {theirs} in the base")
        if self.cond_dims != base.cond_dims:
            out.append(f"conditions (cross-attention width): {self.cond_dims} here, {base.cond_dims} in the base")
        return out

    def place(self, residuals: list, n: int) -> list:
        """The residuals in the base's order (the UNet's: one per skip, then the mid block's, as made)."""
        return residuals

    def check_control(self, x: torch.Tensor, control) -> None:
        B, _, h, w = x.shape
        f, c = self.config.downscale, self.config.conditioning_channels
        want = (B, c, h * f, w * f)
        if not isinstance(control, torch.Tensor) or tuple(control.shape) != want:
            got = tuple(control.shape) if isinstance(control, torch.Tensor) else type(control).__name__
            raise ValueError(f"ControlNet: control should be [B,{c},H,W] = {list(want)}: the latents' {h}x{w} grid "
                             f"times {f} (the conditioning embedding's {len(self.config.embedding_channels) - 1} "
                             f"stride-2 stages; the image at pixel size), got {got}")

    def forward(self, x, t, control, context, added_cond=None, pooled=None, time_ids=None, scale=1.0,
                guess=False) -> list[torch.Tensor]:
        cfg = self.config
        if cfg.num_time_ids:
            if pooled is None or time_ids is None:
                raise ValueError("ControlNet: this one reads SDXL's pooled and time_ids, got None")
            added_cond = text_time_input(pooled, time_ids, cfg.time_id_dim)    # [B, P + K * time_id_dim]
        t = self._check_inputs(x, t, context, added_cond, None)
        self.check_control(x, control)
        scale = check_scale(scale, x.shape[0])
        emb = self.embed(t, added_cond)                                            # [B,4*C0]
        h, skips = self.down_path(x, emb, context, self.hint(control.to(x.dtype)))
        h = self.mid(h, emb, context)                                              # [B,C_last,h',w']
        outputs = [zero(s) for zero, s in zip(self.zero_skips, skips)] + [self.zero_mid(h)]
        return _scaled(outputs, scale, guess)


# -----------------------------------------------------------------------------
# the MMDiT's ControlNet


@dataclass
class SD3ControlNetConfig(MMDiTConfig):
    """The MMDiT's config, `depth` the number of copied joint blocks (none pre-only), plus diffusers'
    extra_conditioning_channels and force_zeros_for_pooled_projection (InstantX's: it reads zeros for the pooled
    text, and its control latents are scaled without the VAE's shift)."""

    extra_conditioning_channels: int = 0
    zero_pooled: bool = True

    @property
    def control_channels(self) -> int:
        return self.in_channels + self.extra_conditioning_channels


class SD3ControlNet(MMDiT):
    """controlnet(x, t, control latents, context, pooled) -> one residual [B,N,D] per copied block, times scale."""

    def __init__(self, config: SD3ControlNetConfig):
        super().__init__(replace(config, depth=config.depth + 1))   # the last joint block would be pre-only: drop it
        self.config = config
        self.joint_blocks = self.joint_blocks[:-1]
        del self.final_layer
        D, p = config.width, config.patch_size
        self.pos_embed_input = zero_module(PatchEmbed(config.control_channels, D, p))
        self.controlnet_blocks = nn.ModuleList(zero_module(nn.Linear(D, D)) for _ in range(config.depth))

    @classmethod
    def from_mmdit(cls, base: MMDiT, depth: int = 12, extra_conditioning_channels: int = 0,
                   zero_pooled: bool = True) -> SD3ControlNet:
        """A ControlNet whose embeddings and first `depth` joint blocks start as `base`'s (diffusers'
        from_transformer)."""
        if not 1 <= depth < base.config.depth:
            raise ValueError(f"depth must be 1 .. {base.config.depth - 1} (the base's blocks, not its pre-only last "
                             f"one), got {depth}")
        cfg = SD3ControlNetConfig(**vars(replace(base.config, depth=depth)),
                                  extra_conditioning_channels=extra_conditioning_channels, zero_pooled=zero_pooled)
        controlnet = cls(cfg).to(next(base.parameters()).device)
        controlnet.load_state_dict({k: v for k, v in base.state_dict().items()
                                    if k in controlnet.state_dict() and not k.startswith(("pos_embed_input.",
                                                                                          "controlnet_blocks."))},
                                   strict=False)
        return controlnet

    control_channels = property(lambda self: self.config.control_channels)
    reads_latents = True                                             # the control image's VAE latents

    def mismatches(self, base: nn.Module, size: int = 32) -> list[str]:
        out = []
        if base.latent_channels != self.latent_channels:
            out.append(f"latent channels: {self.latent_channels} here, {base.latent_channels} in the base")
        mine, theirs = self.residual_shapes(size, size)[0], base.residual_shapes(size, size)[0]
        if mine != theirs:
            out.append(f"tokens (patches, width) at {size}x{size}: {mine} here, {theirs} in the base")
        if self.cond_dims != base.cond_dims:
            out.append(f"conditions (text widths): {self.cond_dims} here, {base.cond_dims} in the base")
        if len(base.residual_shapes(size, size)) < 2:
            out.append("the base has a single (pre-only) joint block: nothing to steer")
        return out

    def place(self, residuals: list, n: int) -> list:
        """Control i to base block j for i = int(j / (n / N)), none to the last (pre-only) block (diffusers'
        SD3Transformer2DModel.forward)."""
        interval = n / len(residuals)
        return [residuals[int(j / interval)] if j < n - 1 else None for j in range(n)]

    def forward(self, x, t, control, context, pooled, scale=1.0, guess=False) -> list[torch.Tensor]:
        if guess:
            raise ValueError("SD3ControlNet: guess mode is the UNet ControlNet's (diffusers has none for SD3)")
        t = self._check_inputs(x, t, context, pooled, None)
        B, _, H, W = x.shape
        c = self.control_channels
        if not isinstance(control, torch.Tensor) or tuple(control.shape) != (B, c, H, W):
            got = tuple(control.shape) if isinstance(control, torch.Tensor) else type(control).__name__
            raise ValueError(f"SD3ControlNet: control should be the control image's latents [B,{c},H,W] = "
                             f"{[B, c, H, W]} (the grid of x), got {got}")
        scale = check_scale(scale, B)
        c_vec = self.embed(t, torch.zeros_like(pooled) if self.config.zero_pooled else pooled)   # [B,D]
        h = self.patchify(x) + self.pos_embed_input(control.to(x.dtype))                       # [B,N,D]
        ctx = self.context_embedder(context)                                                    # [B,L,D]
        outputs = []
        for block, linear in zip(self.joint_blocks, self.controlnet_blocks):
            h, ctx = block(h, ctx, c_vec)
            outputs.append(linear(h))
        return _scaled(outputs, scale, False)


# -----------------------------------------------------------------------------
# the LDM paper's way: the map concatenated to the input


def widen_conv_in(unet: UNet, extra: int | None = None) -> UNet:
    """A copy of `unet` whose conv_in reads `extra` more input channels (default: 1 + its latent channels, SD's
    inpainting UNet, 9 in all, notebook 10), their weights zero-initialised: at initialisation it is the text-to-image
    UNet, whatever the extra inputs (the LDM paper's concatenation, sec. 4.3, started from a trained model)."""
    cfg = unet.config
    extra = 1 + cfg.in_channels if extra is None else extra
    wide = UNet(replace(cfg, in_channels=cfg.in_channels + extra, out_channels=cfg.out_channels))
    wide = wide.to(next(unet.parameters()).device)
    state = dict(unet.state_dict())
    w = state["conv_in.weight"]                                               # [C0, C, 3, 3]
    state["conv_in.weight"] = torch.cat([w, w.new_zeros(w.shape[0], extra, *w.shape[2:])], dim=1)
    wide.load_state_dict(state)
    return wide


class Concatenated(nn.Module):
    """A map as extra input channels (Rombach et al. 2022, sec. 4.3, semantic synthesis): the control image
    resized to the latent grid by area and concatenated to the latents; the whole UNet (widen_conv_in) is trained.
    concatenated(x [B,C,h,w], t, control [B,3,H,W] in [0,1], control_scale, **cond)
      = unet(cat([x, control_scale * area(control)]), t, **cond) -> [B,C,h,w]."""

    def __init__(self, unet: UNet, control_channels: int = 3):
        super().__init__()
        cfg = unet.config
        if cfg.in_channels != cfg.out_channels + control_channels:
            raise ValueError(f"a map-concatenating UNet reads {cfg.out_channels} + {control_channels} channels "
                             f"(latents, map), this one {cfg.in_channels}: widen_conv_in(unet, {control_channels})")
        self.unet, self.control_channels = unet, control_channels

    def init_args(self) -> dict:
        return {"unet": self.unet, "control_channels": self.control_channels}

    latent_channels = property(lambda self: self.unet.config.out_channels)
    prediction = property(lambda self: self.unet.prediction)
    cond_dims = property(lambda self: {**self.unet.cond_dims, "control": self.control_channels})

    def residual_shapes(self, height: int, width: int) -> list:
        return self.unet.residual_shapes(height, width)

    def forward(self, x, t, control, control_scale=1.0, **cond):
        B, _, h, w = x.shape
        c = self.control_channels
        if not isinstance(control, torch.Tensor) or control.ndim != 4 or tuple(control.shape[:2]) != (B, c):
            got = tuple(control.shape) if isinstance(control, torch.Tensor) else type(control).__name__
            raise ValueError(f"Concatenated: control should be maps [B,{c},H,W] = [{B},{c},H,W], got {got}")
        scale = check_scale(control_scale, B)
        scale = scale.view(-1, 1, 1, 1) if isinstance(scale, torch.Tensor) else scale      # [B,1,1,1] or a float
        small = F.interpolate(control.to(x.dtype), size=(h, w), mode="area")               # [B,c,h,w]
        return self.unet(torch.cat([x, small * scale], dim=1), t, **cond)


# -----------------------------------------------------------------------------
# a controlled denoiser, and the conditioner that takes the control image


class Controlled(nn.Module):
    """A frozen denoiser steered by a ControlNet (a sdlearn.diffusion.Denoiser): controlled(x, t, control=...,
    control_scale=1.0, **the base's conditions) = base(x, t, **cond, residuals=controlnet(...))."""

    def __init__(self, base: nn.Module, controlnet: nn.Module, guess_mode: bool = False,
                 add_residuals: Callable | None = None):
        super().__init__()
        wrong = controlnet.mismatches(base)
        if wrong:
            raise ValueError(f"the {type(controlnet).__name__} was made for another denoiser than the "
                             f"{type(base).__name__} it is attached to: " + "; ".join(wrong))
        if add_residuals is not None and not isinstance(controlnet, ControlNet):
            raise ValueError(f"add_residuals adds a UNet ControlNet's residuals to the skips; a "
                             f"{type(controlnet).__name__} adds its own to the joint blocks")
        self.base, self.controlnet, self.guess_mode = base, controlnet, bool(guess_mode)
        self.add_residuals = add_residuals   # (skips, mid, residuals, scale) -> (skips, mid): notebook 09's exercise

    def init_args(self) -> dict:
        return {"base": self.base, "controlnet": self.controlnet, "guess_mode": self.guess_mode}

    latent_channels = property(lambda self: self.base.latent_channels)
    prediction = property(lambda self: self.base.prediction)
    cond_dims = property(lambda self: {**self.base.cond_dims, "control": self.controlnet.control_channels})

    def residual_shapes(self, height: int, width: int) -> list:
        return self.base.residual_shapes(height, width)

    def forward(self, x, t, control, control_scale=1.0, **cond):
        own = {k: cond.get(k) for k in self.controlnet.cond_dims}
        if self.add_residuals is not None:      # the residuals unscaled; the function adds them times the scale
            scale = check_scale(control_scale, x.shape[0])
            scale = scale.view(-1, 1, 1, 1) if isinstance(scale, torch.Tensor) else scale     # [B,1,1,1] or a float
            outputs = self.controlnet(x, t, control, **own, scale=1.0, guess=self.guess_mode)
            return self.base(x, t, **cond, residuals=lambda skips, h: self.add_residuals(skips, h, outputs, scale))
        residuals = self.controlnet(x, t, control, **own, scale=control_scale, guess=self.guess_mode)
        n = len(self.base.residual_shapes(*x.shape[2:]))
        return self.base(x, t, **cond, residuals=self.controlnet.place(residuals, n))


class ControlConditioner(Conditioner):
    """A conditioner and the control image: conditioner(prompts, control=images [N or 1,3,H,W] in [0,1],
    control_scale=1.0, ...) -> its entries, "control" (the images, or with a VAE their latents: the posterior's
    mean, (z - shift) * scale, without the shift when latent_shift is False) and "control_scale" [N]. In guess
    mode the unconditional twin has control_scale 0: the unconditional half of guidance gets no control."""

    takes = ("control", "control_scale")

    def __init__(self, conditioner: Conditioner, vae: AutoencoderKL | None = None, guess_mode: bool = False,
                 latent_shift: bool = True):
        super().__init__()
        self.conditioner, self.vae, self.guess_mode, self.latent_shift = conditioner, vae, guess_mode, latent_shift
        self.takes = (*conditioner.takes, *ControlConditioner.takes)
        self.dropout_keys = conditioner.dropout_keys

    def init_args(self) -> dict:
        return {"conditioner": self.conditioner, "vae": self.vae, "guess_mode": self.guess_mode,
                "latent_shift": self.latent_shift}

    @property
    def dims(self) -> dict[str, int]:
        return self.conditioner.dims

    def encode_control(self, control) -> torch.Tensor:
        """Images [N,3,H,W] in [0,1] -> what the ControlNet reads (themselves, or their scaled latents)."""
        if not isinstance(control, torch.Tensor) or control.ndim != 4 or control.shape[1] != 3:
            got = tuple(control.shape) if isinstance(control, torch.Tensor) else type(control).__name__
            raise ValueError(f"control should be images [N,3,H,W] (RGB, in [0, 1], at the pipeline's pixel size), "
                             f"got {got}")
        if control.min() < 0 or control.max() > 1:
            raise ValueError(f"control images should be in [0, 1], got values in [{control.min().item():.3g}, "
                             f"{control.max().item():.3g}]")
        if self.vae is None:
            return control
        p = next(self.vae.parameters())
        z = self.vae.encode(control.to(p.device, p.dtype) * 2 - 1).mode()
        cfg = self.vae.config
        return ((z - (cfg.shift_factor if self.latent_shift else 0.0)) * cfg.scaling_factor).float()

    def encode(self, prompts: list[str], control=None, control_scale=1.0, **conditions) -> dict[str, torch.Tensor]:
        cond = self.conditioner.encode(prompts, **conditions)
        if control is None:
            return cond
        scale = check_scale(control_scale, len(prompts))
        return {**cond, "control": self.encode_control(control),
                "control_scale": torch.full((len(prompts),), float(scale))}

    def encode_unconditional(self, n: int, control=None, control_scale=1.0, **conditions) -> dict[str, torch.Tensor]:
        twin = self.conditioner.encode_unconditional(n, **conditions)
        return {**twin, "control_scale": torch.zeros(n)} if self.guess_mode and control is not None else twin


def attach(pipe: TextToImage, controlnet: nn.Module, guess_mode: bool = False,
           add_residuals: Callable | None = None) -> TextToImage:
    """pipe with its denoiser steered by `controlnet`: Controlled(denoiser, controlnet) and a ControlConditioner
    (with the pipe's VAE when the ControlNet reads latents, SD3's). add_residuals: Controlled's."""
    latents = controlnet.reads_latents
    if not latents and controlnet.config.downscale != pipe.vae.downsampling_factor:
        raise ValueError(f"the ControlNet's conditioning embedding shrinks maps {controlnet.config.downscale}x "
                         f"({len(controlnet.config.embedding_channels) - 1} stride-2 stages) but this pipeline's VAE "
                         f"{pipe.vae.downsampling_factor}x: its maps would miss the latent grid (ControlNet.from_unet"
                         f"(..., downscale={pipe.vae.downsampling_factor}))")
    shift = not (latents and controlnet.config.zero_pooled)
    conditioner = ControlConditioner(pipe.conditioner, pipe.vae if latents else None, guess_mode, shift)
    return TextToImage(conditioner, Controlled(pipe.denoiser, controlnet, guess_mode, add_residuals), pipe.schedule,
                       pipe.vae, image_size=pipe.image_size)


def concatenate(pipe: TextToImage, control_channels: int = 3) -> TextToImage:
    """pipe with the map concatenated to its UNet's input (Concatenated(widen_conv_in(unet))): a new, whole UNet to
    train, which starts as pipe's own; the conditioner passes the maps on as pixels (ControlConditioner, no VAE)."""
    unet = Concatenated(widen_conv_in(pipe.denoiser, control_channels), control_channels)
    return TextToImage(ControlConditioner(pipe.conditioner), unet, pipe.schedule, pipe.vae, image_size=pipe.image_size)


# -----------------------------------------------------------------------------
# the released models' hyper-parameters

# InstantX/SD3-Controlnet-Canny's config.json (huggingface.co/InstantX/SD3-Controlnet-Canny, diffusers'
# SD3ControlNetModel keywords, the rest at their defaults): 6 joint blocks of SD3-medium's width; its 1.19 GB
# weights file is these 538,805,760 parameters and the 192 x 192 position buffer in float16
SD3_CONTROLNET_CANNY = dict(sample_size=128, patch_size=2, in_channels=16, num_layers=6, attention_head_dim=64,
                            num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                            pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192)


def _preset(unet: UNetConfig, **options) -> ControlNet:
    return ControlNet(ControlNetConfig(**asdict(unet), **options))


PRESETS = {
    # ControlNetModel.from_unet of SD 1.5's UNet (lllyasviel/control_v11p_sd15_*), of SDXL base's (diffusers/
    # controlnet-*-sdxl-1.0): conditioning channels 16, 32, 96, 256
    "sd15-controlnet": lambda: _preset(SD15),
    "sdxl-controlnet": lambda: _preset(SDXL, num_time_ids=6, time_id_dim=256),
    "sd3-controlnet": lambda: SD3ControlNet(SD3ControlNetConfig(**asdict(replace(SD3_MEDIUM, depth=6)))),
}


def read_control(path) -> torch.Tensor:
    """A map image file (PNG, JPEG, ...) -> control [1,3,H,W] in [0,1] (RGB), as generate(control=) takes it."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            rgb = image.convert("RGB")
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"control map {path}: not an image file (expected a PNG or JPEG map, RGB in [0, 255]): "
                         f"{e}") from e
    data = torch.frombuffer(bytearray(rgb.tobytes()), dtype=torch.uint8)
    return data.view(rgb.height, rgb.width, 3).permute(2, 0, 1)[None].float() / 255
