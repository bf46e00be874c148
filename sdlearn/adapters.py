"""Image prompts (IP-Adapter, Ye et al. 2023): "make one like this", a picture as a condition beside the text.

    adapter = IPAdapter.from_unet(pipe.denoiser, embed_dim=64, num_tokens=4)   # new keys / values, from the text's
    ipipe = attach(pipe, adapter, image_encoder)          # a TextToImage whose denoiser is ImagePrompted(base, adapter)
    images = ipipe.generate([""], image_prompt=src, image_scale=1.0)        # src [N or 1,3,H,W] in [-1, 1]

The recipe (paper sec. 3.2, fig. 2; diffusers' ImageProjection, IPAdapterAttnProcessor2_0):
- an **image encoder** embeds the prompt image (SD: CLIP ViT-H's image embedding, 1024 wide; the course: the image
  tower trained beside the text encoder in notebook 02, `shapes-clip-image`, 64 wide), kept frozen;
- an **image projection** (`ImageProjection`) turns that one vector into a few tokens the UNet can attend to: a
  linear to num_tokens x cross_attention_dim, reshaped, then LayerNorm (SD 1.5's: 4 tokens);
- **decoupled cross-attention** (eq. 5): every cross-attention of the frozen UNet keeps its queries and its text
  keys / values, and gains its own key and value projections for the image tokens (`to_k_ip`, `to_v_ip`, no bias,
  initialised from the text's `to_k`, `to_v`); its output is attn(q, k_text, v_text) + scale * attn(q, k_ip, v_ip),
  before the frozen output projection. Only the projection and the new keys / values train (22M of SD 1.5's 860M).

Guidance (diffusers): the unconditional half of the batch reads the image embedding of zeros (its twin), both halves
the same scale. Where the image prompt is encoded: in the conditioner (`ImagePromptConditioner`), which wraps the
text conditioner and takes `image_prompt` (images) and `image_scale`; the denoiser wrapper `ImagePrompted(base,
adapter)` swaps the decoupled attentions in for the length of one call and puts the frozen ones back, so the base
UNet is never modified and saves as itself. Neither the pipeline nor pretrained.save / load names an adapter.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from sdlearn.attention import Attention
from sdlearn.controlnet import check_scale
from sdlearn.pipeline import Conditioner, TextToImage
from sdlearn.unet import TransformerBlock


def decoupled_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_ip: torch.Tensor, v_ip: torch.Tensor,
                        scale) -> torch.Tensor:
    """Decoupled cross-attention (Ye et al. 2023, eq. 5): the text's attention plus `scale` times the image's,
    with the same queries. q [B,h,N,d], k, v [B,h,L,d] (text), k_ip, v_ip [B,h,K,d] (image tokens), scale a float
    or [B,1,1,1] -> [B,h,N,d]. Two softmaxes, one over the text tokens and one over the image tokens: concatenating
    them into one would let the image tokens take attention from the text (notebook 10, exercise 1)."""
    text = F.scaled_dot_product_attention(q, k, v)            # [B,h,N,d]
    image = F.scaled_dot_product_attention(q, k_ip, v_ip)     # [B,h,N,d]
    return text + scale * image


def image_tokens(embeds: torch.Tensor, linear: nn.Linear, norm: nn.LayerNorm, num_tokens: int) -> torch.Tensor:
    """The image projection (diffusers' ImageProjection): embeds [B,E] -> linear [B,K*D] -> [B,K,D] -> LayerNorm over
    D, each token normalised apart (notebook 10, exercise 2)."""
    h = linear(embeds.to(linear.weight.dtype))                  # [B, K*D]
    return norm(rearrange(h, "b (k d) -> b k d", k=num_tokens))  # [B, K, D]


class ImageProjection(nn.Module):
    """Image embedding [B,E] -> num_tokens image tokens [B,K,D] (diffusers' ImageProjection: `image_embeds`, `norm`)."""

    def __init__(self, embed_dim: int, context_dim: int, num_tokens: int = 4,
                 tokens_fn: Callable = image_tokens):
        super().__init__()
        self.num_tokens, self.tokens_fn = num_tokens, tokens_fn
        self.image_embeds = nn.Linear(embed_dim, num_tokens * context_dim)
        self.norm = nn.LayerNorm(context_dim)

    def forward(self, embeds: torch.Tensor) -> torch.Tensor:
        return self.tokens_fn(embeds, self.image_embeds, self.norm, self.num_tokens)


class IPAttention(nn.Module):
    """The image's key and value projections of one cross-attention: to_k_ip, to_v_ip (context_dim -> inner)."""

    def __init__(self, context_dim: int, inner: int):
        super().__init__()
        self.to_k_ip = nn.Linear(context_dim, inner, bias=False)
        self.to_v_ip = nn.Linear(context_dim, inner, bias=False)


class DecoupledCrossAttention(nn.Module):
    """A frozen cross-attention (sdlearn.attention.Attention) with an image prompt's keys and values beside the
    text's: forward(x, context) = to_out(attention_fn(q, k, v, k_ip, v_ip, scale)), the image tokens fixed at
    construction (one call of the UNet)."""

    def __init__(self, attn: Attention, ip: IPAttention, tokens: torch.Tensor, scale,
                 attention_fn: Callable = decoupled_attention):
        super().__init__()
        self.attn, self.ip, self.tokens, self.scale, self.attention_fn = attn, ip, tokens, scale, attention_fn

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        a = self.attn
        q, k, v = a._qkv(x, context)                                            # [B,h,N,d], [B,h,L,d] x 2
        k_ip, v_ip = (rearrange(f(self.tokens.to(f.weight.dtype)).to(q.dtype), "b k (h d) -> b h k d", h=a.heads)
                      for f in (self.ip.to_k_ip, self.ip.to_v_ip))              # [B,h,K,d] each (q's dtype)
        out = self.attention_fn(q, k, v, k_ip, v_ip, self.scale)                # [B,h,N,d]
        return a.dropout(a.to_out(rearrange(out, "b h n d -> b n (h d)")))      # [B,N,dim]


def cross_attention_blocks(unet: nn.Module) -> list[TransformerBlock]:
    """The transformer blocks of a UNet (or an SDXLUNet around one) in the order diffusers numbers their cross-
    attentions: down levels, up levels, then the mid block (UNet2DConditionModel's attn_processors)."""
    unet = getattr(unet, "unet", unet)
    blocks = [m for part in (unet.down, unet.up, unet.mid) for m in part.modules() if isinstance(m, TransformerBlock)]
    if not blocks:
        raise ValueError(f"the {type(unet).__name__} has no cross-attention: nothing to attach an image prompt to")
    return blocks


@dataclass
class IPAdapterConfig:
    embed_dim: int = 1024                       # the image encoder's embedding (SD 1.5's IP-Adapter: CLIP ViT-H, 1024)
    context_dim: int = 768                      # the UNet's cross-attention width (the text tokens')
    num_tokens: int = 4                         # image tokens
    inner_dims: tuple[int, ...] = ()            # each cross-attention's heads * head_dim, in diffusers' order

    def __post_init__(self):
        self.inner_dims = tuple(int(d) for d in self.inner_dims)
        if min(self.embed_dim, self.context_dim, self.num_tokens) < 1 or not self.inner_dims:
            raise ValueError(f"IPAdapterConfig: embed_dim, context_dim, num_tokens must be >= 1 and inner_dims one "
                             f"width per cross-attention, got {self}")


class IPAdapter(nn.Module):
    """The trainable part of an image prompt: the image projection and one IPAttention per cross-attention of the
    UNet it was made for."""

    def __init__(self, config: IPAdapterConfig, tokens_fn: Callable = image_tokens):
        super().__init__()
        self.config = cfg = config
        self.image_proj = ImageProjection(cfg.embed_dim, cfg.context_dim, cfg.num_tokens, tokens_fn)
        self.layers = nn.ModuleList(IPAttention(cfg.context_dim, d) for d in cfg.inner_dims)

    @classmethod
    def from_unet(cls, unet: nn.Module, embed_dim: int, num_tokens: int = 4,
                  tokens_fn: Callable = image_tokens) -> IPAdapter:
        """An adapter for `unet`, its image keys / values initialised from each cross-attention's text ones (paper
        sec. 3.2.2)."""
        blocks = cross_attention_blocks(unet)
        cfg = IPAdapterConfig(embed_dim, blocks[0].attn2.context_dim, num_tokens,
                              tuple(b.attn2.to_k.out_features for b in blocks))
        adapter = cls(cfg, tokens_fn).to(next(unet.parameters()).device)
        with torch.no_grad():
            for layer, b in zip(adapter.layers, blocks):
                layer.to_k_ip.weight.copy_(b.attn2.to_k.weight)
                layer.to_v_ip.weight.copy_(b.attn2.to_v.weight)
        return adapter

    def mismatches(self, base: nn.Module) -> list[str]:
        """What differs between this adapter and the UNet it is attached to (empty: it fits)."""
        try:
            blocks = cross_attention_blocks(base)
        except (AttributeError, ValueError) as e:
            return [str(e)]
        widths = tuple(b.attn2.to_k.out_features for b in blocks)
        out = []
        if blocks[0].attn2.context_dim != self.config.context_dim:
            out.append(f"cross-attention width: {self.config.context_dim} here, {blocks[0].attn2.context_dim} in the "
                       f"base")
        if widths != self.config.inner_dims:
            out.append(f"cross-attentions (inner widths): {len(self.config.inner_dims)} {self.config.inner_dims} here, "
                       f"{len(widths)} {widths} in the base")
        return out

    @contextlib.contextmanager
    def installed(self, base: nn.Module, embeds: torch.Tensor, scale, attention_fn: Callable = decoupled_attention):
        """For the length of the `with`: every cross-attention of `base` reads the image tokens of embeds [B,E]."""
        blocks = cross_attention_blocks(base)
        tokens = self.image_proj(embeds)                                        # [B,K,D]
        frozen = [b.attn2 for b in blocks]
        try:
            for b, layer in zip(blocks, self.layers):
                b.attn2 = DecoupledCrossAttention(b.attn2, layer, tokens, scale, attention_fn)
            yield tokens
        finally:
            for b, attn in zip(blocks, frozen):
                b.attn2 = attn


def check_image_scale(scale, batch: int):
    """An image scale: a finite number, or a tensor [B] (controlnet.check_scale) -> a float or [B,1,1,1]."""
    scale = check_scale(scale, batch, "image_scale")
    return scale.view(-1, 1, 1, 1) if isinstance(scale, torch.Tensor) else scale


class ImagePrompted(nn.Module):
    """A frozen denoiser that also looks at an image prompt (a sdlearn.diffusion.Denoiser):
    prompted(x, t, image_embeds=[B,E], image_scale=1.0, **the base's conditions)."""

    def __init__(self, base: nn.Module, adapter: IPAdapter, attention_fn: Callable | None = None):
        super().__init__()
        wrong = adapter.mismatches(base)
        if wrong:
            raise ValueError(f"the IPAdapter was made for another UNet than the {type(base).__name__} it is attached "
                             f"to: " + "; ".join(wrong))
        self.base, self.adapter = base, adapter
        self.attention_fn = attention_fn        # (q, k, v, k_ip, v_ip, scale) -> out: notebook 10's exercise

    def init_args(self) -> dict:
        return {"base": self.base, "adapter": self.adapter}

    latent_channels = property(lambda self: self.base.latent_channels)
    prediction = property(lambda self: self.base.prediction)
    cond_dims = property(lambda self: {**self.base.cond_dims, "image_embeds": self.adapter.config.embed_dim})

    def residual_shapes(self, height: int, width: int) -> list:
        return self.base.residual_shapes(height, width)

    def forward(self, x, t, image_embeds, image_scale=1.0, **cond):
        E = self.adapter.config.embed_dim
        if not isinstance(image_embeds, torch.Tensor) or tuple(image_embeds.shape) != (x.shape[0], E):
            got = tuple(image_embeds.shape) if isinstance(image_embeds, torch.Tensor) else type(image_embeds).__name__
            raise ValueError(f"ImagePrompted: image_embeds should be the image encoder's embeddings [B,E] = "
                             f"[{x.shape[0]},{E}], got {got}")
        scale = check_image_scale(image_scale, x.shape[0])
        scale = scale.to(x.device, x.dtype) if isinstance(scale, torch.Tensor) else scale   # the conditioner's: CPU
        with self.adapter.installed(self.base, image_embeds, scale, self.attention_fn or decoupled_attention):
            return self.base(x, t, **cond)


class ImagePromptConditioner(Conditioner):
    """A conditioner and an image encoder: conditioner(prompts, image_prompt=images [N or 1,3,H,W] in [-1,1],
    image_scale=1.0, ...) -> its entries, "image_embeds" [N,E] (the encoder's embeddings) and "image_scale" [N].
    The unconditional twin of image_embeds is zeros (diffusers' negative image embeds)."""

    takes = ("image_prompt", "image_scale")

    def __init__(self, conditioner: Conditioner, image_encoder: nn.Module):
        super().__init__()
        self.conditioner, self.image_encoder = conditioner, image_encoder
        self.takes = (*conditioner.takes, *ImagePromptConditioner.takes)
        self.dropout_keys = (*conditioner.dropout_keys, "image_embeds")

    def init_args(self) -> dict:
        return {"conditioner": self.conditioner, "image_encoder": self.image_encoder}

    @property
    def embed_dim(self) -> int:
        return self.image_encoder.config.embed_dim

    @property
    def dims(self) -> dict[str, int]:
        return {**self.conditioner.dims, "image_embeds": self.embed_dim}

    def embed(self, images) -> torch.Tensor:
        """Images [N,3,H,W] in [-1,1] -> the image encoder's embeddings [N,E]."""
        s = self.image_encoder.config.image_size
        if not isinstance(images, torch.Tensor) or images.ndim != 4 or tuple(images.shape[1:]) != (3, s, s):
            got = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"image_prompt should be images [N,3,{s},{s}] (RGB in [-1, 1], the image encoder's "
                             f"size), got {got}")
        if not images.is_floating_point() or images.min() < -1 or images.max() > 1:
            raise ValueError(f"image_prompt should be float images in [-1, 1], got {images.dtype} in "
                             f"[{images.min().item():.3g}, {images.max().item():.3g}]")
        p = next(self.image_encoder.parameters())
        return self.image_encoder(images.to(p.device, p.dtype)).float()     # [N,E]

    def encode(self, prompts: list[str], image_prompt=None, image_scale=1.0, **conditions) -> dict[str, torch.Tensor]:
        cond = self.conditioner.encode(prompts, **conditions)
        if image_prompt is None:
            raise ValueError("this pipeline reads an image prompt: pass image_prompt=images [N or 1,3,H,W] in [-1, 1] "
                             "(image_scale=0 draws from the text alone)")
        scale = check_image_scale(image_scale, len(prompts))      # a float, or a tensor [N] as [N,1,1,1]
        embeds = self.embed(image_prompt)                               # [N or 1, E]
        scale = scale.view(-1).float() if isinstance(scale, torch.Tensor) else torch.full((len(prompts),), scale)
        return {**cond, "image_embeds": embeds, "image_scale": scale.to(embeds.device)}

    def encode_unconditional(self, n: int, image_prompt=None, image_scale=1.0, **conditions) -> dict[str, torch.Tensor]:
        p = next(self.image_encoder.parameters())
        return {**self.conditioner.encode_unconditional(n, **conditions),
                "image_embeds": torch.zeros(n, self.embed_dim, device=p.device)}


def attach(pipe: TextToImage, adapter: IPAdapter, image_encoder: nn.Module,
           attention_fn: Callable | None = None) -> TextToImage:
    """pipe with an image prompt: ImagePrompted(denoiser, adapter) and an ImagePromptConditioner with image_encoder
    (its embed_dim must be the adapter's)."""
    if image_encoder.config.embed_dim != adapter.config.embed_dim:
        raise ValueError(f"the image encoder embeds images in {image_encoder.config.embed_dim} dimensions but the "
                         f"adapter's projection reads {adapter.config.embed_dim}")
    conditioner = ImagePromptConditioner(pipe.conditioner, image_encoder)
    return TextToImage(conditioner, ImagePrompted(pipe.denoiser, adapter, attention_fn), pipe.schedule, pipe.vae,
                       image_size=pipe.image_size)


# -----------------------------------------------------------------------------
# the released models' hyper-parameters

def _sd15_inner_dims() -> tuple[int, ...]:
    from sdlearn.unet import SD15, UNet
    with torch.device("meta"):
        return tuple(b.attn2.to_k.out_features for b in cross_attention_blocks(UNet(SD15)))


PRESETS = {
    # h94/IP-Adapter's ip-adapter_sd15: CLIP ViT-H/14 image embeddings (1024), 4 tokens, SD 1.5's 16 cross-attentions
    "sd15-ip-adapter": lambda: IPAdapter(IPAdapterConfig(1024, 768, 4, _sd15_inner_dims())),
}
