"""sdlearn.recipes.controlnet on the released bases, at a tiny budget (a few steps, a pool of 16 scenes).

- the MMDiT's ControlNet (base="shapes-mmdit", SD3ControlNet): it starts as the base bit for bit, its maps are VAE
  latents encoded once for the whole pool, training moves the ControlNet and nothing else, its pipeline draws
  from a map (evaluate's pixel maps, encoded by the conditioner);
- the UNet's (shapes-t2i) still trains on pixel maps;
- a base no ControlNet fits, the UNet's options on an MMDiT, a depth the MMDiT lacks, and a command line that
  would save anything but a ControlNet of shapes-t2i, are clear errors.
"""
from types import SimpleNamespace

import pytest
import torch
from tiny import one_thread  # noqa: F401

from sdlearn import pretrained
from sdlearn.controlnet import ControlConditioner, Controlled, ControlNet, SD3ControlNet
from sdlearn.recipes import controlnet as recipe

TINY = dict(pool=16, batch_size=4)
PROMPTS = ["a red circle on the left", "a blue square at the top"]


def _maps(n: int, seed: int = 0) -> torch.Tensor:
    return recipe.scenes("segmentation", 32, n, "train", seed)[2]                 # [n,3,32,32] in [0,1]


def test_the_mmdit_controlnet_starts_as_the_base_bit_for_bit():
    base = pretrained.load("shapes-mmdit", 32)
    pipe, hist = recipe.train(recipe.ControlNetRecipe(base="shapes-mmdit", steps=0, **TINY), progress=False)
    assert hist.losses == []
    cn = pipe.denoiser.controlnet
    assert type(pipe.denoiser) is Controlled and type(cn) is SD3ControlNet
    assert cn.config.depth == base.denoiser.config.depth // 2, "default depth: half the base's joint blocks"

    maps = _maps(2)
    cond = pipe.conditioner.encode(PROMPTS, control=maps)
    p = next(base.vae.parameters())
    latents = base.vae.encode(maps.to(p.dtype) * 2 - 1).mode() * base.vae.config.scaling_factor   # no shift: zeros
    assert cond["control"].shape == (2, *base.latent_shape)                           # for the pooled text
    assert torch.allclose(cond["control"], latents, atol=1e-5), "pixel maps become the VAE's scaled latents"

    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, *base.latent_shape, generator=g), torch.tensor([100.0, 900.0])
    text = base.conditioner.encode(PROMPTS)
    with torch.no_grad():
        assert torch.equal(pipe.denoiser(x, t, **cond), base.denoiser(x, t, **text))
    assert torch.equal(pipe.generate(PROMPTS, 3, seed=1, progress=False, control=maps),
                       base.generate(PROMPTS, 3, seed=1, progress=False))


def test_the_mmdit_controlnet_trains_itself_alone_on_latents_encoded_once(monkeypatch):
    encodes, controls = [], []
    encode, forward = ControlConditioner.encode_control, SD3ControlNet.forward
    monkeypatch.setattr(ControlConditioner, "encode_control",
                        lambda self, c: encodes.append(tuple(c.shape)) or encode(self, c))
    monkeypatch.setattr(SD3ControlNet, "forward",
                        lambda self, x, t, control, *a, **k: controls.append(tuple(control.shape))
                        or forward(self, x, t, control, *a, **k))
    pipe, hist = recipe.train(recipe.ControlNetRecipe(base="shapes-mmdit", steps=3, lr=1e-3, depth=1, **TINY),
                              progress=False)
    assert encodes == [(16, 3, 32, 32)], "the pool's maps are encoded once, up front"
    assert controls == [(4, *pipe.latent_shape)] * 3, "each step reads the pool's latents, not pixel maps"
    assert len(hist.losses) == 3 and all(0 < v < 10 for v in hist.losses)

    released = pretrained.load("shapes-mmdit", 32)
    for name, mine, theirs in (("denoiser", pipe.denoiser.base, released.denoiser), ("vae", pipe.vae, released.vae),
                               ("conditioner", pipe.conditioner.conditioner, released.conditioner)):
        ours = mine.state_dict()
        assert all(torch.equal(ours[k], v) for k, v in theirs.state_dict().items()), f"the base's {name} is frozen"
    cn = pipe.denoiser.controlnet
    assert cn.config.depth == 1
    assert all(lin.weight.abs().max() > 0 for lin in cn.controlnet_blocks), "the zero linears learn"
    copied = dict(released.denoiser.named_parameters())
    assert any(not torch.equal(v, copied[k]) for k, v in cn.joint_blocks.named_parameters(prefix="joint_blocks"))

    maps = _maps(2, seed=1)
    with torch.no_grad():
        drawn = pipe.generate(PROMPTS, 3, seed=1, progress=False, control=maps)
        other = pipe.generate(PROMPTS, 3, seed=1, progress=False, control=maps.flip(-1))
    assert drawn.shape == (2, 3, 32, 32) and (drawn - other).abs().max() > 0, "the map is read"
    scores = recipe.evaluate(pipe, 4, steps=3)                      # pixel maps in [0, 1], as for the UNet's
    assert 0 <= scores["iou"] <= 1 and 0 <= scores["exact"] <= 1


def test_the_unet_controlnet_still_trains_on_pixel_maps():
    pipe, hist = recipe.train(recipe.ControlNetRecipe(steps=2, **TINY), progress=False)
    assert type(pipe.denoiser.controlnet) is ControlNet and pipe.conditioner.vae is None
    assert len(hist.losses) == 2
    assert pipe.generate(PROMPTS, 2, progress=False, control=_maps(2)).shape == (2, 3, 32, 32)


def test_a_base_no_controlnet_fits_and_the_unets_options_on_an_mmdit_are_clear_errors(monkeypatch):
    with pytest.raises(ValueError, match=r"base 'shapes-mmdit' is an MMDiT.*the UNet's \['zero_conv'\]"):
        recipe.train(recipe.ControlNetRecipe(base="shapes-mmdit", **TINY), zero_conv=lambda c: None)
    with pytest.raises(ValueError, match=r"depth \(2\) is the joint blocks an MMDiT's ControlNet copies; base "
                                         r"'shapes-t2i' is a UNet"):
        recipe.train(recipe.ControlNetRecipe(depth=2, **TINY))
    monkeypatch.setattr(pretrained, "load", lambda *a, **k: SimpleNamespace(denoiser=torch.nn.Linear(2, 2)))
    with pytest.raises(ValueError, match=r"base 'toy' has a Linear denoiser; a ControlNet steers a UNet \(shapes-t2i\)"
                                         r" or an MMDiT \(shapes-mmdit\)"):
        recipe.train(recipe.ControlNetRecipe(base="toy", **TINY))


def test_copied_blocks_halves_the_mmdit_and_rejects_a_depth_it_does_not_have():
    mmdit = pretrained.load("shapes-mmdit", 32).denoiser
    blocks = mmdit.config.depth
    assert recipe.copied_blocks(mmdit) == max(1, blocks // 2) and recipe.copied_blocks(mmdit, 1) == 1
    with pytest.raises(ValueError, match=rf"depth: expected 0 \(half\) to {blocks} .*got {blocks + 1}"):
        recipe.copied_blocks(mmdit, blocks + 1)


@pytest.mark.parametrize("argv, named", [(["--base", "shapes-mmdit"], "--base shapes-mmdit"),
                                         (["--method", "concat"], "--method concat")])
def test_the_command_line_saves_only_a_controlnet_of_shapes_t2i(argv, named):
    with pytest.raises(SystemExit, match=rf"saves a ControlNet of shapes-t2i; got .*{named}"):
        recipe.main(["train", "--steps", "1", *argv])
