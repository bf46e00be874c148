"""SD3's text conditioning (Esser et al. 2024, sec. 5.2 and fig. 2): three text encoders, one joint sequence.

    conditioner = SD3Conditioner(clip_l, clip_g, t5)         # prompts -> {"context", "pooled"}
    pipe = TextToImage(conditioner, mmdit, FlowSchedule(shift=3.0), vae, image_size=32)
    images = pipe.generate(["a red circle on the left"], steps=28)
    no_t5 = TextToImage(without_third(conditioner), mmdit, ...)   # SD3 without T5: zeros in its place

- The two CLIP encoders' penultimate states are concatenated on channels (SD3: 768 + 1280 = 2048), zero-padded to
  the joint width (SD3: 4096, T5-XXL's), and the third encoder's final states (T5's role: a sequence-only encoder,
  no pooled output) are appended along the sequence: context [N, L + L3, joint] (SD3: 77 + 256 tokens).
- pooled = both CLIPs' projected <eos> vectors, concatenated (SD3: 768 + 1280 = 2048).
- SD3 trained with each encoder dropped independently (46.3% each) so that T5, the largest, can be left out at
  sampling with a small loss: `without_third` puts zeros in its place, and `drop_third` drops it in training.
- The unconditional twin is zeros (what a dropped caption becomes in training).

The course's encoders: shapes-clip (CLIP-L's role), shapes-clip-g (bigG's) and shapes-clip-bidir in T5's role:
bidirectional like T5's encoder, but trained by notebook 02's CLIP recipe (T5 learnt from text alone; shapes
captions alone teach nothing about images), of which only the token states are read.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sdlearn.pipeline import Conditioner
from sdlearn.text import TextEncoder, Tokenizer


class SD3Conditioner(Conditioner):
    """Prompts -> {"context" [N, L + L3, joint_dim], "pooled" [N, P1 + P2]}.

    text_encoder, text_encoder_2: CLIP-L's and bigG's roles (penultimate states on channels, pooled from both);
    text_encoder_3: T5's role (final states along the sequence; a T5Encoder for the real checkpoints), or None:
    zeros of third_length tokens in its place. joint_dim: the context width (default: the wider of D1 + D2 and D3).
    tokenizer, tokenizer_2, tokenizer_3: default the course's word-level Tokenizer of each encoder; real checkpoints
    come with transformers' (sdlearn.text.PretrainedTokenizer). zero_negative: the unconditional twin is zeros (what
    a dropped caption is in training, the course's models); False: the empty prompt through the encoders, as
    diffusers' StableDiffusion3Pipeline makes its default negative prompt."""

    dropout_keys = ("context", "pooled")

    def __init__(self, text_encoder: TextEncoder, text_encoder_2: TextEncoder, text_encoder_3: nn.Module | None,
                 joint_dim: int | None = None, third_length: int | None = None, tokenizer=None, tokenizer_2=None,
                 tokenizer_3=None, zero_negative: bool = True):
        super().__init__()
        self.text_encoder, self.text_encoder_2, self.text_encoder_3 = text_encoder, text_encoder_2, text_encoder_3
        self.zero_negative = zero_negative
        self.tokenizers = [tok or (Tokenizer.for_encoder(e) if e is not None else None) for e, tok in
                           zip((text_encoder, text_encoder_2, text_encoder_3), (tokenizer, tokenizer_2, tokenizer_3),
                               strict=True)]
        if self.tokenizers[0].context_length != self.tokenizers[1].context_length:
            raise ValueError(f"the two CLIP tokenizers pad to different lengths ({self.tokenizers[0].context_length} "
                             f"and {self.tokenizers[1].context_length}): their states are concatenated token by token")
        if text_encoder_3 is None and third_length is None:
            raise ValueError("without a third encoder, give third_length: the number of zero tokens in its place")
        self.third_length = self.tokenizers[2].context_length if text_encoder_3 is not None else third_length
        clip_width = text_encoder.config.width + text_encoder_2.config.width
        third_width = text_encoder_3.config.width if text_encoder_3 is not None else 0
        self.joint_dim = joint_dim or max(clip_width, third_width)
        if self.joint_dim < max(clip_width, third_width):
            raise ValueError(f"joint_dim={self.joint_dim} is narrower than the text it holds: the CLIP states are "
                             f"{clip_width} wide and the third encoder's {third_width}")

    def init_args(self) -> dict:
        zero = {} if self.zero_negative else {"zero_negative": False}
        return {"text_encoder": self.text_encoder, "text_encoder_2": self.text_encoder_2,
                "text_encoder_3": self.text_encoder_3, "joint_dim": self.joint_dim, "third_length": self.third_length,
                **zero}

    @property
    def dims(self) -> dict[str, int]:
        return {"context": self.joint_dim,
                "pooled": self.text_encoder.config.pooled_dim + self.text_encoder_2.config.pooled_dim}

    @property
    def third(self) -> slice:
        """Where the third encoder's tokens are in the context's sequence axis."""
        return slice(self.tokenizers[0].context_length, None)

    def encode(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        device = next(self.text_encoder.parameters()).device
        (h1, p1), (h2, p2) = (enc(tok(prompts).to(device), hidden_layer=-2)
                              for enc, tok in zip(self.encoders[:2], self.tokenizers[:2], strict=True))
        clip = F.pad(torch.cat([h1, h2], dim=-1), (0, self.joint_dim - h1.shape[-1] - h2.shape[-1]))  # [N,L,joint]
        if self.text_encoder_3 is not None:
            h3 = self.text_encoder_3(self.tokenizers[2](prompts).to(device))[0]                      # [N,L3,D3]
            third = F.pad(h3, (0, self.joint_dim - h3.shape[-1]))
        else:
            third = clip.new_zeros(len(prompts), self.third_length, self.joint_dim)
        return {"context": torch.cat([clip, third], dim=1), "pooled": torch.cat([p1, p2], dim=-1)}

    @property
    def encoders(self) -> list[TextEncoder | None]:
        return [self.text_encoder, self.text_encoder_2, self.text_encoder_3]

    def encode_unconditional(self, n: int) -> dict[str, torch.Tensor]:
        """Zeros, the shape of a prompt's conditions: what a dropped caption is in training (zero_negative=False:
        the empty prompt's conditions)."""
        cond = self.encode([""])
        return {k: (torch.zeros_like(v) if self.zero_negative else v).expand(n, *v.shape[1:]) for k, v in cond.items()}

    def drop_third(self, cond: dict[str, torch.Tensor], p: float,
                   generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """cond with the third encoder's tokens zeroed in each sample with probability p (SD3's independent
        encoder dropout, which lets sampling leave T5 out)."""
        context = cond["context"]
        drop = torch.rand(context.shape[0], generator=generator, device=context.device) < p       # [N]
        context = context.clone()
        context[drop, self.third] = 0
        return {**cond, "context": context}


def without_third(conditioner: SD3Conditioner) -> SD3Conditioner:
    """The same conditioner with zeros in place of the third encoder (SD3 without T5)."""
    c = conditioner
    return SD3Conditioner(c.text_encoder, c.text_encoder_2, None, c.joint_dim, c.third_length, *c.tokenizers[:2],
                          zero_negative=c.zero_negative)


class WithoutEncoder(Conditioner):
    """An SD3Conditioner with one encoder's share of the text zeroed at sampling time: which=1 (CLIP-L's role) or 2
    (bigG's), its channels of the CLIP tokens and its part of the pooled vector; which=3 (T5's role), its tokens.
    What does the MMDiT read? (notebook 08's encoder ablation; sdlearn.measure.WithoutEncoder is SDXL's)"""

    dropout_keys = SD3Conditioner.dropout_keys

    def __init__(self, conditioner: SD3Conditioner, which: int):
        super().__init__()
        if which not in (1, 2, 3):
            raise ValueError(f"which must be 1, 2 or 3 (the encoder whose share is zeroed), got {which!r}")
        self.inner, self.which = conditioner, which

    @property
    def dims(self) -> dict[str, int]:
        return self.inner.dims

    def encode(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        c = self.inner
        cond = self.inner.encode(prompts)
        context, pooled = cond["context"].clone(), cond["pooled"].clone()   # [N,L+L3,D], [N,P1+P2]
        if self.which == 3:
            context[:, c.third] = 0
        else:
            w1, p1 = c.text_encoder.config.width, c.text_encoder.config.pooled_dim
            w2 = c.text_encoder_2.config.width
            channels, part = ((slice(0, w1), slice(0, p1)) if self.which == 1 else
                              (slice(w1, w1 + w2), slice(p1, None)))
            context[:, : c.third.start, channels] = 0
            pooled[:, part] = 0
        return {"context": context, "pooled": pooled}

    def encode_unconditional(self, n: int) -> dict[str, torch.Tensor]:
        return self.inner.encode_unconditional(n)
