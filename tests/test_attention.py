"""sdlearn.attention: the formula, the module, parity with diffusers and torch."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sdlearn import convert
from sdlearn.attention import (
    Attention,
    SelfAttentionBlock,
    attention_map,
    causal_mask,
    image_to_tokens,
    scaled_dot_product_attention,
    tokens_to_image,
)

TOL = 1e-5


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _randomise(module: nn.Module) -> nn.Module:
    """Non-zero biases everywhere (diffusers / torch initialise some to zero), so that a swapped one shows."""
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, 0.3)
    return module.eval()


# -----------------------------------------------------------------------------
# the formula


def test_reference_matches_torch_sdpa_plain_causal_and_padding():
    q, k, v = torch.randn(2, 4, 9, 8), torch.randn(2, 4, 9, 8), torch.randn(2, 4, 9, 5)
    assert torch.allclose(scaled_dot_product_attention(q, k, v), F.scaled_dot_product_attention(q, k, v), atol=TOL)
    causal = causal_mask(9)
    assert torch.allclose(scaled_dot_product_attention(q, k, v, causal),
                          F.scaled_dot_product_attention(q, k, v, is_causal=True), atol=TOL)
    pad = torch.ones(2, 9, dtype=torch.bool)
    pad[0, 6:] = False  # the first sequence has 6 real tokens
    mask = pad[:, None, None, :]  # [B, 1, 1, M]
    ours = scaled_dot_product_attention(q, k, v, mask)
    assert torch.allclose(ours, F.scaled_dot_product_attention(q, k, v, attn_mask=mask), atol=TOL)
    additive = torch.zeros(2, 1, 1, 9).masked_fill(~mask, float("-inf"))
    assert torch.allclose(scaled_dot_product_attention(q, k, v, additive), ours, atol=TOL)
    # the masked keys get exactly zero weight, and the rows still sum to one
    w = attention_map(q, k, mask)
    assert w[0, ..., 6:].abs().max() == 0
    assert torch.allclose(w.sum(-1), torch.ones(2, 4, 9))


def test_reference_errors():
    with pytest.raises(ValueError, match="same width d"):
        attention_map(torch.randn(3, 4), torch.randn(5, 6))
    with pytest.raises(ValueError, match="one row per context token"):
        scaled_dot_product_attention(torch.randn(3, 4), torch.randn(5, 4), torch.randn(6, 4))
    with pytest.raises(ValueError, match=r"does not broadcast.*mask\[:, None, None, :\]"):
        attention_map(torch.randn(2, 4, 3, 8), torch.randn(2, 4, 5, 8), torch.ones(2, 5, dtype=torch.bool))


def test_image_tokens_round_trip():
    x = torch.randn(2, 3, 4, 6)
    t = image_to_tokens(x)
    assert t.shape == (2, 24, 3)
    assert torch.equal(t[1, 1 * 6 + 2], x[1, :, 1, 2])  # token h*W + w is pixel (h, w)
    assert torch.equal(tokens_to_image(t, 4), x)
    with pytest.raises(ValueError, match=r"\[B, C, H, W\]"):
        image_to_tokens(torch.randn(3, 4, 4))
    with pytest.raises(ValueError, match="do not make a 5 x 5 image"):
        tokens_to_image(t, 5, 5)


# -----------------------------------------------------------------------------
# the module


@pytest.mark.parametrize("heads,head_dim", [(1, 32), (4, 8), (4, 12), (8, 4), (3, 16)])
def test_module_sdpa_equals_reference_math(heads, head_dim):
    attn = _randomise(Attention(32, heads=heads, head_dim=head_dim, qkv_bias=True))
    x = torch.randn(2, 10, 32)
    assert torch.allclose(attn(x), attn.forward_reference(x), atol=TOL)
    assert torch.allclose(attn(x, is_causal=True), attn.forward_reference(x, is_causal=True), atol=TOL)
    pad = torch.ones(2, 10, dtype=torch.bool)
    pad[1, 7:] = False
    mask = pad[:, None, None, :]
    assert torch.allclose(attn(x, attn_mask=mask), attn.forward_reference(x, attn_mask=mask), atol=TOL)
    both = attn(x, attn_mask=mask, is_causal=True)
    assert torch.allclose(both, attn.forward_reference(x, attn_mask=mask & causal_mask(10)), atol=TOL)
    w = attn.weights(x)
    assert w.shape == (2, heads, 10, 10) and torch.allclose(w.sum(-1), torch.ones(2, heads, 10))


def test_module_cross_attention_shapes_and_weights():
    attn = Attention(32, context_dim=16, heads=4, head_dim=8)
    x, c = torch.randn(2, 10, 32), torch.randn(2, 7, 16)
    assert attn(x, c).shape == (2, 10, 32)
    assert attn.weights(x, c).shape == (2, 4, 10, 7)
    assert [n for n, _ in attn.named_children()][:4] == ["to_q", "to_k", "to_v", "to_out"]
    assert attn.to_q.weight.shape == (32, 32) and attn.to_k.weight.shape == (32, 16)
    assert attn.to_out.weight.shape == (32, 32) and attn.to_q.bias is None and attn.to_out.bias is not None


def test_module_errors():
    attn = Attention(64, heads=4)
    with pytest.raises(ValueError, match=r"expected x \[B, N, dim=64\], got \[2, 10, 32\]"):
        attn(torch.randn(2, 10, 32))
    with pytest.raises(ValueError, match="image_to_tokens"):
        attn(torch.randn(2, 64, 4, 4))
    with pytest.raises(TypeError, match="torch.Tensor"):
        attn([[1.0] * 64])
    cross = Attention(64, context_dim=16, heads=4)
    with pytest.raises(ValueError, match=r"expected context \[B, M, context_dim=16\], got \[2, 5, 8\]"):
        cross(torch.randn(2, 10, 64), torch.randn(2, 5, 8))
    with pytest.raises(ValueError, match="different batch sizes"):
        cross(torch.randn(2, 10, 64), torch.randn(3, 5, 16))
    with pytest.raises(ValueError, match="pass a context"):
        cross(torch.randn(2, 10, 64))
    with pytest.raises(ValueError, match="not divisible by heads"):
        Attention(10, heads=4)
    with pytest.raises(ValueError, match="does not broadcast"):
        attn(torch.randn(2, 10, 64), attn_mask=torch.ones(2, 10, dtype=torch.bool))


def test_self_attention_block_tokens_and_images():
    block = _randomise(SelfAttentionBlock(16, heads=2))
    x = torch.randn(2, 9, 16)
    assert torch.allclose(block(x), x + block.attn(block.norm(x)))
    img = torch.randn(2, 16, 3, 3)
    assert torch.allclose(block(img), tokens_to_image(block(image_to_tokens(img)), 3))


# -----------------------------------------------------------------------------
# parity with diffusers and torch

DIFFUSERS_CONFIGS = [  # (query_dim, cross_attention_dim, heads, dim_head, bias, out_bias)
    (32, None, 4, 8, False, True),   # self-attention, heads * dim_head == dim
    (32, 16, 4, 8, False, True),     # cross-attention, the example
    (32, 16, 2, 24, True, True),     # heads * dim_head = 48 != dim
    (24, 40, 3, 5, False, False),    # inner 15 < dim, no output bias
    (64, None, 1, 64, True, True),   # one head
    (48, 20, 8, 6, False, True),     # many heads
]


def _diffusers_attention(query_dim, cross_dim, heads, dim_head, bias, out_bias):
    from diffusers.models.attention_processor import Attention as DiffusersAttention
    return _randomise(DiffusersAttention(query_dim=query_dim, cross_attention_dim=cross_dim, heads=heads,
                                         dim_head=dim_head, bias=bias, out_bias=out_bias))


@pytest.mark.parametrize("config", DIFFUSERS_CONFIGS,
                         ids=[f"q{c[0]}-c{c[1]}-h{c[2]}x{c[3]}" for c in DIFFUSERS_CONFIGS])
def test_parity_with_diffusers_both_directions(config):
    theirs = _diffusers_attention(*config)
    ours = convert.from_diffusers(theirs)
    assert isinstance(ours, Attention) and ours.heads == config[2] and ours.head_dim == config[3]
    x = torch.randn(2, 11, config[0])
    c = torch.randn(2, 6, config[1]) if config[1] else None
    with torch.no_grad():
        expected = theirs(x, encoder_hidden_states=c)
        assert (ours(x, c) - expected).abs().max() < TOL
        assert (ours.forward_reference(x, c) - expected).abs().max() < TOL
        back = convert.to_diffusers(ours).eval()
        assert type(back).__name__ == "Attention" and type(back).__module__.startswith("diffusers")
        assert (back(x, encoder_hidden_states=c) - expected).abs().max() < TOL
        # and from a fresh sdlearn module to diffusers
        fresh = _randomise(Attention(config[0], context_dim=config[1], heads=config[2], head_dim=config[3],
                                     qkv_bias=config[4], out_bias=config[5]))
        assert (convert.to_diffusers(fresh).eval()(x, encoder_hidden_states=c) - fresh(x, c)).abs().max() < TOL


def test_parity_with_diffusers_padding_mask():
    theirs = _diffusers_attention(32, 16, 4, 8, False, True)
    ours = convert.from_diffusers(theirs)
    x, c = torch.randn(2, 5, 32), torch.randn(2, 7, 16)
    keep = torch.ones(2, 7, dtype=torch.bool)
    keep[0, 4:] = False
    additive = torch.zeros(2, 1, 7).masked_fill(~keep[:, None, :], -10000.0)  # diffusers' [B, 1, M] convention
    with torch.no_grad():
        expected = theirs(x, encoder_hidden_states=c, attention_mask=additive)
        assert (ours(x, c, attn_mask=keep[:, None, None, :]) - expected).abs().max() < TOL


def test_from_diffusers_refuses_options_it_lacks():
    from diffusers.models.attention_processor import Attention as DiffusersAttention
    with pytest.raises(ValueError, match="norm_q"):
        convert.from_diffusers(DiffusersAttention(query_dim=32, heads=4, dim_head=8, qk_norm="rms_norm"))
    with pytest.raises(ValueError, match="residual_connection"):
        convert.from_diffusers(DiffusersAttention(query_dim=32, heads=4, dim_head=8, residual_connection=True))


@pytest.mark.parametrize("kdim", [None, 12])
def test_parity_with_torch_multihead_attention(kdim):
    from sdlearn.convert.attention import from_torch
    mha = _randomise(nn.MultiheadAttention(32, 4, bias=True, batch_first=True, kdim=kdim, vdim=kdim))
    ours = from_torch(mha)
    assert ours.to_q.bias is not None
    x = torch.randn(2, 9, 32)
    c = torch.randn(2, 6, kdim) if kdim else x
    with torch.no_grad():
        expected, _ = mha(x, c, c, need_weights=False)
        assert (ours(x, c if kdim else None) - expected).abs().max() < TOL
        # torch's bool masks are the other way round: True = do NOT attend
        keep = torch.ones(2, c.shape[1], dtype=torch.bool)
        keep[1, 3:] = False
        expected, weights = mha(x, c, c, key_padding_mask=~keep, average_attn_weights=False)
        assert (ours(x, c if kdim else None, attn_mask=keep[:, None, None, :]) - expected).abs().max() < TOL
        assert (ours.weights(x, c if kdim else None, attn_mask=keep[:, None, None, :]) - weights).abs().max() < TOL


def test_convert_dispatch_rejects_other_modules():
    with pytest.raises(TypeError, match="expected a diffusers"):
        convert.from_diffusers(nn.Linear(2, 2))
