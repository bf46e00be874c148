"""The notebook 08 checkers: right answers pass, and each usual mistake is named."""
import pytest
import torch
import torch.nn.functional as F

from sdlearn.checks import CheckFailed
from sdlearn.checks import mmdit as check
from sdlearn.mmdit import modulate as reference_modulate


def _flow(sign=1, swap=False, vp=False):
    def flow_pair(x0, noise, t):
        t = t.reshape(-1, *[1] * (x0.ndim - 1))
        if vp:
            return (1 - t).sqrt() * x0 + t.sqrt() * noise, noise - x0
        a, b = (t, 1 - t) if swap else (1 - t, t)
        return a * x0 + b * noise, sign * (noise - x0)
    return flow_pair


def test_flow_pair():
    check.flow_pair(_flow())
    with pytest.raises(CheckFailed, match="v has the wrong sign"):
        check.flow_pair(_flow(sign=-1))
    with pytest.raises(CheckFailed, match="t and 1 - t swapped"):
        check.flow_pair(_flow(swap=True))
    with pytest.raises(CheckFailed, match="variance-preserving"):
        check.flow_pair(_flow(vp=True))
    with pytest.raises(CheckFailed, match="return a pair of tensors"):
        check.flow_pair(lambda x0, noise, t: x0)


def test_modulate():
    check.modulate(reference_modulate)
    with pytest.raises(CheckFailed, match="x \\* scale \\+ shift: the scale is 1 \\+ scale"):
        check.modulate(lambda x, shift, scale: x * scale[:, None] + shift[:, None])
    with pytest.raises(CheckFailed, match="shift and scale swapped"):
        check.modulate(lambda x, shift, scale: x * (1 + shift[:, None]) + scale[:, None])
    with pytest.raises(CheckFailed, match="has shape"):
        check.modulate(lambda x, shift, scale: x[:, 0] * (1 + scale) + shift)


def _joint(variant="right"):
    def joint_attention(qx, kx, vx, qc, kc, vc):
        if variant == "separate":
            return F.scaled_dot_product_attention(qx, kx, vx), F.scaled_dot_product_attention(qc, kc, vc)
        if variant == "channels":
            q, k, v = (torch.cat(p, dim=-1) for p in ((qx, qc), (kx, kc), (vx, vc)))
        else:
            q, k, v = (torch.cat(p, dim=2) for p in ((qx, qc), (kx, kc), (vx, vc)))
        if variant == "no scale":
            out = (q @ k.transpose(-1, -2)).softmax(-1) @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v)
        N = qx.shape[2]
        return out[:, :, :N], out[:, :, N:]
    return joint_attention


def test_joint_attention():
    check.joint_attention(_joint())
    with pytest.raises(CheckFailed, match="two separate self-attentions"):
        check.joint_attention(_joint("separate"))
    with pytest.raises(CheckFailed, match="not divided by sqrt"):
        check.joint_attention(_joint("no scale"))
    with pytest.raises(CheckFailed, match="concatenate the two streams on the sequence axis"):
        check.joint_attention(_joint("channels"))


def _euler(sign=1.0, scale=1000.0, reverse=False):
    def euler_sample(model, x, sigmas):
        s = sigmas.tolist()
        pairs = list(zip(s[:-1], s[1:]))
        for a, b in (pairs[::-1] if reverse else pairs):
            x = x + sign * (b - a) * model(x, torch.full((x.shape[0],), a * scale))
        return x
    return euler_sample


def test_euler_sample():
    check.euler_sample(_euler())
    with pytest.raises(CheckFailed, match="the step has the wrong sign"):
        check.euler_sample(_euler(sign=-1.0))
    with pytest.raises(CheckFailed, match="reads 1000 sigma"):
        check.euler_sample(_euler(scale=1.0))
    with pytest.raises(CheckFailed, match="walked from 0 up to 1"):
        check.euler_sample(_euler(reverse=True))
    with pytest.raises(CheckFailed, match="called 1 times"):
        check.euler_sample(lambda model, x, sigmas: x + model(x, torch.zeros(x.shape[0])))


def test_flow_pair_per_sample_t():
    def no_reshape(x0, noise, t):           # t [B] against x0 [B, C, H, W]: a broadcasting error
        return (1 - t) * x0 + t * noise, noise - x0

    with pytest.raises(CheckFailed, match=r"reshape t to \[B, 1, 1, 1\]"):
        check.flow_pair(no_reshape)
    with pytest.raises(CheckFailed, match="the batch's mean t"):
        check.flow_pair(lambda x0, noise, t: ((1 - t.mean()) * x0 + t.mean() * noise, noise - x0))
    with pytest.raises(CheckFailed, match="first sample's t"):
        check.flow_pair(lambda x0, noise, t: ((1 - t[0]) * x0 + t[0] * noise, noise - x0))
    with pytest.raises(CheckFailed, match="v = noise is epsilon-prediction"):
        check.flow_pair(lambda x0, noise, t: (_flow()(x0, noise, t)[0], noise))


def test_modulate_axes_and_batch():
    with pytest.raises(CheckFailed, match=r"give them a token axis, scale\[:, None\]"):
        check.modulate(lambda x, shift, scale: x * (1 + scale) + shift)
    with pytest.raises(CheckFailed, match="averaged over the batch"):
        check.modulate(lambda x, shift, scale: x * (1 + scale.mean(0)) + shift.mean(0))
    with pytest.raises(CheckFailed, match="shift and scale swapped.*averaged over the batch"):
        check.modulate(lambda x, shift, scale: x * (1 + shift.mean(0)) + scale.mean(0))


def test_joint_attention_split():
    def split(order):
        def joint_attention(qx, kx, vx, qc, kc, vc):
            first = (qc, kc, vc) if order == "text first" else (qx, kx, vx)
            second = (qx, kx, vx) if order == "text first" else (qc, kc, vc)
            out = F.scaled_dot_product_attention(*(torch.cat(p, dim=2) for p in zip(first, second)))
            cut = qx.shape[2] if order != "L" else qc.shape[2]
            return out[:, :, :cut], out[:, :, cut:]
        return joint_attention

    with pytest.raises(CheckFailed, match=r"concatenated \[text; image\] but split as if \[image; text\]"):
        check.joint_attention(split("text first"))
    with pytest.raises(CheckFailed, match=r"image's N tokens first \(out\[:, :, :N\]"):
        check.joint_attention(split("L"))


def test_euler_sample_reads_t_per_sample():
    def float_t(model, x, sigmas):
        for a, b in zip(sigmas[:-1].tolist(), sigmas[1:].tolist()):
            x = x + (b - a) * model(x, 1000 * a)
        return x

    with pytest.raises(CheckFailed, match=r"called with t = float: it reads t as a tensor \[B\]"):
        check.euler_sample(float_t)
    with pytest.raises(CheckFailed, match="called 5 times"):
        def every_sigma(model, x, sigmas):
            for a, b in zip(sigmas.tolist(), sigmas[1:].tolist() + [0.0]):
                x = x + (b - a) * model(x, torch.full((x.shape[0],), 1000 * a))
            return x
        check.euler_sample(every_sigma)
