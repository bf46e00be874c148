"""CLIP's contrastive pretraining (Radford et al. 2021, "Learning Transferable Visual Models From Natural Language
Supervision"): how the text encoder of sdlearn.text learns what "red" or "on the left" mean, from pairs alone.

    clip = CLIP(TextEncoder(TextConfig()), ImageEncoder(ImageEncoderConfig()))
    image_emb, text_emb = clip(images, tokens)                    # [B, 3, H, W], [B, L] -> [B, P], [B, P], unit rows
    loss = clip_loss(image_emb, text_emb, clip.logit_scale)       # Radford et al. 2021, figure 3
    acc = retrieval(clip, tokenizer, images, captions)            # held-out top-1: {"t2i", "i2t", "t2i_1obj", ...}

A batch of B (image, caption) pairs gives a B x B matrix of cosine similarities, scaled by a learned
1/temperature and read as logits: row i classifies image i among the B captions (the right one: caption i),
column j caption j among the B images. The loss is the mean of the two cross-entropies; nothing else is
labelled. The image encoder is only the training partner: Stable Diffusion keeps CLIP's text tower, frozen,
and throws the image tower away. Here the same recipe runs at toy scale on the shapes dataset
(sdlearn.recipes.clip, `python -m sdlearn train clip`); its releases are the text encoder shapes-clip and its
partner shapes-clip-image:

    clip = CLIP(pretrained.load("shapes-clip", size=32), pretrained.load("shapes-clip-image", size=32))
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from sdlearn.text import TextEncoder, Tokenizer


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
