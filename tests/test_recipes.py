"""sdlearn.recipes: the released models' recipes, their command lines, resuming, and the releases themselves."""
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from sdlearn import pretrained
from sdlearn.__main__ import main as cli
from sdlearn.pipeline import TextToImage
from sdlearn.recipes import RECIPES, clip, t2i, vae
from sdlearn.text import Tokenizer
from sdlearn.vae import AutoencoderKL

TINY_VAE = dict(channels=(8, 16, 16), layers_per_block=1, norm_groups=4)
NEEDS_T2I_PARTS = pytest.mark.skipif(not {"shapes-vae-32", "shapes-clip-32"} <= set(pretrained.available()),
                                     reason="needs the released shapes-vae-32 and shapes-clip-32")


def test_train_help_lists_the_models_and_each_recipe_its_defaults(capsys):
    assert cli(["train", "--help"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in RECIPES)
    for name in RECIPES:
        with pytest.raises(SystemExit) as e:
            cli(["train", name, "--help"])
        assert e.value.code == 0
        out = capsys.readouterr().out
        assert "--checkpoint-dir" in out and "--steps" in out and "(default: " in out
    with pytest.raises(SystemExit):
        cli(["train", "t2i", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "training steps (default: 2000)" in out and "(default: cosine)" in out  # read from t2i.train's signature


def test_unknown_model_is_a_clear_error(capsys):
    assert cli(["train", "unet"]) == 2
    assert "model must be one of clip, vae, t2i, got 'unet'" in capsys.readouterr().err


def test_release_commands_are_the_recipes():
    for name, size, command in [("shapes-t2i", 32, t2i.RELEASE), ("shapes-vae", 32, vae.RELEASE[32]),
                                ("shapes-vae", 64, vae.RELEASE[64]), ("shapes-clip", 32, clip.RELEASE),
                                ("shapes-clip-image", 32, clip.RELEASE)]:
        if f"{name}-{size}" in pretrained.available():
            assert pretrained.metadata(name, size)["command"] == command


# -----------------------------------------------------------------------------
# the three recipes, briefly


def test_vae_recipe_trains_and_sets_the_latent_scale():
    model, hist = vae.train(size=16, steps=3, batch_size=4, config=TINY_VAE, progress=False, scale_images=16)
    assert len(hist.losses) == 3 and not model.training
    assert model.config.scaling_factor > 0 and model.config.scaling_factor != 0.18215


def test_vae_recipe_takes_a_learners_loss():
    calls = []

    def loss_fn(model, images):
        calls.append(images.shape)
        x_rec, _ = model(images)
        return ((x_rec - images) ** 2).mean()

    vae.train(size=16, steps=2, batch_size=3, config=TINY_VAE, loss_fn=loss_fn, progress=False, scale_images=4)
    assert calls == [(3, 3, 16, 16)] * 2


def test_vae_cli_trains_and_writes_a_loadable_release(tmp_path, capsys):
    out = tmp_path / "shapes-vae-16.safetensors"
    assert cli(["train", "vae", "--size", "16", "--steps", "2", "--batch-size", "2", "--eval", "8", "--out",
                str(out)]) == 0
    assert "PSNR" in capsys.readouterr().out
    meta = pretrained.load_file_checked(out)[1]
    assert meta["command"] == f"python -m sdlearn train vae --size 16 --steps 2 --batch-size 2 --eval 8 --out {out}"
    assert "heldout_psnr" in meta and isinstance(pretrained.load_path(out), AutoencoderKL)


def test_unique_caption_batches_have_no_repeats():
    tok = Tokenizer()
    caps = ["a red circle on the left"] * 10 + ["a blue square on the right"] * 10 + [
        f"a {c} cross at the top" for c in ("red", "blue", "green", "cyan", "yellow", "magenta")]
    images = torch.arange(len(caps)).float().view(-1, 1, 1, 1).expand(-1, 3, 4, 4)
    batches = clip.unique_caption_batches(images, caps, tok, batch_size=5, seed=0)
    for _ in range(10):
        x, t = next(batches)
        decoded = tok.decode(t)
        assert len(set(decoded)) == 5 == len(x)
        assert decoded == [caps[int(i)] for i in x[:, 0, 0, 0]]


def test_clip_recipe_takes_a_learners_loss_and_reports_retrieval():
    seen = []

    def loss_fn(model, batch):
        seen.append(len(batch[0]))
        return model.loss(batch)[0]

    model, tok, hist, acc = clip.train(size=32, steps=2, batch_size=4, pool=16, eval_n=8, loss_fn=loss_fn,
                                       progress=False)
    assert seen == [4, 4] and len(hist.losses) == 2 and set(acc) >= {"t2i", "i2t"}


@NEEDS_T2I_PARTS
def test_t2i_cli_trains_and_writes_a_loadable_release(tmp_path, capsys):
    out = tmp_path / "t2i.safetensors"
    assert cli(["train", "t2i", "--steps", "3", "--pool", "32", "--width", "16", "--eval", "4", "--threads", "1",
                "--out", str(out)]) == 0
    assert "1 object" in capsys.readouterr().out
    meta = pretrained.load_file_checked(out)[1]
    assert meta["command"].startswith("python -m sdlearn train t2i --steps 3")
    pipe = pretrained.load_path(out)
    assert isinstance(pipe, TextToImage) and pipe.generate(["a red circle"], steps=1, progress=False).shape \
        == (1, 3, 32, 32)


# -----------------------------------------------------------------------------
# a run killed part-way and started again ends where an uninterrupted run ends

RESUMABLE = {
    "vae": ["--size", "16", "--steps", "40", "--batch-size", "2", "--eval", "0"],
    "clip": ["--steps", "40", "--batch-size", "8", "--pool", "64", "--eval-n", "0"],
    "t2i": ["--steps", "40", "--batch-size", "8", "--pool", "32", "--width", "16", "--eval", "0"],
}


def _train(name, folder, **popen):
    args = [sys.executable, "-m", "sdlearn", "train", name, *RESUMABLE[name], "--threads", "1",
            "--checkpoint-dir", str(folder), "--checkpoint-every", "1"]
    return subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, **popen)


@pytest.mark.parametrize("name", list(RESUMABLE))
def test_cli_resumes_a_killed_run_to_the_same_weights(name, tmp_path):
    if name == "t2i" and not {"shapes-vae-32", "shapes-clip-32"} <= set(pretrained.available()):
        pytest.skip("needs the released shapes-vae-32 and shapes-clip-32")
    steps = int(RESUMABLE[name][RESUMABLE[name].index("--steps") + 1])
    whole = _train(name, tmp_path / "whole")
    run = _train(name, tmp_path / "killed")
    start = time.monotonic()
    while not (tmp_path / "killed" / "latest").exists():  # the first checkpoint: kill it there
        assert run.poll() is None, run.stderr.read()
        assert time.monotonic() - start < 240, "no checkpoint appeared"
        time.sleep(0.002)
    run.kill()
    run.wait()
    killed_at = int((tmp_path / "killed" / "latest").read_text().rsplit("-", 1)[1])
    assert killed_at < steps
    again = _train(name, tmp_path / "killed")
    assert again.wait(timeout=300) == 0, again.stderr.read()
    assert whole.wait(timeout=300) == 0, whole.stderr.read()
    final = f"step-{steps:07d}"
    for file in ("model.safetensors",) + (("ema.safetensors",) if name == "t2i" else ()):
        a, b = load_file(tmp_path / "whole" / final / file), load_file(tmp_path / "killed" / final / file)
        assert all(torch.equal(a[k], b[k]) for k in a), f"{name}: {file} differs after resuming from {killed_at}"


# -----------------------------------------------------------------------------
# the releases

RELEASED_VAES = [int(n.rsplit("-", 1)[1]) for n in pretrained.available() if n.startswith("shapes-vae-")]


@pytest.mark.parametrize("size", RELEASED_VAES)
def test_released_vae_meets_the_quality_bar(size):
    model = pretrained.load("shapes-vae", size=size)
    assert isinstance(model, AutoencoderKL) and model.config.latent_channels == 4
    assert model.downsampling_factor == 4 and model.config.scaling_factor != 0.18215
    scores = vae.evaluate(model, size, n=300)
    assert scores["psnr"] >= 28 and scores["exact"] >= 0.98, scores


def test_the_32px_vae_release_exists():
    assert 32 in RELEASED_VAES
