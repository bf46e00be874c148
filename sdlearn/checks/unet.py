"""Checkers for 05_unet: the timestep embedding, a ResBlock's forward, the up path's skip bookkeeping.

Each checker runs the learner's function next to sdlearn.unet's and, when they differ, next to the usual
wrong versions, to name the mistake rather than just the mismatch.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from sdlearn.checks import CheckFailed, call, diagnose, expect_tensor, fail, is_close, passed
from sdlearn.unet import ResBlock, UNet, UNetConfig
from sdlearn.unet import timestep_embedding as _reference_embedding

# -----------------------------------------------------------------------------
# timestep embedding


def _embedding_variants(t: torch.Tensor, dim: int) -> dict[str, torch.Tensor]:
    """The usual wrong embeddings, each with what it means."""
    half = dim // 2
    i = torch.arange(half, dtype=torch.float32)
    t = t.float()[:, None]
    right = torch.exp(-math.log(10000) * i / half)

    def cat(freqs, first=torch.cos, second=torch.sin):
        return torch.cat([first(t * freqs), second(t * freqs)], -1)

    return {
        "the halves are swapped: Stable Diffusion puts cos first, then sin (diffusers' flip_sin_to_cos=True)":
            cat(right, torch.sin, torch.cos),
        "cos and sin are interleaved (cos f0, sin f0, cos f1, ...): concatenate the two halves instead":
            torch.stack([torch.cos(t * right), torch.sin(t * right)], -1).flatten(1),
        "the frequencies are wrong: exponent -log(10000) * i / (half - 1) (diffusers' freq_shift=1); "
        "SD divides by half":
            cat(torch.exp(-math.log(10000) * i / (half - 1))),
        "the frequencies are wrong: divide the exponent by half = dim // 2, not by dim":
            cat(torch.exp(-math.log(10000) * i / dim)),
        "the frequencies are wrong: the exponent must be negative, f_i = 10000^(-i/half) (from 1 down to ~1/10000)":
            cat(torch.exp(math.log(10000) * i / half)),
        "the frequencies are wrong: f_i = exp(-ln(10000) * i / half), you used log10 or log2 of 10000":
            cat(torch.exp(-math.log10(10000) * i / half)),
        "the arguments are wrong: multiply t by the frequencies (t * f_i), you divided":
            torch.cat([torch.cos(t / right), torch.sin(t / right)], -1),
    }


def timestep_embedding(fn) -> None:
    """fn(t [B], dim) -> [B, dim]: cos(t f_i) for i < dim/2, then sin(t f_i); f_i = 10000^(-i / (dim/2))."""
    name = "timestep_embedding"
    for t, dim in [(torch.tensor([0, 1, 10, 250, 999]), 32), (torch.tensor([0.5, 3.0, 500.0]), 16)]:
        on = f"t={t.tolist()}, dim={dim}"
        got = call(name, fn, t.clone(), dim, on=on, hints={"size of tensor|shape|broadcast": (
            "shapes do not line up: t is [B] and the frequencies [dim // 2]; give t a trailing axis and the "
            "frequencies a leading one, t[:, None] * freqs[None, :] -> [B, dim // 2], then concatenate cos and sin "
            "along the last axis -> [B, dim]")})
        got = expect_tensor(name, got, (len(t), dim),
                            what=f"timestep_embedding(t of shape {tuple(t.shape)}, dim={dim})")
        expected = _reference_embedding(t, dim)
        row0 = got[t == 0]
        advice = "expected cos(t f_i) then sin(t f_i) with f_i = exp(-ln(10000) i / (dim // 2))"
        if len(row0) and not is_close(row0[0], expected[0], atol=1e-4):
            advice = (f"at t=0 the embedding should be 1 (cos 0) in the first half and 0 (sin 0) in the second, "
                      f"got {row0[0][:4].tolist()}... / {row0[0][dim // 2:dim // 2 + 4].tolist()}...")
        diagnose(name, got, expected, _embedding_variants(t, dim), on=on, atol=1e-4, what="the embedding",
                 advice=advice)
    passed(name)


# -----------------------------------------------------------------------------
# ResBlock


def _resblock_variants(b: ResBlock, x, emb) -> dict[str, torch.Tensor]:
    temb = b.time_proj(F.silu(emb))[:, :, None, None]
    h1 = b.conv1(F.silu(b.norm1(x)))

    def tail(h):
        return b.conv2(b.dropout(F.silu(b.norm2(h))))

    return {
        "the time embedding is added after the second conv: add it between the convs (after conv1, before norm2)":
            b.shortcut(x) + tail(h1) + temb,
        "the time embedding goes through time_proj without SiLU first: time_proj(silu(emb))":
            b.shortcut(x) + tail(h1 + b.time_proj(emb)[:, :, None, None]),
        "the shortcut is missing: return shortcut(x) + h":
            tail(h1 + temb),
        "norm and activation are swapped: GroupNorm first, then SiLU (norm1 -> silu -> conv1)":
            b.shortcut(x) + b.conv2(b.norm2(F.silu(h1 + temb))),
        "the first half is not normalised: conv1(silu(norm1(x)))":
            b.shortcut(x) + tail(b.conv1(F.silu(x)) + temb),
    }


def resblock_forward(fn) -> None:
    """fn(block: sdlearn.unet.ResBlock, x [B,Cin,H,W], emb [B,T]) -> [B,Cout,H,W], using the block's layers."""
    name = "resblock_forward"
    torch.manual_seed(0)
    for cin, cout in [(16, 32), (16, 16)]:
        block = ResBlock(cin, cout, temb=24, groups=4).eval()
        with torch.no_grad():
            for p in block.parameters():
                p.add_(0.3 * torch.randn_like(p))
        x, emb = torch.randn(2, cin, 6, 6), torch.randn(2, 24)
        on = f"x [2, {cin}, 6, 6], emb [2, 24], Cin={cin}, Cout={cout}"
        with torch.no_grad():
            got = call(name, fn, block, x, emb, on=on, hints={"must match the size|size of tensor": (
                "shapes do not line up: the time embedding is [B,Cout]; give it two trailing axes, [:, :, None, None], "
                "to add it to every pixel; and the shortcut needs block.shortcut(x) (a 1x1 conv) when Cin != Cout")})
            expected = block(x, emb)
            got = expect_tensor(name, got, tuple(expected.shape), what=f"the output for Cin={cin}, Cout={cout}")
            diagnose(name, got, expected, _resblock_variants(block, x, emb), on=on, atol=1e-4, what="the output",
                     advice="expected shortcut(x) + conv2(dropout(silu(norm2(conv1(silu(norm1(x))) "
                            "+ time_proj(silu(emb))))))")
    passed(name)


# -----------------------------------------------------------------------------
# the up path


class _Stack(list):
    """A list of skips that remembers how it was read."""

    def __init__(self, items):
        super().__init__(items)
        self.pops: list[int] = []
        self.reads = 0

    def pop(self, index=-1):
        self.pops.append(index if index >= 0 else len(self) + index)
        return super().pop(index)

    def __getitem__(self, i):
        self.reads += 1
        return super().__getitem__(i)


def tiny_unet(seed: int = 0) -> UNet:
    """A small UNet (two levels, attention at the coarse one) whose weights are random enough to tell mistakes."""
    torch.manual_seed(seed)
    unet = UNet(UNetConfig(in_channels=3, out_channels=3, channels=(8, 16), layers_per_block=1,
                           attention=(False, True), heads=2, context_dim=8, norm_groups=4)).eval()
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return unet


def _skip_order(name: str, stack: _Stack) -> None:
    """Fail if the skips were popped from the wrong end."""
    if stack.pops and stack.pops[0] == 0:
        fail(name, "skips popped in the wrong order: the up path needs the most recent skip first "
                   "(a stack, last in first out): skips.pop(), not skips.pop(0)")


def _up_path_variants(unet: UNet, h, skips, emb, context) -> dict[str, torch.Tensor]:
    def run(take, order="hs", upsample_first=False, attention=True):
        skips_, h_ = list(skips), h
        for level in unet.up:
            if upsample_first and level.resample is not None:
                h_ = level.resample(h_)
            for j, resnet in enumerate(level.resnets):
                s = take(skips_)
                h_ = resnet(torch.cat([h_, s] if order == "hs" else [s, h_], 1), emb)
                if level.attentions and attention:
                    h_ = level.attentions[j](h_, context)
            if not upsample_first and level.resample is not None:
                h_ = level.resample(h_)
        return h_

    out = {}
    for meaning, kw in [
        ("the skip and h are concatenated in the wrong order: torch.cat([h, skip], dim=1), h first", dict(order="sh")),
        ("the level's spatial transformer is missing: after each ResBlock, h = level.attentions[j](h, context) "
         "when the level has attention", dict(attention=False)),
    ]:
        try:
            out[meaning] = run(lambda s: s.pop(), **kw)
        except RuntimeError:
            pass
    return out


def up_path(fn) -> None:
    """fn(unet, h, skips, emb, context) -> h at full resolution: the up levels, popping the skips."""
    name = "up_path"
    unet = tiny_unet()
    x, t, context = torch.randn(2, 3, 8, 8), torch.tensor([10, 500]), torch.randn(2, 3, 8)
    with torch.no_grad():
        emb = unet.embed(t)
        h, skips = unet.down_path(x, emb, context)
        h = unet.mid(h, emb, context)
        expected = unet.up_path(h, list(skips), emb, context)
        stack = _Stack(skips)
        on = f"x [2, 3, 8, 8] through the tiny UNet's down path and mid block ({len(skips)} skips)"
        try:
            got = call(name, fn, unet, h, stack, emb, context, on=on, hints={"Sizes of tensors must match|size": (
                "shapes do not line up: pop the skip (skips.pop()) and concatenate it to h along channels before "
                "each ResBlock, and upsample only after the level's ResBlocks")})
        except CheckFailed:  # a crash: name the skip bookkeeping that caused it, if it is one
            if stack.reads and not stack.pops:
                fail(name, "skips read with skips[-1] but never removed, so every ResBlock gets the same skip and "
                           "the rest are left unused: take each one with skips.pop()")
            _skip_order(name, stack)
            raise
        _skip_order(name, stack)
        got = expect_tensor(name, got, tuple(expected.shape), what="the up path's output")
        if len(stack):
            fail(name, f"{len(stack)} skip(s) left unused: every ResBlock of the up path takes one with skips.pop() "
                       f"(the up path has one more ResBlock per level than the down path)"
                 + (" - indexing skips[-1] reads a skip without removing it" if stack.reads else ""))
        diagnose(name, got, expected, _up_path_variants(unet, h, skips, emb, context), on=on, atol=1e-4,
                 what="the up path's output",
                 advice="for each level in unet.up, for each ResBlock j: h = resnet(cat([h, skips.pop()], 1), emb), "
                        "then level.attentions[j](h, context) if any; after the ResBlocks, level.resample(h) if it "
                        "is not None")
    passed(name)
