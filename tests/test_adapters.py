"""sdlearn.adapters: IP-Adapter (image prompts) for the UNet.

- the recipe: image_scale 0 is the base bit for bit, the base UNet is unchanged by a call, training reaches only the
  adapter, and the composite pipeline saves and loads through sdlearn.pretrained with no code naming it;
- parity with diffusers (tiny random configs, fp32): ImageProjection, IPAdapterAttnProcessor2_0, the UNet with the
  adapter loaded, and StableDiffusionPipeline with ip_adapter_image_embeds (with and without guidance, two scales);
- the published layout (h94/IP-Adapter's ip-adapter_sd15: image_proj.*, ip_adapter.<n>.to_k_ip / to_v_ip) both ways
  through sdlearn.convert.adapters, read by diffusers' own loader; the full-size count on the meta device;
- bad input is a clear error.
"""
import copy
import dataclasses
from types import SimpleNamespace

import pytest
import torch
from test_convert_pipeline import PROMPTS, SIZE, _sd
from tiny import err, one_thread, perturbed  # noqa: F401

from sdlearn import convert, presets, pretrained
from sdlearn.adapters import (
    DecoupledCrossAttention,
    ImageProjection,
    ImagePromptConditioner,
    ImagePrompted,
    IPAdapter,
    IPAttention,
    attach,
    cross_attention_blocks,
)
from sdlearn.attention import Attention
from sdlearn.checks.pipeline import tiny_pipeline
from sdlearn.clip import ImageEncoder, ImageEncoderConfig
from sdlearn.convert import adapters as ip
from sdlearn.pipeline import training_loss

pytest.importorskip("diffusers")

STEPS = 3
EMBED = 12                     # the tiny image encoder's embedding width
COURSE_PROMPTS = ["a red circle on the left", "a blue square at the top"]


def _encoder(size=16, embed_dim=EMBED, seed=7):
    torch.manual_seed(seed)
    return ImageEncoder(ImageEncoderConfig(image_size=size, channels=(8, 8), embed_dim=embed_dim)).eval()


def _adapter(unet, embed_dim=EMBED, seed=3):
    """An adapter for `unet`, perturbed off its init (to_k_ip = to_k) so that every tensor matters."""
    torch.manual_seed(seed)
    return perturbed(IPAdapter.from_unet(unet, embed_dim=embed_dim), 0.1)


def _images(n=2, size=16, seed=5):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# -----------------------------------------------------------------------------
# the recipe, on the course's tiny pipeline


@pytest.fixture(scope="module")
def course():
    base = tiny_pipeline("v")
    adapter = _adapter(base.denoiser, 64)
    return SimpleNamespace(base=base, adapter=adapter, pipe=attach(base, adapter, _encoder(16, 64)),
                           images=_images())


def test_image_scale_zero_is_the_base_bit_for_bit_and_the_base_is_unchanged(course):
    base, pipe = course.base, course.pipe
    assert type(pipe.denoiser) is ImagePrompted and type(pipe.conditioner) is ImagePromptConditioner
    frozen = {k: v.clone() for k, v in base.denoiser.state_dict().items()}
    attn2 = [b.attn2 for b in cross_attention_blocks(base.denoiser)]
    before = base.generate(COURSE_PROMPTS, steps=3, progress=False)
    for guidance in (1.0, 3.0):
        same = pipe.generate(COURSE_PROMPTS, steps=3, guidance_scale=guidance, progress=False,
                             image_prompt=course.images, image_scale=0.0)
        assert torch.equal(same, base.generate(COURSE_PROMPTS, steps=3, guidance_scale=guidance, progress=False))
    prompted = pipe.generate(COURSE_PROMPTS, steps=3, progress=False, image_prompt=course.images)
    assert (prompted - before).abs().max() > 1e-3, "the image prompt is read"
    other = pipe.generate(COURSE_PROMPTS, steps=3, progress=False, image_prompt=course.images.flip(-1))
    assert (prompted - other).abs().max() > 1e-4, "which image matters"
    half = pipe.generate(COURSE_PROMPTS, steps=3, progress=False, image_prompt=course.images, image_scale=0.5)
    assert (prompted - half).abs().max() > 1e-4, "the scale is read"
    # per-prompt scales (a tensor [N]) are each prompt's own scale
    mixed = pipe.generate(COURSE_PROMPTS, steps=3, progress=False, image_prompt=course.images,
                          image_scale=torch.tensor([1.0, 0.5]))
    assert torch.allclose(mixed[0], prompted[0], atol=1e-5) and torch.allclose(mixed[1], half[1], atol=1e-5)
    # one image for all prompts
    one = pipe.generate(COURSE_PROMPTS, steps=3, progress=False, image_prompt=course.images[:1])
    assert torch.allclose(one[0], prompted[0], atol=1e-5)

    # the base's modules are its own again after every call (also one that failed half-way)
    with pytest.raises(ValueError):
        pipe.denoiser(torch.randn(2, 4, 8, 8), torch.tensor([1.0, 2.0]), image_embeds=torch.zeros(2, 64),
                      context=torch.randn(2, 3, 5))
    assert [b.attn2 for b in cross_attention_blocks(base.denoiser)] == attn2
    assert all(type(a) is Attention for a in attn2)
    after = base.denoiser.state_dict()
    assert after.keys() == frozen.keys() and all(torch.equal(v, after[k]) for k, v in frozen.items())
    assert not any(isinstance(m, DecoupledCrossAttention) for m in pipe.modules())


def test_training_reaches_the_adapter_only(course):
    base, adapter = course.base, copy.deepcopy(course.adapter)
    pipe = attach(base, adapter, course.pipe.conditioner.image_encoder)
    g = torch.Generator().manual_seed(3)
    z0 = torch.randn(2, *base.latent_shape, generator=g)
    cond = pipe.encode_prompts(COURSE_PROMPTS, image_prompt=course.images)
    trainable = [p.requires_grad_(True) for p in adapter.parameters()]
    loss = training_loss(pipe.denoiser, base.schedule, z0, cond, pipe.conditioner.unconditional(1), 0.0,
                         prediction="v", generator=g)
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().max() > 0 for p in trainable)
    assert all(p.grad is None for p in base.denoiser.parameters())
    assert all(p.grad is None for p in pipe.conditioner.image_encoder.parameters())


def test_a_float32_adapter_steers_a_base_of_another_dtype():
    """The adapter trains in float32 beside a frozen base in another precision (float64 here: CPU-friendly)."""
    base = tiny_pipeline("v").denoiser
    adapter = _adapter(base, 8)
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10.0, 500.0])
    context, embeds = torch.randn(2, 3, 16, generator=g), torch.randn(2, 8, generator=g)
    with torch.no_grad():
        single = ImagePrompted(base, adapter)(x, t, image_embeds=embeds, context=context)
        double = ImagePrompted(tiny_pipeline("v").denoiser.double(), adapter)(
            x.double(), t, image_embeds=embeds.double(), image_scale=torch.ones(2), context=context.double())
    assert double.dtype == torch.float64 and err(single, double) <= 1e-5
    assert adapter.image_proj.image_embeds.weight.dtype == torch.float32


def test_the_composite_pipeline_saves_and_loads(course, tmp_path):
    pipe = course.pipe
    drawn = pipe.generate(COURSE_PROMPTS, steps=3, progress=False, image_prompt=course.images, image_scale=0.7)
    path = pretrained.save(pipe, "tiny-ip-adapter", pipe.image_size, "a test", tmp_path / "ip.safetensors")
    again = pretrained.load_path(path)
    assert type(again.denoiser) is ImagePrompted and type(again.denoiser.adapter) is IPAdapter
    assert type(again.conditioner) is ImagePromptConditioner
    assert again.denoiser.adapter.config == course.adapter.config
    state, back = course.adapter.state_dict(), again.denoiser.adapter.state_dict()
    assert back.keys() == state.keys() and all(torch.equal(v, back[k]) for k, v in state.items())
    assert torch.equal(again.generate(COURSE_PROMPTS, steps=3, progress=False, image_prompt=course.images,
                                      image_scale=0.7), drawn)


# -----------------------------------------------------------------------------
# parity with diffusers: the modules


def test_image_projection_matches_diffusers_both_ways():
    from diffusers.models.embeddings import ImageProjection as Theirs

    torch.manual_seed(0)
    theirs = perturbed(Theirs(image_embed_dim=EMBED, cross_attention_dim=24, num_image_text_embeds=4))
    ours = convert.from_diffusers(theirs)
    assert type(ours) is ImageProjection and ours.num_tokens == 4
    embeds = torch.randn(3, EMBED)
    with torch.no_grad():
        mine, them = ours(embeds), theirs(embeds)
    e = err(mine, them)
    print(f"ImageProjection: max abs error {e:.2e}")
    assert mine.shape == (3, 4, 24) and e <= 1e-4
    back = convert.to_diffusers(ours)
    assert type(back) is Theirs and back.state_dict().keys() == theirs.state_dict().keys()
    assert all(torch.equal(v, back.state_dict()[k]) for k, v in theirs.state_dict().items())


def test_decoupled_cross_attention_matches_diffusers_ip_adapter_processor():
    from diffusers.models.attention_processor import Attention as TheirAttention
    from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0

    torch.manual_seed(0)
    attn = TheirAttention(query_dim=32, cross_attention_dim=24, heads=4, dim_head=8, out_bias=True)
    processor = perturbed(IPAdapterAttnProcessor2_0(hidden_size=32, cross_attention_dim=24, num_tokens=(4,)))
    ours_attn, ours_ip = convert.from_diffusers(perturbed(attn)), convert.from_diffusers(processor)
    attn.set_processor(processor)
    assert type(ours_ip) is IPAttention
    g = torch.Generator().manual_seed(1)
    x, text, tokens = (torch.randn(2, n, w, generator=g) for n, w in ((10, 32), (7, 24), (4, 24)))
    seen = {}
    with torch.no_grad():
        for scale in (1.0, 0.4, 0.0):
            processor.scale = [scale]
            them = attn(x, encoder_hidden_states=(text, [tokens]))
            mine = DecoupledCrossAttention(ours_attn, ours_ip, tokens, scale)(x, text)
            seen[scale] = mine
            e = err(mine, them)
            print(f"IPAdapterAttnProcessor2_0, scale {scale}: max abs error {e:.2e}")
            assert e <= 1e-4, scale
        both = DecoupledCrossAttention(ours_attn, ours_ip, tokens, torch.tensor([1.0, 0.4]).view(-1, 1, 1, 1))(x, text)
    assert err(seen[1.0], seen[0.0]) > 1e-2, "the image tokens are read"
    assert torch.allclose(both[0], seen[1.0][0], atol=1e-6) and torch.allclose(both[1], seen[0.4][1], atol=1e-6)
    back = convert.to_diffusers(ours_ip)
    assert type(back) is IPAdapterAttnProcessor2_0
    assert all(torch.equal(v, back.state_dict()[k]) for k, v in processor.state_dict().items())


@pytest.fixture(scope="module")
def sd_ip(tmp_path_factory):
    """A tiny SD 1.5-like diffusers pipeline (two cross-attention levels, 1 and 2 transformer blocks: 11
    cross-attentions), its sdlearn twin converted before the adapter is loaded, and the adapter in the published
    layout, loaded into diffusers by its own loader."""
    torch.manual_seed(0)
    pipe = _sd(tmp_path_factory.mktemp("vocab"), "sd15")
    pipe.set_progress_bar_config(disable=True)
    base = convert.from_diffusers(pipe)                  # the same tensors
    adapter = _adapter(base.denoiser)
    published = ip.to_published(adapter)
    pipe.load_ip_adapter(ip.nested(published), subfolder="", weight_name="", image_encoder_folder=None)
    return SimpleNamespace(pipe=pipe, base=base, adapter=adapter, published=published, encoder=_encoder())


def test_the_published_layout_is_what_diffusers_loader_reads(sd_ip):
    unet, state = sd_ip.pipe.unet, sd_ip.published
    n = len(sd_ip.adapter.layers)
    assert n == 11
    assert set(state) == {"image_proj.proj.weight", "image_proj.proj.bias", "image_proj.norm.weight",
                          "image_proj.norm.bias", *(f"ip_adapter.{2 * j + 1}.to_{kv}_ip.weight"
                                                    for j in range(n) for kv in "kv")}
    # diffusers' own converter put each tensor where ours says: the j-th cross-attention (attn_processors' order)
    projection = unet.encoder_hid_proj.image_projection_layers[0]
    assert torch.equal(projection.image_embeds.weight, state["image_proj.proj.weight"])
    assert torch.equal(projection.norm.bias, state["image_proj.norm.bias"])
    processors = [p for name, p in unet.attn_processors.items() if name.endswith("attn2.processor")]
    assert len(processors) == n
    for j, p in enumerate(processors):
        assert torch.equal(p.to_k_ip[0].weight, state[f"ip_adapter.{2 * j + 1}.to_k_ip.weight"])
        assert torch.equal(p.to_v_ip[0].weight, state[f"ip_adapter.{2 * j + 1}.to_v_ip.weight"])
    # the widths differ per level, so a wrong numbering would not even load
    assert len({p.to_k_ip[0].weight.shape for p in processors}) == 2


def _same_adapter(a: IPAdapter, b: IPAdapter):
    assert a.config == b.config
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(v, sb[k]) for k, v in sa.items())


def test_the_published_layout_loads_both_ways(sd_ip, tmp_path):
    from safetensors.torch import save_file

    adapter, state = sd_ip.adapter, sd_ip.published
    for given in (state, ip.nested(state)):                  # the .safetensors' flat keys, the .bin's nesting
        _same_adapter(ip.from_published(given), adapter)
    _same_adapter(ip.from_diffusers_unet(sd_ip.pipe.unet), adapter)
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "ip-adapter_tiny.safetensors")
    torch.save(ip.nested(state), tmp_path / "ip-adapter_tiny.bin")
    _same_adapter(ip.read(tmp_path / "ip-adapter_tiny.safetensors"), adapter)
    _same_adapter(ip.read(tmp_path / "ip-adapter_tiny.bin", allow_pickle=True), adapter)
    # diffusers reads the file we wrote
    again = _sd(tmp_path, "sd15")
    again.load_ip_adapter(str(tmp_path), subfolder="", weight_name="ip-adapter_tiny.safetensors",
                          image_encoder_folder=None)
    _same_adapter(ip.from_diffusers_unet(again.unet), adapter)
    # and back: into a diffusers pipeline from the sdlearn one
    theirs = ip.to_diffusers_pipeline(attach(sd_ip.base, adapter, sd_ip.encoder))
    _same_adapter(ip.from_diffusers_unet(theirs.unet), adapter)


def test_the_image_prompted_unet_matches_diffusers(sd_ip):
    theirs = sd_ip.pipe.unet
    ours = ImagePrompted(sd_ip.base.denoiser, sd_ip.adapter)
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10.0, 500.0])
    context, embeds = torch.randn(2, 5, 24, generator=g), torch.randn(2, EMBED, generator=g)
    seen = []
    with torch.no_grad():
        for scale in (1.0, 0.4):
            sd_ip.pipe.set_ip_adapter_scale(scale)
            them = theirs(x, t, context, added_cond_kwargs={"image_embeds": [embeds[:, None]]}).sample
            mine = ours(x, t, image_embeds=embeds, image_scale=scale, context=context)
            e = err(mine, them)
            print(f"UNet with the IP-Adapter, scale {scale}: max abs error {e:.2e}")
            assert e <= 1e-4, scale
            seen.append(mine)
        plain = sd_ip.base.denoiser(x, t, context)
    assert err(seen[0], seen[1]) > 1e-3 and err(seen[0], plain) > 1e-3


def _both(sd_ip, ours, guidance, scale, images):
    """Both pipelines' images [N,3,H,W] in [0, 1] from one image prompt images [1,3,H,W] for all the prompts
    (diffusers' ip_adapter_image_embeds: one [1 or 2, images, E] per adapter, repeated for every prompt)."""
    z = ours.noise(len(PROMPTS), seed=2)
    embeds = sd_ip.encoder(images).detach()                               # [1, E]
    given = torch.cat([torch.zeros_like(embeds), embeds]) if guidance > 1 else embeds   # diffusers: [uncond; cond]
    sd_ip.pipe.set_ip_adapter_scale(scale)
    theirs = sd_ip.pipe(PROMPTS, num_inference_steps=STEPS, guidance_scale=guidance, latents=z.clone(),
                        output_type="pt", height=SIZE, width=SIZE, ip_adapter_image_embeds=[given[:, None]]).images
    mine = ours.generate(PROMPTS, STEPS, guidance, latents=z, progress=False, image_prompt=images,
                         image_scale=scale)
    return (mine + 1) / 2, theirs


def test_sd_pipeline_with_an_ip_adapter_matches_diffusers(sd_ip):
    ours = ip.from_diffusers_pipeline(sd_ip.pipe, sd_ip.encoder)
    assert type(ours.denoiser) is ImagePrompted and type(ours.conditioner) is ImagePromptConditioner
    _same_adapter(ours.denoiser.adapter, sd_ip.adapter)
    images = _images(1)
    seen = []
    for guidance in (1.0, 5.0):
        for scale in (1.0, 0.5):
            mine, theirs = _both(sd_ip, ours, guidance, scale, images)
            e = err(mine, theirs)
            inside = ((theirs > 0.01) & (theirs < 0.99)).float().mean().item()
            print(f"StableDiffusionPipeline + IP-Adapter, guidance {guidance}, scale {scale}: max abs error {e:.2e} "
                  f"({inside:.0%} of pixels unclipped)")
            assert e <= 1e-4 and inside > 0.5, (guidance, scale)
            seen.append(mine)
    assert err(seen[0], seen[1]) > 1e-3, "the image scale changes the images"
    assert err(seen[2], seen[3]) > 1e-3
    base = (sd_ip.base.generate(PROMPTS, STEPS, 5.0, latents=ours.noise(2, seed=2), progress=False) + 1) / 2
    assert err(seen[2], base) > 1e-3, "the image prompt changes the images"
    # the pipeline attached by hand to the base converted before loading is the same
    by_hand = attach(sd_ip.base, sd_ip.adapter, sd_ip.encoder)
    mine, theirs = _both(sd_ip, by_hand, 5.0, 0.5, images)
    assert err(mine, seen[3]) == 0 and err(mine, theirs) <= 1e-4
    # image_scale 0: diffusers skips the image attention; ours adds 0 times it: the base pipeline's images exactly
    zero = ours.generate(PROMPTS, STEPS, 5.0, latents=ours.noise(2, seed=2), progress=False, image_prompt=images,
                         image_scale=0.0)
    assert torch.equal((zero + 1) / 2, base)


# -----------------------------------------------------------------------------
# full size: the published count (diffusers 0.42.1), on the meta device


def test_the_sd15_ip_adapter_count_is_diffusers_at_sd15s_config():
    from diffusers import UNet2DConditionModel
    from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0
    from diffusers.models.embeddings import ImageProjection as Theirs

    from sdlearn.convert.unet import config_to_diffusers
    from sdlearn.unet import SD15

    config = config_to_diffusers(SD15)
    with torch.device("meta"):
        unet = UNet2DConditionModel(**config)
        parts = [Theirs(image_embed_dim=1024, cross_attention_dim=768, num_image_text_embeds=4)]
        # the widths as diffusers' _convert_ip_adapter_attn_to_diffusers reads them: the block's channels
        channels = unet.config.block_out_channels
        for name in unet.attn_processors:
            if name.endswith("attn2.processor"):
                level = int(name.split(".")[1]) if not name.startswith("mid_block") else None
                width = (channels[-1] if level is None else
                         channels[level] if name.startswith("down") else list(reversed(channels))[level])
                parts.append(IPAdapterAttnProcessor2_0(hidden_size=width, cross_attention_dim=768))
    assert unet.config.cross_attention_dim == 768 and len(parts) == 1 + 16
    theirs = sum(presets.count_parameters(p) for p in parts)
    ours = presets.build("sd15-ip-adapter")
    assert theirs == presets.count_parameters(ours) == presets.PUBLISHED["sd15-ip-adapter"] == 22_319_616
    assert ours.config.inner_dims == tuple(p.to_k_ip[0].out_features for p in parts[1:])


# -----------------------------------------------------------------------------
# bad input


def test_a_bad_image_prompt_is_a_clear_error(course):
    pipe = course.pipe

    def draw(**conditions):
        return pipe.generate(COURSE_PROMPTS, steps=1, progress=False, **conditions)

    with pytest.raises(ValueError, match=r"image_prompt should be images \[N,3,16,16\].*got \(2, 1, 16, 16\)"):
        draw(image_prompt=torch.rand(2, 1, 16, 16))
    with pytest.raises(ValueError, match=r"image_prompt should be images \[N,3,16,16\].*got \(2, 3, 12, 12\)"):
        draw(image_prompt=torch.rand(2, 3, 12, 12))
    with pytest.raises(ValueError, match=r"image_prompt should be images \[N,3,16,16\].*got \(3, 16, 16\)"):
        draw(image_prompt=torch.rand(3, 16, 16))
    with pytest.raises(ValueError, match=r"image_prompt should be images \[N,3,16,16\].*got list"):
        draw(image_prompt=course.images.tolist())
    with pytest.raises(ValueError, match=r"float images in \[-1, 1\], got torch.float32 in \[0.*, 255\]"):
        draw(image_prompt=(course.images + 1) * 127.5)
    with pytest.raises(ValueError, match=r"float images in \[-1, 1\], got torch.uint8"):
        draw(image_prompt=torch.zeros(2, 3, 16, 16, dtype=torch.uint8))
    with pytest.raises(ValueError, match="pass image_prompt=images"):
        draw()
    with pytest.raises(ValueError, match=r"condition 'image_embeds' must have one row per prompt \(2\).*\(3, 64\)"):
        draw(image_prompt=_images(3))
    for scale in (float("nan"), float("inf"), "1.0", None, torch.ones(3)):
        with pytest.raises(ValueError, match="image_scale must be a finite number"):
            draw(image_prompt=course.images, image_scale=scale)


def test_bad_image_embeds_are_a_clear_error(course):
    prompted = course.pipe.denoiser
    x, t, context = torch.randn(2, 4, 8, 8), torch.tensor([1.0, 2.0]), torch.randn(2, 3, 16)
    for embeds, got in ((torch.zeros(2, 63), r"\(2, 63\)"), (torch.zeros(1, 64), r"\(1, 64\)"),
                        (torch.zeros(2, 1, 64), r"\(2, 1, 64\)"), ([0.0] * 64, "list")):
        with pytest.raises(ValueError, match=rf"image_embeds should be .*\[B,E\] = \[2,64\], got {got}"):
            prompted(x, t, image_embeds=embeds, context=context)
    with pytest.raises(ValueError, match=r"image_scale must be a finite number .*\[2\].*got \(3,\)"):
        prompted(x, t, image_embeds=torch.zeros(2, 64), image_scale=torch.ones(3), context=context)


@pytest.mark.parametrize("change, words", [
    (dict(context_dim=12), r"cross-attention width: 12 here, 16 in the base"),
    (dict(channels=(8, 32)), r"inner widths\): 7 \(8, 32, 32, 32, 8, 8, 32\) here, 7 \(8, 16, 16, 16, 8, 8, 16\) in "
                             r"the base"),
    (dict(transformer_layers=2), r"inner widths\): 14 .* here, 7 .* in the base"),
])
def test_an_adapter_for_another_unet_is_a_clear_error(change, words):
    from sdlearn.unet import UNet

    base = tiny_pipeline("v").denoiser
    other = UNet(dataclasses.replace(base.config, **change))
    with pytest.raises(ValueError, match=f"IPAdapter was made for another UNet than the UNet.*{words}"):
        ImagePrompted(base, IPAdapter.from_unet(other, embed_dim=64))


def test_an_image_encoder_of_another_width_is_a_clear_error(course):
    with pytest.raises(ValueError, match="embeds images in 32 dimensions but the adapter's projection reads 64"):
        attach(course.base, course.adapter, _encoder(16, 32))


def test_a_file_that_is_not_a_plain_ip_adapter_is_a_clear_error():
    good = ip.to_published(IPAdapter.from_unet(tiny_pipeline("v").denoiser, embed_dim=8))
    plus = {"image_proj.latents": torch.zeros(1, 16, 8), "ip_adapter.1.to_k_ip.weight": torch.zeros(8, 16)}
    with pytest.raises(ValueError, match="it is an IP-Adapter Plus .*which sdlearn.adapters lacks"):
        ip.from_published(plus)
    with pytest.raises(ValueError, match=r"expected ip_adapter.<n>.to_k_ip.weight .* n = 1, 3, 5.*got n = \[0, 1"):
        ip.from_published({**good, "ip_adapter.0.to_k_ip.weight": torch.zeros(8, 16)})
    missing = {k: v for k, v in good.items() if k != "ip_adapter.3.to_v_ip.weight"}
    with pytest.raises(ValueError, match=r"does not fit an IPAdapter.*missing \['layers.1.to_v_ip.weight'\]"):
        ip.from_published(missing)
    with pytest.raises(ValueError, match="has no IP-Adapter loaded"):
        ip.from_diffusers_unet(convert.to_diffusers(tiny_pipeline("v").denoiser))
