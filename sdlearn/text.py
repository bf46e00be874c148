"""The conditioning network T_theta: a word-level tokenizer and CLIP's text transformer.

    tok = Tokenizer()                                # the shapes vocabulary, padded to 16 tokens
    tokens = tok(["a red circle on the left", ""])   # [2, 16] LongTensor: <bos> words <eos> <pad>...
    enc = TextEncoder(TextConfig())                  # CLIP's text transformer, small
    hidden, pooled = enc(tokens)                     # [2, 16, 64] per token (cross-attention), [2, 64] pooled

Stable Diffusion conditions on a frozen CLIP text encoder (Rombach et al. 2022, sec. 3.3: tau_theta(y)): the
UNet's cross-attention reads the per-token hidden states, SDXL and SD3 also the pooled one. The encoder is
CLIP's (Radford et al. 2021, sec. 2.4): a GPT-2-style transformer with a causal mask, whose state at <eos>, the
first token that has read the whole prompt, is the pooled vector. How CLIP trains it: sdlearn.clip. The
released course encoder and the tokenizer it was trained with:

    enc = pretrained.load("shapes-clip", size=32); tok = Tokenizer.for_encoder(enc)

`TextEncoder` has the layout of transformers' CLIPTextModel (see sdlearn.convert.text); built as
`presets.build("clip-l-text")` it is SD 1.x's text encoder, CLIP ViT-L/14's, with its 123,060,480 parameters.
"""
from __future__ import annotations

import difflib
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
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
