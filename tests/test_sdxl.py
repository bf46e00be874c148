"""sdlearn.sdxl against diffusers' StableDiffusionXLPipeline / StableDiffusionXLImg2ImgPipeline: micro-conditioning
ids, prompt encoding and its unconditional twin, base + refiner (ensemble of experts), the base alone, the refiner
as img2img; and the errors bad input gets.

Everything is tiny and random (no download): two CLIP text encoders of different widths, a byte-pair tokenizer
from a vocab.json / merges.txt written here, two text_time UNets (6 ids: base, 5 ids: refiner), one VAE, DDIM
with the settings of sdlearn.diffusion.NoiseSchedule("scaled_linear"). The sdlearn side is built from the same
weights by sdlearn.convert.from_diffusers.
"""
import dataclasses
from types import SimpleNamespace

import pytest
import torch
from tiny import check_images, err, one_thread, perturbed, write_bpe  # noqa: F401

from sdlearn import convert
from sdlearn.diffusion import NoiseSchedule
from sdlearn.pipeline import TextToImage
from sdlearn.sdxl import SDXLConditioner, SDXLPipeline, SDXLUNet, handoff, refiner_time_ids, time_ids
from sdlearn.text import PretrainedTokenizer
from sdlearn.unet import UNet, UNetConfig
from sdlearn.vae import AutoencoderKL, VAEConfig

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

L = 12                    # tokens per prompt (both tokenizers: sdlearn concatenates their states token by token)
POOLED, ID_DIM = 20, 8    # text_encoder_2's projection (the pooled text), the sinusoid width of each time id
WIDTH_1, WIDTH_2 = 16, 24  # the two encoders' widths: the base reads 40 channels of context, the refiner 24
SIZE = 16                 # image side: latents 8 x 8 under the VAE's two levels (one downsampling)
PROMPTS = ["a red circle on the left", "a blue circle"]  # different lengths: padding and <eos> pooling matter
STEPS, GUIDANCE = 10, 5.0
SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                 timestep_spacing="leading", steps_offset=0, set_alpha_to_one=True, clip_sample=False,
                 prediction_type="epsilon")  # = NoiseSchedule("scaled_linear"), timesteps(spacing="leading"), DDIM


def _unet(num_ids, context, down):
    from diffusers import UNet2DConditionModel

    up = tuple(t.replace("Down", "Up") for t in reversed(down))
    return perturbed(UNet2DConditionModel(
        sample_size=SIZE // 2, in_channels=4, out_channels=4, down_block_types=down, up_block_types=up,
        block_out_channels=(16, 32), layers_per_block=1, attention_head_dim=(2, 4), use_linear_projection=True,
        transformer_layers_per_block=(1, 2), cross_attention_dim=context, norm_num_groups=8,
        addition_embed_type="text_time", addition_time_embed_dim=ID_DIM,
        projection_class_embeddings_input_dim=POOLED + num_ids * ID_DIM))


@pytest.fixture(scope="module")
def xl(tmp_path_factory):
    """The diffusers pair (base, refiner) and the sdlearn SDXLPipeline made from the same weights."""
    from diffusers import AutoencoderKL as DiffusersVAE
    from diffusers import DDIMScheduler, StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    vocab, merges = write_bpe(tmp_path_factory.mktemp("clip_bpe"))
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=L)            # pads with <eos>
    tokenizer_2 = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=L, pad_token="!")  # SDXL's 2nd: "!"
    eos, bos = tokenizer.eos_token_id, tokenizer.bos_token_id
    torch.manual_seed(0)
    common = dict(vocab_size=len(tokenizer), max_position_embeddings=L, num_hidden_layers=3, bos_token_id=bos)
    text_encoder = perturbed(CLIPTextModel(CLIPTextConfig(  # CLIP ViT-L's role; eos id 2: pools at the largest id
        hidden_size=WIDTH_1, intermediate_size=32, num_attention_heads=2, hidden_act="quick_gelu", eos_token_id=2,
        pad_token_id=eos, **common)))
    text_encoder_2 = perturbed(CLIPTextModelWithProjection(CLIPTextConfig(  # bigG's role: pools at the first <eos>
        hidden_size=WIDTH_2, intermediate_size=48, num_attention_heads=4, hidden_act="gelu", eos_token_id=eos,
        pad_token_id=tokenizer_2.pad_token_id, projection_dim=POOLED, **common)))
    unet = _unet(6, WIDTH_1 + WIDTH_2, ("DownBlock2D", "CrossAttnDownBlock2D"))
    refiner_unet = _unet(5, WIDTH_2, ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"))
    vae = perturbed(DiffusersVAE(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4,
                                  layers_per_block=1, sample_size=SIZE, scaling_factor=0.13025), scale=0.1)
    base_d = StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
        tokenizer_2=tokenizer_2, unet=unet, scheduler=DDIMScheduler(**SCHEDULER), force_zeros_for_empty_prompt=True,
        add_watermarker=False)
    refiner_d = StableDiffusionXLImg2ImgPipeline(
        vae=vae, text_encoder=None, text_encoder_2=text_encoder_2, tokenizer=None, tokenizer_2=tokenizer_2,
        unet=refiner_unet, scheduler=DDIMScheduler(**SCHEDULER), requires_aesthetics_score=True,
        force_zeros_for_empty_prompt=True, add_watermarker=False)
    for pipe in (base_d, refiner_d):
        pipe.set_progress_bar_config(disable=True)

    clip_l, clip_g = convert.from_diffusers(text_encoder), convert.from_diffusers(text_encoder_2)
    ours_vae, schedule = convert.from_diffusers(vae), NoiseSchedule("scaled_linear")
    image_size = SIZE // 2 * 2 ** (len(vae.config.block_out_channels) - 1)  # latent side x the VAE's factor
    tok, tok_2 = PretrainedTokenizer(tokenizer), PretrainedTokenizer(tokenizer_2)
    base = TextToImage(SDXLConditioner(clip_l, clip_g, image_size, tokenizer=tok, tokenizer_2=tok_2),
                       convert.from_diffusers(unet, pooled_dim=POOLED), schedule, ours_vae, "eps", image_size)
    refiner_cond = SDXLConditioner(None, clip_g, image_size, aesthetic_score=6.0, negative_aesthetic_score=2.5,
                                   tokenizer_2=tok_2)
    refiner = TextToImage(refiner_cond, convert.from_diffusers(refiner_unet, pooled_dim=POOLED), schedule,
                          ours_vae, "eps", image_size)
    return SimpleNamespace(base_d=base_d, refiner_d=refiner_d, base=base, refiner=refiner,
                           pipe=SDXLPipeline(base, refiner, switch=0.8), vae=ours_vae)


def _recorder(timesteps):
    """A diffusers callback_on_step_end that records the timesteps visited."""
    def callback(pipe, i, t, kwargs):
        timesteps.append(int(t))
        return kwargs
    return callback


def _check_images(ours, theirs, label):
    check_images(ours, theirs, label, len(PROMPTS), SIZE)


# -----------------------------------------------------------------------------
# micro-conditioning ids

SIZES = [  # (original_size, crop_top_left, target_size): square, non-square, non-zero crops
    ((SIZE, SIZE), (0, 0), (SIZE, SIZE)),
    ((1024, 768), (0, 0), (1024, 1024)),
    ((600, 512), (37, 12), (896, 1152)),
    ((57, 91), (3, 250), (64, 48)),
]


@pytest.mark.parametrize("original, crop, target", SIZES)
def test_time_ids_equal_diffusers(xl, original, crop, target):
    theirs = xl.base_d._get_add_time_ids(original, crop, target, dtype=torch.float32,
                                         text_encoder_projection_dim=POOLED)   # checks the UNet's add_embedding
    assert torch.equal(time_ids(original, crop, target), theirs)
    ids = xl.base.conditioner.ids(3, original_size=original, crop_top_left=crop, target_size=target)
    assert torch.equal(ids, theirs.expand(3, -1))
    assert torch.equal(xl.base.conditioner.ids(1, negative=True), xl.base.conditioner.ids(1))  # one set of ids


@pytest.mark.parametrize("score, negative_score", [(6.0, 2.5), (7.25, 1.0), (0.0, 9.5)])
@pytest.mark.parametrize("original, crop, target", SIZES)
def test_refiner_time_ids_equal_diffusers_img2img(xl, original, crop, target, score, negative_score):
    negative_original, negative_crop, negative_target = (original[1], original[0]), (crop[0] + 5, 1), (8, 8)
    args = (original, crop, target, score, negative_score, negative_original, negative_crop, negative_target)
    positive, negative = xl.refiner_d._get_add_time_ids(*args, dtype=torch.float32,
                                                        text_encoder_projection_dim=POOLED)
    assert torch.equal(refiner_time_ids(original, crop, score), positive)
    assert torch.equal(refiner_time_ids(negative_original, negative_crop, negative_score), negative)
    cond = xl.refiner.conditioner
    assert torch.equal(cond.ids(2, original_size=original, crop_top_left=crop, aesthetic_score=score),
                       positive.expand(2, -1))
    assert cond.ids(1, original_size=original, crop_top_left=crop, negative=True)[0, -1] == 2.5  # its own negative

    # the img2img pipeline without aesthetic score (a base UNet, 6 ids): the ids are time_ids; diffusers' negative
    # ids take the positive crop there (and negative_crops_coords_top_left only in the aesthetic branch)
    from diffusers import StableDiffusionXLImg2ImgPipeline

    plain = StableDiffusionXLImg2ImgPipeline(**{**xl.base_d.components, "requires_aesthetics_score": False})
    positive, negative = plain._get_add_time_ids(*args, dtype=torch.float32, text_encoder_projection_dim=POOLED)
    assert torch.equal(time_ids(original, crop, target), positive)
    assert torch.equal(time_ids(negative_original, crop, negative_target), negative)


def test_batched_time_ids_are_the_rows_stacked():
    original, crop = torch.tensor([[1024, 768], [600, 512]]), torch.tensor([[0, 0], [37, 12]])
    ids = time_ids(original, crop, (SIZE, SIZE))  # a batch of 1 broadcasts
    assert ids.shape == (2, 6) and ids.dtype == torch.float32
    assert torch.equal(ids[1], time_ids((600, 512), (37, 12), (SIZE, SIZE))[0])
    scores = refiner_time_ids((SIZE, SIZE), (0, 0), [6.0, 2.5])
    assert torch.equal(scores[:, -1], torch.tensor([6.0, 2.5])) and torch.equal(scores[0, :4], scores[1, :4])


# -----------------------------------------------------------------------------
# prompts and their unconditional twin


def test_prompt_encoding_and_the_zero_unconditional_twin_equal_diffusers(xl):
    """force_zeros_for_empty_prompt=True (the base's published setting): no negative prompt -> zero context and
    zero pooled text, and the same size ids in both halves (the refiner: the negative aesthetic score).

    The published refiner's model_index.json sets force_zeros_for_empty_prompt to False: diffusers' refiner then
    guides against the encoded "" prompt, which SDXLConditioner(zero_negative=False) does too (tested below)."""
    cpu = torch.device("cpu")
    for ours, theirs, width in ((xl.base, xl.base_d, WIDTH_1 + WIDTH_2), (xl.refiner, xl.refiner_d, WIDTH_2)):
        context, negative, pooled, negative_pooled = theirs.encode_prompt(
            PROMPTS, device=cpu, num_images_per_prompt=1, do_classifier_free_guidance=True)
        cond = ours.encode_prompts(PROMPTS)
        uncond = ours.conditioner.unconditional(len(PROMPTS))
        assert cond["context"].shape == context.shape == (len(PROMPTS), L, width)
        assert cond["pooled"].shape == pooled.shape == (len(PROMPTS), POOLED)
        errs = err(cond["context"], context), err(cond["pooled"], pooled)
        print(f"{type(theirs).__name__} prompt encoding: context {errs[0]:.1e}, pooled {errs[1]:.1e}")
        assert max(errs) <= 1e-5
        assert err(cond["context"][0], cond["context"][1]) > 1e-3  # the two prompts differ
        assert not negative.any() and not negative_pooled.any()
        assert torch.equal(uncond["context"], negative) and torch.equal(uncond["pooled"], negative_pooled)
    assert torch.equal(xl.base.conditioner.unconditional(2)["time_ids"], xl.base.encode_prompts(PROMPTS)["time_ids"])
    assert xl.refiner.conditioner.unconditional(2)["time_ids"][:, -1].tolist() == [2.5, 2.5]
    assert xl.refiner.encode_prompts(PROMPTS)["time_ids"][:, -1].tolist() == [6.0, 6.0]


def test_the_empty_prompt_as_the_negative_equals_diffusers_without_force_zeros(xl):
    cpu = torch.device("cpu")
    xl.refiner_d.register_to_config(force_zeros_for_empty_prompt=False)
    try:
        _, negative, _, negative_pooled = xl.refiner_d.encode_prompt(
            PROMPTS, device=cpu, num_images_per_prompt=1, do_classifier_free_guidance=True)
    finally:
        xl.refiner_d.register_to_config(force_zeros_for_empty_prompt=True)
    c = xl.refiner.conditioner
    empty = SDXLConditioner(None, c.text_encoder_2, c.image_size, c.aesthetic_score, tokenizer_2=c.tokenizer_2,
                            zero_negative=False).unconditional(len(PROMPTS))
    assert negative.abs().amax() > 0 and err(empty["context"], negative) <= 1e-5
    assert err(empty["pooled"], negative_pooled) <= 1e-5


# -----------------------------------------------------------------------------
# whole pipelines


def test_base_then_refiner_equals_diffusers_ensemble_of_experts(xl):
    """base(denoising_end=0.8) -> latents -> refiner(denoising_start=0.8) against SDXLPipeline.generate(switch=0.8),
    both from the initial latents SDXLPipeline draws for seed 0 (image i: a generator seeded i)."""
    z = xl.base.noise(len(PROMPTS), seed=0)  # what SDXLPipeline.generate(seed=0) starts from
    visited_d, visited = [], []
    handover_d = xl.base_d(PROMPTS, num_inference_steps=STEPS, denoising_end=0.8, output_type="latent",
                           latents=z.clone(), guidance_scale=GUIDANCE, height=SIZE, width=SIZE,
                           callback_on_step_end=_recorder(visited_d)).images
    split = len(visited_d)
    images_d = xl.refiner_d(PROMPTS, image=handover_d, num_inference_steps=STEPS, denoising_start=0.8,
                            output_type="pt", guidance_scale=GUIDANCE, callback_on_step_end=_recorder(visited_d)).images

    handover = xl.base.generate(PROMPTS, STEPS, GUIDANCE, seed=0, end=0.8, output="latent", latents=z, progress=False)
    images = xl.pipe.generate(PROMPTS, steps=STEPS, guidance_scale=GUIDANCE, seed=0, progress=False,
                              callback=lambda step: visited.append(step["t"]))

    assert visited == visited_d == list(range(900, -1, -100))  # "leading" spacing, steps_offset 0
    assert (visited_d[:split], visited_d[split:]) == handoff(visited, 0.8) == (list(range(900, 199, -100)), [100, 0])
    e = err(handover, handover_d)
    scale = handover_d.abs().max().item()
    print(f"SDXL base -> refiner, hand-over latents at 0.8: max abs error {e:.2e} (latents up to {scale:.1f})")
    assert e <= 1e-4 * max(1.0, scale)
    _check_images(images, images_d, "SDXL base -> refiner images")
    decoded = (xl.base.decode(handover) + 1) / 2  # the refiner's two steps changed the image
    assert err(decoded, images_d) > 1e-3


def test_base_alone_equals_diffusers_with_size_conditions(xl):
    """denoising_end=None: the base over the whole trajectory, here with non-default micro-conditions."""
    sizes = dict(original_size=(24, 20), crop_top_left=(2, 3), target_size=(SIZE, SIZE + 8))
    z = xl.base.noise(len(PROMPTS), seed=3)
    images_d = xl.base_d(PROMPTS, num_inference_steps=STEPS, output_type="pt", latents=z.clone(),
                         guidance_scale=GUIDANCE, height=SIZE, width=SIZE, original_size=sizes["original_size"],
                         crops_coords_top_left=sizes["crop_top_left"], target_size=sizes["target_size"]).images
    images = xl.pipe.generate(PROMPTS, steps=STEPS, guidance_scale=GUIDANCE, seed=3, switch=1.0, **sizes,
                              progress=False)
    _check_images(images, images_d, "SDXL base alone (switch=1), original (24, 20), crop (2, 3)")
    same = xl.base.generate(PROMPTS, STEPS, GUIDANCE, latents=z, **sizes, progress=False)
    assert torch.equal(same, images)
    default = xl.base.generate(PROMPTS, STEPS, GUIDANCE, latents=z, progress=False)
    assert err(default, images) > 1e-3  # the size ids do reach the UNet


def test_refiner_as_img2img_equals_diffusers(xl):
    """SDXLPipeline.refine (SDEdit) against the img2img pipeline with strength.

    Where the trajectory starts: sdlearn cuts at start = 1 - strength with the denoising_start rule (timesteps
    t < round(T * strength)); diffusers' strength takes the last int(steps * strength) timesteps. With 10 steps
    and strength 0.3 both give [200, 100, 0]; they part where steps * strength is not a whole number (strength
    0.25: diffusers int(2.5) = 2 steps [100, 0], sdlearn t < 250: 3 steps [200, 100, 0]).

    The clean latent: sdlearn encodes images to the posterior's mean; diffusers draws a sample of q(z | x) with
    the generator (retrieve_latents, sample_mode="sample") and then the SDEdit noise from the same generator.
    So diffusers gets the mean latent as its 4-channel `image` (used as is, no encoding), checked below against
    sdlearn's encoding of the pixels, and one generator per image seeded i, as sdlearn's noise for seed 0.
    """
    g = torch.Generator().manual_seed(5)
    pixels = torch.nn.functional.interpolate(torch.rand(len(PROMPTS), 3, 4, 4, generator=g), size=SIZE,
                                             mode="bilinear") * 2 - 1          # smooth images in [-1, 1]
    with torch.no_grad():
        vae = xl.refiner_d.vae
        latent_d = vae.encode(xl.refiner_d.image_processor.preprocess((pixels + 1) / 2)).latent_dist.mode()
        latent_d = latent_d * vae.config.scaling_factor
    latent = xl.vae.to_latent(pixels, sample=False)
    assert err(latent, latent_d) <= 1e-5

    sizes = dict(original_size=(20, 24), crop_top_left=(1, 2), aesthetic_score=7.0)
    visited_d, visited = [], []
    images_d = xl.refiner_d(
        PROMPTS, image=latent_d, strength=0.3, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
        generator=[torch.Generator().manual_seed(i) for i in range(len(PROMPTS))], output_type="pt",
        original_size=sizes["original_size"], crops_coords_top_left=sizes["crop_top_left"],
        negative_crops_coords_top_left=sizes["crop_top_left"],  # diffusers' default negative crop is (0, 0)
        aesthetic_score=7.0, negative_aesthetic_score=2.5, callback_on_step_end=_recorder(visited_d)).images
    images = xl.pipe.refine(pixels, PROMPTS, strength=0.3, steps=STEPS, guidance_scale=GUIDANCE, seed=0,
                            **sizes, progress=False, callback=lambda step: visited.append(step["t"]))
    assert visited == visited_d == [200, 100, 0] == xl.base.schedule.trajectory(STEPS, start=0.7)[:-1]
    _check_images(images, images_d, "SDXL refiner as img2img, strength 0.3")
    assert err(images, pixels) > 1e-2  # it did change the images


# -----------------------------------------------------------------------------
# bad input


def test_bad_time_ids_name_what_was_expected_and_what_came():
    with pytest.raises(ValueError, match=r"original_size must be \(height, width\) or a \[B, 2\] tensor of them, "
                                         r"got \(1, 3\)"):
        time_ids((SIZE, SIZE, 3), (0, 0), (SIZE, SIZE))
    with pytest.raises(ValueError, match=r"crop_top_left must be \(height, width\) .* got \(1, 1\)"):
        refiner_time_ids((SIZE, SIZE), (0,), 6.0)
    with pytest.raises(ValueError, match=r"target_size must be \(height, width\) .* got \(2, 2, 2\)"):
        time_ids((SIZE, SIZE), (0, 0), torch.ones(2, 2, 2))
    with pytest.raises(ValueError, match=r"original_size must not be negative, got \[\[-16\.0, 16\.0\]\]"):
        time_ids((-SIZE, SIZE), (0, 0), (SIZE, SIZE))
    with pytest.raises(ValueError, match=r"crop_top_left must not be negative, got \[\[0\.0, -2\.0\]\]"):
        refiner_time_ids((SIZE, SIZE), (0, -2), 6.0)
    with pytest.raises(ValueError, match=r"target_size must be positive, got \[\[0\.0, 16\.0\]\]"):
        time_ids((SIZE, SIZE), (0, 0), (0, SIZE))
    with pytest.raises(ValueError, match=r"micro-conditions have different batch sizes: \[2, 1, 3\]"):
        time_ids(torch.ones(2, 2), (0, 0), torch.ones(3, 2))


@pytest.mark.parametrize("switch", [0, -0.2, 1.5])
def test_a_switch_outside_0_1_is_refused(xl, switch):
    with pytest.raises(ValueError, match=rf"the switch is a fraction of the trajectory in \(0, 1\], got {switch}"):
        SDXLPipeline(xl.base, xl.refiner, switch=switch)
    with pytest.raises(ValueError, match=rf"in \(0, 1\], got {switch}"):
        xl.pipe.generate(PROMPTS, steps=2, switch=switch, progress=False)


def _sdlearn_refiner_unet(in_channels=4, context=WIDTH_2):
    return SDXLUNet(UNet(UNetConfig(in_channels=in_channels, out_channels=in_channels, channels=(16, 32),
                                    layers_per_block=1, attention=(False, True), heads=(2, 4), context_dim=context,
                                    linear_proj=True, added_cond_dim=POOLED + 5 * ID_DIM, norm_groups=8)),
                    5, ID_DIM).eval()


def test_a_refiner_on_other_latents_is_refused(xl):
    torch.manual_seed(0)
    vae8 = AutoencoderKL(VAEConfig(channels=(8, 16), layers_per_block=1, norm_groups=4, latent_channels=8))
    refiner = TextToImage(xl.refiner.conditioner, _sdlearn_refiner_unet(in_channels=8), xl.refiner.schedule, vae8,
                          "eps", SIZE)
    with pytest.raises(ValueError, match=r"the refiner works on latents \(8, 8, 8\) but the base makes \(4, 8, 8\)"):
        SDXLPipeline(xl.base, refiner)
    bigger = TextToImage(xl.refiner.conditioner, xl.refiner.denoiser, xl.refiner.schedule, xl.vae, "eps", 2 * SIZE)
    with pytest.raises(ValueError, match=r"works on latents \(4, 16, 16\) but the base makes \(4, 8, 8\)"):
        SDXLPipeline(xl.base, bigger)


def test_a_refiner_unet_reading_another_context_width_is_refused(xl):
    """A refiner UNet made for both encoders' context (40) under a refiner conditioner (text_encoder_2 only: 24)."""
    with pytest.raises(ValueError, match=r"the SDXLUNet reads conditions of widths \{'context': 40, 'pooled': 20, "
                                         r"'time_ids': 5\} but the conditioner makes \{'context': 24, 'pooled': 20, "
                                         r"'time_ids': 5\}"):
        TextToImage(xl.refiner.conditioner, _sdlearn_refiner_unet(context=WIDTH_1 + WIDTH_2), xl.refiner.schedule,
                    xl.vae, "eps", SIZE)


def test_a_base_and_refiner_with_different_vaes_are_refused(xl):
    other = convert.from_diffusers(xl.refiner_d.vae)  # the same weights: accepted
    same = TextToImage(xl.refiner.conditioner, xl.refiner.denoiser, xl.refiner.schedule, other, "eps", SIZE)
    SDXLPipeline(xl.base, same)
    with torch.no_grad():
        other.decoder.conv_out.bias[0] += 0.5
    with pytest.raises(ValueError, match=r"must share one VAE.*got two VAEs: their weights differ, first "
                                         r"decoder\.conv_out\.bias \(max abs difference 0\.5\)"):
        SDXLPipeline(xl.base, same)
    rescaled = AutoencoderKL(dataclasses.replace(xl.vae.config, scaling_factor=0.18215))
    rescaled.load_state_dict(xl.vae.state_dict())
    refiner = TextToImage(xl.refiner.conditioner, xl.refiner.denoiser, xl.refiner.schedule, rescaled, "eps", SIZE)
    with pytest.raises(ValueError, match=r"got two VAEs: their configs differ: scaling_factor=0\.13025 vs 0\.18215"):
        SDXLPipeline(xl.base, refiner)


# -----------------------------------------------------------------------------
# the measurements of notebook 07 and benchmarks/sdxl.py


def test_detail_measures_tell_clean_renders_from_degraded_ones():
    from sdlearn.data import ShapesDataset, render_pool
    from sdlearn.metrics import inside_frame, palette_distance, sharpness
    from sdlearn.sdxl import DEGRADATIONS, degrade_image

    clean, _ = render_pool(ShapesDataset(32, length=16), 16, progress=False)
    for kind in DEGRADATIONS:
        worse = torch.stack([degrade_image(x, kind, 1.0) for x in clean])
        assert palette_distance(worse).mean() > 2 * palette_distance(clean).mean(), kind
    blurred = torch.stack([degrade_image(x, "blur", 1.0) for x in clean])
    assert sharpness(blurred).mean() < sharpness(clean).mean()
    assert inside_frame(clean).all()  # the dataset keeps objects inside the frame
    cut = clean.clone()
    cut[:, 0, :, 0] = 1.0  # a saturated red column on the left border
    assert not inside_frame(cut).any()


CAPTIONS = ["a red circle on the left", "a blue square at the top and a green cross at the bottom"]  # the judge's


def test_refinement_table_counts_the_unet_evaluations(xl):
    from sdlearn.measure import refinement_table

    calls = []
    hooks = [p.denoiser.register_forward_hook(lambda m, a, o: calls.append(1)) for p in (xl.base, xl.refiner)]
    try:
        rows, images = refinement_table(xl.pipe, CAPTIONS, steps=10, strength=0.3)
    finally:
        for h in hooks:
            h.remove()
    assert [r["UNet evaluations"] for r in rows.values()] == [10, 10, 13, 10]  # img2img 0.3 of 10 steps: 3 more
    assert len(calls) == 33  # one batched (guided) call per step; the first img2img row reuses the base-alone images
    assert all(x.shape == (2, 3, SIZE, SIZE) for x in images.values())
    assert set(next(iter(rows.values()))) >= {"exact", "1 object exact", "palette distance", "sharpness"}


def test_sweep_and_encoder_ablation(xl):
    from sdlearn.measure import WithoutEncoder, encoder_ablation, sweep

    rows, images = sweep(xl.base, CAPTIONS, "crop_top_left", [(0, 0), (4, 4)], steps=3)
    assert list(rows) == [(0, 0), (4, 4)] and not torch.equal(images[(0, 0)], images[(4, 4)])
    cond = xl.base.conditioner(CAPTIONS)
    without_1, without_2 = (WithoutEncoder(xl.base.conditioner, k)(CAPTIONS) for k in (1, 2))
    assert not without_1["context"][..., :WIDTH_1].any()
    assert torch.equal(without_1["context"][..., WIDTH_1:], cond["context"][..., WIDTH_1:])
    assert not without_2["context"][..., WIDTH_1:].any() and not without_2["pooled"].any()
    assert torch.equal(without_2["context"][..., :WIDTH_1], cond["context"][..., :WIDTH_1])
    no_pooled = WithoutEncoder(xl.base.conditioner, "pooled")(CAPTIONS)
    assert torch.equal(no_pooled["context"], cond["context"]) and not no_pooled["pooled"].any()
    assert len(encoder_ablation(xl.base, CAPTIONS, steps=2)) == 4
    with pytest.raises(ValueError, match="which must be 1, 2 or 'pooled'"):
        WithoutEncoder(xl.refiner.conditioner, 1)
