"""sdlearn.unet: published parameter counts, parity with diffusers' UNet2DConditionModel, bad input, checkers."""
import dataclasses
import json

import pytest
import torch

from sdlearn import convert, presets, pretrained
from sdlearn.sdxl import SDXLUNet
from sdlearn.unet import UNet, UNetConfig, timestep_embedding


@pytest.mark.parametrize("name", ["sd15-unet", "sd21base-unet", "sdxl-unet", "sdxl-refiner-unet"])
def test_preset_has_the_published_parameter_count(name):
    model = presets.build(name)
    assert presets.count_parameters(model) == presets.PUBLISHED[name]


# tiny configs covering: 1x1-conv and linear proj, heads and head_dim per level, several transformer layers
# per block, levels without attention, an added conditioning vector (diffusers' "projection" class embedding),
# SDXL's text_time conditioning (an SDXLUNet around the UNet: 6 ids for the base, 5 for the refiner)
TINY = {
    "sd1-conv-heads": UNetConfig(in_channels=4, out_channels=4, channels=(32, 64), layers_per_block=1,
                                 attention=(True, True), heads=(2, 4), context_dim=24, norm_groups=8),
    "sd2-linear-headdim": UNetConfig(in_channels=3, out_channels=3, channels=(16, 32, 32), layers_per_block=2,
                                     attention=(True, True, False), heads=None, head_dim=8, context_dim=20,
                                     linear_proj=True, transformer_layers=(1, 2, 3), norm_groups=8),
    "added-cond": UNetConfig(in_channels=4, out_channels=4, channels=(16, 32), layers_per_block=1,
                             attention=(True, True), heads=2, context_dim=12, added_cond_dim=10, norm_groups=8),
    "xl-text-time": UNetConfig(in_channels=4, out_channels=4, channels=(16, 32, 48), layers_per_block=1,
                               attention=(False, True, True), transformer_layers=(1, 2, 3), heads=None, head_dim=8,
                               context_dim=32, linear_proj=True, added_cond_dim=1280 + 6 * 8, norm_groups=8),
    "refiner-like": UNetConfig(in_channels=4, out_channels=4, channels=(16, 24, 32, 32), layers_per_block=1,
                               attention=(False, True, True, False), transformer_layers=2, heads=None, head_dim=8,
                               context_dim=16, linear_proj=True, added_cond_dim=1280 + 5 * 8, norm_groups=8),
}
TIME_IDS = {"xl-text-time": 6, "refiner-like": 5}  # these are SDXLUNets, with 8-channel time ids


def _denoiser(name, unet):
    return SDXLUNet(unet, TIME_IDS[name], 8) if name in TIME_IDS else unet


def _randomised(name, seed=0):
    torch.manual_seed(seed)
    model = UNet(TINY[name]).eval()
    with torch.no_grad():  # perturb norms and biases too, so every tensor matters
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return _denoiser(name, model)


def _inputs(name, B=2, seed=1, pooled_dim=1280):
    cfg = TINY[name]
    g = torch.Generator().manual_seed(seed)
    H = 4 * 2 ** (cfg.levels - 1)
    x = torch.randn(B, cfg.in_channels, H, H + 2 ** (cfg.levels - 1), generator=g)
    t = torch.tensor([3.0, 742.0])[:B]
    ctx = torch.randn(B, 5, cfg.context_dim, generator=g)
    kw, theirs = {}, {}
    if name in TIME_IDS:
        pooled = torch.randn(B, pooled_dim, generator=g)
        ids = torch.tensor([[512.0, 768, 0, 16, 1024, 1024][:TIME_IDS[name]],
                            [64.0, 96, 8, 0, 128, 6][:TIME_IDS[name]]])[:B]
        kw = dict(pooled=pooled, time_ids=ids)
        theirs = dict(added_cond_kwargs=dict(text_embeds=pooled, time_ids=ids))
    elif cfg.added_cond_dim:
        kw = dict(added_cond=torch.randn(B, cfg.added_cond_dim, generator=g))
        theirs = dict(class_labels=kw["added_cond"])
    return x, t, ctx, kw, theirs


@pytest.mark.parametrize("name", list(TINY))
def test_to_diffusers_gives_the_same_outputs(name):
    ours = _randomised(name)
    theirs = convert.to_diffusers(ours).eval()
    assert type(theirs).__name__ == "UNet2DConditionModel"
    assert sum(p.numel() for p in theirs.parameters()) == presets.count_parameters(ours)
    x, t, ctx, kw, theirs_kw = _inputs(name)
    with torch.no_grad():
        a = ours(x, t, ctx, **kw)
        b = theirs(x, t, ctx, **theirs_kw).sample
    assert a.shape == x.shape[:1] + (TINY[name].out_channels,) + x.shape[2:]
    assert (a - b).abs().max().item() < 1e-4


@pytest.mark.parametrize("name", list(TINY))
def test_from_diffusers_gives_the_same_outputs(name):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    theirs = UNet2DConditionModel(**convert.unet.config_to_diffusers(TINY[name], 8 if name in TIME_IDS else None))
    theirs.eval()
    with torch.no_grad():
        for p in theirs.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ours = convert.from_diffusers(theirs)
    assert type(ours) is (SDXLUNet if name in TIME_IDS else UNet)
    x, t, ctx, kw, theirs_kw = _inputs(name, seed=2)
    with torch.no_grad():
        a = ours(x, t, ctx, **kw)
        b = theirs(x, t, ctx, **theirs_kw).sample
    assert (a - b).abs().max().item() < 1e-4
    back = convert.to_diffusers(ours)
    assert dict(back.config) == dict(theirs.config)
    assert all(torch.equal(v, back.state_dict()[k]) for k, v in theirs.state_dict().items())


@pytest.mark.parametrize("name", ["sd2-linear-headdim", "xl-text-time"])
def test_residuals_are_diffusers_down_block_and_mid_block_additional_residuals(name):
    """A ControlNet's hook: one residual per skip and one for the mid block, as diffusers adds them."""
    ours = _randomised(name)
    theirs = convert.to_diffusers(ours).eval()
    x, t, ctx, kw, theirs_kw = _inputs(name)
    g = torch.Generator().manual_seed(5)
    residuals = [torch.randn(2, *shape, generator=g) for shape in ours.residual_shapes(*x.shape[2:])]
    with torch.no_grad():
        a = ours(x, t, ctx, **kw, residuals=residuals)
        b = theirs(x, t, ctx, **theirs_kw, down_block_additional_residuals=tuple(residuals[:-1]),
                   mid_block_additional_residual=residuals[-1]).sample
        assert (a - b).abs().max().item() < 1e-4
        assert (a - ours(x, t, ctx, **kw)).abs().max().item() > 1e-3  # the residuals matter


def _diffusers_sdxl_like(pooled_dim):
    """A tiny randomised diffusers UNet with SDXL's text_time conditioning and pooled text of width pooled_dim."""
    from diffusers import UNet2DConditionModel

    cfg = dataclasses.replace(TINY["xl-text-time"], added_cond_dim=pooled_dim + 6 * 8)
    torch.manual_seed(0)
    theirs = UNet2DConditionModel(**convert.unet.config_to_diffusers(cfg, time_id_dim=8)).eval()
    with torch.no_grad():
        for p in theirs.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return cfg, theirs


def test_from_diffusers_forwards_pooled_dim_and_gives_the_same_outputs():
    cfg, theirs = _diffusers_sdxl_like(pooled_dim=24)  # not SDXL's 1280: only pooled_dim tells the two apart
    ours = convert.from_diffusers(theirs, pooled_dim=24)
    assert (ours.pooled_dim, ours.num_time_ids, ours.time_id_dim) == (24, 6, 8)
    assert ours.cond_dims == {"context": 32, "pooled": 24, "time_ids": 6}
    x, t, ctx, kw, theirs_kw = _inputs("xl-text-time", seed=3, pooled_dim=24)
    with torch.no_grad():
        a = ours(x, t, ctx, **kw)
        b = theirs(x, t, ctx, **theirs_kw).sample
    err = (a - b).abs().max().item()
    print(f"SDXL-like UNet, pooled_dim=24, from_diffusers fp32: max abs error {err:.2e}")
    assert err <= 1e-5, err


def test_from_diffusers_without_the_needed_pooled_dim_names_the_call_that_works():
    _, theirs = _diffusers_sdxl_like(pooled_dim=24)
    with pytest.raises(ValueError, match=r"call sdlearn\.convert\.from_diffusers\(unet, "
                                         r"pooled_dim=<the pooled text width>\)"):
        convert.from_diffusers(theirs)
    sd15_like = convert.to_diffusers(UNet(TINY["sd1-conv-heads"]))
    with pytest.raises(ValueError, match="pooled_dim=24 is for a UNet with SDXL's text_time conditioning"):
        convert.from_diffusers(sd15_like, pooled_dim=24)


def test_from_diffusers_rejects_an_option_the_unet_converter_lacks():
    _, theirs = _diffusers_sdxl_like(pooled_dim=24)
    with pytest.raises(TypeError, match=r"from_diffusers\(UNet2DConditionModel, \.\.\.\): the 'unet' family's "
                                        r"converter .* takes no option 'pooled'; its options: pooled_dim, prediction"):
        convert.from_diffusers(theirs, pooled=24)


def test_sd15_like_config_from_diffusers_reads_attention_head_dim_as_heads():
    from diffusers import UNet2DConditionModel

    theirs = UNet2DConditionModel(block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1,
                                  attention_head_dim=4, cross_attention_dim=16, norm_num_groups=8)
    ours = convert.from_diffusers(theirs)
    assert ours.config.heads == (4, 4) and ours.config.attention == (True, False)
    assert ours.down[0].attentions[0].blocks[0].attn1.heads == 4


def test_output_depends_on_time_text_and_sdxl_conditioning():
    unet = _randomised("xl-text-time")
    x, t, ctx, kw, _ = _inputs("xl-text-time")
    with torch.no_grad():
        base = unet(x, t, ctx, **kw)
        assert not torch.allclose(base, unet(x, t + 100, ctx, **kw))
        assert not torch.allclose(base, unet(x, t, ctx + 1, **kw))
        assert not torch.allclose(base, unet(x, t, ctx, kw["pooled"], kw["time_ids"] + 64))
        assert torch.allclose(unet(x, 5, ctx, **kw), unet(x, torch.tensor([5, 5]), ctx, **kw))


def test_gradients_reach_every_parameter():
    unet = UNet(TINY["sd2-linear-headdim"])
    x, t, ctx, _, _ = _inputs("sd2-linear-headdim")
    unet(x, t, ctx).square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in unet.parameters())


def test_timestep_embedding_matches_diffusers():
    from diffusers.models.embeddings import get_timestep_embedding

    t = torch.tensor([0, 1, 17.5, 999])
    for dim in (8, 320, 7):
        ours = timestep_embedding(t, dim)
        theirs = get_timestep_embedding(t, dim, flip_sin_to_cos=True, downscale_freq_shift=0)
        assert torch.allclose(ours, theirs, atol=1e-6)


def test_config_survives_a_release_round_trip(tmp_path):
    unet = UNet(TINY["xl-text-time"])
    dest = pretrained.save(unet, "tiny-unet", 8, command="test", dest=tmp_path / "tiny-unet-8.safetensors")
    state, meta = pretrained.load_file_checked(dest)
    cfg = pretrained._config_class(UNet)(**json.loads(meta["config"]))
    assert cfg == unet.config
    again = UNet(cfg)
    again.load_state_dict(state)


# -- bad input ------------------------------------------------------------------------------------------------


def test_bad_input_is_a_clear_error():
    cfg = TINY["sd2-linear-headdim"]  # 3 levels: sizes must be multiples of 4
    unet = UNet(cfg)
    x, t, ctx = torch.randn(2, 3, 8, 8), torch.tensor([1, 2]), torch.randn(2, 5, 20)
    with pytest.raises(ValueError, match=r"divisible by 2\^\(levels-1\) = 4 .*got 8x6"):
        unet(torch.randn(2, 3, 8, 6), t, ctx)
    with pytest.raises(ValueError, match=r"context should be \[B,L,context_dim\] = \[2,L,20\], got \(2, 5, 16\)"):
        unet(x, t, torch.randn(2, 5, 16))
    with pytest.raises(ValueError, match=r"context should be .* got None"):
        unet(x, t, None)
    with pytest.raises(ValueError, match=r"t should be a scalar or \[B\] = \[2\] timesteps, got shape \(3,\)"):
        unet(x, torch.tensor([1, 2, 3]), ctx)
    with pytest.raises(ValueError, match=r"x should be \[B,3,H,W\], got \(2, 4, 8, 8\)"):
        unet(torch.randn(2, 4, 8, 8), t, ctx)
    with pytest.raises(ValueError, match="added_cond given, but this config has none"):
        unet(x, t, ctx, added_cond=torch.randn(2, 1280))
    with pytest.raises(ValueError, match=r"residuals should be 10 tensors shaped \[\(2, 16, 8, 8\)"):
        unet(x, t, ctx, residuals=[torch.zeros(2, 16, 8, 8)])


def test_added_and_sdxl_conditioning_are_required_and_checked():
    unet = UNet(TINY["added-cond"])
    x, t, ctx, kw, _ = _inputs("added-cond")
    with pytest.raises(ValueError, match=r"added_cond should be \[B,added_cond_dim\] = \[2,10\], got None"):
        unet(x, t, ctx)
    sdxl = _randomised("xl-text-time")
    x, t, ctx, kw, _ = _inputs("xl-text-time")
    with pytest.raises(TypeError, match="missing 2 required positional arguments: 'pooled' and 'time_ids'"):
        sdxl(x, t, ctx)
    with pytest.raises(ValueError, match=r"time_ids should be \[B,6\] = \[2,6\], got NoneType"):
        sdxl(x, t, ctx, pooled=kw["pooled"], time_ids=None)
    with pytest.raises(ValueError, match=r"time_ids should be \[B,6\] = \[2,6\], got \(2, 5\)"):
        sdxl(x, t, ctx, pooled=kw["pooled"], time_ids=kw["time_ids"][:, :5])
    with pytest.raises(ValueError, match=r"added_cond_dim \(40\) must hold the pooled text and 6 time ids of 8"):
        SDXLUNet(UNet(dataclasses.replace(TINY["xl-text-time"], added_cond_dim=40)), 6, 8)


def test_bad_config_is_a_clear_error():
    with pytest.raises(ValueError, match="exactly one of heads and head_dim"):
        UNetConfig(heads=8, head_dim=64)
    with pytest.raises(ValueError, match=r"attention needs one value per level \(2\)"):
        UNetConfig(channels=(32, 64), attention=(True,))
    with pytest.raises(ValueError, match="not divisible by norm_groups=32"):
        UNetConfig(channels=(48, 64), attention=(False, False))
    with pytest.raises(ValueError, match="level 1 has 64 channels, not divisible by head_dim=48"):
        UNetConfig(channels=(48, 64), attention=(True, True), heads=None, head_dim=48, norm_groups=16)
    with pytest.raises(ValueError, match="unknown prediction type 'velocity'"):
        UNetConfig(prediction="velocity")


def test_from_diffusers_refuses_options_sdlearn_lacks():
    from diffusers import UNet2DConditionModel

    theirs = UNet2DConditionModel(block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1,
                                  attention_head_dim=4, cross_attention_dim=16, norm_num_groups=8,
                                  resnet_time_scale_shift="scale_shift")
    with pytest.raises(ValueError, match="resnet_time_scale_shift='scale_shift'"):
        convert.from_diffusers(theirs)
