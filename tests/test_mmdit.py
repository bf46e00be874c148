"""sdlearn.mmdit: the published parameter counts, parity with diffusers' SD3Transformer2DModel (SD3- and SD3.5-like
configs, both ways), the original single-file layout, adaLN-Zero, patchify, the joint attention, QK RMSNorm,
the pipeline with the flow schedule, a few training steps, and bad input."""
import warnings

import pytest
import torch
import torch.nn.functional as F

from sdlearn import convert, presets
from sdlearn.convert import mmdit as convert_mmdit
from sdlearn.flow import FlowSchedule, training_loss
from sdlearn.mmdit import MMDiT, MMDiTConfig, modulate, sincos_2d

TINY = dict(in_channels=4, out_channels=4, patch_size=2, depth=3, heads=4, head_dim=8, context_dim=24, pooled_dim=12,
            pos_embed_max_size=12)
SD3_LIKE = MMDiTConfig(**TINY)
SD35_LIKE = MMDiTConfig(**TINY, qk_norm=True, dual_attention_layers=(0, 1))


def _inputs(B=2, H=8, W=6, L=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, 4, H, W, generator=g), torch.tensor([10.0, 700.0])[:B],
            torch.randn(B, L, 24, generator=g), torch.randn(B, 12, generator=g))


def _random(model, std=0.1, seed=0):
    """Every weight random (the adaLN-Zero init would hide the blocks behind zero gates)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return model.eval()


@pytest.mark.parametrize("name", ["sd3-medium-mmdit", "sd35-medium-mmdit"])
def test_presets_have_the_published_parameter_counts(name):
    model = presets.build(name)
    assert presets.count_parameters(model) == presets.PUBLISHED[name]
    M = model.config.pos_embed_max_size
    assert model.pos_embed.shape == (1, M * M, 1536)          # a buffer, not counted
    assert "pos_embed" not in dict(model.named_parameters())


def test_the_sd35_preset_is_mmdit_x_with_qk_norm():
    model = presets.build("sd35-medium-mmdit")
    dual = [i for i, b in enumerate(model.joint_blocks) if b.x_block.dual_attention]
    assert dual == list(range(13)) and model.config.qk_norm
    assert model.joint_blocks[0].x_block.adaLN_modulation[1].out_features == 9 * 1536
    assert model.joint_blocks[13].x_block.adaLN_modulation[1].out_features == 6 * 1536
    assert model.joint_blocks[-1].context_block.adaLN_modulation[1].out_features == 2 * 1536
    assert model.joint_blocks[-1].context_block.attn.proj is None


diffusers = pytest.importorskip("diffusers")
from diffusers import SD3Transformer2DModel  # noqa: E402


def _theirs(cfg: MMDiTConfig, seed=0):
    return _random(SD3Transformer2DModel(**convert_mmdit.config_to_diffusers(cfg, sample_size=8)), seed=seed)


@pytest.mark.parametrize("cfg", [SD3_LIKE, SD35_LIKE], ids=["sd3-like", "sd35-like"])
def test_outputs_equal_diffusers_both_ways(cfg):
    theirs = _theirs(cfg)
    ours = convert.from_diffusers(theirs).eval()
    assert ours.config == cfg
    x, t, context, pooled = _inputs()
    with torch.no_grad():
        want = theirs(x, context, pooled, t).sample
        got = ours(x, t, context, pooled)
        back = convert.to_diffusers(_random(MMDiT(cfg), seed=1))
        again = convert.from_diffusers(back)(x, t, context, pooled)
        direct = back(x, context, pooled, t).sample
    assert want.abs().max() > 0.1            # the blocks are not hidden behind zero gates
    assert (got - want).abs().max() <= 1e-4
    assert (again - direct).abs().max() <= 1e-4
    assert back.state_dict().keys() == theirs.state_dict().keys()


def test_every_grid_up_to_the_max_crops_the_position_embedding_as_diffusers():
    theirs = _theirs(SD3_LIKE)
    ours = convert.from_diffusers(theirs)
    for H, W in [(2, 2), (4, 10), (24, 24)]:
        x = torch.randn(1, 4, H, W)
        _, _, context, pooled = _inputs(B=1)
        with torch.no_grad():
            assert (ours(x, 5.0, context, pooled) - theirs(x, context, pooled, torch.tensor([5.0])).sample
                    ).abs().max() <= 1e-4


@pytest.mark.parametrize("cfg", [SD3_LIKE, SD35_LIKE], ids=["sd3-like", "sd35-like"])
def test_the_original_single_file_layout_is_ours(cfg):
    """diffusers' own converter of SD3 / SD3.5 single files reads our state dict, prefixed, as the original: the
    same names, the fused QKV, and (shift, scale) in the continuous adaLNs that diffusers stores swapped."""
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    ours = _random(MMDiT(cfg))
    original = {convert_mmdit.ORIGINAL_PREFIX + k: v.clone() for k, v in ours.state_dict().items()}
    original["first_stage_model.decoder.conv_in.weight"] = torch.zeros(1)   # other parts of the file are left out
    theirs = convert_mmdit.state_to_diffusers(ours.state_dict(), cfg.depth)
    converted = convert_sd3_transformer_checkpoint_to_diffusers(
        {k: v for k, v in original.items() if k.startswith(convert_mmdit.ORIGINAL_PREFIX)})
    assert converted.keys() == theirs.keys()
    assert all(torch.equal(converted[k], theirs[k]) for k in theirs)
    state = convert_mmdit.from_original(original)
    assert state.keys() == ours.state_dict().keys()
    assert convert_mmdit.config_from_original(state, head_dim=cfg.head_dim) == cfg
    last = f"joint_blocks.{cfg.depth - 1}.context_block.adaLN_modulation.1.bias"
    shift, scale = ours.state_dict()[last].chunk(2)
    assert torch.equal(theirs[f"transformer_blocks.{cfg.depth - 1}.norm1_context.linear.bias"],
                       torch.cat([scale, shift]))


def test_from_original_refuses_another_model():
    with pytest.raises(ValueError, match="not an SD3 / SD3.5 MMDiT.*joint_blocks.0"):
        convert_mmdit.from_original({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1)})


def test_diffusers_options_sdlearn_lacks_are_named():
    cfg = convert_mmdit.config_to_diffusers(SD3_LIKE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = SD3Transformer2DModel(**{**cfg, "caption_projection_dim": 16})
    with pytest.raises(ValueError, match="caption_projection_dim=16"):
        convert.from_diffusers(theirs)


# -----------------------------------------------------------------------------
# the parts


def test_adaln_zero_starts_every_block_as_the_identity_and_predicts_zero():
    model = MMDiT(SD35_LIKE)
    x, t, context, pooled = _inputs()
    assert torch.equal(model(x, t, context, pooled), torch.zeros_like(x))
    tokens, ctx = model.patchify(x), model.context_embedder(context)
    c = model.embed(t, pooled)
    for block in model.joint_blocks[:-1]:
        out_x, out_c = block(tokens, ctx, c)
        assert torch.equal(out_x, tokens) and torch.equal(out_c, ctx)
    assert model.joint_blocks[-1](tokens, ctx, c)[1] is None     # pre-only: the text stream ends


def test_modulate_is_shift_and_scale_per_sample():
    x, shift, scale = torch.randn(2, 3, 4), torch.randn(2, 4), torch.randn(2, 4)
    assert torch.allclose(modulate(x, shift, scale)[1, 2], x[1, 2] * (1 + scale[1]) + shift[1])


def test_patchify_and_unpatchify_are_inverse_and_patches_are_tokens():
    model = MMDiT(SD3_LIKE)
    p = model.config.patch_size
    tokens = torch.randn(2, 4 * 3, p * p * 4)
    image = model.unpatchify(tokens, 4, 3)                        # [2,4,8,6]
    assert image.shape == (2, 4, 8, 6)
    # token (row 1, column 2) holds the 2x2 patch at rows 2-3, columns 4-5, channel last
    assert torch.equal(image[0, :, 2:4, 4:6].permute(1, 2, 0).flatten(), tokens[0, 1 * 3 + 2])
    with torch.no_grad():
        conv = model.x_embedder(image)
    w = model.x_embedder.proj.weight.flatten(1)                   # [D, C*p*p]
    patch = image[0, :, 2:4, 4:6].flatten()
    assert torch.allclose(conv[0, 1 * 3 + 2], w @ patch + model.x_embedder.proj.bias, atol=1e-5)


def test_the_position_embedding_is_centre_cropped():
    model = MMDiT(SD3_LIKE)
    M = model.config.pos_embed_max_size
    full = model.pos_embed.reshape(M, M, -1)
    assert torch.equal(model.cropped_pos_embed(4, 6)[0].reshape(4, 6, -1), full[4:8, 3:9])
    assert torch.equal(model.cropped_pos_embed(M, M), model.pos_embed)
    grid = sincos_2d(32, 12)
    assert grid.shape == (144, 32) and (grid[0] != grid[1]).any() and (grid[0] != grid[12]).any()


def test_joint_attention_is_one_softmax_over_image_and_text_tokens():
    model = _random(MMDiT(SD3_LIKE))
    x, t, context, pooled = _inputs(B=1)
    block = model.joint_blocks[0]
    block.keep_attention = True
    with torch.no_grad():
        model(x, t, context, pooled)
    weights = block.attention                                     # [B, heads, N + L, N + L]
    N, L = (8 // 2) * (6 // 2), context.shape[1]
    assert weights.shape == (1, 4, N + L, N + L)
    assert torch.allclose(weights.sum(-1), torch.ones(1, 4, N + L))
    assert weights[..., :N, N:].sum() > 0 and weights[..., N:, :N].sum() > 0   # image reads text and back


def test_qk_rmsnorm_bounds_the_attention_logits():
    """Scaling the QKV weights by 100 multiplies the logits by 10^4 without QK norm and leaves them bounded
    with it: what lets SD3.5 train at high learning rates (paper sec. 5.3.2)."""
    logits = {}
    for qk_norm in (False, True):
        model = _random(MMDiT(MMDiTConfig(**{**TINY, "qk_norm": qk_norm})))
        attn = model.joint_blocks[0].x_block.attn
        h = torch.randn(1, 10, 32)
        for scale in (1.0, 100.0):
            with torch.no_grad():
                attn.qkv.weight.mul_(scale)
                q, k, _ = attn.split_heads(h)
                attn.qkv.weight.div_(scale)
            logits[qk_norm, scale] = (q @ k.transpose(-1, -2)).abs().max().item() / 8 ** 0.5
    assert logits[False, 100.0] > 1000 * logits[False, 1.0]
    assert logits[True, 100.0] < 1.5 * logits[True, 1.0]


def test_cond_dims_name_what_forward_reads():
    assert MMDiT(SD3_LIKE).cond_dims == {"context": 24, "pooled": 12}


def test_a_few_flow_training_steps_fit_one_noisy_batch():
    """The same (x0, eps, t) every step: the gradient reaches every part, and the loss falls far."""
    torch.manual_seed(0)
    model = MMDiT(MMDiTConfig(**{**TINY, "depth": 2}))
    x0, _, context, pooled = _inputs()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(60):
        loss = training_loss(model, FlowSchedule(), x0, {"context": context, "pooled": pooled}, None,
                             generator=torch.Generator().manual_seed(0))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.2 * losses[0], losses[::10]


# -----------------------------------------------------------------------------
# bad input


@pytest.mark.parametrize("call, match", [
    (lambda m, x, t, c, p: m(torch.randn(1, 4, 26, 26), t[:1], c[:1], p[:1]),
     "13x13 grid of patches, larger than the position embedding's 12x12; the largest latent that fits is 24x24"),
    (lambda m, x, t, c, p: m(torch.randn(2, 4, 7, 6), t, c, p), "divisible by the patch size 2, got 7x6"),
    (lambda m, x, t, c, p: m(x, t, torch.randn(2, 5, 32), p), r"context should be \[B,L,context_dim\] = \[2,L,24\]"),
    (lambda m, x, t, c, p: m(x, t, c, None), r"pooled should be \[B,pooled_dim\] = \[2,12\], got None"),
    (lambda m, x, t, c, p: m(torch.randn(2, 3, 8, 6), t, c, p), r"x should be \[B,4,H,W\], got \(2, 3, 8, 6\)"),
    (lambda m, x, t, c, p: m(x, torch.zeros(3), c, p), r"t should be a scalar or \[B\] = \[2\]"),
])
def test_bad_input_is_a_clear_error(call, match):
    with pytest.raises(ValueError, match=match):
        call(MMDiT(SD3_LIKE), *_inputs())


def test_bad_configs_are_clear_errors():
    with pytest.raises(ValueError, match=r"dual_attention_layers \[5\] are not blocks of a depth-3"):
        MMDiTConfig(**TINY, dual_attention_layers=(5,))
    with pytest.raises(ValueError, match="heads must be at least 1"):
        MMDiTConfig(**{**TINY, "heads": 0})


def test_the_flow_loss_trains_toward_eps_minus_x0():
    """The exact v for one fixed (x0, eps) pair gives zero loss, the opposite sign does not (the common bug)."""
    x0, noise = torch.randn(2, 4, 8, 6), torch.randn(2, 4, 8, 6)
    t = torch.full((2,), 0.3)
    schedule = FlowSchedule()
    xt = schedule.add_noise(x0, noise, t)
    assert torch.allclose(xt, 0.7 * x0 + 0.3 * noise)
    assert F.mse_loss(noise - x0, schedule.target("v", x0, noise, t)) == 0
