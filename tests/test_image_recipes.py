"""Notebook 10's recipes (sdlearn.recipes.ip_adapter, sdlearn.recipes.inpaint): the learner's functions are what
trains, the repaint cases are what they say, and the judge of the cases scores a perfect answer and a wrong one as it
should."""
import pytest
import torch
import torch.nn.functional as F

from sdlearn import pretrained
from sdlearn.adapters import decoupled_attention, image_tokens
from sdlearn.data import parse_caption
from sdlearn.inpaint import inpaint_input, mask_to_latent
from sdlearn.recipes import inpaint as inpaint_recipe
from sdlearn.recipes import ip_adapter as ip_recipe

NEEDS_RELEASES = pytest.mark.skipif(not {"shapes-t2i-32", "shapes-clip-image-32"} <= set(pretrained.available()),
                                    reason="needs the released shapes-t2i-32 and shapes-clip-image-32")


@NEEDS_RELEASES
def test_the_ip_adapter_recipe_trains_the_learners_functions_and_only_the_adapter():
    calls = {"attention": 0, "tokens": 0}

    def attention(*args):
        calls["attention"] += 1
        return decoupled_attention(*args)

    def tokens(*args):
        calls["tokens"] += 1
        return image_tokens(*args)

    base = pretrained.load("shapes-t2i", 32)
    pipe, hist = ip_recipe.train(ip_recipe.IPAdapterRecipe(steps=2, batch_size=4, pool=8), attention_fn=attention,
                                 tokens_fn=tokens, progress=False)
    assert len(hist.losses) == 2 and calls["attention"] > 0 and calls["tokens"] > 0
    assert all(torch.equal(a, b) for a, b in zip(pipe.denoiser.base.state_dict().values(),
                                                 base.denoiser.state_dict().values()))   # the base stays frozen
    scores = ip_recipe.evaluate(pipe, 4, "other", image_scale=0.5, steps=2)
    assert {"image_exact", "text_exact", "image_exact_1_object"} <= set(scores)


def test_the_ip_adapter_judge_images_are_half_held_out():
    images, captions = ip_recipe.eval_images(6)
    assert images.shape == (6, 3, 32, 32) and len(captions) == 6
    heldout = [{(o.color, o.shape) for o in parse_caption(c)} & {("red", "triangle"), ("green", "cross"),
                                                                 ("blue", "circle"), ("yellow", "square")}
               for c in captions]
    assert not any(heldout[:3]) and all(heldout[3:])


@NEEDS_RELEASES
def test_the_inpaint_recipe_trains_the_learners_functions():
    calls = {"assemble": 0, "resize": 0}

    def assemble(*args):
        calls["assemble"] += 1
        return inpaint_input(*args)

    def resize(*args):
        calls["resize"] += 1
        return mask_to_latent(*args)

    pipe, hist = inpaint_recipe.train(inpaint_recipe.InpaintRecipe(steps=2, batch_size=4, pool=8),
                                      assemble=assemble, to_latent=resize, progress=False)
    assert len(hist.losses) == 2 and calls["assemble"] >= 2 and calls["resize"] >= 1
    assert pipe.denoiser.unet.conv_in.weight.shape[1] == 9


def test_the_cases_change_one_object_inside_its_mask_and_keep_the_other_clear_of_it():
    c = inpaint_recipe.cases(24)
    assert c.images.shape == c.targets.shape == (24, 3, 32, 32) and c.masks.shape == (24, 1, 32, 32)
    outside = c.masks < 0.5
    assert torch.equal(torch.where(outside, c.images, 0.0), torch.where(outside, c.targets, 0.0))  # only inside
    assert all((c.images[i] != c.targets[i]).any() for i in range(24))
    two = [i for i, k in enumerate(c.kept) if k is not None]
    assert two and len(two) < 24
    for i in range(24):
        new, old = parse_caption(c.asked[i])[0], parse_caption(c.prompts[i])
        assert old[0] == new                                  # the caption names the new object first
    # the kept object is wholly outside the region the latent grid repaints
    cells = F.interpolate(mask_to_latent(c.masks, (8, 8)), scale_factor=4) > 0.5
    kept_pixels = (c.images != -1).any(1, keepdim=True) & outside & ~cells
    assert all(kept_pixels[i].any() for i in two)


def test_the_case_judge_scores_the_target_right_and_the_source_wrong():
    c = inpaint_recipe.cases(16)
    right = inpaint_recipe.judge_cases(c.targets, c)
    assert right["inside"] >= 0.9 and right["whole"] >= 0.9 and right["kept"] == 1.0 and right["psnr"] >= 99
    assert right["seam"] == pytest.approx(right["target_seam"])
    source = inpaint_recipe.judge_cases(c.images, c)
    assert source["inside"] == 0 and source["whole"] == 0 and source["kept"] == 1.0
    noisy = inpaint_recipe.judge_cases((c.targets + 0.3 * torch.randn_like(c.targets)).clamp(-1, 1), c)
    assert noisy["psnr"] < 25 and noisy["seam"] > right["seam"]


def test_psnr_and_seam_measure_what_they_say():
    a = torch.full((1, 3, 8, 8), -1.0)
    m = torch.zeros(1, 1, 8, 8)
    m[..., 2:6, 2:6] = 1
    b = a.clone()
    b[..., 2:6, 2:6] = 1.0                     # a white square exactly on the mask: a step of 2 all round
    assert inpaint_recipe.psnr(a, b, 1 - m).item() == pytest.approx(100.0)       # outside unchanged (clamped)
    assert inpaint_recipe.seam(b, m).item() == pytest.approx(2.0)
    assert inpaint_recipe.seam(a, m).item() == 0.0
    c = a.clone()
    c[..., 0, 0] = 1.0                                        # one pixel off by 2 (of 1 in [0, 1]) outside the mask
    assert inpaint_recipe.psnr(a, c, 1 - m).item() == pytest.approx(10 * torch.log10(torch.tensor(48.0)).item())


@pytest.mark.parametrize("model, flags", [
    ("shapes-inpaint", ["--image", "{src}", "--mask", "{mask}"]),
    ("shapes-t2i", ["--image", "{src}", "--mask", "{mask}", "--blend", "--strength", "0.8"]),
    ("shapes-ip-adapter", ["--image-prompt", "{src}", "--image-scale", "0.6"]),
])
def test_the_command_line_draws_with_the_released_image_models(model, flags, tmp_path, capsys):
    """A fresh install's command line: repaint with the released inpainting model or by blending with shapes-t2i, and
    draw from an image prompt with the empty text (the prompt "" is allowed there, and only there)."""
    if f"{model}-32" not in pretrained.available():
        pytest.skip(f"needs the released {model}-32")
    from torchvision.utils import save_image

    from sdlearn.__main__ import main as cli

    c = inpaint_recipe.cases(1)
    files = {"src": tmp_path / "src.png", "mask": tmp_path / "mask.png"}
    save_image((c.images[0] + 1) / 2, files["src"])
    save_image(c.masks[0].expand(3, -1, -1), files["mask"])
    out = tmp_path / "out.png"
    prompt = "" if model == "shapes-ip-adapter" else c.prompts[0]
    args = [a.format(**files) for a in flags]
    assert cli(["generate", prompt, "--model", model, *args, "--n", "2", "--steps", "3", "--out", str(out)]) == 0
    assert out.exists() and "wrote" in capsys.readouterr().out
    if model != "shapes-ip-adapter":
        with pytest.raises(SystemExit):
            cli(["generate", "", "--model", model, *args, "--out", str(out)])
        assert "a prompt is empty" in capsys.readouterr().err
