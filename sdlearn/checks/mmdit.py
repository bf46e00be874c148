"""Checkers for 08_mmdit: the rectified-flow pair (x_t, v), adaLN modulation, the joint attention, the Euler sampler.

    from sdlearn.checks import mmdit as check
    check.flow_pair(flow_pair)              # (x_t, v) = ((1 - t) x0 + t eps, eps - x0)
    check.modulate(modulate)                # x * (1 + scale) + shift, one (shift, scale) per sample
    check.joint_attention(joint_attention)  # one softmax over [image; text] tokens, split back
    check.euler_sample(euler_sample)        # x += (sigma_next - sigma) v, the model reading 1000 sigma

Each runs the learner's function next to sdlearn's reference on inputs chosen so that the usual mistakes give
different answers (every sample its own t, shift and scale), and names the mistake: the velocity's sign, t and
1 - t swapped, one t for the whole batch, scale without the 1, shift and scale swapped or averaged over the batch,
two separate attentions, the concatenation on the wrong axis or split in the wrong order, the Euler step's sign,
the model fed sigma instead of 1000 sigma or a float instead of t [B], ... A shape error gets a hint saying which
tensor needs which axes.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from sdlearn.checks import call, diagnose, diagnose_combinations, expect_tensor, fail, passed
from sdlearn.flow import FlowSchedule

_BROADCAST = "size of tensor|must match|broadcast|shape"   # PyTorch's words for a shape mismatch
_PER_SAMPLE_T = ("t is [B], one noise level per sample, and x0 is [B, C, H, W]: reshape t to [B, 1, 1, 1] "
                 "(t.view(-1, *[1] * (x0.ndim - 1))) so that each sample's t multiplies all of its own values")


def _pair(name: str, got, on: str) -> tuple[torch.Tensor, torch.Tensor]:
    if not (isinstance(got, (tuple, list)) and len(got) == 2):
        fail(name, f"return a pair of tensors{on}, got {type(got).__name__}")
    return got[0], got[1]


# -----------------------------------------------------------------------------
# exercise 1: the rectified-flow pair


def flow_pair(fn) -> None:
    """fn(x0 [B,...], noise [B,...], t [B]) -> (x_t, v): x_t = (1 - t) x0 + t noise, v = noise - x0 (SD3 eq. 1-3)."""
    name = "flow_pair"
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 2, 4, 4, generator=g), torch.randn(3, 2, 4, 4, generator=g)
    t = torch.tensor([0.1, 0.5, 0.8])                   # one t per sample, all different
    on = "x0, noise [3, 2, 4, 4] and t = [0.1, 0.5, 0.8]"
    x_t, v = _pair(name, call(name, fn, x0, noise, t, on=on, hints={_BROADCAST: _PER_SAMPLE_T}), f" on {on}")
    tb = t[:, None, None, None]
    diagnose(name, x_t, (1 - tb) * x0 + tb * noise, {
        "x_t = t x0 + (1 - t) noise: t and 1 - t swapped; at t = 0 x_t is the data, at t = 1 pure noise":
            tb * x0 + (1 - tb) * noise,
        "x_t = sqrt(1 - t) x0 + sqrt(t) noise is a variance-preserving path; rectified flow's is straight, "
        "(1 - t) x0 + t noise": (1 - tb).sqrt() * x0 + tb.sqrt() * noise,
        "every sample got the batch's mean t, t.mean(): each sample has its own t, t.view(-1, 1, 1, 1)":
            (1 - t.mean()) * x0 + t.mean() * noise,
        "every sample got the first sample's t, t[0]: each sample has its own t, t.view(-1, 1, 1, 1)":
            (1 - t[0]) * x0 + t[0] * noise,
    }, on=on, what="x_t", advice=_PER_SAMPLE_T)
    diagnose(name, v, noise - x0, {
        "v has the wrong sign: the path goes from data (t = 0) to noise (t = 1), so dx_t/dt = noise - x0, not "
        "x0 - noise (the most common rectified-flow bug)": x0 - noise,
        "v = noise is epsilon-prediction; the velocity is the derivative of x_t, noise - x0": noise,
        "v = x_t - x0 is t (noise - x0), the velocity scaled by t: the velocity is the derivative, noise - x0":
            tb * (noise - x0),
    }, on=on, what="v")
    passed(name)


# -----------------------------------------------------------------------------
# exercise 2: adaLN modulation


def modulate(fn) -> None:
    """fn(x [B,N,D], shift [B,D], scale [B,D]) -> x * (1 + scale) + shift, each sample's shift and scale on all of
    its tokens."""
    name = "modulate"
    g = torch.Generator().manual_seed(1)
    x, shift, scale = torch.randn(2, 5, 3, generator=g), torch.randn(2, 3, generator=g), torch.randn(2, 3, generator=g)
    on = "x [2, 5, 3], shift [2, 3], scale [2, 3]"
    tokens = ("shift and scale are [B, D] and x is [B, N, D]: give them a token axis, scale[:, None] -> [B, 1, D], "
              "so each sample's pair applies to all N of its tokens")
    got = expect_tensor(name, call(name, fn, x, shift, scale, on=on, hints={_BROADCAST: tokens}), (2, 5, 3),
                        "modulate(x, shift, scale)")

    def compute(one, roles, per):
        sh, sc = (shift, scale) if roles == "right" else (scale, shift)
        if per == "batch mean":
            sh, sc = sh.mean(0, keepdim=True), sc.mean(0, keepdim=True)
        return x * (one + sc[:, None]) + sh[:, None]

    diagnose_combinations(name, got, compute, axes=[(1.0, 0.0), ("right", "swapped"), ("sample", "batch mean")],
                          hints=[{0.0: "x * scale + shift: the scale is 1 + scale, so that a zero modulation "
                                       "leaves x unchanged (adaLN-Zero's identity start)"},
                                 {"swapped": "shift and scale swapped: x * (1 + scale) + shift"},
                                 {"batch mean": "shift and scale were averaged over the batch: each sample has its "
                                                "own pair, scale[:, None] [B, 1, D]"}], on=on, advice=tokens)
    passed(name)


# -----------------------------------------------------------------------------
# exercise 3: joint attention


def _joint_reference(qx, kx, vx, qc, kc, vc, variant="right"):
    N = qx.shape[2]
    if variant == "separate":
        return F.scaled_dot_product_attention(qx, kx, vx), F.scaled_dot_product_attention(qc, kc, vc)
    if variant == "image-only keys":
        return F.scaled_dot_product_attention(qx, kx, vx), F.scaled_dot_product_attention(qc, kx, vx)
    if variant == "split [text; image]":          # concatenated text first, split as if image first
        q, k, v = (torch.cat(p, dim=2) for p in ((qc, qx), (kc, kx), (vc, vx)))
        out = F.scaled_dot_product_attention(q, k, v)
        return out[:, :, :N], out[:, :, N:]
    if variant == "no scale":
        q, k, v = (torch.cat(p, dim=2) for p in ((qx, qc), (kx, kc), (vx, vc)))
        out = (q @ k.transpose(-1, -2)).softmax(-1) @ v
        return out[:, :, :N], out[:, :, N:]
    q, k, v = (torch.cat(p, dim=2) for p in ((qx, qc), (kx, kc), (vx, vc)))
    out = F.scaled_dot_product_attention(q, k, v)
    if variant == "split swapped":
        L = qc.shape[2]
        return out[:, :, :L], out[:, :, L:]
    return out[:, :, :N], out[:, :, N:]


def joint_attention(fn) -> None:
    """fn(q_x, k_x, v_x, q_c, k_c, v_c) -> (out_x, out_c): image tokens [B,h,N,d] and text tokens [B,h,L,d]
    attend together, softmax(q k^T / sqrt(d)) v over the concatenated sequence [image; text], then split back."""
    name = "joint_attention"
    g = torch.Generator().manual_seed(2)
    qx, kx, vx = (torch.randn(2, 2, 6, 4, generator=g) for _ in range(3))
    qc, kc, vc = (torch.randn(2, 2, 3, 4, generator=g) for _ in range(3))
    on = "image q, k, v [2, 2, 6, 4] (B, heads, N, head_dim) and text q, k, v [2, 2, 3, 4]"
    got = call(name, fn, qx, kx, vx, qc, kc, vc, on=on,
               hints={"Sizes of tensors must match|size of tensor": "concatenate the two streams on the sequence "
                      "axis (dim=2 of [B, heads, tokens, head_dim]); their widths match, their lengths do not"})
    out_x, out_c = _pair(name, got, f" on {on}")
    want_x, want_c = _joint_reference(qx, kx, vx, qc, kc, vc)
    for what, value, want, index in (("out_x", out_x, want_x, 0), ("out_c", out_c, want_c, 1)):
        expect_tensor(name, value, what=what)
        if value.shape != want.shape:
            fail(name, f"{what} has shape {tuple(value.shape)}{' on ' + on}, expected {tuple(want.shape)}: the "
                       "attention's output is [B, heads, N + L, d] with the image's N tokens first (out[:, :, :N], "
                       "N = q_x.shape[2]) and the text's L last (out[:, :, N:]); keep the heads axis")
        diagnose(name, value, want, {
            "two separate self-attentions: in the MMDiT both streams attend over the concatenation of their "
            "tokens, torch.cat([q_x, q_c], dim=2) and the same for k and v, in one attention":
                _joint_reference(qx, kx, vx, qc, kc, vc, "separate")[index],
            "the text reads only the image's keys and values (cross-attention): joint attention concatenates "
            "both streams' keys and values too": _joint_reference(qx, kx, vx, qc, kc, vc, "image-only keys")[index],
            "the scores are not divided by sqrt(head_dim)": _joint_reference(qx, kx, vx, qc, kc, vc,
                                                                             "no scale")[index],
            "the streams were concatenated [text; image] but split as if [image; text]: the first N outputs "
            "belong to whichever stream came first": _joint_reference(qx, kx, vx, qc, kc, vc,
                                                                     "split [text; image]")[index],
        }, on=on, what=what, advice="the first N outputs are the image's, the last L the text's")
    passed(name)


# -----------------------------------------------------------------------------
# exercise 4: the Euler sampler


class _Linear(torch.nn.Module):
    """A stand-in velocity model v = a * x + b * (t / 1000) that records the t it is called with."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, x, t):
        if not (isinstance(t, torch.Tensor) and t.shape == (x.shape[0],)):
            got = f"a tensor of shape {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
            fail("euler_sample", f"the model was called with t = {got}: it reads t as a tensor [B] = "
                                 f"[{x.shape[0]}], one value per sample, torch.full((x.shape[0],), 1000 * sigma)")
        self.seen.append(torch.as_tensor(t, dtype=torch.float32).flatten()[0].item())
        return 0.3 * x + 0.5 * (torch.as_tensor(t, dtype=x.dtype) / 1000).reshape(-1, *[1] * (x.ndim - 1))


def _euler(model, x, sigmas, sign=1.0, scale=1000.0, order="right"):
    pairs = list(zip(sigmas[:-1], sigmas[1:], strict=True))
    for s, s_next in (pairs if order == "right" else pairs[::-1]):
        x = x + sign * (s_next - s) * model(x, torch.full((x.shape[0],), float(s) * scale))
    return x


def euler_sample(fn) -> None:
    """fn(model, x, sigmas) -> x_0: for each (sigma, sigma_next), x <- x + (sigma_next - sigma) model(x, 1000 sigma),
    sigma from 1 down to 0 (SD3's sampler; diffusers' FlowMatchEulerDiscreteScheduler.step)."""
    name = "euler_sample"
    sigmas = FlowSchedule(shift=3.0).sigmas(4)
    x = torch.randn(2, 3, generator=torch.Generator().manual_seed(3))
    on = f"sigmas = FlowSchedule(shift=3.0).sigmas(4) = {[round(s, 3) for s in sigmas.tolist()]}"
    model = _Linear()
    got = call(name, fn, model, x.clone(), sigmas, on=on)
    got = expect_tensor(name, got, (2, 3), "the sample")
    if len(model.seen) != 4:
        fail(name, f"the model was called {len(model.seen)} times{' on ' + on}; one call per step, 4 for 5 sigmas "
                   "(the last sigma, 0, is where the last step lands)")
    if max(model.seen) <= 1.0 + 1e-6 and max(sigmas.tolist()) > 0:
        fail(name, f"the model was given t = {model.seen[0]:.3g} at the first step: it reads 1000 sigma "
                   "(len(schedule) * sigma), as SD3's transformer was trained")

    def compute(sign, order):
        return _euler(_Linear(), x, sigmas, sign, 1000.0, order)

    diagnose_combinations(name, got, compute, axes=[(1.0, -1.0), ("right", "reversed")],
                          hints=[{-1.0: "the step has the wrong sign: x + (sigma_next - sigma) v, and sigma_next < "
                                        "sigma, so the step goes against v (from noise towards data)"},
                                 {"reversed": "the sigmas were walked from 0 up to 1: sampling starts at "
                                              "sigma = 1 (pure noise) and ends at 0"}], on=on)
    passed(name)
