"""The notebook-01 checkers (sdlearn.checks.attention): the right answers pass, each classic mistake gets its hint."""
import math

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from sdlearn.attention import Attention, SelfAttentionBlock, scaled_dot_product_attention
from sdlearn.checks import CheckFailed
from sdlearn.checks import attention as check

# -----------------------------------------------------------------------------
# checkers: the right answers pass, each classic mistake gets its own hint


def attention_right(q, k, v, mask=None):
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return scores.softmax(dim=-1) @ v


def attention_big_negative(q, k, v, mask=None):  # -1e9 instead of -inf is fine too
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    if mask is not None:
        scores = scores.masked_fill(mask == 0, -1e9)
    return torch.softmax(scores, -1) @ v


def _wrong(scale="sqrt", softmax_dim=-1, mask_mode="inf", scores="qk", weights_only=False, use_T=False, d_from="q"):
    def fn(q, k, v, mask=None):
        d = {"q": q.shape[-1], "v": v.shape[-1], "m": k.shape[-2]}[d_from]
        kt = k.T if use_T else k.transpose(-2, -1)
        s = q @ kt if scores == "qk" else k @ q.transpose(-2, -1)
        s = s * {"sqrt": 1 / math.sqrt(d), "none": 1.0, "d": 1 / d}[scale]
        if mask is not None:
            if mask_mode == "inf":
                s = s.masked_fill(~mask, float("-inf"))
            elif mask_mode == "inverted":
                s = s.masked_fill(mask, float("-inf"))
            elif mask_mode == "zero":
                s = s.masked_fill(~mask, 0.0)
        w = s.softmax(softmax_dim)
        if mask is not None and mask_mode == "after":
            w = w * mask
        return w if weights_only else w @ v
    return fn


@pytest.mark.parametrize("fn,hint", [
    (_wrong(scale="none"), r"missing the 1/sqrt\(d\) scaling"),
    (_wrong(scale="d"), r"1/d instead of 1/sqrt\(d\)"),
    (_wrong(softmax_dim=-2), "softmax over the wrong axis"),
    (_wrong(scores="kq"), "transposes wrong"),
    (_wrong(weights_only=True), "the attention weights: multiply them by v"),
    (_wrong(use_T=True), r"k.transpose\(-2, -1\): k.T reverses"),
    (_wrong(d_from="v"), "value width dv instead of"),
    (_wrong(mask_mode="ignore"), "the mask is ignored"),
    (_wrong(mask_mode="inverted"), "the mask is inverted"),
    (_wrong(mask_mode="zero"), "set to 0 instead of -inf"),
    (_wrong(mask_mode="after"), "mask is applied after the softmax"),
])
@pytest.mark.filterwarnings("ignore:The use of `x.T`:UserWarning")  # the k.T mistake on batched inputs
def test_attention_checker_names_the_mistake(fn, hint):
    with pytest.raises(CheckFailed, match=hint):
        check.attention(fn)


def test_attention_checker_accepts_right_answers(capsys):
    check.attention(attention_right)
    check.attention(attention_big_negative)
    check.attention(scaled_dot_product_attention)
    check.attention(lambda q, k, v, mask=None: F.scaled_dot_product_attention(q, k, v, attn_mask=mask))
    assert capsys.readouterr().out.count("correct") == 4


def test_attention_checker_lets_not_implemented_through():
    def todo(q, k, v, mask=None):
        raise NotImplementedError()
    with pytest.raises(NotImplementedError):
        check.attention(todo)


def split_right(x, heads):
    return rearrange(x, "b n (h d) -> b h n d", h=heads)


def merge_right(x):
    return rearrange(x, "b h n d -> b n (h d)")


@pytest.mark.parametrize("split,merge,hint", [
    (lambda x, h: rearrange(x, "b n (d h) -> b h n d", h=h), merge_right, r"split_heads mixed the heads.*'\(d h\)'"),
    (split_right, lambda x: rearrange(x, "b h n d -> b n (d h)"), r"merge_heads mixed the heads.*'\(d h\)'"),
    (lambda x, h: x.view(x.shape[0], h, x.shape[1], -1), merge_right, "reshaped without moving axes"),
    (split_right, lambda x: x.reshape(x.shape[0], x.shape[2], -1), "merge_heads reshaped without moving axes"),
    (lambda x, h: rearrange(x, "b n (h d) -> b n h d", h=h), merge_right, "head axis goes before the tokens"),
    (lambda x, h: x, merge_right, r"has shape \(2, 5, 12\), expected \(2, 3, 5, 4\)"),
    (split_right, lambda x: rearrange(x, "b h n d -> b (h d) n"), r"tokens stay on axis 1"),
])
def test_heads_checker_names_the_mistake(split, merge, hint):
    with pytest.raises(CheckFailed, match=hint):
        check.heads(split, merge)


def test_heads_checker_accepts_right_answers():
    check.heads(split_right, merge_right)
    check.heads(lambda x, h: x.unflatten(-1, (h, -1)).transpose(1, 2), lambda x: x.transpose(1, 2).flatten(2))


class BlockBase(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads=heads)


def _block(forward):
    return type("Block", (BlockBase,), {"forward": forward})


@pytest.mark.parametrize("forward,hint", [
    (lambda self, x: self.attn(self.norm(x)), "missing the residual"),
    (lambda self, x: self.norm(x + self.attn(x)), r"the norm is after the attention \(post-norm"),
    (lambda self, x: self.norm(x + self.attn(self.norm(x))), "the norm is after the residual"),
    (lambda self, x: x + self.attn(x), "the norm is missing"),
    (lambda self, x: self.norm(x) + self.attn(self.norm(x)), "adds norm\\(x\\) instead of x"),
    (lambda self, x: x.mean(1), r"has shape \(2, 16\), expected \(2, 9, 16\)"),
])
def test_block_checker_names_the_mistake(forward, hint):
    with pytest.raises(CheckFailed, match=hint):
        check.self_attention_block(_block(forward))


def test_block_checker_wants_norm_and_attn():
    class NoNames(nn.Module):
        def __init__(self, dim, heads):
            super().__init__()
            self.ln = nn.LayerNorm(dim)
            self.mha = Attention(dim, heads=heads)
    with pytest.raises(CheckFailed, match=r"\.norm.*\.attn"):
        check.self_attention_block(NoNames)


def test_block_checker_accepts_right_answer():
    check.self_attention_block(_block(lambda self, x: x + self.attn(self.norm(x))))
    check.self_attention_block(lambda dim, heads: SelfAttentionBlock(dim, heads))
