"""sdlearn.pipeline: parts, seeding, new schedules, hand-over, img2img, bad input, the release and `generate`."""
import json
import subprocess
import sys
import time

import pytest
import torch

from sdlearn import pretrained
from sdlearn.__main__ import main as cli
from sdlearn.checks.pipeline import tiny_pipeline
from sdlearn.diffusion import NoiseSchedule, register
from sdlearn.pipeline import TextConditioner, TextToImage, training_loss
from sdlearn.recipes.t2i import unet_config
from sdlearn.text import TextConfig, TextEncoder
from sdlearn.unet import UNet
from sdlearn.vae import AutoencoderKL, VAEConfig

tiny_pipe = tiny_pipeline


PROMPTS = ["a red circle on the left", "a blue square at the top", ""]


def test_generate_shape_range_and_seeding():
    pipe = tiny_pipe()
    a = pipe.generate(PROMPTS, steps=4, progress=False)
    assert a.shape == (3, 3, 16, 16) and a.min() >= -1 and a.max() <= 1 and not a.requires_grad
    assert torch.equal(a, pipe.generate(PROMPTS, steps=4, progress=False))          # same seed, same images
    assert not torch.equal(a, pipe.generate(PROMPTS, steps=4, seed=1, progress=False))
    # image i uses seed + i, whatever the batching
    assert torch.allclose(a[1:], pipe.generate(PROMPTS[1:], steps=4, seed=1, progress=False), atol=1e-5)
    assert torch.allclose(a, pipe.generate(PROMPTS, steps=4, batch_size=1, progress=False), atol=1e-5)
    # the prompt matters
    b = pipe.generate(["a green cross on the right"] * 3, steps=4, progress=False)
    assert (a - b).abs().amax() > 1e-3


class LineSchedule:
    """A toy schedule the pipeline has never seen: x_s = (1 - s) x0 + s eps on s in [0, 1], the model reads
    s * 1000 and predicts x0, and its one sampler steps along the line to the next s (rectified flow's Euler step,
    written for an x0-predicting model). It plugs into the pipeline with no change to it or to the loop."""

    def __init__(self, num_steps: int = 1000):
        self.num_steps = num_steps

    def init_args(self):
        return {"num_steps": self.num_steps}

    @staticmethod
    def parse_prediction(kind):
        if kind != "x0":
            raise ValueError(f"a LineSchedule's model predicts x0, got {kind!r}")
        return kind

    def trajectory(self, steps, start=0.0, end=1.0):
        s = torch.linspace(1, 0, steps + 1).tolist()
        keep = [i for i in range(steps) if start <= 1 - s[i] < end]
        return [s[i] for i in keep] + [s[keep[-1] + 1]] if keep else []

    def model_timesteps(self, s, x):
        return torch.full((x.shape[0],), s * self.num_steps, device=x.device)

    def add_noise(self, x0, noise, s):
        s = s.view(-1, *[1] * (x0.ndim - 1)).to(x0.dtype)
        return (1 - s) * x0 + s * noise

    def to_x0(self, prediction, out, x, s):
        return out



@register("line", LineSchedule)
def line_step(schedule, out, x, s, s_next, prediction="x0", noise=None, generator=None, clip_x0=None, state=None):
    eps = (x - (1 - s) * out) / s  # the noise this x0 implies
    return (1 - s_next) * out + s_next * eps


def test_a_new_schedule_and_sampler_plug_into_the_pipeline_unchanged():
    base = tiny_pipe("x0")
    pipe = TextToImage(base.conditioner, base.denoiser, LineSchedule(), base.vae, "x0", 16)
    images = pipe.generate(PROMPTS[:2], steps=4, guidance_scale=2.0, seed=3, progress=False)
    # the same, written out by hand
    z, s = pipe.noise(2, 3), [1.0, 0.75, 0.5, 0.25, 0.0]
    cond, uncond = pipe.encode_prompts(PROMPTS[:2])["context"], pipe.encode_prompts([""])["context"].expand(2, -1, -1)
    for a, b in zip(s[:-1], s[1:]):
        t = torch.full((2,), a * 1000)
        out_u, out_c = pipe.denoiser(z, t, uncond), pipe.denoiser(z, t, cond)
        x0 = out_u + 2.0 * (out_c - out_u)
        z = (1 - b) * x0 + b * (z - (1 - a) * x0) / a
    assert torch.allclose(images, pipe.decode(z), atol=1e-5)
    # img2img and stopping part-way use the same schedule methods
    assert pipe.img2img(images, PROMPTS[:2], strength=0.5, steps=4, progress=False).shape == images.shape
    assert pipe.generate(PROMPTS[:1], steps=4, end=0.5, output="latent", progress=False).shape == (1, 4, 8, 8)


def test_stopping_part_way_and_continuing_gives_the_same_images():
    """SDXL's ensemble of experts: one pipeline stops at a fraction of the trajectory and hands over latents,
    another continues from there. With the same model on both sides it is one uninterrupted run."""
    pipe = tiny_pipe("v")
    whole = pipe.generate(PROMPTS[:2], steps=10, seed=4, progress=False)
    latents = pipe.generate(PROMPTS[:2], steps=10, seed=4, end=0.8, output="latent", progress=False)
    rest = pipe.generate(PROMPTS[:2], steps=10, seed=4, start=0.8, latents=latents, progress=False)
    assert torch.allclose(rest, whole, atol=1e-6)
    with pytest.raises(ValueError, match=r"latents must be \[N, C, h, w\] = \[2, 4, 8, 8\], got \(2, 4, 4, 4\)"):
        pipe.generate(PROMPTS[:2], start=0.8, latents=torch.zeros(2, 4, 4, 4), progress=False)


def test_a_list_of_points_runs_as_the_grid_that_lists_them():
    """generate(prompts, steps=[...]): explicit timesteps, or noise levels (Levels, `schedule.level(sigma)`), as
    diffusers' pipelines take timesteps= / sigmas=: the run whose grid lists those points."""
    pipe = tiny_pipe("v")
    for sampler, karras in (("ddim", False), ("euler", True)):  # a grid of ints; one of Levels
        pipe.schedule = pipe.schedule.replace(sampler=sampler, karras=karras)
        points = pipe.schedule.grid(5)
        assert torch.equal(pipe.generate(PROMPTS[:2], steps=points, seed=4, progress=False),
                           pipe.generate(PROMPTS[:2], steps=5, seed=4, progress=False))
    with pytest.raises(ValueError, match="strictly decreasing in sigma"):
        pipe.generate(PROMPTS[:1], steps=points[::-1], progress=False)


def test_guidance_one_is_the_conditional_model_and_zero_the_unconditional():
    pipe = tiny_pipe()
    z = pipe.noise(2, 0)
    cond, uncond = pipe.encode_prompts(PROMPTS[:2]), pipe.encode_prompts(["", ""])
    captured = []
    pipe.denoise(z, cond, 2, 1.0, callback=captured.append, progress=False)
    pipe.denoise(z, cond, 2, 0.0, callback=captured.append, progress=False)
    first = [c for c in captured if c["i"] == 0]
    t = first[0]["t"]
    for got, c in zip(first, (cond, uncond)):
        expected = pipe.schedule.to_x0("eps", pipe.denoiser(z, torch.full((2,), t), **c), z, t)
        assert torch.allclose(got["denoised"], expected, atol=1e-5)


def test_img2img():
    pipe = tiny_pipe()
    x = pipe.generate(PROMPTS[:2], steps=3, progress=False)
    same = pipe.img2img(x, PROMPTS[:2], strength=0.0, steps=10, progress=False)
    assert torch.allclose(same, pipe.decode(pipe.vae.to_latent(x, sample=False)), atol=1e-6)
    light, heavy = (pipe.img2img(x, PROMPTS[:2], strength=s, steps=10, progress=False) for s in (0.2, 1.0))
    assert light.shape == x.shape
    assert (light - same).abs().mean() < (heavy - same).abs().mean()


@pytest.mark.parametrize("call, match", [
    (lambda p: p.generate([]), "non-empty list of prompts"),
    (lambda p: p.generate(["a red blob"]), "unknown word 'blob'"),
    (lambda p: p.generate(["a red circle"], steps=0), "steps must be an int >= 1"),
    (lambda p: p.generate(["a red circle"], guidance_scale=-1.0), "guidance_scale must be a number >= 0"),
    (lambda p: p.generate(["a red circle"], sampler="heun"),
     r"unknown sampler 'heun' for a NoiseSchedule, expected one of \('ddim', 'ddpm'"),
    (lambda p: p.generate(["a red circle"], sampler_options={"etta": 0.5}), "the 'ddim' sampler has no option 'etta'"),
    (lambda p: p.generate(["a red circle", "a red square"], control=torch.zeros(3, 3, 16, 16)),
     r"condition 'control' must have one row per prompt \(2\) or one for all, got shape \(3, 3, 16, 16\)"),
    (lambda p: p.img2img(torch.zeros(1, 3, 16, 16), ["a red circle"], strength=1.5), r"strength must be in \[0, 1\]"),
    (lambda p: p.img2img(torch.zeros(1, 3, 8, 8), ["a red circle"]), r"expected images \[N, 3, 16, 16\]"),
    (lambda p: p.img2img(torch.zeros(2, 3, 16, 16), ["a red circle"]), "2 images but 1 prompts"),
])
def test_bad_input_is_a_clear_error(call, match):
    with pytest.raises(ValueError, match=match):
        call(tiny_pipe())


def test_mismatched_parts_are_refused():
    pipe = tiny_pipe()
    with pytest.raises(ValueError, match=r"the UNet reads conditions of widths \{'context': 16\} but the conditioner "
                                         r"makes \{'context': 32\}"):
        TextToImage(TextConditioner(TextEncoder(TextConfig(width=32, layers=1, heads=2))), pipe.denoiser,
                    pipe.schedule, pipe.vae)
    with pytest.raises(ValueError, match="the UNet works on 4 latent channels but the VAE's latents have 16"):
        TextToImage(pipe.conditioner, pipe.denoiser, pipe.schedule, AutoencoderKL(VAEConfig(
            channels=(8, 8), layers_per_block=1, norm_groups=4, latent_channels=16)))


def test_training_loss_targets_and_caption_dropout():
    pipe = tiny_pipe()
    sched = pipe.schedule
    z0, ctx, uncond = torch.randn(256, 4, 8, 8), torch.randn(256, 5, 16), torch.zeros(1, 5, 16)
    ids = torch.randn(256, 6)
    seen = []

    def oracle(z_t, t, context, time_ids):  # knows z0, so it can return the exact noise
        seen.append((context, time_ids))
        abar = sched.alphas_cumprod[t].view(-1, 1, 1, 1)
        return (z_t - abar.sqrt() * z0) / (1 - abar).sqrt()

    cond = {"context": ctx, "time_ids": ids}
    assert training_loss(oracle, sched, z0, cond, {"context": uncond}, p_uncond=0.1) < 1e-8
    dropped = (seen[0][0] == 0).flatten(1).all(1).float().mean()
    assert 0.03 < dropped < 0.2
    assert torch.equal(seen[0][1], ids)  # an entry without an unconditional twin is never dropped
    zero = training_loss(lambda z, t, **c: torch.zeros_like(z), sched, z0, cond, {"context": uncond})
    assert zero == pytest.approx(1.0, abs=0.05)
    training_loss(oracle, sched, z0, cond, {"context": uncond}, p_uncond=1.0)
    assert (seen[-1][0] == 0).all()


def test_release_round_trip_and_changed_parts_are_refused(tmp_path):
    if not {"shapes-vae-32", "shapes-clip-32"} <= set(pretrained.available()):
        pytest.skip("needs the released shapes-vae-32 and shapes-clip-32")
    vae, text = pretrained.load("shapes-vae", 32), pretrained.load("shapes-clip", 32)
    unet = UNet(unet_config(4, text.config.width, width=16))
    pipe = TextToImage(TextConditioner(text), unet, NoiseSchedule("cosine"), vae, "v", 32)
    dest = tmp_path / "t2i.safetensors"
    released = {"vae": "shapes-vae-32", "conditioner.text_encoder": "shapes-clip-32"}
    pretrained.save(pipe, "t2i", 32, "a command", dest, released=released)
    state, meta = pretrained.load_file_checked(dest)
    assert set(state) == {f"denoiser.{k}" for k in unet.state_dict()}  # the frozen parts are references
    back = pretrained.load_path(dest)
    assert back.prediction == "v" and back.schedule.kind == "cosine" and back.image_size == 32
    assert torch.equal(back.generate(PROMPTS[:1], steps=2, progress=False),
                       pipe.generate(PROMPTS[:1], steps=2, progress=False))
    parts = json.loads(meta["parts"])
    parts["vae"]["sha256"] = "0" * 64
    pretrained.save_file_atomic(state, dest, {**meta, "parts": json.dumps(parts)})
    with pytest.raises(ValueError, match="trained on another shapes-vae-32"):
        pretrained.load_path(dest)
    state["denoiser.conv_in.weight"] = state["denoiser.conv_in.weight"][:8]
    pretrained.save_file_atomic(state, dest, meta)
    with pytest.raises(ValueError, match="parameter 'conv_in.weight' has shape"):
        pretrained.load_path(dest)


def released_t2i():
    if "shapes-t2i-32" not in pretrained.available():
        pytest.skip("no shapes-t2i-32 release")
    return pretrained.load("shapes-t2i", 32)


def test_released_model_follows_single_object_prompts():
    from sdlearn.metrics import prompt_adherence

    pipe = released_t2i()
    assert isinstance(pipe, TextToImage) and not pipe.training
    prompts = ["a red circle on the left", "a yellow triangle at the top", "a green square on the right",
               "a cyan cross at the bottom", "a blue square in the center", "a magenta triangle on the left",
               "a red cross on the right", "a yellow circle at the top"]
    images = pipe.generate(prompts, steps=25, progress=False)
    assert prompt_adherence(images, prompts)["exact"] >= 0.75


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "sdlearn", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=300)


def test_cli_generate_writes_a_grid(tmp_path):
    released_t2i()
    out = tmp_path / "grid.png"
    r = run_cli("generate", "a red circle on the left", "a blue square at the top", "--n", "3", "--steps", "5",
                "--scale", "2", "--out", str(out))
    assert r.returncode == 0, r.stderr
    from PIL import Image

    assert Image.open(out).size == (3 * 64 + 4 * 2, 2 * 64 + 3 * 2)  # 3 columns x 2 rows of 64 px, 2 px padding


@pytest.mark.parametrize("args, message", [
    (["a red blob"], "unknown word 'blob'"),
    (["a red circle", "--model", "shapes-vae"], "is a AutoencoderKL, not a text-to-image pipeline"),
    (["a red circle", "--model", "shapes-nothing"], "no released model 'shapes-nothing'"),
    ([""], "a prompt is empty: describe the image with the words the model knows"),
    (["a red circle", "   "], "a prompt is empty"),
    (["a red circle", "--guidance", "-1"], "--guidance must be >= 0 (1: no guidance; 3: the course's), got -1.0"),
    (["a red circle", "--steps", "0"], "--steps must be >= 1, got 0"),
])
def test_cli_bad_input_says_what_is_wrong(args, message, tmp_path, capsys):
    """A one-line error and exit status 2, no traceback (argparse's error; the subprocess test above runs the
    real command line)."""
    released_t2i()
    with pytest.raises(SystemExit) as e:
        cli(["generate", *args, "--out", str(tmp_path / "x.png")])
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_cli_checks_the_output_path_before_generating(tmp_path, capsys):
    released_t2i()
    for out, message in ((tmp_path / "missing" / "x.png", "does not exist"), (tmp_path / "x.jpg", "ending in .png")):
        start = time.perf_counter()
        with pytest.raises(SystemExit) as e:
            cli(["generate", "a red circle", "--out", str(out)])
        assert e.value.code == 2 and message in capsys.readouterr().err
        assert time.perf_counter() - start < 2   # refused before loading the model and sampling


def test_cli_generates_with_the_sdxl_base_and_refiner(tmp_path, capsys):
    if not {"shapes-sdxl-base-32", "shapes-sdxl-refiner-32"} <= set(pretrained.available()):
        pytest.skip("needs the released shapes-sdxl-base-32 and shapes-sdxl-refiner-32")
    out = tmp_path / "sdxl.png"
    assert cli(["generate", "a red circle on the left", "--model", "shapes-sdxl", "--refiner", "--n", "2",
                "--steps", "5", "--scale", "1", "--out", str(out)]) == 0
    from PIL import Image

    assert Image.open(out).size == (2 * 32 + 3 * 2, 32 + 2 * 2) and "wrote" in capsys.readouterr().out


def test_cli_generates_with_the_mmdit_on_its_flow_schedule(tmp_path, capsys):
    if "shapes-mmdit-32" not in pretrained.available():
        pytest.skip("needs the released shapes-mmdit-32")
    out = tmp_path / "mmdit.png"
    assert cli(["generate", "a red circle on the left", "--model", "shapes-mmdit", "--n", "2", "--steps", "5",
                "--scale", "1", "--out", str(out)]) == 0
    from PIL import Image

    assert Image.open(out).size == (2 * 32 + 3 * 2, 32 + 2 * 2) and "wrote" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:   # the flow schedule's sampler is euler; ddim is a NoiseSchedule's
        cli(["generate", "a red circle", "--model", "shapes-mmdit", "--sampler", "ddim", "--out", str(out)])
    assert e.value.code == 2 and "euler" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["shapes-t2i", "shapes-sdxl-base", "shapes-mmdit"])
def test_a_half_precision_pipeline_samples_in_float32_and_draws_the_same_images(name):
    """Real checkpoints run in fp16 / bf16 on a GPU: the denoiser and the VAE read their own dtype, the sampling
    loop stays in float32. bf16 here (CPU): the images are those of float32 within bf16's precision."""
    if f"{name}-32" not in pretrained.available():
        pytest.skip(f"no {name}-32 release")
    pipe = pretrained.load(name, 32)
    prompts = ["a red circle on the left", "a blue square at the top"]
    full = pipe.generate(prompts, steps=6, progress=False)
    half = pipe.to(torch.bfloat16)
    images = half.generate(prompts, steps=6, progress=False)
    edits = half.img2img(images, prompts[::-1], strength=0.5, steps=6, progress=False)
    assert images.dtype == edits.dtype == torch.float32 and next(half.denoiser.parameters()).dtype == torch.bfloat16
    diff = (images - full).abs()
    print(f"{name}: bf16 vs fp32, mean |diff| {diff.mean():.4f}, max {diff.max():.4f}")
    assert diff.mean() < 0.02 and diff.max() < 0.2
