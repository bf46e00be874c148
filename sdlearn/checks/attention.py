"""Checkers for 01_self_attention.

Each checker runs the learner's code on small random inputs, compares it with sdlearn.attention, and on a
mismatch compares it with the usual mistakes (no 1/sqrt(d), softmax over the queries, a transposed score
matrix, the mask ignored, heads interleaved, the residual forgotten, ...) to say which one it is.
"""
from __future__ import annotations

import math

import torch
from einops import rearrange
from torch import nn

from sdlearn.attention import Attention, SelfAttentionBlock, attention_map
from sdlearn.checks import call, diagnose, expect_tensor, fail, is_close, passed

# -----------------------------------------------------------------------------
# exercise 1: scaled dot-product attention


def _softmax_attention(q, k, v, scale, dim=-1):
    return (q @ k.transpose(-2, -1) * scale).softmax(dim) @ v


def attention(fn) -> None:
    """fn(q [..., N, d], k [..., M, d], v [..., M, dv], mask=None [..., N, M] bool, True = attend) -> [..., N, dv]"""
    name = "attention"
    g = torch.Generator().manual_seed(0)
    randn = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    _attention_one_head(name, fn, randn)
    _attention_cross_and_batched(name, fn, randn)
    _attention_masks(name, fn, randn)
    passed(name)


def _attention_one_head(name, fn, randn) -> None:
    """One head, N = M so that transposes do not crash and can be recognised."""
    # 1. one head, N = M so that transposes do not crash and can be recognised; d != N
    n, d = 6, 16
    q, k, v = randn(n, d) * 0.6, randn(n, d) * 0.6, randn(n, d)
    on = f"q, k, v of shape [{n}, {d}] (no mask)"
    got = expect_tensor(name, call(name, fn, q, k, v, on=on), what="attention(q, k, v)")
    if tuple(got.shape) == (n, n) and d != n:
        fail(name, f"returned shape {tuple(got.shape)} = [N, M], the attention weights: multiply them by v")
    expect_tensor(name, got, (n, d), what=f"attention(q, k, v) for q, k, v [{n}, {d}]")
    s = 1 / math.sqrt(d)
    diagnose(name, got, _softmax_attention(q, k, v, s), {
        "missing the 1/sqrt(d) scaling: divide the scores q @ k^T by math.sqrt(d), d = q.shape[-1]":
            _softmax_attention(q, k, v, 1.0),
        "scaled by 1/d instead of 1/sqrt(d)": _softmax_attention(q, k, v, 1 / d),
        "scaled by sqrt(d) instead of 1/sqrt(d): divide, don't multiply": _softmax_attention(q, k, v, math.sqrt(d)),
        "softmax over the wrong axis: each query's weights over the keys must sum to 1, use softmax(dim=-1)":
            _softmax_attention(q, k, v, s, dim=-2),
        "transposes wrong: the scores are q @ k.transpose(-2, -1) ([N, M], one row per query), not k @ q^T":
            (k @ q.transpose(-2, -1) * s).softmax(-1) @ v,
        "transposes wrong: weights @ v, not weights^T @ v":
            (q @ k.transpose(-2, -1) * s).softmax(-1).transpose(-2, -1) @ v,
    }, on=on)


def _attention_cross_and_batched(name, fn, randn) -> None:
    """N queries, M keys, value width dv; then leading batch and head axes."""
    n, m, d, dv = 5, 7, 4, 3
    # 2. cross-attention shapes: N queries, M keys, value width dv
    q, k, v = randn(n, d), randn(m, d), randn(m, dv)
    on = f"q [{n}, {d}], k [{m}, {d}], v [{m}, {dv}] (N != M, d != dv)"
    got = expect_tensor(name, call(name, fn, q, k, v, on=on), (n, dv), what=f"the result on {on}")
    diagnose(name, got, _softmax_attention(q, k, v, 1 / math.sqrt(d)), {
        "scaled by the value width dv instead of the query/key width d: use d = q.shape[-1]":
            _softmax_attention(q, k, v, 1 / math.sqrt(dv)),
        "scaled by the number of keys M instead of the width d: use d = q.shape[-1]":
            _softmax_attention(q, k, v, 1 / math.sqrt(m)),
    }, on=on)

    # 3. leading batch and head axes
    shape = (2, 3)
    q, k, v = randn(*shape, n, d), randn(*shape, m, d), randn(*shape, m, dv)
    on = f"batched q [2, 3, {n}, {d}], k [2, 3, {m}, {d}], v [2, 3, {m}, {dv}]"
    batched_hint = ("for batched inputs swap the last two axes with k.transpose(-2, -1): k.T reverses all "
                    "of them; and take d from q.shape[-1]")
    got = expect_tensor(name, call(name, fn, q, k, v, on=on, hints={"": batched_hint}), (*shape, n, dv),
                        what=f"the result on {on}")
    diagnose(name, got, _softmax_attention(q, k, v, 1 / math.sqrt(d)), on=on)


def _attention_masks(name, fn, randn) -> None:
    """A padding mask, then a causal mask broadcast over batch and heads."""
    n, m, d, dv = 5, 7, 4, 3
    # 4. a padding mask: every query may see only the first M - 2 keys
    keep = torch.ones(n, m, dtype=torch.bool)
    keep[:, -2:] = False
    on = f"q [{n}, {d}], k [{m}, {d}], v [{m}, {dv}] with a padding mask (the last 2 keys masked out)"
    q, k, v = randn(n, d), randn(m, d), randn(m, dv)
    got = expect_tensor(name, call(name, fn, q, k, v, keep, on=on), (n, dv), what=f"the result on {on}")
    scores = q @ k.T / math.sqrt(d)
    w = scores.softmax(-1)
    diagnose(name, got, attention_map(q, k, keep) @ v, {
        "the mask is ignored: set the masked scores to -inf before the softmax "
        "(scores.masked_fill(~mask, float('-inf')))":
            w @ v,
        "the mask is inverted: True means 'may attend', so fill where ~mask (mask == False)":
            attention_map(q, k, ~keep) @ v,
        "masked scores set to 0 instead of -inf: a score of 0 still gets weight e^0 after the softmax":
            scores.masked_fill(~keep, 0).softmax(-1) @ v,
        "the mask is applied after the softmax: zeroed weights no longer sum to 1; mask the scores (-inf) before it":
            (w * keep) @ v,
    }, on=on)

    # 5. a causal mask, broadcast over batch and heads
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    q, k, v = randn(2, 3, n, d), randn(2, 3, n, d), randn(2, 3, n, dv)
    on = f"batched q, k, v [2, 3, {n}, ...] with a causal mask [{n}, {n}] (broadcast)"
    got = expect_tensor(name, call(name, fn, q, k, v, causal, on=on), (2, 3, n, dv), what=f"the result on {on}")
    diagnose(name, got, attention_map(q, k, causal) @ v, {
        "the mask is ignored: set the masked scores to -inf before the softmax":
            _softmax_attention(q, k, v, 1 / math.sqrt(d)),
    }, on=on)


# -----------------------------------------------------------------------------
# exercise 2: split and merge heads


def heads(split_heads, merge_heads) -> None:
    """split_heads(x [B, N, h*d], heads) -> [B, h, N, d];  merge_heads(x [B, h, N, d]) -> [B, N, h*d]"""
    name = "split_heads / merge_heads"
    b, n, h, d = 2, 5, 3, 4
    x = torch.randn(b, n, h * d, generator=torch.Generator().manual_seed(0))
    on = f"x [{b}, {n}, {h * d}] with heads={h}"
    got = expect_tensor(name, call(name, split_heads, x, h, on=on), what=f"split_heads(x, heads={h})")
    if tuple(got.shape) == (b, n, h, d):
        fail(name, f"split_heads returned [B, N, heads, d] = {tuple(got.shape)}: the head axis goes before the "
                   "tokens, [B, heads, N, d], so that each head attends over the tokens separately")
    if tuple(got.shape) == (b, d, n, h) or tuple(got.shape) == (b, h, d, n):
        fail(name, f"split_heads returned {tuple(got.shape)}: expected [B, heads, N, head_dim] = {(b, h, n, d)}")
    expect_tensor(name, got, (b, h, n, d), what=f"split_heads(x [{b}, {n}, {h * d}], heads={h})")
    diagnose(name, got, rearrange(x, "b n (h d) -> b h n d", h=h), {
        "split_heads mixed the heads into the wrong axis: head i owns the channels i*d .. (i+1)*d - 1 "
        "(contiguous), i.e. 'b n (h d) -> b h n d', not '(d h)'": rearrange(x, "b n (d h) -> b h n d", h=h),
        "split_heads reshaped without moving axes (x.view(B, heads, N, d)): that mixes tokens between heads; "
        "split the channels, then move the head axis: 'b n (h d) -> b h n d'": x.reshape(b, h, n, d),
    }, on=on, what="split_heads(x, heads)")

    y = rearrange(x, "b n (h d) -> b h n d", h=h)  # [B, h, N, d], the right split
    on = f"y [{b}, {h}, {n}, {d}]"
    got = expect_tensor(name, call(name, merge_heads, y, on=on), what="merge_heads(y)")
    if tuple(got.shape) == (b, h * d, n):
        fail(name, f"merge_heads returned [B, h*d, N] = {tuple(got.shape)}: tokens stay on axis 1, [B, N, h*d]")
    expect_tensor(name, got, (b, n, h * d), what=f"merge_heads(y [{b}, {h}, {n}, {d}])")
    diagnose(name, got, x, {
        "merge_heads mixed the heads into the wrong axis: 'b h n d -> b n (h d)', not '(d h)'":
            rearrange(y, "b h n d -> b n (d h)"),
        "merge_heads reshaped without moving axes (y.reshape(B, N, h*d)): move the head axis next to the "
        "channels first, 'b h n d -> b n (h d)'": y.reshape(b, n, h * d),
    }, on=on, what="merge_heads(y)")
    back = call(name, merge_heads, call(name, split_heads, x, h, on=on), on="split_heads(x)")
    if not is_close(back, x):
        fail(name, "merge_heads(split_heads(x, heads)) should give x back exactly")
    passed(name)


# -----------------------------------------------------------------------------
# exercise 3: a pre-norm residual self-attention block


def self_attention_block(block_cls) -> None:
    """block_cls(dim, heads) with .norm (LayerNorm) and .attn (Attention); forward(x [B, N, dim]) -> [B, N, dim]"""
    name = "self_attention_block"
    dim, h, b, n = 16, 2, 2, 9
    torch.manual_seed(0)
    block = call(name, block_cls, dim, h, on=f"{block_cls.__name__}({dim}, {h})")
    if not isinstance(block, nn.Module):
        fail(name, f"{block_cls.__name__} should be an nn.Module")
    if not (isinstance(getattr(block, "norm", None), nn.LayerNorm)
            and isinstance(getattr(block, "attn", None), Attention)):
        fail(name, "the block should keep its nn.LayerNorm as .norm and its Attention as .attn")
    ref = SelfAttentionBlock(dim, heads=h)
    with torch.no_grad():  # a LayerNorm that is not the identity at init, so that its place shows
        ref.norm.weight.uniform_(0.5, 2.0)
        ref.norm.bias.normal_(0.0, 0.5)
    try:
        block.load_state_dict(ref.state_dict())
    except Exception as e:
        fail(name, f"the block's parameters should be exactly .norm and .attn ({e})")
    x = torch.randn(b, n, dim) * 3 + 1  # far from normalised, so a missing norm shows
    on = f"x [{b}, {n}, {dim}]"
    with torch.no_grad():
        got = expect_tensor(name, call(name, block, x, on=on), (b, n, dim), what=f"the block's output on {on}")
        norm, attn = ref.norm, ref.attn
        diagnose(name, got, ref(x), {
            "missing the residual: return x + attn(norm(x)), not attn(norm(x))": attn(norm(x)),
            "the norm is after the attention (post-norm, norm(x + attn(x))): normalise the input of attn instead, "
            "x + attn(norm(x))": norm(x + attn(x)),
            "the norm is after the residual: x + attn(norm(x)) adds the normalised attention to the raw x, "
            "not norm(x + attn(norm(x)))": norm(x + attn(norm(x))),
            "the norm is missing: x + attn(norm(x))": x + attn(x),
            "the residual adds norm(x) instead of x: keep the raw x on the residual path, x + attn(norm(x))":
                norm(x) + attn(norm(x)),
        }, on=on, what="the block's output")
    passed(name)
