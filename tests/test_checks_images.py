"""The notebook-10 checkers (sdlearn.checks.images): decoupled attention, the image tokens, the inpainting UNet's input
and the mask at the latent grid, one step of blended latents. Right answers pass; each plausible wrong one fails with
a message naming its mistake; a crash on a shape gets a hint in the learner's terms; an unknown wrong answer names
the first wrong element."""
import pytest
import torch
import torch.nn.functional as F
from einops import rearrange

from sdlearn import adapters, inpaint
from sdlearn.checks import CheckFailed
from sdlearn.checks import images as check


def test_right_answers_pass(capsys):
    check.decoupled_attention(adapters.decoupled_attention)
    check.image_tokens(adapters.image_tokens)
    check.inpaint_input(inpaint.inpaint_input)
    check.mask_to_latent(inpaint.mask_to_latent)
    check.blend_step(inpaint.blend_step)
    out = capsys.readouterr().out
    assert all(f"{n}: correct" in out for n in ("decoupled_attention", "image_tokens", "inpaint_input",
                                                  "mask_to_latent", "blend_step"))


def test_hand_written_right_answers_pass():
    """Equivalent spellings of the right answers pass too (softmax written out, view instead of rearrange, ...)."""
    def attention(q, k, v, k_ip, v_ip, scale):
        a = lambda k, v: (q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5).softmax(-1) @ v  # noqa: E731
        return a(k, v) + scale * a(k_ip, v_ip)

    def tokens(embeds, linear, norm, num_tokens):
        return norm(linear(embeds).view(len(embeds), num_tokens, -1))

    def blend(x_next, source, noise, mask, t_next, schedule):
        known = source if t_next == -1 else schedule.add_noise(source, noise, t_next)
        return torch.where(mask > 0.5, x_next, known)

    check.decoupled_attention(attention)
    check.image_tokens(tokens)
    check.inpaint_input(lambda z, m, x: torch.cat([z, m, x], dim=-3))
    check.mask_to_latent(lambda m, size: F.interpolate(m, size=size, mode="nearest"))
    check.blend_step(blend)


# -----------------------------------------------------------------------------
# exercise 1: decoupled attention

sdpa = F.scaled_dot_product_attention


def attn(q, k, v):
    """softmax(q k^T) v, the 1/sqrt(d) forgotten."""
    return (q @ k.transpose(-2, -1)).softmax(-1) @ v


@pytest.mark.parametrize("hint, fn", [
    ("one softmax over the text and image tokens together",
     lambda q, k, v, ki, vi, s: sdpa(q, torch.cat([k, ki], -2), torch.cat([v, vi], -2))),
    ("one softmax over the text and image tokens together",
     lambda q, k, v, ki, vi, s: sdpa(q, torch.cat([k, ki], -2), torch.cat([v, s * vi], -2))),
    ("the scale is on the text's term", lambda q, k, v, ki, vi, s: s * sdpa(q, k, v) + sdpa(q, ki, vi)),
    ("the scale is forgotten", lambda q, k, v, ki, vi, s: sdpa(q, k, v) + sdpa(q, ki, vi)),
    ("the scale is inside the softmax", lambda q, k, v, ki, vi, s: sdpa(q, k, v) + sdpa(s * q, ki, vi)),
    ("the scale multiplies the sum", lambda q, k, v, ki, vi, s: s * (sdpa(q, k, v) + sdpa(q, ki, vi))),
    ("reads the text's values v", lambda q, k, v, ki, vi, s: sdpa(q, k, v) + s * sdpa(q, ki, v)),
    ("reads the text's keys k", lambda q, k, v, ki, vi, s: sdpa(q, k, v) + s * sdpa(q, k, vi)),
    ("the text's term is missing", lambda q, k, v, ki, vi, s: s * sdpa(q, ki, vi)),
    ("missing the 1/sqrt\\(d\\) scaling", lambda q, k, v, ki, vi, s: attn(q, k, v) + s * attn(q, ki, vi)),
    ("the first sample's scale is used for every sample",
     lambda q, k, v, ki, vi, s: sdpa(q, k, v) + (s.flatten()[0] if torch.is_tensor(s) else s) * sdpa(q, ki, vi)),
    ("returned the attention weights",
     lambda q, k, v, ki, vi, s: (q @ torch.cat([k, ki], -2).transpose(-2, -1)).softmax(-1)),
])
def test_decoupled_attention_checker_names_the_mistake(hint, fn):
    with pytest.raises(CheckFailed, match=hint):
        check.decoupled_attention(fn)


def test_decoupled_attention_names_a_scale_that_does_not_broadcast():
    """scale [B,1,1,1] flattened to [B] meets the head width d: a hint about the per-sample scale, not only torch's."""
    def flattened(q, k, v, k_ip, v_ip, scale):
        s = scale.flatten() if torch.is_tensor(scale) else scale
        return sdpa(q, k, v) + sdpa(q, k_ip, v_ip) * s

    with pytest.raises(CheckFailed, match="scale is \\[B,1,1,1\\], one per sample: it broadcasts"):
        check.decoupled_attention(flattened)
    with pytest.raises(CheckFailed, match="no float\\(scale\\)"):
        check.decoupled_attention(lambda q, k, v, ki, vi, s: sdpa(q, k, v) + float(s) * sdpa(q, ki, vi))


def test_decoupled_attention_names_an_unknown_mistake():
    with pytest.raises(CheckFailed, match="matches none of the usual mistakes.*first wrong element|first wrong "
                                          "element.*matches none of the usual mistakes"):
        check.decoupled_attention(lambda q, k, v, ki, vi, s: sdpa(q, k, v) + s * sdpa(q, ki, vi) + 0.01)


# -----------------------------------------------------------------------------
# exercise 2: the image tokens


def norm_flat(embeds, linear, norm, num_tokens):
    """The LayerNorm over the flat K*D vector (norm's weight repeated per token), then the reshape."""
    h = linear(embeds)
    h = F.layer_norm(h, h.shape[-1:], norm.weight.repeat(num_tokens), norm.bias.repeat(num_tokens), norm.eps)
    return rearrange(h, "b (k d) -> b k d", k=num_tokens)


@pytest.mark.parametrize("hint, fn", [
    ("LayerNorm is over the flat vector", norm_flat),
    ("the tokens are interleaved",
     lambda e, lin, n, k: n(rearrange(lin(e), "b (d k) -> b k d", k=k))),
    ("the tokens are interleaved",
     lambda e, lin, n, k: n(lin(e).reshape(len(e), -1, k).transpose(1, 2))),
    ("the LayerNorm is forgotten", lambda e, lin, n, k: rearrange(lin(e), "b (k d) -> b k d", k=k)),
    ("the linear is forgotten", lambda e, lin, n, k: n(rearrange(e, "b (k d) -> b k d", k=k))),
    ("without the given norm's weight and bias",
     lambda e, lin, n, k: F.layer_norm(rearrange(lin(e), "b (k d) -> b k d", k=k), n.normalized_shape)),
    ("reshape to num_tokens tokens", lambda e, lin, n, k: lin(e)),
    ("tokens first", lambda e, lin, n, k: n(rearrange(lin(e), "b (k d) -> b k d", k=k)).transpose(1, 2)),
])
def test_image_tokens_checker_names_the_mistake(hint, fn):
    with pytest.raises(CheckFailed, match=hint):
        check.image_tokens(fn)


def test_image_tokens_names_a_norm_before_the_reshape():
    """norm (LayerNorm(D)) on the [B, K*D] output: torch's "normalized_shape" error, and the hint to reshape first."""
    with pytest.raises(CheckFailed, match="normalized_shape.*reshape the linear's output \\[B, K\\*D\\] to "
                                          "\\[B, K, D\\] first"):
        check.image_tokens(lambda e, lin, n, k: rearrange(n(lin(e)), "b (k d) -> b k d", k=k))
    with pytest.raises(CheckFailed, match="with the num_tokens given"):
        check.image_tokens(lambda e, lin, n, k: n(lin(e).reshape(len(e), 4, -1)) if k == 4 else n(
            lin(e).reshape(len(e), 4, n.normalized_shape[0])))


def test_image_tokens_names_an_unknown_mistake():
    with pytest.raises(CheckFailed, match="first wrong element at index .*matches none of the usual mistakes"):
        check.image_tokens(lambda e, lin, n, k: n(rearrange(lin(e), "b (k d) -> b k d", k=k)) * 1.1)


# -----------------------------------------------------------------------------
# exercise 3: the inpainting UNet's input and the mask at the latent grid


@pytest.mark.parametrize("hint, fn", [
    ("in the order \\[mask, z_t, masked_latents\\]", lambda z, m, x: torch.cat([m, z, x], 1)),
    ("in the order \\[masked_latents, mask, z_t\\]", lambda z, m, x: torch.cat([x, m, z], 1)),
    ("in the order \\[z_t, masked_latents, mask\\]", lambda z, m, x: torch.cat([z, x, m], 1)),
    ("the mask is inverted", lambda z, m, x: torch.cat([z, 1 - m, x], 1)),
    ("masked again", lambda z, m, x: torch.cat([z, m, x * (1 - m)], 1)),
    ("the mask is missing", lambda z, m, x: torch.cat([z, x], 1)),
])
def test_inpaint_input_checker_names_the_mistake(hint, fn):
    with pytest.raises(CheckFailed, match=hint):
        check.inpaint_input(fn)


@pytest.mark.parametrize("dim", [0, 3, -1])
def test_inpaint_input_names_the_wrong_axis(dim):
    with pytest.raises(CheckFailed, match="concatenate along the channel axis, dim=1"):
        check.inpaint_input(lambda z, m, x: torch.cat([z, m, x], dim))


def test_inpaint_input_names_an_unknown_mistake():
    with pytest.raises(CheckFailed, match="first wrong element at index .*matches none of the usual mistakes"):
        check.inpaint_input(lambda z, m, x: torch.cat([z, m, 2 * x], 1))


@pytest.mark.parametrize("hint, fn", [
    ("still at the image's size", lambda m, size: m),
    ("values between 0 and 1.*bilinear", lambda m, size: F.interpolate(m, size=size, mode="bilinear")),
    ("values between 0 and 1.*bilinear", lambda m, size: F.interpolate(m, size=size, mode="area")),
    ("values between 0 and 1.*bilinear", lambda m, size: F.adaptive_avg_pool2d(m, size)),
    ("nearest-exact", lambda m, size: F.interpolate(m, size=size, mode="nearest-exact")),
    ("nearest-exact", lambda m, size: m[..., m.shape[-2] // size[0] // 2::m.shape[-2] // size[0],
                                         m.shape[-1] // size[1] // 2::m.shape[-1] // size[1]]),
    ("max pooling", lambda m, size: F.max_pool2d(m, m.shape[-1] // size[1])),
    ("the mask is inverted", lambda m, size: 1 - F.interpolate(m, size=size)),
    ("size is \\(h, w\\), height first", lambda m, size: F.interpolate(m, size=size[::-1])),
])
def test_mask_to_latent_checker_names_the_mistake(hint, fn):
    with pytest.raises(CheckFailed, match=hint):
        check.mask_to_latent(fn)


def test_mask_to_latent_names_an_unknown_mistake():
    with pytest.raises(CheckFailed, match="first wrong element at index .*matches none of the usual mistakes"):
        check.mask_to_latent(lambda m, size: (F.interpolate(m, size=size, mode="bilinear") > 0.5).float())


def test_mask_to_latent_passes_the_slice_of_first_pixels():
    """mask[..., ::f, ::f] is nearest resizing by an integer factor: right."""
    check.mask_to_latent(lambda m, size: m[..., ::m.shape[-2] // size[0], ::m.shape[-1] // size[1]])


# -----------------------------------------------------------------------------
# exercise 4: one step of blended latents


def known(source, noise, t_next, schedule):
    return source if t_next == -1 else schedule.add_noise(source, noise, t_next)


def blend(x_next, source, noise, mask, t_next, schedule, invert=False, clean=False, end=True, fresh=False):
    """blend_step with knobs for the usual mistakes."""
    noise = torch.randn_like(noise) if fresh else noise
    if t_next == -1 and end:
        known = source
    else:
        known = source if clean else schedule.add_noise(source, noise, t_next if t_next >= 0 else 999)
    m = 1 - mask if invert else mask
    return m * x_next + (1 - m) * known


@pytest.mark.parametrize("hint, fn", [
    ("the mask is inverted", lambda *a: blend(*a, invert=True)),
    ("x_next and the source swapped", lambda x, s, n, m, t, sch: m * known(s, n, t, sch) + (1 - m) * x),
    ("the clean source is pasted at every step", lambda *a: blend(*a, clean=True)),
    ("the clean source is pasted at t_next = 0",
     lambda x, s, n, m, t, sch: blend(x, s, n, m, t, sch) if t != 0 else m * x + (1 - m) * s),
    ("use the run's initial noise, `noise`", lambda *a: blend(*a, fresh=True)),
    ("noised to the noisiest timestep", lambda *a: blend(*a, end=False)),
    ("x_next is noised instead of the source",
     lambda x, s, n, m, t, sch: m * x + (1 - m) * (s if t == -1 else sch.add_noise(x, n, t))),
    ("\\(1 - mask\\) is missing", lambda x, s, n, m, t, sch: m * x + known(s, n, t, sch)),
    ("modified source in place", lambda x, s, n, m, t, sch: m * x + (1 - m) * s.copy_(known(s, n, t, sch))),
])
def test_blend_step_checker_names_the_mistake(hint, fn):
    with pytest.raises(CheckFailed, match=hint):
        check.blend_step(fn)


def test_blend_step_names_the_last_step_and_a_squeezed_mask():
    """add_noise at t_next = -1 raises (timesteps lie in [0, T)); a mask squeezed to [B,h,w] does not broadcast."""
    with pytest.raises(CheckFailed, match="timesteps must lie in.*t_next = -1 after the last step.*the source "
                                          "itself"):
        check.blend_step(lambda x, s, n, m, t, sch: m * x + (1 - m) * sch.add_noise(s, n, torch.full((len(s),), t)))
    with pytest.raises(CheckFailed, match="mask is \\[B,1,h,w\\]: it broadcasts over the latent channels"):
        check.blend_step(lambda x, s, n, m, t, sch: blend(x, s, n, m.squeeze(1), t, sch))


def test_blend_step_names_an_unknown_mistake():
    with pytest.raises(CheckFailed, match="first wrong element at index .*matches none of the usual mistakes"):
        check.blend_step(lambda *a: blend(*a) * 0.99)
