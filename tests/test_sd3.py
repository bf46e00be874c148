"""sdlearn.sd3: SD3's three-encoder conditioning (layout, the third encoder left out or dropped, zeros as the
unconditional twin), an MMDiT text-to-image pipeline on the flow schedule that a release rebuilds, the MMDiT recipe,
and bad input."""
import pytest
import torch
from tiny import sd3_conditioner, sd3_pipeline  # noqa: E402

from sdlearn import pretrained
from sdlearn.flow import FlowSchedule
from sdlearn.pipeline import TextToImage
from sdlearn.sd3 import SD3Conditioner, without_third

PROMPTS = ["a red circle on the left", "a blue square at the top and a green triangle at the bottom"]


def test_context_is_both_clips_on_channels_padded_then_the_third_along_the_sequence():
    cond = sd3_conditioner()
    out = cond(PROMPTS)
    assert cond.dims == {"context": 40, "pooled": 40}          # joint: max(16 + 24, 32); pooled 16 + 24
    assert out["context"].shape == (2, 16 + 16, 40) and out["pooled"].shape == (2, 40)
    enc1, enc2, enc3 = cond.encoders
    tokens = cond.tokenizers[0](PROMPTS)
    h1, p1 = enc1(tokens, hidden_layer=-2)
    h2, p2 = enc2(tokens, hidden_layer=-2)
    h3, _ = enc3(tokens)
    assert torch.equal(out["context"][:, :16, :16], h1) and torch.equal(out["context"][:, :16, 16:40], h2)
    assert torch.equal(out["context"][:, 16:, :32], h3) and not out["context"][:, 16:, 32:].any()
    assert torch.equal(out["pooled"], torch.cat([p1, p2], -1))


def test_the_third_encoder_is_bidirectional_and_the_clips_are_causal():
    """Changing the last word changes the first tokens' states of the bidirectional encoder only."""
    cond = sd3_conditioner()
    a, b = (cond.tokenizers[0]([p]) for p in ("a red circle on the left", "a red circle on the right"))
    for enc, sees_ahead in zip(cond.encoders, (False, False, True), strict=True):
        ha, hb = enc(a, hidden_layer=-2)[0], enc(b, hidden_layer=-2)[0]
        assert (not torch.allclose(ha[:, :3], hb[:, :3])) == sees_ahead


def test_without_the_third_encoder_its_tokens_are_zeros_and_the_rest_is_unchanged():
    cond = sd3_conditioner()
    full, no_third = cond(PROMPTS), without_third(cond)(PROMPTS)
    assert torch.equal(no_third["context"][:, :16], full["context"][:, :16])
    assert not no_third["context"][:, 16:].any() and no_third["context"].shape == full["context"].shape
    assert torch.equal(no_third["pooled"], full["pooled"])


def test_drop_third_zeroes_the_third_tokens_of_some_samples():
    cond = sd3_conditioner()
    out = cond(PROMPTS * 50)
    assert torch.equal(cond.drop_third(out, 0.0)["context"], out["context"])
    assert not cond.drop_third(out, 1.0)["context"][:, 16:].any()
    dropped = cond.drop_third(out, 0.3, torch.Generator().manual_seed(0))["context"]
    zero = (dropped[:, 16:] == 0).flatten(1).all(1)
    assert 10 <= zero.sum() <= 50 and torch.equal(dropped[:, :16], out["context"][:, :16])


def test_the_unconditional_twin_is_zeros():
    u = sd3_conditioner().unconditional(3)
    assert u["context"].shape == (3, 32, 40) and not u["context"].any() and not u["pooled"].any()


def test_bad_conditioners_are_clear_errors():
    with pytest.raises(ValueError, match="joint_dim=20 is narrower than the text it holds: the CLIP states are 40"):
        sd3_conditioner(joint_dim=20)
    cond = sd3_conditioner()
    with pytest.raises(ValueError, match="give third_length"):
        SD3Conditioner(cond.text_encoder, cond.text_encoder_2, None)


def test_an_mmdit_pipeline_on_the_flow_schedule_generates_and_a_release_rebuilds_it(tmp_path):
    pipe = sd3_pipeline()
    images = pipe.generate(PROMPTS, steps=4, guidance_scale=3.0, progress=False)
    assert images.shape == (2, 3, 16, 16) and images.abs().max() <= 1
    assert not torch.allclose(images[0], images[1])
    path = pretrained.save(pipe, "tiny-mmdit", 16, "a test", tmp_path / "tiny-mmdit-16.safetensors")
    again = pretrained.load_path(path)
    assert type(again.conditioner) is SD3Conditioner and type(again.schedule) is FlowSchedule
    assert torch.allclose(again.generate(PROMPTS, steps=4, guidance_scale=3.0, progress=False), images, atol=1e-5)


def test_sampling_without_the_third_encoder_changes_the_images_but_runs():
    pipe = sd3_pipeline()
    no_third = TextToImage(without_third(pipe.conditioner), pipe.denoiser, pipe.schedule, pipe.vae, "v", 16)
    a = pipe.generate(PROMPTS[:1], steps=3, progress=False)
    b = no_third.generate(PROMPTS[:1], steps=3, progress=False)
    assert a.shape == b.shape and not torch.allclose(a, b)


NEEDS_SD3_PARTS = pytest.mark.skipif(
    not {"shapes-vae-sd3-32", "shapes-clip-32", "shapes-clip-g-32", "shapes-clip-bidir-32"}
    <= set(pretrained.available()), reason="needs the released shapes-vae-sd3-32 and the three shapes encoders")


@NEEDS_SD3_PARTS
def test_mmdit_recipe_trains_with_a_learners_loss():
    from sdlearn.recipes import mmdit

    seen = []

    def loss_fn(model, schedule, z0, cond, uncond, p_uncond, **options):
        seen.append(sorted(options))
        return mmdit.loss_with_third_dropped(model, schedule, z0, cond, uncond, p_uncond, **options)

    pipe, hist = mmdit.train(mmdit.MMDiTRecipe(steps=2, batch_size=4, pool=8, width=16, depth=2, heads=2),
                             loss_fn=loss_fn, progress=False)
    assert len(hist.losses) == 2 and seen[0] == ["cond_model", "density", "p_drop_third", "prediction"]
    assert pipe.denoiser.config.in_channels == 16 and pipe.denoiser.config.qk_norm
    assert pipe.generate(["a red circle"], steps=2, progress=False).shape == (1, 3, 32, 32)
