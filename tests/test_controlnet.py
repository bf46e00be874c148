"""sdlearn.controlnet: ControlNet for the UNet and the MMDiT.

- it starts as the base bit for bit (zero convolutions) and a few training steps on a toy map change it;
- parity with diffusers (tiny random configs, fp32): ControlNetModel (SD-like and SDXL-like) both ways through
  sdlearn.convert, StableDiffusionControlNetPipeline (with and without guidance, two scales, guess mode),
  SD3ControlNetModel and StableDiffusion3ControlNetPipeline;
- it saves and loads through sdlearn.pretrained with no code naming it; full-size counts on the meta device;
- bad input is a clear error.
"""
import copy
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from test_convert_pipeline import PROMPTS, SD3_LENGTH, SIZE, _sd, _sd3
from tiny import err, one_thread, perturbed  # noqa: F401

from sdlearn import convert, presets, pretrained
from sdlearn.checks.pipeline import tiny_pipeline
from sdlearn.controlnet import Concatenated, Controlled, ControlNet, SD3ControlNet, attach, concatenate
from sdlearn.pipeline import training_loss

pytest.importorskip("diffusers")

STEPS = 3
COURSE_PROMPTS = ["a red circle on the left", "a blue square at the top"]


# -----------------------------------------------------------------------------
# the recipe: it starts as the base, and training moves it


def test_the_controlnet_starts_as_the_base_bit_for_bit_and_training_changes_it(tmp_path):
    base = tiny_pipeline("v")
    controlnet = ControlNet.from_unet(base.denoiser, downscale=base.vae.downsampling_factor)
    assert controlnet.config.embedding_channels == (16, 32)  # the tiny VAE halves once: one stride-2 stage
    pipe = attach(base, controlnet)
    g = torch.Generator().manual_seed(3)
    control = torch.rand(2, 3, base.image_size, base.image_size, generator=g)
    before = base.generate(COURSE_PROMPTS, steps=3, progress=False)
    assert torch.equal(pipe.generate(COURSE_PROMPTS, steps=3, progress=False, control=control), before)

    frozen = {k: v.clone() for k, v in base.denoiser.state_dict().items()}
    trainable = [p.requires_grad_(True) for p in controlnet.parameters()]
    opt = torch.optim.Adam(trainable, lr=1e-2)
    z0, cond = torch.randn(2, *base.latent_shape, generator=g), {**base.encode_prompts(COURSE_PROMPTS),
                                                                  "control": control}
    pipe.denoiser.train()
    for _ in range(3):
        loss = training_loss(pipe.denoiser, base.schedule, z0, cond, base.conditioner.unconditional(1), 0.5,
                             prediction="v", generator=g)
        opt.zero_grad(), loss.backward(), opt.step()
    pipe.denoiser.eval()
    assert all(torch.equal(v, base.denoiser.state_dict()[k]) for k, v in frozen.items()), "the base is frozen"
    trained = pipe.generate(COURSE_PROMPTS, steps=3, progress=False, control=control)
    assert (trained - before).abs().max() > 1e-3
    other = pipe.generate(COURSE_PROMPTS, steps=3, progress=False, control=control.flip(-1))
    assert (trained - other).abs().max() > 1e-4, "the map is read"
    half = pipe.generate(COURSE_PROMPTS, steps=3, progress=False, control=control, control_scale=0.5)
    assert (trained - half).abs().max() > 1e-4, "the scale is read"
    assert torch.equal(pipe.generate(COURSE_PROMPTS, steps=3, progress=False, control=control, control_scale=0.0),
                       before)

    path = pretrained.save(pipe, "tiny-controlnet", base.image_size, "a test", tmp_path / "cn.safetensors")
    again = pretrained.load_path(path)
    assert type(again.denoiser) is Controlled and type(again.denoiser.controlnet) is ControlNet
    assert torch.equal(again.generate(COURSE_PROMPTS, steps=3, progress=False, control=control), trained)


def test_the_concatenating_unet_starts_as_the_base_reads_the_map_and_saves(tmp_path):
    base = tiny_pipeline("v")
    pipe = concatenate(base)
    assert pipe.denoiser.unet.config.in_channels == base.denoiser.config.in_channels + 3
    g = torch.Generator().manual_seed(4)
    control = torch.rand(2, 3, base.image_size, base.image_size, generator=g)
    before = base.generate(COURSE_PROMPTS, steps=3, progress=False)
    assert torch.equal(pipe.generate(COURSE_PROMPTS, steps=3, progress=False, control=control), before)

    opt = torch.optim.Adam(pipe.denoiser.requires_grad_(True).parameters(), lr=1e-2)   # the whole UNet, as in LDM
    z0, cond = torch.randn(2, *base.latent_shape, generator=g), {**base.encode_prompts(COURSE_PROMPTS),
                                                                  "control": control}
    for _ in range(3):
        loss = training_loss(pipe.denoiser.train(), base.schedule, z0, cond, base.conditioner.unconditional(1), 0.5,
                             prediction="v", generator=g)
        opt.zero_grad(), loss.backward(), opt.step()
    pipe.denoiser.eval()
    new_inputs = pipe.denoiser.unet.conv_in.weight[:, base.denoiser.config.in_channels:]
    assert new_inputs.abs().max() > 0, "the map's input weights, zero at first, learn"
    trained = pipe.generate(COURSE_PROMPTS, steps=3, progress=False, control=control)
    other = pipe.generate(COURSE_PROMPTS, steps=3, progress=False, control=control.flip(-1))
    assert (trained - other).abs().max() > 1e-4, "the map is read"
    path = pretrained.save(pipe, "tiny-concat", base.image_size, "a test", tmp_path / "concat.safetensors")
    again = pretrained.load_path(path)
    assert type(again.denoiser) is Concatenated
    assert torch.equal(again.generate(COURSE_PROMPTS, steps=3, progress=False, control=control), trained)
    with pytest.raises(ValueError, match=r"reads 4 \+ 3 channels \(latents, map\), this one 4: widen_conv_in"):
        Concatenated(base.denoiser)
    with pytest.raises(ValueError, match=r"control should be maps \[B,3,H,W\] = \[2,3,H,W\], got \(2, 1, 8, 8\)"):
        pipe.denoiser(z0, torch.tensor([1, 2]), control=torch.rand(2, 1, 8, 8), **base.encode_prompts(COURSE_PROMPTS))


# -----------------------------------------------------------------------------
# parity with diffusers


def _controlnet_model(xl: bool):
    from diffusers import ControlNetModel
    from tiny import unet

    xl_options = dict(addition_embed_type="text_time", addition_time_embed_dim=8, use_linear_projection=True,
                      projection_class_embeddings_input_dim=20 + 6 * 8) if xl else {}
    base = unet(SIZE, 24, down=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"), **xl_options)
    return perturbed(ControlNetModel.from_unet(base, conditioning_embedding_out_channels=(8, 16)))


@pytest.mark.parametrize("xl", [False, True], ids=["sd", "sdxl"])
def test_controlnet_model_matches_diffusers_both_ways(xl):
    torch.manual_seed(0)
    theirs = _controlnet_model(xl)
    ours = convert.from_diffusers(theirs, **({"pooled_dim": 20} if xl else {}))
    assert type(ours) is ControlNet
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10.0, 500.0])
    context = torch.randn(2, 5, 24, generator=g)
    image = torch.rand(2, 3, SIZE, SIZE, generator=g)
    xl_in = dict(pooled=torch.randn(2, 20, generator=g), time_ids=10 * torch.randn(2, 6, generator=g)) if xl else {}
    added = {"added_cond_kwargs": {"text_embeds": xl_in["pooled"], "time_ids": xl_in["time_ids"]}} if xl else {}
    with torch.no_grad():
        for scale, guess in ((1.0, False), (0.4, False), (0.7, True)):
            down, mid = theirs(x, t, context, image, conditioning_scale=scale, guess_mode=guess, return_dict=False,
                               **added)
            mine = ours(x, t, image, context, scale=scale, guess=guess, **xl_in)
            assert len(mine) == len(down) + 1 and min(m.abs().max() for m in mine) > 1e-2
            assert max(err(a, b) for a, b in zip(mine, [*down, mid])) <= 1e-4, (scale, guess)
    back = convert.to_diffusers(ours).state_dict()
    assert back.keys() == theirs.state_dict().keys()
    assert all(torch.equal(v, back[k]) for k, v in theirs.state_dict().items())


@pytest.fixture(scope="module")
def sd_controlnet(tmp_path_factory):
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline

    torch.manual_seed(0)
    base = _sd(tmp_path_factory.mktemp("vocab"), "sd15")
    controlnet = perturbed(ControlNetModel.from_unet(base.unet, conditioning_embedding_out_channels=(8, 16)))
    pipe = StableDiffusionControlNetPipeline(**base.components, controlnet=controlnet)
    pipe.set_progress_bar_config(disable=True)
    return SimpleNamespace(pipe=pipe, base=base, image=torch.rand(1, 3, SIZE, SIZE,
                                                                  generator=torch.Generator().manual_seed(5)))


def _images(pipe, ours, image, guidance, scale, **theirs_options):
    z = ours.noise(len(PROMPTS), seed=2)
    theirs = pipe(PROMPTS, image=image, num_inference_steps=STEPS, guidance_scale=guidance, latents=z.clone(),
                  output_type="pt", height=SIZE, width=SIZE, controlnet_conditioning_scale=scale,
                  **theirs_options).images
    mine = ours.generate(PROMPTS, STEPS, guidance, latents=z, progress=False, control=image, control_scale=scale)
    return (mine + 1) / 2, theirs


def test_sd_controlnet_pipeline_matches_diffusers(sd_controlnet):
    ours = convert.from_diffusers(sd_controlnet.pipe)
    assert type(ours.denoiser) is Controlled
    seen = []
    for guidance in (1.0, 5.0):
        for scale in (1.0, 0.4):
            mine, theirs = _images(sd_controlnet.pipe, ours, sd_controlnet.image, guidance, scale)
            assert err(mine, theirs) <= 1e-4, (guidance, scale)
            seen.append(mine)
    assert err(seen[0], seen[1]) > 1e-3, "the conditioning scale changes the images"
    guess = attach(convert.from_diffusers(sd_controlnet.base), ours.denoiser.controlnet, guess_mode=True)
    mine, theirs = _images(sd_controlnet.pipe, guess, sd_controlnet.image, 5.0, 0.8, guess_mode=True)
    assert err(mine, theirs) <= 1e-4 and err(mine, seen[2]) > 1e-3


def test_sd_controlnet_pipeline_saves_to_a_folder_diffusers_reads(sd_controlnet, tmp_path):
    from diffusers import StableDiffusionControlNetPipeline

    ours = convert.from_diffusers(sd_controlnet.pipe)
    folder = convert.save(ours, tmp_path / "saved")
    theirs = StableDiffusionControlNetPipeline.from_pretrained(folder)
    theirs.set_progress_bar_config(disable=True)
    again = convert.load(folder)
    mine, other = _images(theirs, again, sd_controlnet.image, 5.0, 0.7)
    assert err(mine, other) <= 1e-4


@pytest.fixture(scope="module")
def sd3_controlnet(tmp_path_factory):
    from diffusers import SD3ControlNetModel, StableDiffusion3ControlNetPipeline

    torch.manual_seed(5)
    base = _sd3(tmp_path_factory.mktemp("vocab3"), "sd35")
    # from_transformer writes num_layers into the config it is given: a copy keeps the base's
    controlnet = perturbed(SD3ControlNetModel.from_transformer(copy.deepcopy(base.transformer), num_layers=1,
                                                               num_extra_conditioning_channels=0), 0.1)
    pipe = StableDiffusion3ControlNetPipeline(**base.components, controlnet=controlnet)
    pipe.set_progress_bar_config(disable=True)
    return SimpleNamespace(pipe=pipe, controlnet=controlnet, image=torch.rand(
        1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(6)))


def test_sd3_controlnet_model_matches_diffusers_both_ways(sd3_controlnet):
    theirs = sd3_controlnet.controlnet
    ours = convert.from_diffusers(theirs)
    assert type(ours) is SD3ControlNet and ours.config.zero_pooled
    g = torch.Generator().manual_seed(1)
    x, control = torch.randn(2, 16, 8, 8, generator=g), torch.randn(2, 16, 8, 8, generator=g)
    t, context = torch.tensor([10.0, 500.0]), torch.randn(2, 5, 40, generator=g)
    pooled = torch.randn(2, 40, generator=g)
    with torch.no_grad():
        # force_zeros_for_pooled_projection: diffusers' pipeline hands the ControlNet zeros, ours reads zeros itself
        mine = ours(x, t, control, context, pooled, scale=0.7)
        them = theirs(x, control, 0.7, context, torch.zeros_like(pooled), t, return_dict=False)[0]
    assert len(mine) == len(them) == 1 and mine[0].abs().max() > 1e-2 and err(mine[0], them[0]) <= 1e-4
    back = convert.to_diffusers(ours).state_dict()
    assert back.keys() == theirs.state_dict().keys()
    assert all(torch.equal(v, back[k]) for k, v in theirs.state_dict().items())


def test_sd3_controlnet_pipeline_matches_diffusers(sd3_controlnet, monkeypatch, tmp_path):
    from diffusers import StableDiffusion3Pipeline
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    # diffusers encodes the control image with a sample of the posterior (global RNG); sdlearn with its mean
    monkeypatch.setattr(DiagonalGaussianDistribution, "sample", lambda self, generator=None: self.mean)
    ours = convert.from_diffusers(sd3_controlnet.pipe, max_sequence_length=SD3_LENGTH)
    assert type(ours.denoiser.controlnet) is SD3ControlNet and ours.conditioner.vae is ours.vae
    parts = {k: v for k, v in sd3_controlnet.pipe.components.items() if k != "controlnet"}
    StableDiffusion3Pipeline(**parts).save_pretrained(tmp_path / "base", safe_serialization=True)
    sd3_controlnet.controlnet.save_pretrained(tmp_path / "controlnet", safe_serialization=True)
    loaded = convert.load(tmp_path / "base", controlnet=tmp_path / "controlnet", max_sequence_length=SD3_LENGTH)
    seen = []
    for guidance, scale, pipe in ((1.0, 1.0, ours), (1.0, 0.4, ours), (5.0, 1.0, ours), (5.0, 0.4, loaded)):
        z = ours.noise(len(PROMPTS), seed=2)
        theirs = sd3_controlnet.pipe(
            PROMPTS, control_image=sd3_controlnet.image * 2 - 1, num_inference_steps=STEPS,
            guidance_scale=guidance, latents=z.clone(), output_type="pt", height=SIZE, width=SIZE,
            controlnet_conditioning_scale=scale, max_sequence_length=SD3_LENGTH).images
        mine = (pipe.generate(PROMPTS, STEPS, guidance, latents=z, progress=False, control=sd3_controlnet.image,
                              control_scale=scale) + 1) / 2
        assert err(mine, theirs) <= 1e-4, (guidance, scale, err(mine, theirs))
        seen.append(mine)
    assert err(seen[0], seen[1]) > 1e-3, "the conditioning scale changes the images"


# -----------------------------------------------------------------------------
# full size: the published counts (diffusers 0.42.1), on the meta device


@pytest.mark.parametrize("name", ["sd15-controlnet", "sdxl-controlnet", "sd3-controlnet"])
def test_full_size_controlnets_have_the_published_counts(name):
    model = presets.build(name)
    assert presets.count_parameters(model) == presets.PUBLISHED[name]


def test_the_sd3_controlnet_count_is_diffusers_at_the_published_config():
    from diffusers import SD3ControlNetModel

    from sdlearn.controlnet import SD3_CONTROLNET_CANNY

    with torch.device("meta"):
        theirs = SD3ControlNetModel(**SD3_CONTROLNET_CANNY)
    assert presets.count_parameters(theirs) == presets.PUBLISHED["sd3-controlnet"]


# -----------------------------------------------------------------------------
# bad input


def test_bad_input_is_a_clear_error():
    base = tiny_pipeline("v")
    controlnet = ControlNet.from_unet(base.denoiser, downscale=base.vae.downsampling_factor)
    pipe = attach(base, controlnet)
    image = torch.rand(1, 3, 16, 16)
    with pytest.raises(ValueError, match=r"control should be \[B,3,H,W\] = \[4, 3, 16, 16\].*got \(4, 3, 12, 12\)"):
        pipe.generate(COURSE_PROMPTS, steps=1, progress=False, control=torch.rand(1, 3, 12, 12))
    with pytest.raises(ValueError, match=r"control should be images \[N,3,H,W\].*got \(1, 1, 16, 16\)"):
        pipe.generate(COURSE_PROMPTS, steps=1, progress=False, control=torch.rand(1, 1, 16, 16))
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        pipe.generate(COURSE_PROMPTS, steps=1, progress=False, control=image * 2 - 1)
    for scale in (float("nan"), float("inf"), "1.0", None):
        with pytest.raises(ValueError, match="control_scale must be a finite number"):
            pipe.generate(COURSE_PROMPTS, steps=1, progress=False, control=image, control_scale=scale)
    with pytest.raises(ValueError, match="downscale must be the VAE's downsampling factor"):
        ControlNet.from_unet(base.denoiser, downscale=3)
    with pytest.raises(ValueError, match="make 1 stride-2 stages, but a 8x VAE needs 3"):
        ControlNet.from_unet(base.denoiser, downscale=8, embedding_channels=(4, 8))
    with pytest.raises(ValueError, match=r"shrinks maps 4x \(2 stride-2 stages\) but this pipeline's VAE 2x"):
        attach(base, ControlNet.from_unet(base.denoiser, downscale=4))


@pytest.mark.parametrize("change, words", [
    (dict(channels=(16, 16)), "skips"),                                   # width
    (dict(channels=(8, 16, 16), attention=(True,) * 3, transformer_layers=1, heads=2), "skips"),  # levels
    (dict(context_dim=12), "cross-attention width"),
])
def test_a_controlnet_for_another_base_is_a_clear_error(change, words):
    import dataclasses

    from sdlearn.unet import UNet

    base = tiny_pipeline("v").denoiser
    other = UNet(dataclasses.replace(base.config, **change))
    controlnet = ControlNet.from_unet(other, downscale=2)
    with pytest.raises(ValueError, match=f"made for another denoiser.*{words}"):
        Controlled(base, controlnet)


# -----------------------------------------------------------------------------
# published files: the original layout, and a ControlNet loaded beside its base checkpoint


def test_the_original_layout_maps_as_diffusers_own_converter_reads_it(sd_controlnet):
    from diffusers import ControlNetModel
    from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint

    from sdlearn.convert.controlnet import from_original, to_original

    # diffusers' converter knows SD's embedding only (four widths: its conv_out is input_hint_block.14)
    theirs = ControlNetModel.from_unet(sd_controlnet.base.unet, conditioning_embedding_out_channels=(4, 8, 8, 16))
    state = theirs.state_dict()
    original = to_original(state)
    assert {"control_model.input_hint_block.14.weight", "control_model.zero_convs.0.0.weight",
            "control_model.middle_block_out.0.bias", "control_model.input_blocks.0.0.weight"} <= set(original)
    for converted in (convert_controlnet_checkpoint(original, theirs.config), from_original(original)):
        assert converted.keys() == state.keys() and all(torch.equal(converted[k], v) for k, v in state.items())


@pytest.fixture(scope="module")
def published(sd_controlnet, tmp_path_factory):
    """The base pipeline as a diffusers folder, and its ControlNet three ways: a diffusers folder, a single file in
    diffusers' names, a single file in the original layout."""
    from safetensors.torch import save_file

    from sdlearn.convert.controlnet import to_original

    tmp = tmp_path_factory.mktemp("published")
    sd_controlnet.base.save_pretrained(tmp / "base", safe_serialization=True)
    controlnet = sd_controlnet.pipe.controlnet
    controlnet.save_pretrained(tmp / "controlnet", safe_serialization=True)
    state = {k: v.contiguous() for k, v in controlnet.state_dict().items()}
    save_file(state, tmp / "controlnet.safetensors")
    save_file(to_original(state), tmp / "control_sd15_tiny.safetensors")
    return tmp


@pytest.mark.parametrize("layout", ["controlnet", "controlnet.safetensors", "control_sd15_tiny.safetensors"])
def test_load_reads_a_published_controlnet_beside_its_base(sd_controlnet, published, layout):
    pipe = convert.load(published / "base", controlnet=published / layout)
    assert type(pipe.denoiser) is Controlled
    mine, theirs = _images(sd_controlnet.pipe, pipe, sd_controlnet.image, 5.0, 0.7)
    assert err(mine, theirs) <= 1e-4


def test_the_command_line_draws_with_a_map(sd_controlnet, published, tmp_path):
    from PIL import Image

    from sdlearn.__main__ import main

    image = (sd_controlnet.image[0].permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
    Image.fromarray(image).save(tmp_path / "map.png")
    (tmp_path / "map.txt").write_text("not an image")
    args = ["generate", "a red circle", "--checkpoint", str(published / "base"), "--controlnet",
            str(published / "controlnet"), "--steps", "2", "--n", "1", "--out", str(tmp_path / "out.png")]
    drawn = []
    for scale in ("0.5", "0"):
        assert main([*args, "--control", str(tmp_path / "map.png"), "--control-scale", scale]) == 0
        drawn.append(torch.tensor(np.asarray(Image.open(tmp_path / "out.png")), dtype=torch.float32))
    assert drawn[0].shape == (SIZE, SIZE, 3) and (drawn[0] - drawn[1]).abs().max() > 2, "the map is read"
    with pytest.raises(SystemExit):
        main([*args, "--control", str(tmp_path / "map.txt")])
    with pytest.raises(SystemExit):
        main([*args[:4], *args[6:], "--control", str(tmp_path / "map.png")])  # no --controlnet: no ControlNet


@pytest.mark.skipif("shapes-controlnet-seg-32" not in pretrained.available(),
                    reason="needs the released shapes-controlnet-seg-32")
def test_the_command_line_draws_with_the_released_controlnet_by_default(tmp_path):
    from PIL import Image

    from sdlearn.__main__ import main
    from sdlearn.data import parse_scene, render_map

    scene = render_map(parse_scene("a red circle at 0.3 0.6 size 0.3"), 32)
    Image.fromarray((scene.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()).save(tmp_path / "map.png")
    drawn = []
    for scale in ("1", "0"):   # no --model: with --control the released ControlNet draws
        assert main(["generate", "a red circle", "--control", str(tmp_path / "map.png"), "--control-scale", scale,
                     "--steps", "4", "--n", "1", "--scale", "1", "--out", str(tmp_path / "out.png")]) == 0
        drawn.append(torch.tensor(np.asarray(Image.open(tmp_path / "out.png")), dtype=torch.float32))
    assert (drawn[0] - drawn[1]).abs().max() > 2, "the map is read"


def test_a_map_file_that_is_not_an_image_is_a_clear_error(tmp_path):
    from sdlearn.controlnet import read_control

    (tmp_path / "map.png").write_text("not an image")
    with pytest.raises(ValueError, match=r"control map .*map.png: not an image file"):
        read_control(tmp_path / "map.png")
