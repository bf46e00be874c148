"""Checkers for 10_image_prompts_inpainting: decoupled cross-attention, the image tokens, the inpainting UNet's input
(and the mask at the latent grid), one step of blended latents.

Each checker runs the learner's function on small inputs whose samples differ, compares it with the reference
(sdlearn.adapters.decoupled_attention, image_tokens; sdlearn.inpaint.inpaint_input, mask_to_latent, blend_step) and,
when it is wrong, names the usual mistake: one softmax over the text and image tokens together, the scale on the wrong
term or inside the softmax, the text's values for the image; the LayerNorm before the reshape or over the flat vector,
the tokens interleaved; the channels in another order, the mask inverted, blurred by bilinear resizing or left at pixel
size; the clean source pasted at every step, fresh noise, the last step not handled.
"""
from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from sdlearn.adapters import decoupled_attention as reference_attention
from sdlearn.adapters import image_tokens as reference_tokens
from sdlearn.checks import call, diagnose, expect_tensor, fail, is_close, passed
from sdlearn.diffusion import NoiseSchedule
from sdlearn.inpaint import blend_step as reference_blend
from sdlearn.inpaint import inpaint_input as reference_input
from sdlearn.inpaint import mask_to_latent as reference_resize

# -----------------------------------------------------------------------------
# exercise 1: decoupled cross-attention


def _attend(q, k, v, scores_scale: float | None = None, dim: int = -1):
    """softmax(q k^T * scores_scale) v written out (scores_scale None: 1/sqrt(d)); k and v of the same length."""
    s = 1 / math.sqrt(q.shape[-1]) if scores_scale is None else scores_scale
    return (q @ k.transpose(-2, -1) * s).softmax(dim) @ v


def _attention_mistakes(q, k, v, k_ip, v_ip, scale, per_sample: bool):
    """(message, what that mistake gives) for the usual wrong decoupled attentions; lazily, the cheap ones first."""
    sdpa = F.scaled_dot_product_attention
    text, image = sdpa(q, k, v), sdpa(q, k_ip, v_ip)
    yield ("one softmax over the text and image tokens together (k and k_ip, v and v_ip concatenated): the image "
           "tokens then take attention away from the text. Decoupled attention is two attentions with the same "
           "queries, attn(q, k, v) + scale * attn(q, k_ip, v_ip)",
           sdpa(q, torch.cat([k, k_ip], -2), torch.cat([v, v_ip], -2)))
    yield ("one softmax over the text and image tokens together (k and k_ip, v and v_ip concatenated), scale on "
           "v_ip: the image tokens then take attention away from the text. Two attentions, two softmaxes: "
           "attn(q, k, v) + scale * attn(q, k_ip, v_ip)",
           sdpa(q, torch.cat([k, k_ip], -2), torch.cat([v, scale * v_ip], -2)))
    yield ("the scale is forgotten: attn(q, k, v) + scale * attn(q, k_ip, v_ip), the image term times `scale`",
           text + image)
    yield ("the scale is on the text's term: it weighs the image's, attn(q, k, v) + scale * attn(q, k_ip, v_ip)",
           scale * text + image)
    yield ("the scale multiplies the sum: only the image's term is scaled, attn(q, k, v) + scale * attn(q, k_ip, "
           "v_ip) (scale 0 must give the text-only attention)", scale * (text + image))
    yield ("the scale is inside the softmax (on the queries, the keys or the scores): it weighs the image term's "
           "output, attn(q, k, v) + scale * attn(q, k_ip, v_ip)", text + sdpa(q, scale * k_ip, v_ip))
    yield ("the scale is inside the softmax and on the output", text + scale * sdpa(q, scale * k_ip, v_ip))
    yield ("the image term reads the text's values v: its values are v_ip, attn(q, k_ip, v_ip)",
           text + scale * sdpa(q, k_ip, v))
    yield ("the image term reads the text's keys k: its keys are k_ip, attn(q, k_ip, v_ip)",
           text + scale * sdpa(q, k, v_ip))
    yield ("the image term is the text's attention again (k, v): it reads the image's keys and values, "
           "attn(q, k_ip, v_ip)", text + scale * text)
    yield ("the text's term is missing: the text keeps its own attention, attn(q, k, v) + scale * attn(q, k_ip, "
           "v_ip)", scale * image)
    yield ("the image's term is missing: add scale * attn(q, k_ip, v_ip)", text)
    if per_sample:
        yield ("the first sample's scale is used for every sample: scale is [B,1,1,1], one per sample; multiply by "
               "it as it is, it broadcasts over heads, queries and channels", text + scale.flatten()[0] * image)
    no_root = 1.0
    yield ("missing the 1/sqrt(d) scaling of the scores: softmax(q k^T / sqrt(d)) v, d = q.shape[-1] (or "
           "F.scaled_dot_product_attention, which does it)",
           _attend(q, k, v, no_root) + scale * _attend(q, k_ip, v_ip, no_root))
    yield ("the image term misses the 1/sqrt(d) scaling of the scores: softmax(q k_ip^T / sqrt(d)) v_ip",
           text + scale * _attend(q, k_ip, v_ip, no_root))
    yield ("the scores are scaled by 1/d instead of 1/sqrt(d)",
           _attend(q, k, v, 1 / q.shape[-1]) + scale * _attend(q, k_ip, v_ip, 1 / q.shape[-1]))
    yield ("softmax over the wrong axis: each query's weights over the keys must sum to 1, softmax(dim=-1)",
           _attend(q, k, v, dim=-2) + scale * _attend(q, k_ip, v_ip, dim=-2))


_SCALE_HINTS = {
    "only one element|cannot be converted to Scalar|Boolean value of Tensor":
        "scale may be a tensor [B,1,1,1], one per sample (or a float): multiply the image term by it as it is, "
        "no float(scale) or scale.item()",
    r"size of tensor . \(3\)": "scale is [B,1,1,1], one per sample: it broadcasts over [B,h,N,d] as it is (do not "
                                "squeeze or flatten it)",
}


def decoupled_attention(fn) -> None:
    """fn(q [B,h,N,d], k, v [B,h,L,d], k_ip, v_ip [B,h,K,d], scale float or [B,1,1,1]) -> [B,h,N,d]:
    attn(q, k, v) + scale * attn(q, k_ip, v_ip)."""
    name = "decoupled_attention"
    g = torch.Generator().manual_seed(10)
    B, h, N, d = 3, 2, 5, 8
    cases = (  # L == K first: reading v for v_ip (or k for k_ip) then gives a value to recognise, not a crash
        (6, 6, 0.7), (6, 6, torch.tensor([0.5, 1.7, 0.2], dtype=torch.float64).view(B, 1, 1, 1)),
        (7, 4, torch.tensor([1.3, 0.0, 0.6], dtype=torch.float64).view(B, 1, 1, 1)))  # no size but B is 3
    for L, K, scale in cases:
        per_sample = isinstance(scale, torch.Tensor)
        q, k, v = (torch.randn(B, h, n, d, generator=g, dtype=torch.float64) for n in (N, L, L))
        k_ip, v_ip = (torch.randn(B, h, K, d, generator=g, dtype=torch.float64) for _ in range(2))
        on = (f"q [{B},{h},{N},{d}], k, v [{B},{h},{L},{d}], k_ip, v_ip [{B},{h},{K},{d}], scale "
              + ("[3,1,1,1] = " + str(scale.flatten().tolist()) if per_sample else str(scale)))
        hints = {**_SCALE_HINTS, "batch2|size of tensor|cannot be multiplied|must match":
                 f"the text has L = {L} tokens, the image K = {K}: k goes with v, k_ip with v_ip"}
        got = call(name, fn, q, k, v, k_ip, v_ip, scale, on=on, hints=hints)
        got = expect_tensor(name, got, what=f"the result on {on}")
        if tuple(got.shape) == (B, h, N, L + K):
            fail(name, f"returned the attention weights {tuple(got.shape)} on {on}: multiply them by the values")
        diagnose(name, got, reference_attention(q, k, v, k_ip, v_ip, scale),
                 _attention_mistakes(q, k, v, k_ip, v_ip, scale, per_sample), on=on,
                 advice="attn(q, k, v) + scale * attn(q, k_ip, v_ip), two softmaxes over the two token sets")
    passed(name)


# -----------------------------------------------------------------------------
# exercise 2: the image tokens


def _projection(E: int, K: int, D: int, seed: int) -> tuple[nn.Linear, nn.LayerNorm]:
    """A linear E -> K*D and a LayerNorm(D) whose weight and bias are not 1 and 0, so that each shows."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        linear, norm = nn.Linear(E, K * D).double(), nn.LayerNorm(D).double()
        with torch.no_grad():
            norm.weight.uniform_(0.5, 2.0)
            norm.bias.normal_(0.0, 0.5)
    return linear, norm


def _token_mistakes(embeds, linear, norm, K, D):
    flat = linear(embeds)                                                       # [B, K*D]
    tokens = rearrange(flat, "b (k d) -> b k d", k=K)                           # [B, K, D], the right split
    w, b = norm.weight, norm.bias
    yield ("the LayerNorm is forgotten: norm the tokens, norm(reshape(linear(embeds)))", tokens)
    yield ("the tokens are interleaved: the linear's K*D outputs are K tokens of D in a row, 'b (k d) -> b k d' "
           "(reshape(B, K, D)), not reshape(B, D, K) then a transpose ('b (d k) -> b k d')",
           norm(rearrange(flat, "b (d k) -> b k d", k=K)))
    yield ("the tokens are interleaved ('b (d k) -> b k d') and the LayerNorm is forgotten",
           rearrange(flat, "b (d k) -> b k d", k=K))
    yield ("the LayerNorm is over the flat vector of K*D values, before the reshape: reshape to [B, K, D] first, "
           "then norm each token over its D channels",
           rearrange(F.layer_norm(flat, (K * D,), w.repeat(K), b.repeat(K), norm.eps), "b (k d) -> b k d", k=K))
    yield ("the LayerNorm is over the flat vector of K*D values, before the reshape (without norm's weight and "
           "bias): reshape to [B, K, D] first, then norm(tokens)",
           rearrange(F.layer_norm(flat, (K * D,), eps=norm.eps), "b (k d) -> b k d", k=K))
    yield ("normalised without the given norm's weight and bias (a new nn.LayerNorm, or F.layer_norm alone): use "
           "`norm`, it is trained with the projection", F.layer_norm(tokens, (D,), eps=norm.eps))
    if embeds.shape[-1] == K * D:
        yield ("the linear is forgotten: the tokens are norm(reshape(linear(embeds))), embeds [B,E] go through "
               "`linear` first", norm(rearrange(embeds, "b (k d) -> b k d", k=K)))
        yield ("the linear comes after the LayerNorm: linear first, then reshape, then norm",
               rearrange(linear(F.layer_norm(embeds, (K * D,), w.repeat(K), b.repeat(K), norm.eps)),
                         "b (k d) -> b k d", k=K))


def image_tokens(fn) -> None:
    """fn(embeds [B,E], linear E -> K*D, norm LayerNorm(D), num_tokens K) -> [B,K,D]: linear, reshape, LayerNorm."""
    name = "image_tokens"
    B = 3
    for E, K, D in ((20, 4, 5), (7, 3, 6)):   # E = K*D first: the linear forgotten then gives a value, not a crash
        linear, norm = _projection(E, K, D, seed=E)
        embeds = torch.randn(B, E, generator=torch.Generator().manual_seed(E), dtype=torch.float64) * 2 + 1
        on = f"embeds [{B},{E}], linear {E} -> {K * D}, norm LayerNorm({D}), num_tokens = {K}"
        hints = {
            "normalized_shape": f"norm is nn.LayerNorm({D}), one token's width D: reshape the linear's output "
                                f"[B, K*D] to [B, K, D] first (K = num_tokens tokens of D), then norm it",
            "is invalid for input of size": f"reshape the linear's output [B, K*D] = [{B}, {K * D}] (not embeds, "
                                            f"[{B}, {E}]) to [B, num_tokens, D], with the num_tokens given",
            "cannot be multiplied": f"the linear reads the embedding [B, E] = [{B}, {E}]: linear(embeds) first",
        }
        with torch.no_grad():
            got = expect_tensor(name, call(name, fn, embeds, linear, norm, K, on=on, hints=hints),
                                what=f"the result on {on}")
            if tuple(got.shape) == (B, K * D):
                fail(name, f"returned [B, K*D] = {tuple(got.shape)} on {on}: reshape to num_tokens tokens, [B, K, D]")
            if tuple(got.shape) == (B, D, K):
                fail(name, f"returned [B, D, K] = {tuple(got.shape)} on {on}: tokens first, [B, K, D] "
                           f"= {(B, K, D)}")
            diagnose(name, got, reference_tokens(embeds, linear, norm, K), _token_mistakes(embeds, linear, norm, K, D),
                     on=on, advice="norm(rearrange(linear(embeds), 'b (k d) -> b k d', k=num_tokens))")
    passed(name)


# -----------------------------------------------------------------------------
# exercise 3: the inpainting UNet's input, and the mask at the latent grid

_PARTS = ("z_t", "mask", "masked_latents")


def _input_mistakes(z_t, mask, masked):
    parts = dict(zip(_PARTS, (z_t, mask, masked)))
    for order in itertools.permutations(_PARTS):
        if order != _PARTS:
            yield (f"the channels are in the order [{', '.join(order)}]: the inpainting checkpoints' conv_in reads "
                   f"[z_t, mask, masked_latents] (4 + 1 + 4 for SD), cat([z_t, mask, masked_latents], dim=1)",
                   torch.cat([parts[p] for p in order], 1))
    yield ("the mask is inverted (1 - mask): it comes as the UNet reads it, 1 = repaint; pass it as it is",
           torch.cat([z_t, 1 - mask, masked], 1))
    yield ("the masked latents are masked again: masked_latents are already the latents of the masked image, pass "
           "them as they are", torch.cat([z_t, mask, masked * (1 - mask)], 1))
    yield ("z_t is masked: the UNet reads the whole noisy latents z_t, the mask beside them",
           torch.cat([z_t * (1 - mask), mask, masked], 1))


def inpaint_input(fn) -> None:
    """fn(z_t [B,C,h,w], mask [B,1,h,w], masked_latents [B,C,h,w]) -> [B,2C+1,h,w], cat([z_t, mask, masked], 1)."""
    name = "inpaint_input"
    g = torch.Generator().manual_seed(3)
    B, C, h, w = 2, 4, 3, 5
    z_t, masked = torch.randn(B, C, h, w, generator=g), torch.randn(B, C, h, w, generator=g)
    mask = (torch.rand(B, 1, h, w, generator=g) < 0.5).float()
    on = f"z_t [{B},{C},{h},{w}], mask [{B},1,{h},{w}], masked_latents [{B},{C},{h},{w}]"
    got = call(name, fn, z_t, mask, masked, on=on, hints={
        "must match except in dimension|stack expects":
            "concatenate along the channel axis, dim=1: the three share the batch and the latent grid, their "
            "channels differ (C, 1, C); the result is [B, 2C+1, h, w]"})
    got = expect_tensor(name, got, what=f"the result on {on}")
    if got.ndim == 4 and tuple(got.shape[::2]) == (B, h) and got.shape[1] == 2 * C:
        fail(name, f"returned {tuple(got.shape)}, {2 * C} channels: the mask is missing, [z_t, mask, masked_latents] "
                   f"is C + 1 + C = {2 * C + 1}")
    expect_tensor(name, got, (B, 2 * C + 1, h, w), what=f"the result on {on}")
    diagnose(name, got, reference_input(z_t, mask, masked), _input_mistakes(z_t, mask, masked), on=on,
             advice="torch.cat([z_t, mask, masked_latents], dim=1)")
    passed(name)


def _masks(B: int, H: int, W: int) -> torch.Tensor:
    """Binary masks [B,1,H,W], a different rectangle per sample, its edges off the latent cells' borders."""
    mask = torch.zeros(B, 1, H, W)
    mask[0, :, 3:11, 5:18] = 1
    mask[1, :, 6:15, 1:10] = 1
    return mask


def _resize_mistakes(mask, size):
    nearest = F.interpolate(mask, size=size)
    yield ("the mask is inverted (1 - mask): it stays 1 = repaint at the latent grid", 1 - nearest)
    yield ("nearest-exact (or mask[..., f // 2::f, f // 2::f]) takes each cell's centre pixel: diffusers' "
           "prepare_mask_latents (which the inpainting checkpoints were trained with) uses F.interpolate's default "
           "mode, nearest, each cell's first pixel: F.interpolate(mask, size=size)",
           F.interpolate(mask, size=size, mode="nearest-exact"))
    yield ("max pooling marks a cell if any of its pixels is marked (a dilated mask): the checkpoints read the mask "
           "resized by nearest, F.interpolate(mask, size=size)", F.adaptive_max_pool2d(mask, size))


def mask_to_latent(fn) -> None:
    """fn(mask [B,1,H,W] in {0, 1}, size (h, w)) -> [B,1,h,w], resized by nearest (F.interpolate's default)."""
    name = "mask_to_latent"
    B, H, W, f = 2, 16, 24, 4
    mask = _masks(B, H, W)
    for size in ((H // f, W // f), (H // 2, W // 2)):
        on = f"mask [{B},1,{H},{W}] (two rectangles), size = {size}"
        got = call(name, fn, mask.clone(), size, on=on, hints={
            "size shape must match|only 3D, 4D|Expected .*D": "mask is [B,1,H,W] and size (h, w), the latent grid: "
                                                              "F.interpolate(mask, size=size)"})
        got = expect_tensor(name, got, what=f"the result on {on}")
        if tuple(got.shape[-2:]) == (H, W):
            fail(name, f"the mask is still at the image's size {H}x{W} on {on}: resize it to the latent grid "
                       f"`size` = {size} (the VAE's latents are {H // size[0]}x smaller), "
                       f"F.interpolate(mask, size=size)")
        if tuple(got.shape[-2:]) == size[::-1]:
            fail(name, f"the grid is {tuple(got.shape[-2:])}, width first, on {on}: size is (h, w), height first")
        expect_tensor(name, got, (B, 1, *size), what=f"the result on {on}")
        want = reference_resize(mask, size)
        if not is_close(got, want) and ((got > 1e-6) & (got < 1 - 1e-6)).any():
            fail(name, f"the resized mask has values between 0 and 1 at the region's border (on {on}): bilinear (or "
                       f"area, average) resizing blends the pixels of a cell. Resize by nearest, F.interpolate(mask, "
                       f"size=size) (its default mode), so that each latent cell takes one pixel's value, 0 or 1, as "
                       f"diffusers'")
        diagnose(name, got, want, _resize_mistakes(mask, size), on=on, advice="F.interpolate(mask, size=size)")
    passed(name)


# -----------------------------------------------------------------------------
# exercise 4: one step of blended latents


def _schedule() -> NoiseSchedule:
    """The course's schedule (shapes-t2i: cosine, 1000 steps)."""
    return NoiseSchedule("cosine", 1000)


def _blend_mistakes(x_next, source, noise, mask, t_next, schedule):
    T = schedule.num_steps
    end = t_next < 0
    known = source if end else schedule.add_noise(source, noise, t_next)
    yield ("the mask is inverted (or x_next and the source swapped): mask 1 = repaint keeps the model's x_next, the "
           "source goes where mask is 0: mask * x_next + (1 - mask) * the noised source",
           (1 - mask) * x_next + mask * known)
    if not end:
        yield ((f"the clean source is pasted at every step: at t_next = {t_next} x_next is still noisy, so the "
                f"source must be noised to t_next, schedule.add_noise(source, noise, t_next); only after the last "
                f"step (t_next = -1) is it the source itself") if t_next else
               ("the clean source is pasted at t_next = 0: t = 0 is the last timestep, still noised a little "
                "(schedule.add_noise(source, noise, 0)); the source itself goes in only after it, at t_next = -1"),
               mask * x_next + (1 - mask) * source)
        yield ("the mask is inverted, and the clean source is pasted at every step: mask * x_next + (1 - mask) * "
               "schedule.add_noise(source, noise, t_next)", (1 - mask) * x_next + mask * source)
        yield ("x_next is noised instead of the source: the model's x_next is kept as it is, the source is noised "
               "to t_next", mask * x_next + (1 - mask) * schedule.add_noise(x_next, noise, t_next))
        yield ("the whole blend is noised: only the source is noised, mask * x_next + (1 - mask) * "
               "schedule.add_noise(source, noise, t_next)",
               schedule.add_noise(mask * x_next + (1 - mask) * source, noise, t_next))
    else:
        yield (f"after the last step (t_next = -1) the source is noised to the noisiest timestep (alphas_cumprod[-1]"
               f" is t = {T - 1}'s): at -1 the run has landed on clean latents, put the source itself",
               mask * x_next + (1 - mask) * schedule.add_noise(source, noise, T - 1))
        yield ("after the last step (t_next = -1) the source is noised to t = 0: at -1 the run has landed on clean "
               "latents, put the source itself", mask * x_next + (1 - mask) * schedule.add_noise(source, noise, 0))
    yield ("the known region is pure noise: it is the source noised to t_next, schedule.add_noise(source, noise, "
           "t_next)", mask * x_next + (1 - mask) * noise)
    yield ("(1 - mask) is missing: mask * x_next + (1 - mask) * the noised source, the two weights sum to 1",
           mask * x_next + known)
    yield ("the source replaces x_next everywhere: keep x_next where mask is 1", known)


def blend_step(fn) -> None:
    """fn(x_next [B,C,h,w], source [B,C,h,w], noise [B,C,h,w], mask [B,1,h,w], t_next, schedule) -> [B,C,h,w]:
    mask * x_next + (1 - mask) * schedule.add_noise(source, noise, t_next), the source itself at t_next = -1."""
    name = "blend_step"
    schedule = _schedule()
    g = torch.Generator().manual_seed(7)
    B, C, h, w = 3, 4, 4, 5
    source, noise = torch.randn(B, C, h, w, generator=g), torch.randn(B, C, h, w, generator=g)
    mask = torch.zeros(B, 1, h, w)
    mask[0, :, 1:3, 1:4], mask[1, :, :2, 2:], mask[2, :, 2:, :3] = 1, 1, 1    # a different region per sample
    hints = {
        "timesteps must lie in":
            "t_next = -1 after the last step: the run has landed on clean latents, so the known region is the "
            "source itself there (no noise)",
        "size of tensor a": "mask is [B,1,h,w]: it broadcasts over the latent channels as it is (do not squeeze it)",
    }
    for t_next in (600, 37, 0, -1):
        x_next = torch.randn(B, C, h, w, generator=g)
        on = f"x_next, source, noise [{B},{C},{h},{w}], mask [{B},1,{h},{w}], t_next = {t_next}"
        args = (x_next, source, noise, mask)
        with torch.random.fork_rng():
            torch.manual_seed(0)
            got = call(name, fn, *(a.clone() for a in args), t_next, schedule, on=on, hints=hints)
            got = expect_tensor(name, got, (B, C, h, w), what=f"the result on {on}")
            again = call(name, fn, *(a.clone() for a in args), t_next, schedule, on=on, hints=hints)
        if not torch.equal(got, again):
            fail(name, f"two calls on the same inputs give different results ({on}): the source seems noised with "
                       f"fresh random noise; use the run's initial noise, `noise`, so that the known region is noised "
                       f"the same way at every step: schedule.add_noise(source, noise, t_next)")
        kept = [a.clone() for a in args[1:]]
        call(name, fn, *args, t_next, schedule, on=on, hints=hints)     # x_next may be overwritten, not the rest
        for what, a, b in zip(("source", "noise", "mask"), args[1:], kept):
            if not torch.equal(a, b):
                fail(name, f"modified {what} in place: it is reused at every step of the run; return a new tensor")
        diagnose(name, got, reference_blend(x_next, source, noise, mask, t_next, schedule),
                 _blend_mistakes(x_next, source, noise, mask, t_next, schedule), on=on,
                 advice="mask * x_next + (1 - mask) * schedule.add_noise(source, noise, t_next), the source itself "
                        "at t_next = -1")
    passed(name)
