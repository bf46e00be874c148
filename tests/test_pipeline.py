"""sdlearn.pipeline: the denoising loop, seeding, img2img, bad input, the release and the command line."""
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from sdlearn import pretrained
from sdlearn.diffusion import NoiseSchedule, guided, sample
from sdlearn.checks.pipeline import tiny_pipeline
from sdlearn.pipeline import TextToImage, shapes_unet_config, training_loss
from sdlearn.text import TextConfig, TextEncoder, Tokenizer
from sdlearn.unet import UNet


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


@pytest.mark.parametrize("prediction", ["eps", "v"])
@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_denoising_loop_matches_diffusion_sample_with_guidance(prediction, sampler):
    pipe = tiny_pipe(prediction)
    z = pipe.noise(2, seed=3)
    context, uncond = pipe.encode_prompts(PROMPTS[:2]), pipe.encode_prompts([""])
    ts = pipe.schedule.timesteps(5).tolist()
    ours = pipe.denoise(z, context, ts, 3.0, sampler, seed=7, progress=False)
    ref = sample(guided(pipe.unet, context, uncond, 3.0), z, pipe.schedule, 5, sampler=sampler,
                 prediction=prediction, generator=torch.Generator().manual_seed(7), progress=False)
    assert torch.allclose(ours, ref, atol=1e-5)


def test_guidance_one_is_the_conditional_model_and_zero_the_unconditional():
    pipe = tiny_pipe()
    z, ts = pipe.noise(2, 0), [500]
    cond, uncond = pipe.encode_prompts(PROMPTS[:2]), pipe.encode_prompts(["", ""])
    captured = []
    pipe.denoise(z, cond, ts, 1.0, callback=captured.append, progress=False)
    pipe.denoise(z, cond, ts, 0.0, callback=captured.append, progress=False)
    t = torch.full((2,), 500)
    for got, ctx in zip(captured, (cond, uncond)):
        assert torch.allclose(got["z0"], pipe.schedule.to_x0("eps", pipe.unet(z, t, ctx), z, 500), atol=1e-5)


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
    (lambda p: p.generate(["a red circle"], sampler="euler"), "unknown sampler 'euler'"),
    (lambda p: p.img2img(torch.zeros(1, 3, 16, 16), ["a red circle"], strength=1.5), r"strength must be in \[0, 1\]"),
    (lambda p: p.img2img(torch.zeros(1, 3, 8, 8), ["a red circle"]), r"expected images \[N, 3, 16, 16\]"),
    (lambda p: p.img2img(torch.zeros(2, 3, 16, 16), ["a red circle"]), "2 images but 1 prompts"),
])
def test_bad_input_is_a_clear_error(call, match):
    with pytest.raises(ValueError, match=match):
        call(tiny_pipe())


def test_mismatched_parts_are_refused():
    pipe = tiny_pipe()
    with pytest.raises(ValueError, match="cross-attends to 16-wide text states but the text encoder makes 32"):
        TextToImage(pipe.vae, TextEncoder(TextConfig(width=32, layers=1, heads=2)), pipe.tokenizer, pipe.unet,
                    pipe.schedule)


def test_training_loss_targets_and_caption_dropout():
    pipe = tiny_pipe()
    sched = pipe.schedule
    z0, ctx, uncond = torch.randn(256, 4, 8, 8), torch.randn(256, 5, 16), torch.zeros(1, 5, 16)
    seen = []

    def oracle(z_t, t, context):  # knows z0, so it can return the exact noise
        seen.append(context)
        abar = sched.alphas_cumprod[t].view(-1, 1, 1, 1)
        return (z_t - abar.sqrt() * z0) / (1 - abar).sqrt()

    assert training_loss(oracle, sched, z0, ctx, uncond, p_uncond=0.1) < 1e-8
    dropped = (seen[0] == 0).flatten(1).all(1).float().mean()
    assert 0.03 < dropped < 0.2
    assert training_loss(lambda z, t, c: torch.zeros_like(z), sched, z0, ctx, uncond) == pytest.approx(1.0, abs=0.05)
    training_loss(oracle, sched, z0, ctx, uncond, p_uncond=1.0)
    assert (seen[-1] == 0).all()


def test_release_round_trip_and_changed_parts_are_refused(tmp_path):
    if not {"shapes-vae-32", "shapes-clip-32"} <= set(pretrained.available()):
        pytest.skip("needs the released shapes-vae-32 and shapes-clip-32")
    vae, text = pretrained.load("shapes-vae", 32), pretrained.load("shapes-clip", 32)
    unet = UNet(shapes_unet_config(4, text.config.width, width=16))
    pipe = TextToImage(vae, text, Tokenizer.for_encoder(text), unet, NoiseSchedule("cosine"), "v", 32)
    meta = pipe.release_metadata("shapes-vae-32", "shapes-clip-32")
    dest = tmp_path / "t2i.safetensors"
    pretrained.save_file_atomic(unet.state_dict(), dest, meta)
    back = TextToImage.from_release(load_file(dest), meta, str(dest))
    assert back.prediction == "v" and back.schedule.kind == "cosine" and back.image_size == 32
    assert torch.equal(back.generate(PROMPTS[:1], steps=2, progress=False),
                       pipe.generate(PROMPTS[:1], steps=2, progress=False))
    with pytest.raises(ValueError, match="trained on another shapes-vae-32"):
        TextToImage.from_release(load_file(dest), {**meta, "vae_sha256": "0" * 64}, str(dest))
    bad = {k: v for k, v in load_file(dest).items()}
    bad["conv_in.weight"] = bad["conv_in.weight"][:8]
    with pytest.raises(ValueError, match="parameter 'conv_in.weight' has shape"):
        TextToImage.from_release(bad, meta, str(dest))


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


def test_cli_bad_input_says_what_is_wrong(tmp_path):
    released_t2i()
    r = run_cli("generate", "a red blob", "--out", str(tmp_path / "x.png"))
    assert r.returncode == 2 and "unknown word 'blob'" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("train", "unet")
    assert r.returncode == 2 and "must be one of t2i, vae, clip" in r.stderr


def test_cli_train_t2i_runs_and_writes_a_release(tmp_path):
    if not {"shapes-vae-32", "shapes-clip-32"} <= set(pretrained.available()):
        pytest.skip("needs the released shapes-vae-32 and shapes-clip-32")
    out = tmp_path / "t2i.safetensors"
    r = run_cli("train", "t2i", "--steps", "3", "--pool", "32", "--width", "16", "--eval", "4", "--threads", "1",
                "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert "1 object" in r.stdout or "2 objects" in r.stdout
    state, meta = pretrained.load_file_checked(out)
    assert meta["command"].startswith("python -m sdlearn.pipeline train --steps 3")
    assert TextToImage.from_release(state, meta, str(out)).generate(["a red circle"], steps=1, progress=False).shape \
        == (1, 3, 32, 32)
