"""T5 v1.1's encoder (Raffel et al. 2020, "Exploring the Limits of Transfer Learning with a Unified Text-to-Text
Transformer"): SD3's third text encoder, the one whose tokens read the whole prompt in both directions.

    enc = T5Encoder(T5Config(vocab_size=100, width=32, layers=2, heads=4, head_dim=8, mlp_dim=48))
    hidden, _ = enc(tokens)                          # [B, L] SentencePiece ids -> ([B, L, D], None): no pooled output
    enc = presets.build("t5-xxl-encoder")            # SD3's: google/t5-v1_1-xxl, 4,762,310,656 parameters

How it differs from CLIP's text transformer (sdlearn.text): no mask, every token attends to every token; no
position embedding but a learned bias per head and relative-position bucket, added to the attention scores
(T5 sec. 2.1); a layer norm that only rescales (RMSNorm: no mean subtracted, no bias); no biases anywhere and no
1/sqrt(d) in the attention (folded into the initialisation). T5 v1.1, the checkpoints SD3 uses, replaces the ReLU
feed-forward with a gated GELU (Shazeer 2020) and unties the input and output embeddings. SD3 (Esser et al.
2024) puts its final states after CLIP-L's and bigG's along the sequence (sdlearn.sd3). The weights load from
transformers' T5EncoderModel through sdlearn.convert.t5; the tokenizer is transformers' T5TokenizerFast, wrapped
in sdlearn.text.PretrainedTokenizer.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn


@dataclass
class T5Config:
    """The encoder of T5 v1.1 (Raffel et al. 2020, with v1.1's gated-GELU feed-forward and untied embeddings).
    Defaults: T5-XXL, SD3's (google/t5-v1_1-xxl)."""
    vocab_size: int = 32128
    width: int = 4096          # d_model
    layers: int = 24
    heads: int = 64
    head_dim: int = 64         # d_kv; heads * head_dim need not be the width
    mlp_dim: int = 10240       # d_ff
    buckets: int = 32          # relative position buckets: half per direction, half of those exact, the rest log-spaced
    max_distance: int = 128    # distances beyond it share the last bucket
    eps: float = 1e-6
    max_length: int = 256      # the length prompts are padded to (SD3's max_sequence_length)


class RMSNorm(nn.Module):
    """T5's layer norm: x / sqrt(mean(x^2) + eps) * gain, no mean subtracted, no bias; the mean square in float32."""

    def __init__(self, width: int, eps: float = 1e-6):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(width)), eps

    def forward(self, x):
        rms = torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)  # [..., 1]
        return self.weight * (x.float() * rms).to(self.weight.dtype)


def relative_buckets(q_len: int, k_len: int, buckets: int, max_distance: int, device=None) -> torch.Tensor:
    """[q_len, k_len] bucket of each key position relative to each query (T5 sec. 2.1, bidirectional): half the
    buckets for keys after the query; within a half, distances below buckets/4 get one bucket each, larger ones
    share logarithmically wider buckets up to max_distance."""
    rel = torch.arange(k_len, device=device)[None, :] - torch.arange(q_len, device=device)[:, None]  # key - query
    half = buckets // 2
    out = (rel > 0).long() * half
    rel, exact = rel.abs(), half // 2
    log = exact + (torch.log(rel.float().clamp(min=1) / exact) / math.log(max_distance / exact)
                   * (half - exact)).long()
    return out + torch.where(rel < exact, rel, log.clamp(max=half - 1))


class T5Attention(nn.Module):
    """T5's self-attention: no biases and no 1/sqrt(d) scaling (folded into the initialisation); the position is
    a learned bias per head and relative-position bucket, added to the scores."""

    def __init__(self, cfg: T5Config):
        super().__init__()
        inner, self.heads = cfg.heads * cfg.head_dim, cfg.heads
        self.q, self.k, self.v = (nn.Linear(cfg.width, inner, bias=False) for _ in range(3))
        self.o = nn.Linear(inner, cfg.width, bias=False)

    def forward(self, x, bias):                            # x [B, L, D], bias [1, h, L, L]
        q, k, v = (rearrange(f(x), "b l (h d) -> b h l d", h=self.heads) for f in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), scale=1.0)  # [B, h, L, d]
        return self.o(rearrange(out, "b h l d -> b l (h d)"))


class T5Block(nn.Module):
    """Pre-norm: x + attn(norm(x)), then x + wo(gelu(wi_0(norm(x))) * wi_1(norm(x))) (the gated-GELU of v1.1)."""

    def __init__(self, cfg: T5Config):
        super().__init__()
        self.norm1, self.attn = RMSNorm(cfg.width, cfg.eps), T5Attention(cfg)
        self.norm2 = RMSNorm(cfg.width, cfg.eps)
        self.wi_0, self.wi_1 = (nn.Linear(cfg.width, cfg.mlp_dim, bias=False) for _ in range(2))
        self.wo = nn.Linear(cfg.mlp_dim, cfg.width, bias=False)

    def forward(self, x, bias):
        x = _fp16_safe(x + self.attn(self.norm1(x), bias))
        h = self.norm2(x)
        return _fp16_safe(x + self.wo(F.gelu(self.wi_0(h), approximate="tanh") * self.wi_1(h)))   # [B, L, D]


def _fp16_safe(x: torch.Tensor) -> torch.Tensor:
    """T5's activations outgrow float16 (T5-XXL's reach ~1e5): in fp16, clamp them below its largest value, as
    transformers does; other dtypes pass unchanged."""
    if x.dtype != torch.float16:
        return x
    limit = torch.finfo(torch.float16).max - (1000 if torch.isinf(x).any() else 0)
    return x.clamp(-limit, limit)


class T5Encoder(nn.Module):
    """T5's encoder: tokens [B, L] -> (hidden [B, L, D], None), called as a TextEncoder is (SD3's text_encoder_3
    reads the final states; T5 has no pooled output). Every token sees every other: bidirectional, and no padding
    mask (SD3's pipeline gives none, so the padding's states are part of the context)."""

    def __init__(self, config: T5Config):
        super().__init__()
        self.config = cfg = config
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.position_bias = nn.Embedding(cfg.buckets, cfg.heads)  # shared by all layers (T5: held by the first)
        self.blocks = nn.ModuleList([T5Block(cfg) for _ in range(cfg.layers)])
        self.final_norm = RMSNorm(cfg.width, cfg.eps)

    def forward(self, tokens: torch.Tensor, hidden_layer: int = -1) -> tuple[torch.Tensor, None]:
        if hidden_layer != -1:
            raise ValueError(f"T5's encoder gives its final states only (hidden_layer=-1), got {hidden_layer}")
        if tokens.dim() != 2 or tokens.dtype not in (torch.long, torch.int):
            raise ValueError(f"expected token ids, a LongTensor [B, L], got {tokens.dtype} {list(tokens.shape)}")
        L = tokens.shape[1]
        buckets = relative_buckets(L, L, self.config.buckets, self.config.max_distance, tokens.device)  # [L, L]
        bias = rearrange(self.position_bias(buckets), "q k h -> 1 h q k")                       # [1, h, L, L]
        x = self.token_embedding(tokens)                                                        # [B, L, D]
        for block in self.blocks:
            x = block(x, bias)
        return self.final_norm(x), None


PRESETS = {
    # T5 v1.1 XXL's encoder: SD3's third text encoder (google/t5-v1_1-xxl, as SD3 ships it)
    "t5-xxl-encoder": lambda: T5Encoder(T5Config()),
}
