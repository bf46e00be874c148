"""sdlearn.inpaint: the 9-channel inpainting UNet and blended latents.

- parity with diffusers' StableDiffusionInpaintPipeline (tiny random configs, fp32, DDIM): a 9-channel UNet and a
  4-channel one (blended latents), with and without guidance, strength 1 and 0.6;
- the full-size preset has the published count, and is diffusers' UNet at SD 1.5's config with in_channels 9;
- sdlearn.convert reads an inpainting checkpoint as a diffusers folder and as an original single file, and writes it
  back as a folder diffusers reads;
- the command line inpaints (--image, --mask), blends with a plain model (--blend), reads an image prompt;
- bad input is a clear error.
"""
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from test_convert_pipeline import PROMPTS, PUBLISHED_CONFIGS, SIZE, _ddim, _sd
from tiny import check_images, err, one_thread, perturbed  # noqa: F401
from torch import nn

from sdlearn import convert, presets
from sdlearn.checks.pipeline import tiny_pipeline
from sdlearn.inpaint import (
    InpaintConditioner,
    Inpainting,
    blended,
    box_mask,
    check_mask,
    inpaint,
    inpainting_pipeline,
    widen_conv_in,
)
from sdlearn.pipeline import TextToImage

pytest.importorskip("diffusers")

STEPS = 10  # with 10 steps, strength 0.6 runs the same 6 timesteps in both (see test_strength_...)
GUIDANCE = 5.0


def _source(seed=5):
    """A smooth source image [1,3,SIZE,SIZE] in [-1, 1] and a box mask [1,1,SIZE,SIZE] in {0, 1} (1 = repaint)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, 3, 4, 4, generator=g) * 1.6 - 0.8
    image = torch.nn.functional.interpolate(coarse, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
    return image, box_mask(0.35, 0.6, 0.4, SIZE)[None]


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    """diffusers' StableDiffusionInpaintPipeline twice, over the same tiny SD 1.5-like parts: with a 9-channel UNet
    (the text-to-image UNet's config with in_channels 9, random) and with the 4-channel UNet (blended latents)."""
    from diffusers import StableDiffusionInpaintPipeline, UNet2DConditionModel

    torch.manual_seed(3)
    tmp = tmp_path_factory.mktemp("inpaint")
    (tmp / "vocab").mkdir()
    base = _sd(tmp / "vocab", "sd15")
    unet9 = perturbed(UNet2DConditionModel.from_config({**base.unet.config, "in_channels": 9}))
    parts = dict(vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer, safety_checker=None,
                 feature_extractor=None, requires_safety_checker=False)
    nine = StableDiffusionInpaintPipeline(**parts, unet=unet9, scheduler=_ddim())
    four = StableDiffusionInpaintPipeline(**parts, unet=base.unet, scheduler=_ddim())
    for pipe in (base, nine, four):
        pipe.set_progress_bar_config(disable=True)
    nine.save_pretrained(tmp / "nine", safe_serialization=True)
    base.save_pretrained(tmp / "base", safe_serialization=True)
    image, mask = _source()
    return SimpleNamespace(base=base, nine=nine, four=four, tmp=tmp, image=image, mask=mask)


@pytest.fixture
def posterior_mean(monkeypatch):
    """diffusers encodes the image and the masked image with a SAMPLE of the VAE's posterior (retrieve_latents,
    sample_mode="sample", drawn from the pipeline's generator); sdlearn with its mean. The sample is replaced by the
    mean, which also leaves the generators untouched: diffusers' initial noise, drawn next from one generator per
    image seeded seed + i, is then sdlearn's pipe.noise(n, seed) (with strength < 1 too, where diffusers noises the
    source itself: its get_timesteps, prepare_latents and add_noise are under test, no latents are passed)."""
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    monkeypatch.setattr(DiagonalGaussianDistribution, "sample", lambda self, generator=None: self.mean)


def _theirs(pipe, image, mask, guidance, strength, seed, steps=STEPS):
    generators = [torch.Generator().manual_seed(seed + i) for i in range(len(PROMPTS))]
    return pipe(PROMPTS, image=(image + 1) / 2, mask_image=mask, num_inference_steps=steps, guidance_scale=guidance,
                strength=strength, generator=generators, output_type="pt", height=SIZE, width=SIZE).images


CASES = [(1.0, 1.0), (GUIDANCE, 1.0), (1.0, 0.6), (GUIDANCE, 0.6)]


def test_a_9_channel_unet_matches_diffusers_inpaint_pipeline(sd, posterior_mean):
    """The inpainting UNet: cat([z_t, mask, masked latents]) at every step, from pure noise (strength 1) or from
    the source noised part-way (0.6); with and without guidance."""
    ours = convert.from_diffusers(sd.nine)
    assert type(ours.denoiser) is Inpainting and type(ours.conditioner) is InpaintConditioner
    seen = {}
    for guidance, strength in CASES:
        theirs = _theirs(sd.nine, sd.image, sd.mask, guidance, strength, seed=7)
        mine = inpaint(ours, sd.image, sd.mask, PROMPTS, strength=strength, steps=STEPS, guidance_scale=guidance,
                       seed=7, progress=False)
        check_images(mine, theirs, f"9-channel UNet, guidance {guidance}, strength {strength}", len(PROMPTS), SIZE)
        seen[guidance, strength] = mine
    assert err(seen[1.0, 1.0], seen[GUIDANCE, 1.0]) > 1e-3 and err(seen[GUIDANCE, 1.0], seen[GUIDANCE, 0.6]) > 1e-3
    # the mask is read: another mask, other images
    other = inpaint(ours, sd.image, sd.mask.flip(-1), PROMPTS, steps=STEPS, guidance_scale=GUIDANCE, seed=7,
                    progress=False)
    assert err(other, seen[GUIDANCE, 1.0]) > 1e-3


def test_blended_latents_with_a_4_channel_unet_match_diffusers_inpaint_pipeline(sd, posterior_mean):
    """A plain UNet in diffusers' inpaint pipeline: after every step the known region is the source's latents
    noised to timesteps[i + 1] with the run's initial noise (the source itself after the last step), which is
    sdlearn.inpaint.blended."""
    ours = convert.from_diffusers(sd.four)
    assert type(ours.denoiser).__name__ == "UNet" and ours.denoiser.config.in_channels == 4  # the "sd" row
    for guidance, strength in CASES:
        theirs = _theirs(sd.four, sd.image, sd.mask, guidance, strength, seed=11)
        mine = blended(ours, sd.image, sd.mask, PROMPTS, strength=strength, steps=STEPS, guidance_scale=guidance,
                       seed=11, progress=False)
        check_images(mine, theirs, f"blended latents, guidance {guidance}, strength {strength}", len(PROMPTS), SIZE)


def test_a_soft_mask_is_binarized_as_diffusers_does(sd, posterior_mean):
    """diffusers' mask processor binarizes the mask (>= 0.5: repaint); so does sdlearn's check_mask, for the UNet's
    mask channel and for blending alike (unbinarized, the 9-channel images differed by 0.09, the blended ones by 1)."""
    soft = sd.mask * 0.7 + (1 - sd.mask) * 0.3                       # 0.7 inside the box, 0.3 outside
    for pipe, draw in ((sd.nine, inpaint), (sd.four, blended)):
        theirs = _theirs(pipe, sd.image, soft, GUIDANCE, 1.0, seed=1)
        mine = draw(convert.from_diffusers(pipe), sd.image, soft, PROMPTS, steps=STEPS, guidance_scale=GUIDANCE,
                    seed=1, progress=False)
        check_images(mine, theirs, f"{draw.__name__}, a soft mask", len(PROMPTS), SIZE)
        hard = draw(convert.from_diffusers(pipe), sd.image, sd.mask, PROMPTS, steps=STEPS, guidance_scale=GUIDANCE,
                    seed=1, progress=False)
        assert torch.equal(mine, hard)


def test_strength_counts_steps_as_diffusers_where_the_two_rules_agree(sd):
    """diffusers' strength keeps the last int(steps * strength) timesteps (get_timesteps); sdlearn's img2img cuts at
    start = 1 - strength (the denoising_start rule, timesteps t < round(T * strength)). With 10 steps at 0.6 both
    run [501, ..., 1]; at 8 steps they part (diffusers 4 steps, sdlearn 5: [501, 376, ...])."""
    ours = convert.from_diffusers(sd.nine)
    scheduler = _ddim()
    for steps, strength, same in ((10, 0.6, True), (10, 1.0, True), (8, 0.6, False)):
        scheduler.set_timesteps(steps)
        kept = min(int(steps * strength), steps)
        theirs = scheduler.timesteps[steps - kept:].tolist()
        mine = ours.schedule.trajectory(steps, 1 - strength)[:-1]
        assert (mine == theirs) is same, (steps, strength, mine, theirs)


# -----------------------------------------------------------------------------
# the recipe's pieces


def test_a_widened_unet_starts_as_the_text_to_image_one():
    base = tiny_pipeline("v")
    ipipe = inpainting_pipeline(base)
    assert ipipe.denoiser.unet.config.in_channels == 9 and ipipe.denoiser.cond_dims["mask"] == 1
    image, mask = _source()
    before = base.generate(PROMPTS, steps=3, progress=False)
    assert err(ipipe.generate(PROMPTS, steps=3, progress=False, image=image, mask=mask), before) < 1e-5
    with torch.no_grad():  # the new input channels are read once trained
        ipipe.denoiser.unet.conv_in.weight[:, 4:].normal_(0, 0.1)
    assert err(ipipe.generate(PROMPTS, steps=3, progress=False, image=image, mask=mask), before) > 1e-3


# -----------------------------------------------------------------------------
# full size: the published count, and diffusers' UNet at the published config


def test_the_inpainting_unet_preset_has_the_published_count():
    from diffusers import UNet2DConditionModel

    ours = presets.build("sd15-inpaint-unet")
    assert presets.count_parameters(ours) == presets.PUBLISHED["sd15-inpaint-unet"] == 859_535_364
    config = dict(next(c for name, _, c in PUBLISHED_CONFIGS if name == "sd15-unet"), in_channels=9)
    with torch.device("meta"):
        theirs = UNet2DConditionModel(**config)
    assert presets.count_parameters(theirs) == 859_535_364
    assert tuple(ours.conv_in.weight.shape) == tuple(theirs.conv_in.weight.shape) == (320, 9, 3, 3)
    assert presets.count_parameters(presets.build("sd15-unet")) == 859_535_364 - 5 * 320 * 9


# -----------------------------------------------------------------------------
# checkpoints: a diffusers folder, an original single file, and back


def _same_images(pipe, sd, guidance=GUIDANCE, strength=1.0):
    theirs = _theirs(sd.nine, sd.image, sd.mask, guidance, strength, seed=3)
    mine = inpaint(pipe, sd.image, sd.mask, PROMPTS, strength=strength, steps=STEPS, guidance_scale=guidance, seed=3,
                   progress=False)
    return err((mine + 1) / 2, theirs)


def test_load_reads_an_inpainting_diffusers_folder(sd, posterior_mean):
    pipe = convert.load(sd.tmp / "nine")
    assert isinstance(pipe, TextToImage) and type(pipe.denoiser) is Inpainting
    assert type(pipe.conditioner) is InpaintConditioner and pipe.conditioner.vae is pipe.vae
    e = _same_images(pipe, sd)
    print(f"inpainting from a diffusers folder: max abs error {e:.2e}")
    assert e <= 1e-4


@pytest.mark.parametrize("config", ["nine", "base"], ids=["inpaint-configs", "text-to-image-configs"])
def test_load_reads_an_original_inpainting_single_file(sd, posterior_mean, config):
    """SD's inpainting file holds the UNet with a 9-channel input_blocks.0.0; its configs may be the inpainting
    folder's or SD's own (the published sd-v1-5-inpainting file is often loaded with SD 1.5's configs): the file's
    conv_in says how many channels the UNet reads."""
    from sdlearn.convert import files, original

    parts = {k: m.state_dict() for k, m in sd.nine.components.items() if k in ("unet", "vae", "text_encoder")}
    state = original.join(parts, "sd1")
    assert state["model.diffusion_model.input_blocks.0.0.weight"].shape[1] == 9
    single = sd.tmp / f"inpaint-{config}.safetensors"
    files.write(state, single)
    pipe = convert.load(single, config=sd.tmp / config)
    assert type(pipe.denoiser) is Inpainting and pipe.denoiser.unet.config.in_channels == 9
    e = _same_images(pipe, sd)
    print(f"inpainting from an original single file with the {config} folder's configs: max abs error {e:.2e}")
    assert e <= 1e-4


def test_save_writes_an_inpainting_folder_diffusers_reads(sd, posterior_mean, tmp_path):
    from diffusers import DiffusionPipeline

    ours = convert.from_diffusers(sd.nine)
    folder = convert.save(ours, tmp_path / "saved")
    theirs = DiffusionPipeline.from_pretrained(folder)
    theirs.set_progress_bar_config(disable=True)
    assert type(theirs).__name__ == "StableDiffusionInpaintPipeline" and theirs.unet.config.in_channels == 9
    mine = inpaint(ours, sd.image, sd.mask, PROMPTS, steps=STEPS, guidance_scale=GUIDANCE, seed=4, progress=False)
    check_images(mine, _theirs(theirs, sd.image, sd.mask, GUIDANCE, 1.0, seed=4), "saved by sdlearn", len(PROMPTS),
                 SIZE)
    assert torch.equal(inpaint(convert.load(folder), sd.image, sd.mask, PROMPTS, steps=STEPS,
                               guidance_scale=GUIDANCE, seed=4, progress=False), mine)
    # a text-to-image pipeline is still written as one
    plain = convert.save(convert.from_diffusers(sd.base), tmp_path / "plain")
    assert type(DiffusionPipeline.from_pretrained(plain)).__name__ == "StableDiffusionPipeline"


# -----------------------------------------------------------------------------
# the command line


def _png(tensor01: torch.Tensor, path, mode=None):
    """[C,H,W] in [0, 1] -> a PNG file (C = 1: grey-level, 3: RGB)."""
    from PIL import Image

    data = (tensor01 * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    Image.fromarray(data[..., 0] if data.shape[-1] == 1 else data, mode).save(path)
    return str(path)


def _read_png(path) -> torch.Tensor:
    from PIL import Image

    return torch.tensor(np.asarray(Image.open(path)), dtype=torch.float32).permute(2, 0, 1) / 255


@pytest.fixture(scope="module")
def files(sd, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli")
    image, mask = sd.image[0], sd.mask[0]
    rgb_mask = mask.expand(3, -1, -1).clone()
    rgb_mask[1:] = 1 - rgb_mask[1:]                      # the first channel is the mask; the others are not
    (tmp / "notes.txt").write_text("not an image")
    return SimpleNamespace(tmp=tmp, image=_png((image + 1) / 2, tmp / "src.png"), mask=_png(mask, tmp / "mask.png"),
                           rgb_mask=_png(rgb_mask, tmp / "rgb_mask.png"),
                           small=_png(mask[:, :8, :8], tmp / "small.png"), text=str(tmp / "notes.txt"))


def _args(folder, out, *more):
    return ["generate", *PROMPTS, "--checkpoint", str(folder), "--steps", "3", "--n", "1", "--seed", "2",
            "--guidance", str(GUIDANCE), "--out", str(out), *more]


def _grid_row(out, i):
    """Image i of a one-column grid (padding 2)."""
    grid = _read_png(out)
    top = 2 + i * (SIZE + 2)
    return grid[:3, top:top + SIZE, 2:2 + SIZE]


def test_the_command_line_inpaints_with_an_inpainting_checkpoint(sd, files, tmp_path, capsys):
    from sdlearn.__main__ import main, read_image, read_mask

    out = tmp_path / "out.png"
    image, mask = read_image(files.image, "--image"), read_mask(files.mask)
    assert image.shape == (1, 3, SIZE, SIZE) and -1 <= image.min() and image.max() <= 1
    assert err(image, sd.image) <= 1 / 255 + 1e-6 and torch.equal(mask, sd.mask)
    assert torch.equal(read_mask(files.rgb_mask), mask)   # an RGB mask: its first channel
    pipe = convert.load(sd.tmp / "nine")
    for strength in ("1", "0.6"):
        assert main(_args(sd.tmp / "nine", out, "--image", files.image, "--mask", files.rgb_mask, "--strength",
                          strength)) == 0
        want = (inpaint(pipe, image, mask, PROMPTS, strength=float(strength), steps=3, guidance_scale=GUIDANCE,
                        seed=2, progress=False) + 1) / 2
        for i in range(len(PROMPTS)):
            assert (_grid_row(out, i) - want[i]).abs().max() <= 1 / 255 + 1e-6     # PNG's 8 bits
    with pytest.raises(SystemExit):  # an inpainting model reads the mask itself
        main(_args(sd.tmp / "nine", out, "--image", files.image, "--mask", files.mask, "--blend"))
    assert "--blend is for a plain text-to-image model" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # an inpainting model without a mask
        main(_args(sd.tmp / "nine", out))
    assert "this pipeline inpaints: pass image=" in capsys.readouterr().err


def test_the_command_line_blends_with_a_plain_checkpoint_only_when_asked(sd, files, tmp_path, capsys):
    from sdlearn.__main__ import main, read_image, read_mask

    out = tmp_path / "out.png"
    with pytest.raises(SystemExit):
        main(_args(sd.tmp / "base", out, "--image", files.image, "--mask", files.mask))
    message = capsys.readouterr().err
    assert "plain text-to-image model" in message and "add --blend" in message, message
    assert main(_args(sd.tmp / "base", out, "--image", files.image, "--mask", files.mask, "--blend")) == 0
    want = (blended(convert.load(sd.tmp / "base"), read_image(files.image, "--image"), read_mask(files.mask),
                    PROMPTS, steps=3, guidance_scale=GUIDANCE, seed=2, progress=False) + 1) / 2
    for i in range(len(PROMPTS)):
        assert (_grid_row(out, i) - want[i]).abs().max() <= 1 / 255 + 1e-6


@pytest.mark.parametrize("more, words", [
    (["--mask", "{mask}"], "--mask marks the region of a source image to repaint: give the image with --image"),
    (["--image", "{image}"], "give the region to repaint with --mask"),
    (["--image", "{image}", "--mask", "{small}"], r"--mask .*small.png is 8x8 but --image .*src.png is 16x16"),
    (["--image", "{text}", "--mask", "{mask}"], r"--image .*notes.txt: not an image file"),
    (["--image", "{image}", "--mask", "{text}"], r"--mask .*notes.txt: not an image file"),
    (["--image-prompt", "{text}"], r"--image-prompt .*notes.txt: not an image file"),
    (["--image", "{image}", "--mask", "{mask}", "--strength", "0"], r"--strength must be in \(0, 1\]"),
    (["--blend"], "--blend repaints the --mask region"),
    (["--strength", "0.5"], "--strength 0.5: how much of the trajectory repaints the --mask region"),
    (["--image-prompt", "{image}"], "does not read an image prompt"),
])
def test_the_command_line_says_what_is_wrong_with_the_images(sd, files, tmp_path, capsys, more, words):
    import re

    from sdlearn.__main__ import main

    paths = {"mask": files.mask, "image": files.image, "small": files.small, "text": files.text}
    with pytest.raises(SystemExit):
        main(_args(sd.tmp / "nine", tmp_path / "out.png", *(m.format(**paths) for m in more)))
    message = capsys.readouterr().err
    assert re.search(words, message), message


class _TinyImageEncoder(nn.Module):
    """A stand-in image encoder for the image-prompt adapter: images [N,3,16,16] -> [N,8]."""

    def __init__(self):
        super().__init__()
        self.config = SimpleNamespace(embed_dim=8, image_size=SIZE)
        self.proj = nn.Linear(3 * 4 * 4, 8)

    def forward(self, images):
        return self.proj(torch.nn.functional.avg_pool2d(images, 4).flatten(1))


def test_the_command_line_reads_an_image_prompt(sd, files, tmp_path, monkeypatch):
    from sdlearn import adapters, pretrained
    from sdlearn.__main__ import main, read_image

    torch.manual_seed(0)
    base = tiny_pipeline("v")
    ipipe = adapters.attach(base, adapters.IPAdapter.from_unet(base.denoiser, embed_dim=8),
                            _TinyImageEncoder().eval())
    monkeypatch.setattr(pretrained, "load", lambda name, size: ipipe)
    out = tmp_path / "out.png"
    args = ["generate", *PROMPTS, "--model", "shapes-t2i", "--steps", "3", "--n", "1", "--scale", "1", "--out",
            str(out), "--image-prompt", files.image]
    drawn = []
    for scale in ("0.6", "0"):
        assert main([*args, "--image-scale", scale]) == 0
        drawn.append(torch.stack([_grid_row(out, i) for i in range(len(PROMPTS))]))
    want = (ipipe.generate(PROMPTS, 3, 3.0, 0, progress=False, image_prompt=read_image(files.image, "--image"),
                           image_scale=0.6) + 1) / 2
    assert (drawn[0] - want).abs().max() <= 1 / 255 + 1e-6
    assert (drawn[0] - drawn[1]).abs().max() > 2 / 255, "the image prompt is read"


# -----------------------------------------------------------------------------
# bad input


@pytest.fixture(scope="module")
def tiny():
    base = tiny_pipeline("v")
    return SimpleNamespace(base=base, ipipe=inpainting_pipeline(base))


def test_a_mask_of_another_size_is_a_clear_error(tiny):
    image, mask = _source()
    for draw, pipe in ((inpaint, tiny.ipipe), (blended, tiny.base)):
        with pytest.raises(ValueError, match="mask is 8x8 but the image is 16x16: give a mask of the image's size"):
            draw(pipe, image, mask[..., :8, :8], PROMPTS, steps=1, progress=False)
    with pytest.raises(ValueError, match="mask is 8x8 but the image is 16x16"):
        tiny.ipipe.generate(PROMPTS, steps=1, progress=False, image=image, mask=mask[..., :8, :8])


def test_a_mask_that_is_not_one_channel_in_0_1_is_a_clear_error(tiny):
    image, mask = _source()
    with pytest.raises(ValueError, match=r"single-channel.*got shape \(1, 3, 16, 16\) \(an RGB image\? take one"):
        inpaint(tiny.ipipe, image, mask.expand(1, 3, -1, -1), PROMPTS, steps=1, progress=False)
    with pytest.raises(ValueError, match=r"single-channel.*got shape \(1, 2, 16, 16\)$"):
        blended(tiny.base, image, mask.expand(1, 2, -1, -1), PROMPTS, steps=1, progress=False)
    nan = mask * float("nan")
    for bad, got in ((mask * 255, r"\[0, 255\]"), (mask - 0.5, r"\[-0.5, 0.5\]"), (nan, r"\[nan, nan\]")):
        with pytest.raises(ValueError, match=r"mask values should be in \[0, 1\] .*got " + got):
            inpaint(tiny.ipipe, image, bad, PROMPTS, steps=1, progress=False)
    with pytest.raises(ValueError, match="mask should be a tensor .* got ndarray"):
        check_mask(mask.numpy())
    assert check_mask(mask[0, 0]).shape == check_mask(mask[0]).shape == (1, 1, SIZE, SIZE)   # [H,W], [N,H,W]
    with pytest.raises(ValueError, match="mask has 3 rows for 2 prompts"):
        inpaint(tiny.ipipe, image, mask.expand(3, -1, -1, -1), PROMPTS, steps=1, progress=False)


def test_an_empty_mask_warns_and_returns_the_source(tiny):
    image, mask = _source()
    for draw, pipe in ((inpaint, tiny.ipipe), (blended, tiny.base)):
        with pytest.warns(UserWarning, match=r"the mask marks no pixel to repaint .* for 2 of 2 images"):
            out = draw(pipe, image, torch.zeros_like(mask), PROMPTS, steps=2, progress=False)
        assert torch.equal(out, image.expand(2, -1, -1, -1))
    # one empty mask of two: that image comes back as the source, the other is repainted
    masks = torch.cat([mask, torch.zeros_like(mask)])
    with pytest.warns(UserWarning, match="for 1 of 2 images"):
        out = blended(tiny.base, image, masks, PROMPTS, steps=2, progress=False)
    assert torch.equal(out[1], image[0]) and err(out[0], image[0]) > 1e-2


def test_a_wrong_image_is_a_clear_error(tiny):
    image, mask = _source()
    for draw, pipe in ((inpaint, tiny.ipipe), (blended, tiny.base)):
        with pytest.raises(ValueError, match=r"image should be \[N,3,16,16\] .*got \(1, 1, 16, 16\)"):
            draw(pipe, image[:, :1], mask, PROMPTS, steps=1, progress=False)
        with pytest.raises(ValueError, match=r"image should be \[N,3,16,16\] .*got \(1, 3, 32, 32\)"):
            draw(pipe, torch.zeros(1, 3, 32, 32), torch.zeros(1, 1, 32, 32), PROMPTS, steps=1, progress=False)
        with pytest.raises(ValueError, match=r"image should be float in \[-1, 1\], got torch.float32 in \[33.3, 226\]"):
            draw(pipe, (image + 1) * 127.5, mask, PROMPTS, steps=1, progress=False)
        with pytest.raises(ValueError, match=r"image should be \[N,3,16,16\] .*got ndarray"):
            draw(pipe, image.numpy(), mask, PROMPTS, steps=1, progress=False)


def test_a_plain_pipeline_or_unet_is_a_clear_error_where_an_inpainting_one_is_needed(tiny):
    image, mask = _source()
    with pytest.raises(ValueError, match="does not read a mask: inpaint needs an inpainting pipeline"):
        inpaint(tiny.base, image, mask, PROMPTS, steps=1, progress=False)
    with pytest.raises(ValueError, match=r"reads 2 x 4 \+ 1 = 9 channels .* this one 4: widen_conv_in"):
        Inpainting(tiny.base.denoiser)
    with pytest.raises(ValueError, match="this pipeline inpaints: pass image="):
        tiny.ipipe.generate(PROMPTS, steps=1, progress=False)
    unet9 = widen_conv_in(tiny.base.denoiser)
    with pytest.raises(ValueError, match=r"Inpainting: mask should be \[B,1,h,w\] = \[2, 1, 8, 8\]"):
        Inpainting(unet9)(torch.zeros(2, 4, 8, 8), torch.tensor([1, 1]), torch.zeros(2, 1, 4, 4),
                          torch.zeros(2, 4, 8, 8), context=torch.zeros(2, 3, 16))
