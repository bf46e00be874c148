"""sdlearn.recipes: the released models' recipes, their command lines, resuming, and the releases themselves."""
import dataclasses
import importlib
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from sdlearn import pretrained
from sdlearn import train as train_module
from sdlearn.__main__ import main as cli
from sdlearn.diffusion import NoiseSchedule
from sdlearn.flow import FlowSchedule
from sdlearn.pipeline import TextConditioner, TextToImage, training_loss
from sdlearn.recipes import (
    RECIPES,
    clip,
    command,
    command_line_options,
    controlnet,
    inpaint,
    ip_adapter,
    mmdit,
    parse,
    sdxl,
    settings,
    t2i,
    vae,
    vae_xl,
)
from sdlearn.text import TextConfig, TextEncoder, Tokenizer
from sdlearn.unet import UNet
from sdlearn.vae import AutoencoderKL, VAEConfig

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
    assert "training steps (default: 2000)" in out and "(default: cosine)" in out  # read from T2IRecipe's fields


@pytest.mark.parametrize("name", list(RECIPES))
def test_help_shows_every_settings_field_with_its_help_and_default(name, capsys, monkeypatch):
    """Every field of the recipe's settings and of the options around it is an --option, with its help and its
    default (a subclass that changes only a default keeps the help of the base); objects only Python passes
    (a model's configuration) are not options."""
    module = importlib.import_module(RECIPES[name])
    recipe, run = settings(module.command_line().parse_args(["train"]))
    assert recipe == type(recipe)() and run == type(run)()  # the command line's defaults are the dataclasses'
    monkeypatch.setenv("COLUMNS", "1000")  # one line an option: argparse wraps long help at hyphens too
    with pytest.raises(SystemExit):
        cli(["train", name, "--help"])
    out = " ".join(capsys.readouterr().out.split())
    for cls in (type(recipe), type(run)):
        options = command_line_options(cls)
        for f, help in options:
            flag = "--" + f.name.replace("_", "-")
            assert f"{flag} " in out and f"{help} (default: {f.default})" in out, (flag, help)
        not_options = {f.name for f in dataclasses.fields(cls)} - {f.name for f, _ in options}
        assert all(f"--{n}" not in out for n in not_options)
    assert {"--steps", "--batch-size", "--lr", "--checkpoint-dir", "--release", "--out", "--threads"} <= set(
        out.split())


def test_a_release_command_parses_to_the_settings_it_names():
    assert parse(t2i.RELEASE) == (t2i.T2IRecipe(steps=4000), t2i.JudgedRelease(threads=2, release=True))
    assert parse(sdxl.RELEASE["refiner"]) == (sdxl.SDXLRecipe(part="refiner", steps=2000, lr=1e-3),
                                              t2i.JudgedRelease(threads=1, release=True))
    assert parse(vae.RELEASE_SD3) == (vae.VAERecipe(latent_channels=16, layout="sd3", size=32, steps=1200),
                                      vae.VAERelease(name="shapes-vae-sd3", threads=1, release=True))
    assert parse(clip.RELEASE_BIDIR)[0] == clip.CLIPRecipe(width=128, layers=4, heads=8, activation="gelu",
                                                           attention="bidirectional", steps=3000, pool=30000)
    assert parse("python -m sdlearn train t2i --eval 0 --guidance 5 --out x.safetensors")[1] \
        == t2i.JudgedRelease(eval=0, guidance=5.0, out="x.safetensors")
    for name in pretrained.available():  # what each release stored: it parses, to the steps it recorded
        meta = pretrained.metadata(*name.rsplit("-", 1))
        recipe, _ = parse(meta["command"])
        assert "steps" not in meta or recipe.steps == int(meta["steps"]), name
    with pytest.raises(ValueError, match="not a recipe's command"):
        parse("python -m sdlearn generate 'a red circle'")
    with pytest.raises(ValueError, match="part must be 'base' or 'refiner'"):
        parse("python -m sdlearn train sdxl --part middle")


def test_unknown_model_is_a_clear_error(capsys):
    assert cli(["train", "unet"]) == 2
    assert ("model must be one of clip, vae, t2i, vae-xl, sdxl, mmdit, ip-adapter, inpaint, controlnet, got 'unet'"
            in capsys.readouterr().err)


def test_release_commands_are_the_recipes():
    releases = [("shapes-t2i", 32, t2i.RELEASE), ("shapes-vae", 32, vae.RELEASE[32]),
                ("shapes-vae", 64, vae.RELEASE[64]), ("shapes-clip", 32, clip.RELEASE),
                ("shapes-clip-image", 32, clip.RELEASE),
                ("shapes-clip-g", 32, clip.RELEASE_G), ("shapes-clip-g-image", 32, clip.RELEASE_G),
                ("shapes-vae-xl", 32, vae_xl.RELEASE), ("shapes-vae-sd3", 32, vae.RELEASE_SD3),
                ("shapes-clip-bidir", 32, clip.RELEASE_BIDIR), ("shapes-clip-bidir-image", 32, clip.RELEASE_BIDIR),
                ("shapes-mmdit", 32, mmdit.RELEASE),
                ("shapes-sdxl-base", 32, sdxl.RELEASE["base"]), ("shapes-sdxl-refiner", 32, sdxl.RELEASE["refiner"]),
                ("shapes-inpaint", 32, inpaint.RELEASE), ("shapes-ip-adapter", 32, ip_adapter.RELEASE),
                ("shapes-controlnet-seg", 32, controlnet.RELEASE)]
    for name, size, made_by in releases:
        if f"{name}-{size}" in pretrained.available():
            assert pretrained.metadata(name, size)["command"] == made_by


# -----------------------------------------------------------------------------
# the three recipes, briefly


def test_vae_recipe_trains_and_sets_the_latent_scale():
    model, hist = vae.train(vae.VAERecipe(size=16, steps=3, batch_size=4, architecture=TINY_VAE, scale_images=16),
                            progress=False)
    assert len(hist.losses) == 3 and not model.training
    assert model.config.scaling_factor > 0 and model.config.scaling_factor != 0.18215


def test_vae_recipe_takes_a_learners_loss():
    calls = []

    def loss_fn(model, images):
        calls.append(images.shape)
        x_rec, _ = model(images)
        return ((x_rec - images) ** 2).mean()

    vae.train(vae.VAERecipe(size=16, steps=2, batch_size=3, architecture=TINY_VAE, scale_images=4), loss_fn=loss_fn,
              progress=False)
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

    model, tok, hist, acc = clip.train(clip.CLIPRecipe(size=32, steps=2, batch_size=4, pool=16, eval_n=8),
                                       loss_fn=loss_fn, progress=False)
    assert seen == [4, 4] and len(hist.losses) == 2 and set(acc) >= {"t2i", "i2t"}


def test_fit_denoiser_trains_what_the_denoiser_predicts():
    """The prediction type the loss gets is the denoiser's own; one its schedule cannot sample is refused before any
    step is taken."""
    torch.manual_seed(0)
    conditioner = TextConditioner(TextEncoder(TextConfig(width=16, layers=1, heads=2)).requires_grad_(False))
    autoencoder = AutoencoderKL(VAEConfig(**TINY_VAE))                    # 16 px images -> 4x4x4 latents
    latents, conds = torch.randn(8, 4, 4, 4), conditioner(["a red circle on the left"] * 8)
    recipe = t2i.T2IRecipe(size=16, steps=2, batch_size=4)
    seen = []

    def loss_fn(model, schedule, z0, cond, uncond, p_uncond, prediction, snr_gamma):
        seen.append(prediction)
        return training_loss(model, schedule, z0, cond, uncond, p_uncond, prediction, snr_gamma)

    unet = UNet(t2i.unet_config(4, 16, width=8, prediction="x0"))
    pipe, hist = t2i.fit_denoiser(unet, conditioner, autoencoder, latents, conds, NoiseSchedule("cosine"), recipe,
                                  loss_fn, {"snr_gamma": None}, progress=False)
    assert seen == ["x0", "x0"] and len(hist.losses) == 2 and pipe.prediction == "x0"
    with pytest.raises(ValueError, match="velocity"):
        t2i.fit_denoiser(unet, conditioner, autoencoder, latents, conds, FlowSchedule(), recipe, loss_fn, {},
                         progress=False)
    assert seen == ["x0", "x0"]


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
# a run stopped part-way and started again ends where an uninterrupted run ends


def test_cli_resumes_a_killed_run_to_the_same_weights(tmp_path):
    """The real thing, for the text-to-image recipe: the process is killed (SIGKILL) after its first checkpoint,
    the same command is run again, and the weights equal those of a run that never stopped."""
    if not {"shapes-vae-32", "shapes-clip-32"} <= set(pretrained.available()):
        pytest.skip("needs the released shapes-vae-32 and shapes-clip-32")
    steps = 12
    args = [sys.executable, "-m", "sdlearn", "train", "t2i", "--steps", str(steps), "--batch-size", "8", "--pool", "32",
            "--width", "16", "--eval", "0", "--threads", "1", "--checkpoint-every", "1", "--checkpoint-dir"]

    def start(folder):
        return subprocess.Popen([*args, str(folder)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    whole, run = start(tmp_path / "whole"), start(tmp_path / "killed")
    began = time.monotonic()
    while not (tmp_path / "killed" / "latest").exists():  # the first checkpoint: kill it there
        assert run.poll() is None, run.stderr.read()
        assert time.monotonic() - began < 240, "no checkpoint appeared"
        time.sleep(0.002)
    run.kill()
    run.wait()
    killed_at = int((tmp_path / "killed" / "latest").read_text().rsplit("-", 1)[1])
    assert killed_at < steps
    again = start(tmp_path / "killed")
    assert again.wait(timeout=300) == 0, again.stderr.read()
    assert whole.wait(timeout=300) == 0, whole.stderr.read()
    for file in ("model.safetensors", "ema.safetensors"):
        a, b = (load_file(tmp_path / run / f"step-{steps:07d}" / file) for run in ("whole", "killed"))
        assert all(torch.equal(a[k], b[k]) for k in a), f"{file} differs after resuming from step {killed_at}"


class Crash(Exception):
    pass


@pytest.mark.parametrize("name, args", [
    ("vae", ["--size", "16", "--steps", "12", "--batch-size", "2", "--eval", "0"]),
    ("clip", ["--steps", "12", "--batch-size", "8", "--pool", "64", "--eval-n", "0"]),
])
def test_every_recipe_resumes_from_its_checkpoint_folder(name, args, tmp_path, monkeypatch):
    """The other recipes, in-process: the run crashes right after writing its checkpoint of step 5, the same
    command line is run again, and its last checkpoint equals an uninterrupted run's."""
    def run(folder):
        assert cli(["train", name, *args, "--threads", "1", "--checkpoint-every", "1",
                    "--checkpoint-dir", str(folder)]) == 0

    run(tmp_path / "whole")
    save = train_module.save_checkpoint

    def save_then_crash(folder, step, *a, **k):
        path = save(folder, step, *a, **k)
        if step == 5:
            raise Crash(f"crashed after saving step {step}")
        return path

    monkeypatch.setattr(train_module, "save_checkpoint", save_then_crash)
    with pytest.raises(Crash):
        run(tmp_path / "stopped")
    monkeypatch.setattr(train_module, "save_checkpoint", save)
    assert (tmp_path / "stopped" / "latest").read_text() == "step-0000005"
    run(tmp_path / "stopped")
    a, b = (load_file(tmp_path / r / "step-0000012" / "model.safetensors") for r in ("whole", "stopped"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_stored_command_leaves_out_where_checkpoints_go():
    assert command("t2i", ["train", "--steps", "3", "--checkpoint-dir", "/x", "--checkpoint-every=5", "--release"]) \
        == "python -m sdlearn train t2i --steps 3 --release"


# -----------------------------------------------------------------------------
# the releases

RELEASED_VAES = [int(n.rsplit("-", 1)[1]) for n in pretrained.available()
                 if n.startswith("shapes-vae-") and n.count("-") == 2]  # shapes-vae-<size>, not -xl-, -sd3-


@pytest.mark.parametrize("size", RELEASED_VAES)
def test_released_vae_meets_the_quality_bar(size):
    model = pretrained.load("shapes-vae", size=size)
    assert isinstance(model, AutoencoderKL) and model.config.latent_channels == 4
    assert model.downsampling_factor == 4 and model.config.scaling_factor != 0.18215
    scores = vae.evaluate(model, size, n=300)
    assert scores["psnr"] >= 28 and scores["exact"] >= 0.98, scores


def test_the_32px_vae_release_exists():
    assert 32 in RELEASED_VAES


NEEDS_SDXL_PARTS = pytest.mark.skipif(
    not {"shapes-vae-xl-32", "shapes-clip-32", "shapes-clip-g-32"} <= set(pretrained.available()),
    reason="needs the released shapes-vae-xl-32, shapes-clip-32 and shapes-clip-g-32")


@NEEDS_SDXL_PARTS
@pytest.mark.parametrize("part", ["base", "refiner"])
def test_sdxl_recipe_trains_each_part_with_its_conditions(part):
    seen = []

    def loss_fn(model, schedule, z0, cond, uncond, p_uncond, prediction, snr_gamma, **kw):
        seen.append((sorted(cond), sorted(uncond), kw))
        return training_loss(model, schedule, z0, cond, uncond, p_uncond, prediction, snr_gamma, **kw)

    pipe, hist = sdxl.train(sdxl.SDXLRecipe(part=part, steps=2, batch_size=4, pool=8, width=16), loss_fn=loss_fn,
                            progress=False)
    assert len(hist.losses) == 2 and isinstance(pipe, TextToImage)
    keys, dropped, kw = seen[0]
    assert keys == ["context", "pooled", "time_ids"] and dropped == ["context", "pooled"]  # ids are never dropped
    assert kw == ({"t_max": 200} if part == "refiner" else {})
    assert pipe.conditioner.dims["time_ids"] == (5 if part == "refiner" else 6)


@NEEDS_SDXL_PARTS
def test_sdxl_training_samples_record_their_micro_conditions():
    images, captions, base_ids = sdxl.training_samples("base", 32, 8, augment=0.5, progress=False)
    assert images.shape == (8, 3, 32, 32) and len(captions) == 8
    assert sorted(base_ids) == ["crop_top_left", "original_size", "target_size"]
    assert (base_ids["original_size"][4:] == 32).all() and not base_ids["crop_top_left"][4:].any()  # plain half
    _, _, refiner_ids = sdxl.training_samples("refiner", 32, 40, degrade=0.5, progress=False)
    assert sorted(refiner_ids) == ["aesthetic_score", "crop_top_left", "original_size"]
    assert (refiner_ids["aesthetic_score"] < 6).any() and (refiner_ids["aesthetic_score"] == 6).any()


def test_the_sdxl_vae_keeps_what_the_micro_conditions_describe():
    """shapes-vae-xl saw SDXL-style and degraded images: a blurred or noisy image stays so after a round trip,
    where shapes-vae (clean renders only) cleans it up, leaving SDXL's size and quality ids nothing to act on."""
    if not {"shapes-vae-32", "shapes-vae-xl-32"} <= set(pretrained.available()):
        pytest.skip("needs the released shapes-vae-32 and shapes-vae-xl-32")
    from sdlearn.data import ShapesDataset, render_pool
    from sdlearn.metrics import palette_distance
    from sdlearn.sdxl import degrade_image
    from sdlearn.vae import reconstruct

    clean, _ = render_pool(ShapesDataset(32, length=64, seed=3), 64, progress=False)
    blurred = torch.stack([degrade_image(x, "blur", 0.7) for x in clean])
    before = palette_distance(blurred).mean()
    plain, xl = (reconstruct(pretrained.load(n, 32), blurred) for n in ("shapes-vae", "shapes-vae-xl"))
    assert palette_distance(xl).mean() > 0.9 * before > 1.5 * palette_distance(plain).mean()
    scores = vae.evaluate(pretrained.load("shapes-vae-xl", 32), 32, n=300)
    assert scores["psnr"] >= 28 and scores["exact"] >= 0.98, scores
