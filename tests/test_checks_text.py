"""The notebook-02 checkers (sdlearn.checks.text): cross-attention, the causal mask, CLIP's loss."""
import math

import pytest
import torch
import torch.nn.functional as F

from sdlearn.checks import CheckFailed
from sdlearn.checks import text as check
from sdlearn.clip import clip_loss

# -----------------------------------------------------------------------------
# checkers, against right and deliberately wrong answers


def _xattn(x, context, w_q, w_k, w_v, keys_from_x=False, values_from_x=False, scale=True, dim=-1):
    q = x @ w_q
    k = (x if keys_from_x else context) @ w_k
    v = (x if values_from_x else context) @ w_v
    s = q @ k.transpose(-2, -1) / (math.sqrt(q.shape[-1]) if scale else 1)
    return s.softmax(dim) @ v


def test_cross_attention_checker_passes_the_reference_and_sdlearn(capsys):
    from sdlearn.attention import scaled_dot_product_attention

    check.cross_attention(_xattn)
    check.cross_attention(lambda x, c, wq, wk, wv: scaled_dot_product_attention(x @ wq, c @ wk, c @ wv))
    assert "correct" in capsys.readouterr().out


@pytest.mark.parametrize("wrong,hint", [
    (lambda *a: _xattn(*a, keys_from_x=True), "keys must come from the context"),
    (lambda *a: _xattn(*a, values_from_x=True), "values must come from the context"),
    (lambda *a: _xattn(*a, keys_from_x=True, values_from_x=True), "keys must come .*; values must come"),
    (lambda *a: _xattn(*a, scale=False), r"not scaled: divide Q K\^T by sqrt\(d\)"),
    (lambda *a: _xattn(*a, dim=-2), "softmax over the wrong axis"),
    (lambda x, c, wq, wk, wv: _xattn(c, x, wq, wk, wv), "queries must come from x"),
    (lambda x, c, wq, wk, wv: (x @ wq)[..., :wv.shape[1]], "differs from the reference"),
    (lambda x, c, wq, wk, wv: _xattn(x, c, wq, wk, wv)[0], r"has shape \(5, 3\), expected \(2, 5, 3\)"),
])
def test_cross_attention_checker_names_the_mistake(wrong, hint):
    with pytest.raises(CheckFailed, match=hint):
        check.cross_attention(wrong)


def test_cross_attention_checker_catches_a_hard_coded_shape():
    def only_square(x, c, wq, wk, wv):
        if x.shape != c.shape:
            raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")
        return _xattn(x, c, wq, wk, wv)
    with pytest.raises(CheckFailed, match="RuntimeError.*another length and width"):
        check.cross_attention(only_square)


def test_causal_mask_checker(capsys):
    check.causal_mask(lambda n: torch.ones(n, n, dtype=torch.bool).tril())
    check.causal_mask(lambda n: torch.tril(torch.ones(n, n)).bool())
    assert "correct" in capsys.readouterr().out


@pytest.mark.parametrize("wrong,hint", [
    (lambda n: torch.ones(n, n, dtype=torch.bool).triu(), "upside down"),
    (lambda n: torch.ones(n, n, dtype=torch.bool).triu(1), "True marks the positions to .hide"),
    (lambda n: torch.ones(n, n, dtype=torch.bool).tril(-1), "off by one diagonal: a token must attend to itself"),
    (lambda n: torch.ones(n, n, dtype=torch.bool).tril(1), "off by one diagonal: token i may also see token i.1"),
    (lambda n: torch.ones(n, n, dtype=torch.bool), "nothing is masked"),
    (lambda n: torch.ones(n, n).tril(), r"right pattern, but dtype torch.float32"),
    (lambda n: torch.zeros(n, n).masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), float("-inf")),
     "additive form"),
    (lambda n: torch.ones(n, n + 1, dtype=torch.bool).tril(), r"has shape \(4, 5\), expected \(4, 4\)"),
])
def test_causal_mask_checker_names_the_mistake(wrong, hint):
    with pytest.raises(CheckFailed, match=hint):
        check.causal_mask(wrong)


def _loss(img, txt, s, norm=True, scale="exp", direction="mean", labels=None):
    if norm:
        img, txt = F.normalize(img, dim=-1), F.normalize(txt, dim=-1)
    logits = img @ txt.T * {"exp": s.exp(), "none": 1, "raw": s}[scale]
    y = torch.arange(len(img)) if labels is None else labels(len(img))
    a, b = F.cross_entropy(logits, y), F.cross_entropy(logits.T, y)
    return {"mean": (a + b) / 2, "i2t": a, "sum": a + b}[direction]


def test_clip_loss_checker_passes_the_reference(capsys):
    check.clip_loss(clip_loss)
    check.clip_loss(_loss)
    assert "correct" in capsys.readouterr().out


@pytest.mark.parametrize("wrong,hint", [
    (lambda *a: _loss(*a, direction="i2t"), "not symmetric: only the image->text"),
    (lambda *a: _loss(*a, direction="sum"), "added; CLIP takes their mean"),
    (lambda *a: _loss(*a, scale="none"), "not scaled by the temperature"),
    (lambda *a: _loss(*a, scale="raw"), r"the \*log\* of the scale"),
    (lambda *a: _loss(*a, norm=False), "not normalised"),
    (lambda *a: _loss(*a, labels=lambda b: torch.zeros(b, dtype=torch.long)), "labels wrong"),
    (lambda *a: _loss(*a, norm=False, scale="none"), "not normalised.*; logits not scaled"),
    (lambda img, txt, s: _loss(img, txt, s.detach()), "not differentiable in logit_scale"),
    (lambda img, txt, s: torch.stack([_loss(img, txt, s)] * 2), r"one number .*got shape \(2,\)"),
    (lambda img, txt, s: _loss(img, txt, s) + 0.1, "differs from the reference"),
])
def test_clip_loss_checker_names_the_mistake(wrong, hint):
    with pytest.raises(CheckFailed, match=hint):
        check.clip_loss(wrong)
