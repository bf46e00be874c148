"""Checkers for 09_controlnet: the zero convolution, adding the residuals into the skips, the embedding's strides.

Each checker runs the learner's function on small inputs, compares it with sdlearn.controlnet's reference (zero_conv,
add_residuals, embedding_strides) and, when it is wrong, names the usual mistake: a randomly initialised conv, a
bias left random, a 3x3 kernel; the scale forgotten, the residuals reversed or shifted by one, the mid block's
residual left out, the skips modified in place; one stride-2 stage too many, one per unit of the factor rather than
per halving, the stride on the wrong conv of a pair. The zero convolution is also built into a tiny ControlNet,
which must start as its base bit for bit.
"""
from __future__ import annotations

import torch
from torch import nn

from sdlearn.checks import call, diagnose, expect_tensor, fail, passed
from sdlearn.controlnet import Controlled, ControlNet
from sdlearn.controlnet import add_residuals as reference_add
from sdlearn.controlnet import embedding_strides as reference
from sdlearn.unet import UNet, UNetConfig

# -----------------------------------------------------------------------------
# exercise 1: the zero convolution


def _tiny_unet() -> UNet:
    torch.manual_seed(0)
    return UNet(UNetConfig(in_channels=4, out_channels=4, channels=(8, 16), layers_per_block=1,
                           attention=(False, True), heads=2, context_dim=8, norm_groups=4)).eval()


def _check_conv(name: str, conv, c: int) -> None:
    """conv = fn(c): an nn.Conv2d c -> c, 1x1, with a bias, every parameter zero and trainable."""
    if not isinstance(conv, nn.Module):
        fail(name, f"zero_conv({c}) should return an nn.Module (an nn.Conv2d), got {type(conv).__name__}")
    if not isinstance(conv, nn.Conv2d):
        fail(name, f"zero_conv({c}) should return an nn.Conv2d (the published ControlNets' layout), got "
                   f"{type(conv).__name__}")
    if (conv.in_channels, conv.out_channels) != (c, c):
        fail(name, f"zero_conv({c}) maps {conv.in_channels} -> {conv.out_channels} channels: a zero convolution "
                   f"keeps the width of the skip it feeds ({c} -> {c})")
    if tuple(conv.kernel_size) != (1, 1):
        fail(name, f"the kernel is {conv.kernel_size[0]}x{conv.kernel_size[1]}: a zero convolution is 1x1 "
                   f"(kernel_size=1; a published ControlNet's weights are [C,C,1,1])")
    if tuple(conv.stride) != (1, 1):
        fail(name, f"stride {tuple(conv.stride)}: a zero convolution keeps the grid of its skip (stride 1)")
    if conv.bias is None:
        fail(name, "bias=False: the zero convolution has a bias (zero too, trained like the weight; published "
                   "ControlNets have one)")
    if conv.weight.detach().abs().max() > 0:
        fail(name, "the weight is not zero (random init?): nn.Conv2d draws its weight at random; set it to zero "
                   "(nn.init.zeros_(conv.weight)), so that the ControlNet adds exactly nothing at the start")
    if conv.bias.detach().abs().max() > 0:
        fail(name, "the weight is zero but the bias is not: nn.Conv2d draws a random bias too; zero it as well "
                   "(nn.init.zeros_(conv.bias))")
    if not (conv.weight.requires_grad and conv.bias.requires_grad):
        fail(name, "the parameters do not require grad: zero at the start, not forever; training must move them")


def zero_conv(fn) -> None:
    """fn(channels) -> an nn.Conv2d(channels, channels, 1) with weight and bias zero."""
    name = "zero_conv"
    for c in (4, 7):
        _check_conv(name, call(name, fn, c, on=f"channels = {c}"), c)
    conv = fn(5)
    x = torch.randn(2, 5, 6, 3)
    out = call(name, conv, x, on="x of shape (2, 5, 6, 3)")
    expect_tensor(name, out, (2, 5, 6, 3), "its output")
    if out.abs().max() > 0:
        fail(name, "its output is not zero on a random input")
    out.mul(torch.randn_like(out)).sum().backward()
    if conv.weight.grad is None or conv.weight.grad.abs().max() == 0:
        fail(name, "no gradient reaches the weight: a zero conv must learn (the gradient w.r.t. a zero weight is "
                   "its input, not zero)")
    # where it goes: every skip and the mid block of a ControlNet, which then starts as its base, bit for bit
    base = _tiny_unet()
    controlnet = call(name, ControlNet.from_unet, base, downscale=2, zero_conv=fn, on="a tiny UNet's ControlNet")
    g = torch.Generator().manual_seed(1)
    x, t, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 900]), torch.randn(2, 5, 8, generator=g)
    control = torch.rand(2, 3, 16, 16, generator=g)
    with torch.no_grad():
        want, got = base(x, t, ctx), Controlled(base, controlnet.eval())(x, t, control, context=ctx)
    if not torch.equal(want, got):
        fail(name, f"a ControlNet built with your zero convs changes its base at the start (max difference "
                   f"{(want - got).abs().max():.3g}): it should start as the base, bit for bit")
    passed(name)


# -----------------------------------------------------------------------------
# exercise 2: the residuals into the skips and the mid block


def _inputs(shapes, g, per_sample: bool):
    B = 3
    skips = [torch.randn(B, *s, generator=g) for s in shapes[:-1]]
    mid = torch.randn(B, *shapes[-1], generator=g)
    residuals = [torch.randn(B, *s, generator=g) for s in shapes]
    scale = torch.tensor([0.5, 1.7, -0.3]).view(B, 1, 1, 1) if per_sample else 0.6
    return skips, mid, residuals, scale


def _residual_mistakes(skips, mid, residuals, scale):
    """(message, (skips, mid) that mistake gives) for the usual wrong additions."""
    r, s = residuals[:-1], scale
    yield ("the conditioning scale is forgotten: add residual * scale, not the residual alone",
           ([a + b for a, b in zip(skips, r)], mid + residuals[-1]))
    yield ("the skips get residual * scale but the mid block's residual is not scaled",
           ([a + b * s for a, b in zip(skips, r)], mid + residuals[-1]))
    yield ("the mid block gets residual * scale but the skips' residuals are not scaled",
           ([a + b for a, b in zip(skips, r)], mid + residuals[-1] * s))
    yield ("the mid block's residual (the last one) is not added to mid",
           ([a + b * s for a, b in zip(skips, r)], mid))
    yield ("the residuals go to the skips in reverse order: residuals[i] belongs to skips[i], both in the order "
           "the down path made them (the up path pops the skips last-first, the ControlNet does not)",
           ([a + b * s for a, b in zip(skips, r[::-1])], mid + residuals[-1] * s))
    yield ("the residuals are shifted by one: the first residual is the first skip's (conv_in's output), the "
           "last is the mid block's",
           ([a + b * s for a, b in zip(skips, residuals[1:])], mid + residuals[0] * s))
    yield ("the skips are replaced by the residuals, not added to",
           ([b * s for b in r], residuals[-1] * s))
    yield ("(skip + residual) * scale scales the frozen UNet's own features too: add skip + residual * scale",
           ([(a + b) * s for a, b in zip(skips, r)], (mid + residuals[-1]) * s))


def _flat(skips, mid) -> torch.Tensor:
    return torch.cat([t.flatten() for t in (*skips, mid)])


def _check_output(name: str, out, skips, mid, on: str):
    if not (isinstance(out, (tuple, list)) and len(out) == 2):
        fail(name, f"should return (skips, mid), a pair, got {type(out).__name__}{_len(out)}{on}")
    new_skips, new_mid = out
    if not isinstance(new_skips, (list, tuple)) or len(new_skips) != len(skips):
        fail(name, f"skips should come back as a list of {len(skips)} tensors (one per skip), got "
                   f"{type(new_skips).__name__}{_len(new_skips)}{on}")
    for i, (a, b) in enumerate(zip(new_skips, skips)):
        expect_tensor(name, a, tuple(b.shape), f"skips[{i}]{on}")
    expect_tensor(name, new_mid, tuple(mid.shape), f"mid{on}")
    return new_skips, new_mid


def _len(x) -> str:
    return f" of length {len(x)}" if isinstance(x, (list, tuple)) else ""


def add_residuals(fn) -> None:
    """fn(skips, mid, residuals, scale) -> (skips, mid): residuals[i] * scale added to skips[i], the last to mid."""
    name = "add_residuals"
    g = torch.Generator().manual_seed(4)
    same = [(4, 4, 4)] * 5                                    # every skip alike: an order mistake cannot hide
    unet = [(4, 8, 8), (4, 8, 8), (4, 4, 4), (6, 4, 4), (6, 4, 4)]   # a two-level UNet's skips, then the mid block
    for shapes, per_sample in ((same, False), (same, True), (unet, True)):
        skips, mid, residuals, scale = _inputs(shapes, g, per_sample)
        kept = [t.clone() for t in (*skips, mid, *residuals)]
        on = (f" (5 skips and mid, shaped {shapes[0]}{'' if shapes is same else ' ...'}, scale "
              f"{'one per sample [3,1,1,1]' if per_sample else scale})")
        out = call(name, fn, list(skips), mid, list(residuals), scale, on=on.strip(" ()"), hints={
            "size of tensor|must match": "a residual was added to a skip of another shape: residuals[i] goes to "
                                         "skips[i] (the same order), the last residual to mid"})
        if any(not torch.equal(a, b) for a, b in zip((*skips, mid, *residuals), kept)):
            fail(name, "modified its inputs in place (+=): return new tensors (s + r * scale), the frozen UNet's "
                       "activations are needed as they are for the backward pass")
        new_skips, new_mid = _check_output(name, out, skips, mid, on)
        want = reference_add(skips, mid, residuals, scale)
        mistakes = ((hint, _flat(*wrong)) for hint, wrong in _residual_mistakes(skips, mid, residuals, scale))
        diagnose(name, _flat(new_skips, new_mid), _flat(*want), mistakes, on=on.strip(" ()"),
                 what="the skips and mid", advice="skips[i] + residuals[i] * scale, and mid + residuals[-1] * scale")
    passed(name)


# -----------------------------------------------------------------------------
# exercise 3: the conditioning embedding's strides


def _stride_mistakes(image_size: int, latent_size: int):
    stages = len(reference(image_size, latent_size)) // 2
    factor = image_size // latent_size
    yield (f"one stride-2 stage too many: {image_size} px maps would shrink to {latent_size // 2}, the latent grid "
           f"is {latent_size}", [1, 2] * (stages + 1))
    yield (f"one stride-2 stage too few: {image_size} px maps would shrink to {latent_size * 2}, the latent grid "
           f"is {latent_size}", [1, 2] * (stages - 1))
    yield (f"one stage per unit of the factor: a {factor}x smaller grid is {stages} halvings (log2 {factor}), not "
           f"{factor}", [1, 2] * factor)
    yield ("the stride-2 conv is the second of each pair, the one to the next width (diffusers' blocks[2i + 1]); "
           "the first keeps width and size (stride 1)", [2, 1] * stages)
    yield ("every conv has stride 2: the first of each pair keeps the size (stride 1), only the second halves",
           [2, 2] * stages)
    if stages:
        yield ("no stride-2 stage at all: is the ratio upside down? The factor is image_size // latent_size "
               "(latent_size // image_size is 0)", [])
    yield ("a stride of the whole factor: each stage halves (stride 2), one stage per halving",
           [1, factor] if factor > 1 else [])


def embedding_strides(fn) -> None:
    """fn(image_size, latent_size) -> the strides of the embedding's convs after conv_in: [1, 2] per halving."""
    name = "embedding_strides"
    for image_size, latent_size in ((32, 8), (512, 64), (64, 32), (16, 16), (1024, 128)):
        on = f"image_size = {image_size}, latent_size = {latent_size}"
        got = call(name, fn, image_size, latent_size, on=on)
        if isinstance(got, torch.Tensor):
            got = got.tolist()
        if not isinstance(got, (list, tuple)) or not all(isinstance(s, int) for s in got):
            fail(name, f"should return a list of ints (one stride per conv), got {got!r} on {on}")
        want = reference(image_size, latent_size)
        if list(got) == want:
            continue
        hint = next((h for h, wrong in _stride_mistakes(image_size, latent_size) if list(got) == wrong), None)
        fail(name, f"on {on}: expected {want}, got {list(got)}" + (f": {hint}" if hint else ""))
    for image_size, latent_size in ((48, 8), (32, 0)):
        try:
            fn(image_size, latent_size)
        except ValueError:
            continue
        except Exception as e:  # the learner's bug: the wrong kind of error
            fail(name, f"image_size = {image_size}, latent_size = {latent_size} should raise ValueError (the ratio "
                       f"is no power of 2), it raised {type(e).__name__}: {e}")
        fail(name, f"image_size = {image_size}, latent_size = {latent_size} should raise ValueError: no number of "
                   f"halvings maps {image_size} px to a grid of {latent_size}")
    passed(name)
