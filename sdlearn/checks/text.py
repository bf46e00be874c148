"""Checkers for 02_cross_attention: cross-attention, the causal mask, CLIP's contrastive loss.

Each checker runs the learner's function on small random inputs and compares it with the reference. On a
mismatch it recomputes the answer with the typical mistakes (alone and combined) and names the ones that
reproduce the learner's result: keys from x instead of the context, a mask upside down, a loss in one
direction only, logits without the temperature, ...
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from sdlearn.checks import call, diagnose, diagnose_combinations, expect_tensor, fail, passed

# -----------------------------------------------------------------------------
# exercise 1: cross-attention

_XATTN_HINTS = [
    {"q_ctx": "queries must come from x (the pixels): Q = x @ w_q, not from the context"},
    {"k_x": "keys must come from the context (the text tokens): K = context @ w_k, not x @ w_k"},
    {"v_x": "values must come from the context (the text tokens): V = context @ w_v, not x @ w_v"},
    {"none": "scores not scaled: divide Q K^T by sqrt(d), d = the width of q and k",
     "d": "scores divided by d: divide by sqrt(d) instead",
     "sqrt_C": "scores divided by sqrt of x's width: use sqrt(d), d = the width of q and k (w_q.shape[1])"},
    {"queries": "softmax over the wrong axis: each query's weights over the keys must sum to 1 (dim=-1)",
     "none": "no softmax: the weights must be softmax(Q K^T / sqrt(d)) over the keys"},
]


def _xattn(x, ctx, wq, wk, wv, q_src="x", k_src="ctx", v_src="ctx", scale="sqrt_d", softmax="keys"):
    q = (ctx if q_src == "q_ctx" else x) @ wq  # [B, N, d]
    k = (x if k_src == "k_x" else ctx) @ wk  # [B, M, d]
    v = (x if v_src == "v_x" else ctx) @ wv  # [B, M, dv]
    d = q.shape[-1]
    scores = q @ k.transpose(-2, -1)  # [B, N, M]
    scores = scores / {"sqrt_d": math.sqrt(d), "none": 1.0, "d": d, "sqrt_C": math.sqrt(x.shape[-1])}[scale]
    w = {"keys": scores.softmax(-1), "queries": scores.softmax(-2), "none": scores}[softmax]
    return w @ v  # [B, N, dv]


def cross_attention(fn) -> None:
    """fn(x [B,N,C], context [B,M,Cc], w_q [C,d], w_k [Cc,d], w_v [Cc,dv]) -> [B,N,dv]"""
    name = "cross_attention"
    g = torch.Generator().manual_seed(0)

    def r(*s):
        return torch.randn(*s, generator=g, dtype=torch.float64)

    # 1. x and context of the same width and length: every wrong wiring runs, and we can tell which it was
    B, N, C, d, dv = 2, 5, 6, 4, 3
    x, ctx, wq, wk, wv = r(B, N, C), r(B, N, C), r(C, d), r(C, d), r(C, dv)
    on = f"x and a context of the same shape [{B}, {N}, {C}]"
    got = expect_tensor(name, call(name, fn, x, ctx, wq, wk, wv, on=on), (B, N, dv), "the output [B, N, dv]")
    axes = [("x", "q_ctx"), ("ctx", "k_x"), ("ctx", "v_x"), ("sqrt_d", "none", "d", "sqrt_C"),
            ("keys", "queries", "none")]
    diagnose_combinations(name, got, lambda *v: _xattn(x, ctx, wq, wk, wv, *v), axes, _XATTN_HINTS, on=on,
                          what="the output")
    # 2. the real case: a context of another length (M tokens) and width (Cc) than x
    N, M, C, Cc = 7, 4, 6, 10
    x, ctx, wq, wk, wv = r(B, N, C), r(B, M, Cc), r(C, d), r(Cc, d), r(Cc, dv)
    on = f"x [{B}, {N}, {C}] and a context of another length and width [{B}, {M}, {Cc}]"
    got = call(name, fn, x, ctx, wq, wk, wv, on=on, hints={"": "queries come from x, keys and values from the "
                                                                "context, and the weights are [B, N, M]"})
    expect_tensor(name, got, (B, N, dv), f"the output for x [{B},{N},{C}], context [{B},{M},{Cc}]")
    diagnose(name, got, _xattn(x, ctx, wq, wk, wv), on=on, what="the output",
             advice="It was right when x and the context had the same shape: is something hard-coded?")
    passed(name)


# -----------------------------------------------------------------------------
# exercise 2: the causal mask


def causal_mask(fn) -> None:
    """fn(n) -> bool [n, n], True where query i may attend to key j (j <= i)."""
    name = "causal_mask"
    wrong = {  # what a wrong mask for n=5 looks like -> what it means
        "upside": (lambda n: torch.ones(n, n, dtype=torch.bool).triu(),
                   "upside down: token i may attend to the *later* tokens j >= i (the future). Keep the lower "
                   "triangle, j <= i (torch.tril)"),
        "inverted": (lambda n: torch.ones(n, n, dtype=torch.bool).triu(1),
                     "True marks the positions to *hide*; here (as in F.scaled_dot_product_attention) True means "
                     "'may attend': negate it"),
        "no_diag": (lambda n: torch.ones(n, n, dtype=torch.bool).tril(-1),
                    "off by one diagonal: a token must attend to itself (the diagonal is True); without it, token 0 "
                    "has nothing to attend to and its softmax is NaN"),
        "plus_one": (lambda n: torch.ones(n, n, dtype=torch.bool).tril(1),
                     "off by one diagonal: token i may also see token i+1, one step into the future"),
        "full": (lambda n: torch.ones(n, n, dtype=torch.bool),
                 "nothing is masked: every token sees the whole prompt, future included"),
    }
    for n in (4, 7, 1):  # 4 first: for n=1 several mistakes look alike
        got = call(name, fn, n, on=f"n={n}")
        expect_tensor(name, got, (n, n), f"the mask for n={n}")
        expected = torch.ones(n, n, dtype=torch.bool).tril()
        if got.dtype != torch.bool:
            g = got.detach().double().cpu()
            if torch.equal(g, expected.double()):
                fail(name, f"right pattern, but dtype {got.dtype}: return a bool tensor (.bool()); a 0/1 float "
                           f"mask would be *added* to the scores and mask nothing")
            if torch.equal(g, torch.zeros(n, n).masked_fill(~expected, float("-inf")).double()):
                fail(name, "that is the additive form (0 / -inf), also valid in torch, but this exercise asks for "
                           "the bool mask: True where query i may attend to key j")
            fail(name, f"should be a bool tensor (True = may attend), got dtype {got.dtype}")
        shown = f"For n={n} expected (1 = may attend)\n{expected.int()}\ngot\n{got.int()}"
        diagnose(name, got, expected, [(f"{meaning}. {shown}", make(n)) for make, meaning in wrong.values()],
                 on=f"n={n}", what="the mask", atol=0, rtol=0, advice=shown)
    passed(name)


# -----------------------------------------------------------------------------
# exercise 3: CLIP's contrastive loss

_CLIP_HINTS = [
    {"none": "the embeddings are not normalised: CLIP compares cosines, F.normalize(emb, dim=-1) each row first",
     "dim0": "normalised along the wrong axis: each embedding (row) gets unit length, F.normalize(emb, dim=-1)"},
    {"none": "logits not scaled by the temperature: multiply the cosines by logit_scale.exp()",
     "raw": "logit_scale is the *log* of the scale: multiply by logit_scale.exp(), not by logit_scale",
     "divide": "the cosines must be multiplied by logit_scale.exp() (1 / temperature), not divided"},
    {"i2t": "not symmetric: only the image->text direction; add the text->image loss (logits.T) and average",
     "t2i": "not symmetric: only the text->image direction; add the image->text loss (logits) and average",
     "sum": "the two directions are added; CLIP takes their mean (divide by 2)"},
    {"zeros": "labels wrong: the right caption of image i is caption i, labels = torch.arange(B)",
     "reversed": "labels wrong: the right caption of image i is caption i, labels = torch.arange(B)"},
]


def _clip(img, txt, s, norm="dim1", scale="exp", direction="mean", labels="arange"):
    if norm != "none":
        d = -1 if norm == "dim1" else 0
        img, txt = F.normalize(img, dim=d), F.normalize(txt, dim=d)
    cos = img @ txt.T  # [B, B]
    logits = {"exp": cos * s.exp(), "none": cos, "raw": cos * s, "divide": cos / s.exp()}[scale]
    B = len(logits)
    y = {"arange": torch.arange(B), "zeros": torch.zeros(B, dtype=torch.long),
         "reversed": torch.arange(B).flip(0)}[labels]
    a, b = F.cross_entropy(logits, y), F.cross_entropy(logits.T, y)
    return {"mean": (a + b) / 2, "i2t": a, "t2i": b, "sum": a + b}[direction]


def clip_loss(fn) -> None:
    """fn(image_emb [B,P], text_emb [B,P], logit_scale: 0-dim tensor, log(1/temperature)) -> scalar loss"""
    name = "clip_loss"
    g = torch.Generator().manual_seed(0)
    B, P = 6, 5
    img, txt = (torch.randn(B, P, generator=g, dtype=torch.float64)
                * torch.rand(B, 1, generator=g, dtype=torch.float64).add(0.5) * 3 for _ in range(2))
    txt = txt + 0.8 * img  # pairs somewhat aligned, as during training
    scale = torch.tensor(1.3, dtype=torch.float64, requires_grad=True)
    got = call(name, fn, img.clone(), txt.clone(), scale, on=f"image and text embeddings [{B}, {P}]")
    expect_tensor(name, got, None, "the loss")
    if got.numel() != 1:
        fail(name, f"should be one number (a 0-dim tensor), got shape {tuple(got.shape)}: average over the batch")
    got = got.reshape(())
    axes = [("dim1", "none", "dim0"), ("exp", "none", "raw", "divide"), ("mean", "i2t", "t2i", "sum"),
            ("arange", "zeros", "reversed")]
    with torch.no_grad():
        diagnose_combinations(name, got, lambda *v: _clip(img, txt, scale, *v), axes, _CLIP_HINTS, what="the loss")
    if not got.requires_grad:
        fail(name, "the right value, but not differentiable in logit_scale: keep it a tensor "
                   "(logit_scale.exp(), not math.exp(logit_scale.item())), so the temperature is learned")
    passed(name)
