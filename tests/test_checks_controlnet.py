"""The notebook-09 checkers (sdlearn.checks.controlnet): the zero convolution, the residuals into the skips, the
conditioning embedding's strides. Right answers pass; each plausible wrong one fails with a message naming its
mistake. And the injection points train what the learner wrote: the references reproduce the default path."""
import pytest
import torch
from torch import nn

from sdlearn import controlnet as ref
from sdlearn.checks import CheckFailed
from sdlearn.checks import controlnet as check
from sdlearn.checks.controlnet import _tiny_unet
from sdlearn.controlnet import Controlled, ControlNet


def test_right_answers_pass(capsys):
    check.zero_conv(ref.zero_conv)
    check.add_residuals(ref.add_residuals)
    check.embedding_strides(ref.embedding_strides)
    out = capsys.readouterr().out
    assert all(f"{n}: correct" in out for n in ("zero_conv", "add_residuals", "embedding_strides"))


def conv(c, init=True, bias_zero=True, **kw):
    """A zero convolution with knobs for the usual mistakes."""
    m = nn.Conv2d(c, kw.pop("out", c), kw.pop("k", 1), bias=kw.pop("bias", True), **kw)
    if init:
        nn.init.zeros_(m.weight)
        if m.bias is not None and bias_zero:
            nn.init.zeros_(m.bias)
    return m


@pytest.mark.parametrize("hint, fn", [
    ("random init", lambda c: nn.Conv2d(c, c, 1)),
    ("the bias is not", lambda c: conv(c, bias_zero=False)),
    ("a zero convolution is 1x1", lambda c: conv(c, k=3, padding=1)),
    ("bias=False", lambda c: conv(c, bias=False)),
    ("keeps the width", lambda c: conv(c, out=2 * c)),
    ("do not require grad", lambda c: conv(c).requires_grad_(False)),
    ("should return an nn.Module", lambda c: torch.zeros(c, c, 1, 1)),
])
def test_zero_conv_checker_names_the_mistake(hint, fn):
    with pytest.raises(CheckFailed, match=hint):
        check.zero_conv(fn)


def add(skips, mid, residuals, scale, order=slice(None), shift=0, scale_mid=True, scale_skips=True, add_mid=True):
    """add_residuals with knobs for the usual mistakes."""
    r = residuals[:-1][order] if not shift else residuals[shift:]
    skips = [s + x * (scale if scale_skips else 1) for s, x in zip(skips, r)]
    last = residuals[-1] if not shift else residuals[0]
    return skips, (mid + last * (scale if scale_mid else 1)) if add_mid else mid


def in_place(skips, mid, residuals, scale):
    for s, r in zip(skips, residuals):
        s += r * scale
    return skips, mid.add_(residuals[-1] * scale)


@pytest.mark.parametrize("hint, fn", [
    ("scale is forgotten", lambda *a: add(*a, scale_mid=False, scale_skips=False)),
    ("mid block's residual is not scaled", lambda *a: add(*a, scale_mid=False)),
    ("skips' residuals are not scaled", lambda *a: add(*a, scale_skips=False)),
    ("not added to mid", lambda *a: add(*a, add_mid=False)),
    ("reverse order", lambda *a: add(*a, order=slice(None, None, -1))),
    ("shifted by one", lambda *a: add(*a, shift=1)),
    ("replaced by the residuals", lambda s, m, r, k: ([x * k for x in r[:-1]], r[-1] * k)),
    ("scales the frozen UNet's own features", lambda s, m, r, k: ([(a + b) * k for a, b in zip(s, r)],
                                                                   (m + r[-1]) * k)),
    ("in place", in_place),
    ("should return \\(skips, mid\\)", lambda *a: add(*a)[0]),
])
def test_add_residuals_checker_names_the_mistake(hint, fn):
    with pytest.raises(CheckFailed, match=hint):
        check.add_residuals(fn)


def test_add_residuals_names_a_shape_mismatch():
    with pytest.raises(CheckFailed, match="residuals\\[i\\] goes to skips\\[i\\]"):
        check.add_residuals(lambda s, m, r, k: add(s, m, r, k, order=slice(None, None, -1)) if len(
            {x.shape for x in s}) > 1 else add(s, m, r, k))


def right_strides(image_size, latent_size):
    return ref.embedding_strides(image_size, latent_size)


@pytest.mark.parametrize("hint, fn", [
    ("one stride-2 stage too many", lambda i, lat: right_strides(i, lat) + [1, 2]),
    ("one stride-2 stage too few", lambda i, lat: right_strides(i, lat)[2:]),
    ("not\\s+4|per unit of the factor", lambda i, lat: [1, 2] * (i // lat)),
    ("the stride-2 conv is the second of each pair", lambda i, lat: right_strides(i, lat)[::-1]),
    ("every conv has stride 2", lambda i, lat: [2] * len(right_strides(i, lat))),
    ("upside down", lambda i, lat: [1, 2] * max(lat // i, 0)),
    ("should raise ValueError", lambda i, lat: [1, 2] * max((i // max(lat, 1)).bit_length() - 1, 0)),
    ("a list of ints", lambda i, lat: len(right_strides(i, lat)) // 2),
])
def test_embedding_strides_checker_names_the_mistake(hint, fn):
    with pytest.raises(CheckFailed, match=hint):
        check.embedding_strides(fn)


def test_the_references_through_the_injection_points_are_the_default_path():
    """Controlled(..., add_residuals=the reference) and from_unet(zero_conv=, strides=) give the default's output
    bit for bit; a trained ControlNet (non-zero residuals) too, with a per-sample scale."""
    base = _tiny_unet()
    torch.manual_seed(2)
    made = ControlNet.from_unet(base, downscale=4, zero_conv=ref.zero_conv, strides=ref.embedding_strides(32, 8))
    assert made.config.embedding_strides == () and made.config.embedding_channels == (16, 32, 96)
    for p in made.parameters():   # as if trained: every zero conv non-zero
        p.data += 0.05 * torch.randn_like(p)
    g = torch.Generator().manual_seed(1)
    x, t, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 900]), torch.randn(2, 5, 8, generator=g)
    control, scale = torch.rand(2, 3, 32, 32, generator=g), torch.tensor([0.5, 1.5])
    with torch.no_grad():
        default = Controlled(base, made)(x, t, control, scale, context=ctx)
        through = Controlled(base, made, add_residuals=ref.add_residuals)(x, t, control, scale, context=ctx)
        wrong = Controlled(base, made, add_residuals=lambda s, m, r, k: add(s, m, r, k, scale_mid=False))(
            x, t, control, scale, context=ctx)
    assert torch.equal(default, through)
    assert (wrong - default).abs().max() > 1e-4, "the learner's function is what runs"


def test_wrong_strides_are_a_clear_error():
    base = _tiny_unet()
    with pytest.raises(ValueError, match="shrinking 8x"):
        ControlNet.from_unet(base, downscale=4, strides=[1, 2, 1, 2, 1, 2])
    swapped = ControlNet.from_unet(base, downscale=4, strides=[2, 1, 2, 1])
    assert swapped.config.embedding_strides == (2, 1, 2, 1) and swapped.config.downscale == 4
    assert swapped.hint.blocks[0].stride == (2, 2) and swapped.hint.blocks[1].stride == (1, 1)
