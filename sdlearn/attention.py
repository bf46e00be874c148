"""Attention: every token looks at every other token and takes a weighted mean of what it finds.

    Attention(Q, K, V) = softmax(Q K^T / sqrt(d)) V          (Vaswani et al. 2017, eq. 1)

with Q = x W_q (queries, one per token of x), K = c W_k and V = c W_v (keys and values, one per token of the
context c; c = x for self-attention, c = text tokens for cross-attention). Multi-head attention (ibid. 3.2.2)
splits the inner width into `heads` groups of `head_dim` channels, attends in each group separately, and
mixes the groups back with W_o.

    attn = Attention(dim=320, heads=8)              # SD 1.5's first transformer block (self-attention)
    y = attn(x)                                     # x [B,N,320] -> [B,N,320]
    y = Attention(320, context_dim=768)(x, text)    # cross-attention: keys/values from text [B,77,768]

`scaled_dot_product_attention` / `attention_map` are the plain formula, for teaching and tests;
`Attention` runs torch's fused `F.scaled_dot_product_attention` (flash / memory-efficient kernels) and has
the same weight layout as diffusers' `Attention` (see sdlearn.convert.attention).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

# -----------------------------------------------------------------------------
# the formula


def _check_mask(mask: torch.Tensor, scores_shape: torch.Size) -> None:
    if not isinstance(mask, torch.Tensor):
        raise TypeError("mask should be a torch.Tensor (bool: True = attend, or additive float), "
                        f"got {type(mask).__name__}")
    try:
        torch.broadcast_shapes(mask.shape, scores_shape)
    except RuntimeError:
        raise ValueError(
            f"mask of shape {tuple(mask.shape)} does not broadcast to the attention scores {tuple(scores_shape)} "
            f"[..., queries, keys]; a padding mask [B, keys] should be passed as mask[:, None, None, :]"
        ) from None


def attention_map(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) over the keys: q [..., N, d], k [..., M, d] -> weights [..., N, M].

    mask (broadcastable to [..., N, M]): bool, True = may attend; or a float added to the scores
    (0 = attend, -inf = do not). A query whose keys are all masked gets NaN weights.
    """
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"queries and keys need the same width d, got q [..., {q.shape[-1]}] "
                         f"and k [..., {k.shape[-1]}]")
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])  # [..., N, M]
    if mask is not None:
        _check_mask(mask, scores.shape)
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, float("-inf"))
        else:
            scores = scores + mask
    return scores.softmax(dim=-1)  # each query's weights over the keys sum to 1


def scaled_dot_product_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                 mask: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v: q [..., N, d], k [..., M, d], v [..., M, dv] -> [..., N, dv]. Eq. 1."""
    if k.shape[-2] != v.shape[-2]:
        raise ValueError(f"keys and values need one row per context token, got k [..., {k.shape[-2]}, d] "
                         f"and v [..., {v.shape[-2]}, dv]")
    return attention_map(q, k, mask) @ v  # [..., N, dv]


def causal_mask(n: int, m: int | None = None, device=None) -> torch.Tensor:
    """[n, m] bool, True on and below the diagonal: query i may attend to keys 0..i (top-left aligned)."""
    return torch.ones(n, n if m is None else m, dtype=torch.bool, device=device).tril()


# -----------------------------------------------------------------------------
# images as tokens


def image_to_tokens(x: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B, H*W, C]: one token per pixel, row by row."""
    if x.dim() != 4:
        raise ValueError(f"expected an image batch [B, C, H, W], got shape {tuple(x.shape)}")
    return rearrange(x, "b c h w -> b (h w) c")


def tokens_to_image(tokens: torch.Tensor, height: int, width: int | None = None) -> torch.Tensor:
    """[B, H*W, C] -> [B, C, H, W], the inverse of image_to_tokens (width defaults to H*W // height)."""
    if tokens.dim() != 3:
        raise ValueError(f"expected tokens [B, H*W, C], got shape {tuple(tokens.shape)}")
    n = tokens.shape[1]
    width = n // height if width is None else width
    if height * width != n:
        raise ValueError(f"{n} tokens do not make a {height} x {width} image")
    return rearrange(tokens, "b (h w) c -> b c h w", h=height, w=width)


# -----------------------------------------------------------------------------
# the module


class Attention(nn.Module):
    """Multi-head (self- or cross-) attention with diffusers' weight layout: to_q, to_k, to_v, to_out.

    dim: width of x (queries and output). context_dim: width of the context (keys/values), default dim.
    heads * head_dim (the inner width) may differ from dim; head_dim defaults to dim // heads.
    dropout acts on the output, as in diffusers.
    """

    def __init__(self, dim: int, context_dim: int | None = None, heads: int = 8, head_dim: int | None = None,
                 qkv_bias: bool = False, out_bias: bool = True, dropout: float = 0.0):
        super().__init__()
        if head_dim is None:
            if dim % heads:
                raise ValueError(f"dim={dim} is not divisible by heads={heads}: pass head_dim explicitly")
            head_dim = dim // heads
        self.dim, self.context_dim = dim, context_dim or dim
        self.heads, self.head_dim = heads, head_dim
        inner = heads * head_dim
        self.to_q = nn.Linear(dim, inner, bias=qkv_bias)
        self.to_k = nn.Linear(self.context_dim, inner, bias=qkv_bias)
        self.to_v = nn.Linear(self.context_dim, inner, bias=qkv_bias)
        self.to_out = nn.Linear(inner, dim, bias=out_bias)
        self.dropout = nn.Dropout(dropout)

    def extra_repr(self) -> str:
        return f"heads={self.heads}, head_dim={self.head_dim}"

    def _check(self, x: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x should be a torch.Tensor [B, N, dim={self.dim}], got {type(x).__name__}")
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"expected x [B, N, dim={self.dim}], got {list(x.shape)}"
                             + (" (an image? use image_to_tokens first)" if x.dim() == 4 else ""))
        if context is None:
            if self.context_dim != self.dim:
                raise ValueError(f"this is cross-attention (context_dim={self.context_dim}): pass a context "
                                 f"[B, M, {self.context_dim}]")
            return x
        if not isinstance(context, torch.Tensor):
            raise TypeError(f"context should be a torch.Tensor [B, M, {self.context_dim}], "
                            f"got {type(context).__name__}")
        if context.dim() != 3 or context.shape[-1] != self.context_dim:
            raise ValueError(f"expected context [B, M, context_dim={self.context_dim}], got {list(context.shape)}")
        if context.shape[0] != x.shape[0]:
            raise ValueError(f"x and context have different batch sizes: x {list(x.shape)}, "
                             f"context {list(context.shape)}")
        return context

    def _qkv(self, x, context):
        c = self._check(x, context)  # [B, M, Cc]
        q, k, v = self.to_q(x), self.to_k(c), self.to_v(c)  # [B, N, h*d], [B, M, h*d], [B, M, h*d]
        q, k, v = (rearrange(t, "b n (h d) -> b h n d", h=self.heads) for t in (q, k, v))  # [B, h, N|M, d]
        return q, k, v

    def _mask(self, attn_mask, is_causal, q, k):
        """One mask for both paths: attn_mask (bool True = attend, or additive) combined with causal."""
        scores_shape = (q.shape[0], self.heads, q.shape[2], k.shape[2])  # [B, h, N, M]
        if attn_mask is not None:
            _check_mask(attn_mask, torch.Size(scores_shape))
            attn_mask = attn_mask.to(q.device)
        if is_causal:
            causal = causal_mask(q.shape[2], k.shape[2], device=q.device)  # [N, M]
            if attn_mask is None:
                attn_mask = causal
            elif attn_mask.dtype == torch.bool:
                attn_mask = attn_mask & causal
            else:
                attn_mask = attn_mask.masked_fill(~causal, float("-inf"))
        if attn_mask is not None and attn_mask.dtype != torch.bool:
            attn_mask = attn_mask.to(q.dtype)
        return attn_mask

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        """x [B, N, dim], context [B, M, context_dim] (default x) -> [B, N, dim].

        attn_mask broadcastable to [B, heads, N, M]: bool (True = attend) or additive float.
        """
        q, k, v = self._qkv(x, context)  # [B, h, N, d], [B, h, M, d], [B, h, M, d]
        mask = self._mask(attn_mask, is_causal, q, k)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # [B, h, N, d]
        out = rearrange(out, "b h n d -> b n (h d)")  # [B, N, h*d]
        return self.dropout(self.to_out(out))  # [B, N, dim]

    @torch.no_grad()
    def weights(self, x: torch.Tensor, context: torch.Tensor | None = None,
                attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        """The attention map, by the plain formula: [B, heads, N, M], each row sums to 1 (for pictures)."""
        q, k, _ = self._qkv(x, context)
        return attention_map(q, k, self._mask(attn_mask, is_causal, q, k))  # [B, h, N, M]

    def forward_reference(self, x: torch.Tensor, context: torch.Tensor | None = None,
                          attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        """forward() by the plain formula (materialises the [B, h, N, M] weights): for tests and timing."""
        q, k, v = self._qkv(x, context)
        out = scaled_dot_product_attention(q, k, v, self._mask(attn_mask, is_causal, q, k))  # [B, h, N, d]
        return self.dropout(self.to_out(rearrange(out, "b h n d -> b n (h d)")))


class SelfAttentionBlock(nn.Module):
    """Pre-norm residual self-attention: x + Attention(LayerNorm(x)) (as in GPT-2 and SD's transformer blocks).

    Takes tokens [B, N, dim], or an image [B, dim, H, W] (attends over its H*W pixels, returns an image).
    """

    def __init__(self, dim: int, heads: int = 8, head_dim: int | None = None, dropout: float = 0.0):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads=heads, head_dim=head_dim, dropout=dropout)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        if x.dim() == 4:  # an image: pixels are the tokens
            h, w = x.shape[-2:]
            return tokens_to_image(self(image_to_tokens(x), attn_mask, is_causal), h, w)
        return x + self.attn(self.norm(x), attn_mask=attn_mask, is_causal=is_causal)  # [B, N, dim]
