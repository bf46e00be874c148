"""The conditioning network T_theta: a word-level tokenizer and CLIP's text transformer.

    tok = Tokenizer()                                # the shapes vocabulary, padded to 16 tokens
    tokens = tok(["a red circle on the left", ""])   # [2, 16] LongTensor: <bos> words <eos> <pad>...
    enc = TextEncoder(TextConfig())                  # CLIP's text transformer, small
    hidden, pooled = enc(tokens)                     # [2, 16, 64] per token (cross-attention), [2, 64] pooled

Stable Diffusion conditions on a frozen CLIP text encoder (Rombach et al. 2022, sec. 3.3: tau_theta(y)):
the UNet's cross-attention reads the per-token hidden states, SDXL and SD3 also the pooled one. CLIP
(Radford et al. 2021) trained that encoder contrastively against an image encoder on captioned images; here
the same recipe, at toy scale, on the shapes dataset:

    clip = CLIP(TextEncoder(TextConfig()), ImageEncoder(ImageEncoderConfig()))
    loss = clip_loss(*clip(images, tokens), clip.logit_scale)      # Radford et al. 2021, figure 3

The released encoder (its recipe: sdlearn.recipes.clip, `python -m sdlearn train clip`):

    enc = pretrained.load("shapes-clip", size=32); tok = Tokenizer.for_encoder(enc)

`TextEncoder` has the layout of transformers' CLIPTextModel (see sdlearn.convert.text); built as
`presets.build("clip-l-text")` it is SD 1.x's text encoder, CLIP ViT-L/14's, with its 123,060,480 parameters.
"""
from __future__ import annotations

import difflib
import math
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from sdlearn.attention import Attention
from sdlearn.data import COLORS, POSITION_PHRASES, SHAPES

# -----------------------------------------------------------------------------
# the tokenizer

PAD, BOS, EOS = "<pad>", "<bos>", "<eos>"


def course_words() -> tuple[str, ...]:
    """Every word a shapes caption can use, in a fixed order: a, colours, shapes, position phrases' words, and."""
    words = ["a", *COLORS, *SHAPES]
    for phrase in POSITION_PHRASES.values():  # "on the left", "at the top", "in the center", ...
        words += phrase.split()
    words.append("and")
    return tuple(dict.fromkeys(words))  # de-duplicated, order kept


# <pad> is id 0; <bos>, <eos> are the two largest ids, as in CLIP (49406, 49407): argmax(tokens) finds <eos>
COURSE_VOCAB = (PAD, *course_words(), BOS, EOS)


class Tokenizer:
    """Word-level tokenizer: prompt -> [<bos>, word ids..., <eos>, <pad>...] of exactly `context_length` ids.

    CLIP's tokenizer does the same with 49,408 byte-pair pieces and context_length=77; ours knows only the
    shapes captions' words (lower-cased, split on spaces; . , ; ! ? are dropped). The empty prompt "" is
    [<bos>, <eos>, <pad>...], the "unconditional" prompt of classifier-free guidance.

    A word outside the vocabulary is a ValueError naming it. A prompt longer than the context is a
    ValueError too, unless truncate=True: then it is cut (keeping <eos> last, as CLIP does) with a warning.
    """

    def __init__(self, context_length: int = 16, vocab: Sequence[str] | None = None, truncate: bool = False):
        vocab = tuple(COURSE_VOCAB if vocab is None else vocab)
        missing = [s for s in (PAD, BOS, EOS) if s not in vocab]
        if missing:
            raise ValueError(f"a vocabulary needs the special tokens {PAD}, {BOS}, {EOS}; missing {missing}")
        if len(set(vocab)) != len(vocab):
            raise ValueError("the vocabulary has repeated entries")
        if isinstance(context_length, bool) or not isinstance(context_length, int) or context_length < 2:
            raise ValueError(f"context_length must be an int >= 2 (room for <bos> and <eos>), got {context_length!r}")
        self.vocab, self.context_length, self.truncate = vocab, context_length, truncate
        self.ids = {w: i for i, w in enumerate(vocab)}
        self.pad_id, self.bos_id, self.eos_id = self.ids[PAD], self.ids[BOS], self.ids[EOS]

    @classmethod
    def for_encoder(cls, encoder: TextEncoder, truncate: bool = False) -> Tokenizer:
        """The tokenizer an encoder was trained with: its config's vocab, padded to its position table."""
        cfg = encoder.config
        if getattr(cfg, "vocab", None) is None:  # a T5Config has none: T5 reads SentencePiece pieces
            raise ValueError(f"this {type(encoder).__name__} has no word vocabulary in its config: it expects an "
                             f"external tokenizer, e.g. transformers' CLIPTokenizer or T5TokenizerFast wrapped in "
                             f"sdlearn.text.PretrainedTokenizer")
        return cls(context_length=cfg.max_positions, vocab=cfg.vocab, truncate=truncate)

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def __len__(self) -> int:
        return len(self.vocab)

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, context_length={self.context_length})"

    def split(self, prompt: str) -> list[str]:
        """The words of a prompt: lower-cased, punctuation dropped, split on white space."""
        if not isinstance(prompt, str):
            raise TypeError(f"a prompt must be a str, got {type(prompt).__name__}")
        return re.sub(r"[.,;!?]", " ", prompt.lower()).split()

    def encode(self, prompt: str) -> list[int]:
        """[<bos>, ids of the words, <eos>], unpadded (checked against the context length)."""
        words = self.split(prompt)
        for w in words:
            if w not in self.ids or w in (PAD, BOS, EOS):
                close = difflib.get_close_matches(w, self.vocab, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                known = " ".join(v for v in self.vocab if v not in (PAD, BOS, EOS))
                raise ValueError(f"unknown word {w!r} in prompt {prompt!r}{hint}; the vocabulary is: {known}")
        room = self.context_length - 2  # words that fit between <bos> and <eos>
        if len(words) > room:
            msg = (f"prompt {prompt!r} has {len(words)} words, {len(words) + 2} tokens with <bos> and <eos>, "
                   f"longer than the context length {self.context_length}")
            if not self.truncate:
                raise ValueError(f"{msg}; shorten it, or use Tokenizer(context_length=...) or truncate=True")
            warnings.warn(f"{msg}: truncated to its first {room} words", stacklevel=3)
            words = words[:room]
        return [self.bos_id, *(self.ids[w] for w in words), self.eos_id]

    def __call__(self, prompts: str | Sequence[str]) -> torch.Tensor:
        """A prompt or a list of them -> LongTensor [B, context_length], padded with <pad>."""
        if isinstance(prompts, str):
            prompts = [prompts]
        if not isinstance(prompts, Sequence):
            raise TypeError(f"expected a prompt (str) or a list of prompts, got {type(prompts).__name__}")
        for i, p in enumerate(prompts):
            if not isinstance(p, str):
                raise TypeError(f"a prompt must be a str, got {type(p).__name__} (prompts[{i}] = {p!r})")
        out = torch.full((len(prompts), self.context_length), self.pad_id, dtype=torch.long)  # [B, L]
        for i, p in enumerate(prompts):
            ids = self.encode(p)
            out[i, :len(ids)] = torch.tensor(ids)
        return out

    def tokens(self, prompt: str) -> list[str]:
        """The context_length token strings a prompt becomes: ['<bos>', 'a', 'red', ..., '<eos>', '<pad>', ...]."""
        return [self.vocab[i] for i in self(prompt)[0].tolist()]

    def decode(self, tokens: torch.Tensor | Sequence[int]) -> str | list[str]:
        """Ids [L] -> the prompt; [B, L] -> a list of prompts (text between <bos> and the first <eos>)."""
        t = torch.as_tensor(tokens)
        if t.dim() == 2:
            return [self.decode(row) for row in t]
        if t.dim() != 1:
            raise ValueError(f"expected tokens [L] or [B, L], got shape {tuple(t.shape)}")
        words = []
        for i in t.tolist():
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"token id {i} is outside the vocabulary (0..{self.vocab_size - 1})")
            if i == self.eos_id:
                break
            if i not in (self.bos_id, self.pad_id):
                words.append(self.vocab[i])
        return " ".join(words)


class PretrainedTokenizer:
    """A transformers tokenizer (CLIPTokenizer, or T5TokenizerFast for SD3's T5) called like the course's Tokenizer:
    prompts -> ids [B, max_length], padded and truncated as diffusers' pipelines do (T5 appends </s>)."""

    def __init__(self, tokenizer, max_length: int | None = None):
        self.tokenizer, self.context_length = tokenizer, max_length or tokenizer.model_max_length

    def __call__(self, prompts: str | Sequence[str]) -> torch.Tensor:
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        return self.tokenizer(prompts, padding="max_length", max_length=self.context_length, truncation=True,
                              return_tensors="pt").input_ids  # [B, L]


# -----------------------------------------------------------------------------
# the text transformer


@dataclass
class TextConfig:
    """CLIP's text transformer. Defaults: the course's small encoder over the shapes vocabulary."""
    vocab: tuple[str, ...] | None = COURSE_VOCAB  # word vocabulary (Tokenizer.for_encoder); None: external (BPE)
    vocab_size: int | None = None    # default len(vocab); CLIP: 49408
    max_positions: int = 16          # position table = context length; CLIP: 77
    width: int = 64                  # D; CLIP-L: 768
    layers: int = 3                  # CLIP-L: 12
    heads: int = 4                   # CLIP-L: 12
    mlp_dim: int | None = None       # default 4 * width
    activation: str = "quick_gelu"   # "quick_gelu" (CLIP) or "gelu" (OpenCLIP ViT-H/G)
    projection_dim: int | None = 64  # pooled -> P by text_projection (no bias); None: no projection, P = D
    eos_token_id: int | None = None  # default vocab.index("<eos>")
    pool: str = "eos"                # pooled = the first <eos>; "argmax": the largest id (old CLIP configs)
    layer_norm_eps: float = 1e-5
    causal: bool = True              # CLIP: token i sees tokens 0..i; False: every token sees all (T5's encoder)

    def __post_init__(self):
        if self.vocab is not None:
            self.vocab = tuple(self.vocab)  # a JSON list after a save/load round trip
            self.vocab_size = self.vocab_size or len(self.vocab)
            if self.eos_token_id is None and EOS in self.vocab:
                self.eos_token_id = self.vocab.index(EOS)
        if self.vocab_size is None:
            raise ValueError("TextConfig needs vocab_size when vocab is None")
        if self.vocab is not None and self.vocab_size != len(self.vocab):
            raise ValueError(f"vocab_size={self.vocab_size} but the vocab has {len(self.vocab)} words")
        self.mlp_dim = self.mlp_dim or 4 * self.width
        if self.width % self.heads:
            raise ValueError(f"width={self.width} is not divisible by heads={self.heads}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {self.activation!r}, expected one of {', '.join(ACTIVATIONS)}")
        if self.pool not in ("eos", "argmax"):
            raise ValueError(f"pool must be 'eos' or 'argmax', got {self.pool!r}")
        if self.pool == "eos" and self.eos_token_id is None:
            raise ValueError("pool='eos' needs eos_token_id")

    @property
    def pooled_dim(self) -> int:
        return self.projection_dim or self.width


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """x * sigmoid(1.702 x): the GELU approximation OpenAI's CLIP was trained with."""
    return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": F.gelu}


class MLP(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.width, cfg.mlp_dim)
        self.fc2 = nn.Linear(cfg.mlp_dim, cfg.width)
        self.act = ACTIVATIONS[cfg.activation]

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))  # [B, L, D] -> [B, L, mlp] -> [B, L, D]


class Block(nn.Module):
    """Pre-LN transformer block: x + attn(ln(x)) with a causal mask, then x + mlp(ln(x)) (GPT-2, CLIP); without
    the mask (config.causal False), a bidirectional encoder's block."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.causal = cfg.causal
        self.norm1 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.attn = Attention(cfg.width, heads=cfg.heads, qkv_bias=True)
        self.norm2 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x):
        x = x + self.attn(self.norm1(x), is_causal=self.causal)  # causal: token i sees tokens 0..i
        return x + self.mlp(self.norm2(x))  # [B, L, D]


class TextEncoder(nn.Module):
    """CLIP's text transformer: tokens [B, L] -> (hidden [B, L, D], pooled [B, P]).

    hidden: final-LayerNorm'd states of every token (what the UNet cross-attends to); with hidden_layer=-2, the
        penultimate block's output as it is (SDXL's context; transformers' hidden_states[-2]).
    pooled: the final state at <eos> (which, causally, has read the whole prompt), times text_projection if any.
    """

    def __init__(self, config: TextConfig):
        super().__init__()
        self.config = cfg = config
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.position_embedding = nn.Embedding(cfg.max_positions, cfg.width)  # learned, one per position
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.layers)])
        self.final_norm = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.projection = nn.Linear(cfg.width, cfg.projection_dim, bias=False) if cfg.projection_dim else None
        self.apply(self._init)

    @staticmethod
    def _init(m):  # GPT-2 / CLIP style: small normal weights, zero biases
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def _check(self, tokens):
        cfg = self.config
        if not isinstance(tokens, torch.Tensor) or tokens.dtype not in (torch.long, torch.int):
            got = f"{tokens.dtype} tensor" if isinstance(tokens, torch.Tensor) else type(tokens).__name__
            raise TypeError(f"expected token ids, a LongTensor [B, L] (from a Tokenizer), got {got}")
        if tokens.dim() != 2:
            raise ValueError(f"expected tokens [B, L], got shape {tuple(tokens.shape)}")
        if tokens.shape[1] > cfg.max_positions:
            raise ValueError(f"tokens have length {tokens.shape[1]}, longer than the position table "
                             f"(max_positions={cfg.max_positions})")
        if tokens.numel() and (tokens.min() < 0 or tokens.max() >= cfg.vocab_size):
            raise ValueError(f"token ids must be in 0..{cfg.vocab_size - 1}, got ids from {tokens.min().item()} "
                             f"to {tokens.max().item()}")

    def pool_index(self, tokens: torch.Tensor) -> torch.Tensor:
        """[B] position of each row's <eos>: its first occurrence, or (pool="argmax") the largest id's,
        as transformers' CLIPTextModel does for eos_token_id != 2 and == 2. No <eos> in a row: position 0."""
        if self.config.pool == "argmax":
            return tokens.int().argmax(-1)
        return (tokens == self.config.eos_token_id).int().argmax(-1)

    def forward(self, tokens: torch.Tensor, hidden_layer: int = -1) -> tuple[torch.Tensor, torch.Tensor]:
        self._check(tokens)
        layers = len(self.blocks)
        if not -layers <= hidden_layer <= -1:
            raise ValueError(f"hidden_layer must be in -{layers}..-1 (-1: the last block, final-normed; -2: the "
                             f"penultimate, as SDXL reads it), got {hidden_layer}")
        B, L = tokens.shape
        pos = torch.arange(L, device=tokens.device)  # [L]
        x = self.token_embedding(tokens) + self.position_embedding(pos)  # [B, L, D]
        states = []
        for block in self.blocks:
            x = block(x)  # [B, L, D]
            states.append(x)
        final = self.final_norm(x)  # [B, L, D]
        hidden = final if hidden_layer == -1 else states[hidden_layer]
        pooled = final[torch.arange(B, device=tokens.device), self.pool_index(tokens)]  # [B, D]
        if self.projection is not None:
            pooled = self.projection(pooled)  # [B, P]
        return hidden, pooled


# -----------------------------------------------------------------------------
# T5's encoder: SD3's third text encoder


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


CLIP_L = dict(vocab=None, vocab_size=49408, max_positions=77, width=768, layers=12, heads=12, mlp_dim=3072,
              activation="quick_gelu", eos_token_id=2, pool="argmax")

PRESETS = {
    # T5 v1.1 XXL's encoder: SD3's third text encoder (google/t5-v1_1-xxl, as SD3 ships it)
    "t5-xxl-encoder": lambda: T5Encoder(T5Config()),
    # OpenCLIP ViT-H/14's text tower as SD 2.x reads it (23 of its 24 layers: the penultimate's output), no projection
    "openclip-h-text": lambda: TextEncoder(TextConfig(
        vocab=None, vocab_size=49408, max_positions=77, width=1024, layers=23, heads=16, mlp_dim=4096,
        activation="gelu", projection_dim=None, eos_token_id=2, pool="argmax")),
    # CLIP ViT-L/14's text tower (SD 1.x's text encoder; SDXL's first one): openai/clip-vit-large-patch14
    "clip-l-text": lambda: TextEncoder(TextConfig(**CLIP_L, projection_dim=None)),
    # the same with its text projection, as SD3 uses it (CLIPTextModelWithProjection)
    "clip-l-text-proj": lambda: TextEncoder(TextConfig(**CLIP_L, projection_dim=768)),
    # OpenCLIP ViT-bigG/14's text tower with its projection: SDXL's second text encoder, SD3's too
    "clip-g-text": lambda: TextEncoder(TextConfig(
        vocab=None, vocab_size=49408, max_positions=77, width=1280, layers=32, heads=20, mlp_dim=5120,
        activation="gelu", projection_dim=1280, eos_token_id=2, pool="argmax")),
}


# -----------------------------------------------------------------------------
# contrastive pretraining (CLIP)


@dataclass
class ImageEncoderConfig:
    """The image tower CLIP's text encoder is trained against (the training partner; not used afterwards)."""
    image_size: int = 32
    channels: tuple[int, ...] = (16, 32, 64)  # one stride-2 stage each: 32 -> 16 -> 8 -> 4
    embed_dim: int = 64                        # = the text encoder's projection_dim

    def __post_init__(self):
        self.channels = tuple(self.channels)
        if any(c % 8 for c in self.channels):
            raise ValueError(f"channels must be multiples of 8 (GroupNorm with 8 groups), got {self.channels}")
        final = self.image_size / 2 ** len(self.channels)
        if final != int(final) or final < 1:
            raise ValueError(f"image_size={self.image_size} cannot be halved {len(self.channels)} times "
                             f"(one per stage of channels={self.channels})")


class ImageEncoder(nn.Module):
    """A small conv net: image [B, 3, H, W] in [-1, 1] -> embedding [B, embed_dim].

    Stride-2 conv stages, then the final [C, h, w] feature map flattened into a linear layer: unlike global
    average pooling, flattening keeps *where* each feature is, which the captions talk about.
    """

    def __init__(self, config: ImageEncoderConfig):
        super().__init__()
        self.config = cfg = config
        layers, c_in = [nn.Conv2d(3, cfg.channels[0], 3, padding=1), nn.SiLU()], cfg.channels[0]
        for c in cfg.channels:
            layers += [nn.Conv2d(c_in, c, 3, stride=2, padding=1), nn.GroupNorm(8, c), nn.SiLU(),
                       nn.Conv2d(c, c, 3, padding=1), nn.GroupNorm(8, c), nn.SiLU()]
            c_in = c
        self.convs = nn.Sequential(*layers)
        side = cfg.image_size // 2 ** len(cfg.channels)
        self.head = nn.Linear(c_in * side * side, cfg.embed_dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        s = self.config.image_size
        if not isinstance(images, torch.Tensor) or images.dim() != 4 or tuple(images.shape[1:]) != (3, s, s):
            got = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"expected images [B, 3, {s}, {s}], got {got}")
        h = self.convs(images)  # [B, C, s/8, s/8]
        return self.head(rearrange(h, "b c h w -> b (c h w)"))  # [B, embed_dim]


def clip_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """CLIP's symmetric cross-entropy (Radford et al. 2021, figure 3).

    image_emb, text_emb: [B, P], row i of each from the same (image, caption) pair. logit_scale: the learned
    log of 1/temperature. logits[i, j] = exp(logit_scale) * cos(image_i, text_j); the right caption of image i
    is caption i (labels = arange(B)), and the right image of caption j is image j: the mean of both losses.
    """
    image_emb = F.normalize(image_emb, dim=-1)  # [B, P], unit rows
    text_emb = F.normalize(text_emb, dim=-1)  # [B, P]
    logits = logit_scale.exp() * image_emb @ text_emb.T  # [B images, B captions]
    labels = torch.arange(len(logits), device=logits.device)  # [B]
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


class CLIP(nn.Module):
    """A text encoder and an image encoder trained together: forward -> (image_emb, text_emb), unit rows."""

    def __init__(self, text: TextEncoder, image: ImageEncoder, temperature: float = 0.07):
        super().__init__()
        if text.config.pooled_dim != image.config.embed_dim:
            raise ValueError(f"the text encoder's pooled width ({text.config.pooled_dim}) must equal the image "
                             f"encoder's embed_dim ({image.config.embed_dim})")
        self.text, self.image = text, image
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / temperature)))  # CLIP's init

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        image_emb = F.normalize(self.image(images), dim=-1)  # [B, P]
        text_emb = F.normalize(self.text(tokens)[1], dim=-1)  # [B, P]
        return image_emb, text_emb

    def loss(self, batch) -> tuple[torch.Tensor, dict]:
        """For sdlearn.train.fit: batch = (images [B,3,H,W], tokens [B,L])."""
        images, tokens = batch
        with torch.no_grad():
            self.logit_scale.clamp_(0, math.log(100))  # as CLIP: temperature >= 0.01
        loss = clip_loss(*self(images, tokens), self.logit_scale)
        return loss, {"scale": self.logit_scale.exp().item()}


@torch.no_grad()
def embed(clip: CLIP, images: torch.Tensor, tokens: torch.Tensor, batch_size: int = 500):
    """Unit embeddings of images [N,3,H,W] and of tokens [N,L], in batches: ([N, P], [N, P])."""
    clip.eval()
    dev = clip.logit_scale.device
    img = torch.cat([F.normalize(clip.image(images[i:i + batch_size].to(dev)), dim=-1)
                     for i in range(0, len(images), batch_size)])
    txt = torch.cat([F.normalize(clip.text(tokens[i:i + batch_size].to(dev))[1], dim=-1)
                     for i in range(0, len(tokens), batch_size)])
    return img, txt


@torch.no_grad()
def retrieval(clip: CLIP, tokenizer: Tokenizer, images: torch.Tensor, captions: list[str]) -> dict[str, float]:
    """Top-1 retrieval among N (image, caption) pairs, split by the number of objects in the caption.

    text->image: for each caption, the image most similar to it; image->text: for each image, the caption.
    Captions repeat (the vocabulary is small), so a retrieval counts as right when the retrieved item's
    caption equals the query's caption *text*, not only when it is the query's own partner.
    """
    img, txt = embed(clip, images, tokenizer(captions))
    sim = img @ txt.T  # [N images, N captions]
    same = torch.tensor([[a == b for b in captions] for a in captions])  # [N, N] caption texts equal
    n_obj = torch.tensor([c.count(" and ") + 1 for c in captions])  # [N]
    rows = torch.arange(len(captions))
    t2i = same[rows, sim.argmax(0)].float()  # caption j -> image sim[:, j].argmax()
    i2t = same[rows, sim.argmax(1)].float()  # image i -> caption sim[i].argmax()
    out = {"t2i": t2i.mean().item(), "i2t": i2t.mean().item()}
    for k in (1, 2):
        if (n_obj == k).any():
            out[f"t2i_{k}obj"] = t2i[n_obj == k].mean().item()
            out[f"i2t_{k}obj"] = i2t[n_obj == k].mean().item()
    return out
