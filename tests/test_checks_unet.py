"""The notebook-05 checkers (sdlearn.checks.unet): the timestep embedding, a ResBlock, the up path."""
import math

import pytest
import torch
import torch.nn.functional as F

from sdlearn.checks import CheckFailed
from sdlearn.checks import unet as check
from sdlearn.unet import ResBlock

# -- checkers: the right answer passes, each typical mistake is named ---------------------------------------


def _emb_right(t, dim):
    half = dim // 2
    f = torch.exp(-math.log(10000) * torch.arange(half) / half)
    a = t.float()[:, None] * f
    return torch.cat([a.cos(), a.sin()], -1)


def _emb_swapped(t, dim):
    return _emb_right(t, dim).roll(dim // 2, -1)


def _emb_shift(t, dim):
    half = dim // 2
    a = t.float()[:, None] * torch.exp(-math.log(10000) * torch.arange(half) / (half - 1))
    return torch.cat([a.cos(), a.sin()], -1)


def _emb_over_dim(t, dim):
    a = t.float()[:, None] * torch.exp(-math.log(10000) * torch.arange(dim // 2) / dim)
    return torch.cat([a.cos(), a.sin()], -1)


def _emb_interleaved(t, dim):
    a = t.float()[:, None] * torch.exp(-math.log(10000) * torch.arange(dim // 2) / (dim // 2))
    return torch.stack([a.cos(), a.sin()], -1).flatten(1)


def _emb_half_only(t, dim):
    return _emb_right(t, dim)[:, : dim // 2]


def test_timestep_embedding_checker(capsys):
    check.timestep_embedding(_emb_right)
    assert "correct" in capsys.readouterr().out
    for fn, hint in [(_emb_swapped, "halves are swapped"), (_emb_shift, r"half - 1"), (_emb_over_dim, "not by dim"),
                     (_emb_interleaved, "interleaved"), (_emb_half_only, r"shape \(5, 16\), expected \(5, 32\)")]:
        with pytest.raises(CheckFailed, match=hint):
            check.timestep_embedding(fn)


def _res_right(b, x, emb):
    h = b.conv1(F.silu(b.norm1(x)))
    h = h + b.time_proj(F.silu(emb))[:, :, None, None]
    return b.shortcut(x) + b.conv2(b.dropout(F.silu(b.norm2(h))))


def _res_time_after(b, x, emb):
    h = b.conv2(b.dropout(F.silu(b.norm2(b.conv1(F.silu(b.norm1(x)))))))
    return b.shortcut(x) + h + b.time_proj(F.silu(emb))[:, :, None, None]


def _res_no_silu_on_emb(b, x, emb):
    h = b.conv1(F.silu(b.norm1(x))) + b.time_proj(emb)[:, :, None, None]
    return b.shortcut(x) + b.conv2(F.silu(b.norm2(h)))


def _res_no_broadcast(b, x, emb):
    h = b.conv1(F.silu(b.norm1(x))) + b.time_proj(F.silu(emb))
    return b.shortcut(x) + b.conv2(F.silu(b.norm2(h)))


def _res_no_shortcut(b, x, emb):
    h = b.conv1(F.silu(b.norm1(x))) + b.time_proj(F.silu(emb))[:, :, None, None]
    return b.conv2(F.silu(b.norm2(h)))


def _res_identity_shortcut(b, x, emb):
    h = b.conv1(F.silu(b.norm1(x))) + b.time_proj(F.silu(emb))[:, :, None, None]
    return x + b.conv2(F.silu(b.norm2(h)))


def test_resblock_checker(capsys):
    check.resblock_forward(_res_right)
    assert "correct" in capsys.readouterr().out
    for fn, hint in [(_res_time_after, "after the second conv"), (_res_no_silu_on_emb, "without SiLU"),
                     (_res_no_broadcast, r"\[:, :, None, None\]"), (_res_no_shortcut, "shortcut is missing"),
                     (_res_identity_shortcut, r"block.shortcut\(x\)")]:
        with pytest.raises(CheckFailed, match=hint):
            check.resblock_forward(fn)


def _up(order="hs", pop=lambda s: s.pop(), attention=True, upsample_first=False):
    def fn(unet, h, skips, emb, context):
        for level in unet.up:
            if upsample_first and level.resample is not None:
                h = level.resample(h)
            for j, resnet in enumerate(level.resnets):
                s = pop(skips)
                h = resnet(torch.cat([h, s] if order == "hs" else [s, h], 1), emb)
                if level.attentions and attention:
                    h = level.attentions[j](h, context)
            if not upsample_first and level.resample is not None:
                h = level.resample(h)
        return h
    return fn


def test_up_path_checker(capsys):
    check.up_path(_up())
    assert "correct" in capsys.readouterr().out
    for fn, hint in [(_up(pop=lambda s: s.pop(0)), r"wrong order.*pop\(0\)"),
                     (_up(order="sh"), "concatenated in the wrong order"),
                     (_up(attention=False), "spatial transformer is missing"),
                     (_up(upsample_first=True), "upsample only after"),
                     (_up(pop=lambda s: s[-1]), r"skips\[-1\] but never removed")]:
        with pytest.raises(CheckFailed, match=hint):
            check.up_path(fn)


def test_checkers_unet_is_the_library_unet():
    unet = check.tiny_unet()
    x = torch.randn(1, 3, 8, 8)
    out = unet(x, torch.tensor([5]), torch.randn(1, 2, 8))
    assert out.shape == x.shape
    assert isinstance(unet.down[0].resnets[0], ResBlock)


def test_a_missing_reshape_in_the_embedding_gets_a_hint():
    def no_reshape(t, dim):  # t [B] times freqs [dim // 2]: a broadcasting error
        a = t.float() * torch.exp(-math.log(10000) * torch.arange(dim // 2) / (dim // 2))
        return torch.cat([a.cos(), a.sin()], -1)

    with pytest.raises(CheckFailed, match=r"raised RuntimeError .* t\[:, None\] \* freqs\[None, :\]"):
        check.timestep_embedding(no_reshape)


def test_a_mistake_outside_the_usual_ones_names_the_first_wrong_element():
    def minus_sin(t, dim):
        e = _emb_right(t, dim)
        return torch.cat([e[:, : dim // 2], -e[:, dim // 2:]], -1)

    with pytest.raises(CheckFailed, match=r"first wrong element at index \(1, 16\).*none of the usual mistakes"):
        check.timestep_embedding(minus_sin)
    with pytest.raises(CheckFailed, match=r"first wrong element at index .*none of the usual mistakes"):
        check.resblock_forward(lambda b, x, emb: 2 * _res_right(b, x, emb))
