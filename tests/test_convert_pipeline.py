"""Whole-pipeline parity: a diffusers pipeline saved in the published formats (a diffusers folder, an original
single file) loads into sdlearn's own modules with sdlearn.convert.load and gives diffusers' images; and an sdlearn
pipeline saved with sdlearn.convert.save loads into diffusers and gives the same images again.

Families: SD 1.5-like, SD 2.1-like (eps and v-prediction), SDXL-like base + refiner, SD3-like (with and without
its third encoder) and SD3.5-like (QK norm, MMDiT-X). Everything is tiny and random, nothing is downloaded; the
schedulers are the ones sdlearn samples with (DDIM with SD's "leading" spacing and offset 1; flow-matching Euler
with SD3's shift 3).
"""
from types import SimpleNamespace

import pytest
import torch
from tiny import check_images, clip_text, clip_tokenizer, err, one_thread, perturbed, unet, vae  # noqa: F401

from sdlearn import convert
from sdlearn.mmdit import MMDiTConfig
from sdlearn.sdxl import SDXLPipeline

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

L = 12                       # CLIP tokens per prompt
SIZE = 16                    # image side: latents 8 x 8 under the tiny VAE
PROMPTS = ["a red circle on the left", "a blue circle"]
STEPS, GUIDANCE = 8, 5.0
DDIM = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
            timestep_spacing="leading", steps_offset=1, set_alpha_to_one=True, clip_sample=False)


def _ddim(prediction="epsilon"):
    from diffusers import DDIMScheduler

    return DDIMScheduler(**DDIM, prediction_type=prediction)


def _sd(tmp, variant):
    """SD 1.5-like (CLIP-L's role: quick_gelu, convolutional projections in the transformer blocks) or SD 2.1-like
    (OpenCLIP's: gelu, linear projections; eps or v-prediction)."""
    from diffusers import StableDiffusionPipeline

    tokenizer = clip_tokenizer(tmp, L)
    sd2 = variant != "sd15"
    text_encoder = clip_text(tokenizer, 24, 4, act="gelu" if sd2 else "quick_gelu")
    return StableDiffusionPipeline(
        vae=vae(SIZE), text_encoder=text_encoder, tokenizer=tokenizer,
        unet=unet(SIZE, 24, use_linear_projection=sd2, down=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D")),
        scheduler=_ddim("v_prediction" if variant == "sd21-v" else "epsilon"), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)


def _sdxl(tmp):
    """SDXL-like base and refiner sharing a VAE and the second text encoder (as the published pair does)."""
    from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

    tokenizer, tokenizer_2 = clip_tokenizer(tmp, L), clip_tokenizer(tmp, L, pad_token="!")
    text_encoder = clip_text(tokenizer, 16, 2, eos_token_id=2)  # pools at the largest id, as CLIP-L's config
    text_encoder_2 = clip_text(tokenizer_2, 24, 4, act="gelu", projection=20)
    xl = dict(addition_embed_type="text_time", addition_time_embed_dim=8, use_linear_projection=True)
    shared = dict(vae=vae(SIZE, scaling_factor=0.13025), text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2,
                  force_zeros_for_empty_prompt=True, add_watermarker=False)
    base = StableDiffusionXLPipeline(**shared, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=_ddim(),
                                     unet=unet(SIZE, 40, projection_class_embeddings_input_dim=20 + 6 * 8, **xl))
    refiner = StableDiffusionXLImg2ImgPipeline(
        **shared, text_encoder=None, tokenizer=None, scheduler=_ddim(), requires_aesthetics_score=True,
        unet=unet(SIZE, 24, down=("CrossAttnDownBlock2D",) * 2, projection_class_embeddings_input_dim=20 + 5 * 8,
                  **xl))
    return base, refiner


def _t5(tmp):
    """A tiny T5 v1.1 encoder (gated-GELU) and a word-level T5 tokenizer written here."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel

    words = ["<pad>", "</s>", "<unk>", "a", "red", "blue", "circle", "on", "the", "left"]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>",
                                        unk_token="<unk>", model_max_length=16)
    encoder = perturbed(T5EncoderModel(T5Config(
        vocab_size=len(words), d_model=40, d_kv=8, d_ff=48, num_layers=2, num_heads=4, feed_forward_proj="gated-gelu",
        relative_attention_num_buckets=8, relative_attention_max_distance=16)))
    return encoder, tokenizer


def _sd3(tmp, variant):
    """SD3-like (2 CLIPs with projection + T5, or none: "sd3-no-t5") or SD3.5-like (QK RMSNorm, MMDiT-X)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    from sdlearn.convert import mmdit

    tokenizer, tokenizer_2 = clip_tokenizer(tmp, L), clip_tokenizer(tmp, L, pad_token="!")
    text_encoder = clip_text(tokenizer, 16, 2, projection=16, eos_token_id=2)
    text_encoder_2 = clip_text(tokenizer_2, 24, 4, act="gelu", projection=24)
    t5, t5_tokenizer = _t5(tmp) if variant != "sd3-no-t5" else (None, None)
    sd35 = variant == "sd35"
    cfg = MMDiTConfig(in_channels=16, out_channels=16, patch_size=2, depth=2, heads=2, head_dim=8, context_dim=40,
                      pooled_dim=16 + 24, pos_embed_max_size=8, qk_norm=sd35,
                      dual_attention_layers=(0,) if sd35 else ())
    transformer = perturbed(SD3Transformer2DModel(**mmdit.config_to_diffusers(cfg, sample_size=SIZE // 2)), 0.1)
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=vae(SIZE, latent_channels=16, use_quant_conv=False, use_post_quant_conv=False, scaling_factor=1.5305,
                shift_factor=0.0609),
        text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2,
        text_encoder_3=t5, tokenizer_3=t5_tokenizer)


FAMILIES = ["sd15", "sd21-eps", "sd21-v", "sd3", "sd3-no-t5", "sd35"]
SD3_LENGTH = 16  # T5 tokens (diffusers' max_sequence_length)


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, tmp_path_factory):
    """(name, the diffusers pipeline, the folder it was saved to with save_pretrained)."""
    torch.manual_seed(FAMILIES.index(request.param))
    tmp = tmp_path_factory.mktemp(request.param)
    (tmp / "vocab").mkdir()
    pipe = (_sd3 if request.param.startswith("sd3") else _sd)(tmp / "vocab", request.param)
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(tmp / "diffusers", safe_serialization=True)
    return SimpleNamespace(name=request.param, pipe=pipe, folder=tmp / "diffusers", tmp=tmp)


def _theirs(pipe, z, **options):
    extra = {"max_sequence_length": SD3_LENGTH} if type(pipe).__name__ == "StableDiffusion3Pipeline" else {}
    return pipe(PROMPTS, num_inference_steps=STEPS, guidance_scale=GUIDANCE, latents=z.clone(), output_type="pt",
                height=SIZE, width=SIZE, **extra, **options).images


def _ours(pipe, z):
    return pipe.generate(PROMPTS, STEPS, GUIDANCE, latents=z, progress=False)


def _options(f):
    return {"max_sequence_length": SD3_LENGTH} if f.name.startswith("sd3") else {}


def test_a_diffusers_folder_loads_into_sdlearn_and_gives_diffusers_images(family):
    ours = convert.load(family.folder, **_options(family))
    z = ours.noise(len(PROMPTS), seed=0)
    check_images(_ours(ours, z), _theirs(family.pipe, z), f"{family.name} from a diffusers folder", len(PROMPTS), SIZE)
    assert type(ours.denoiser).__module__.startswith("sdlearn.")


def test_an_in_memory_pipeline_converts_with_from_diffusers(family):
    ours = convert.from_diffusers(family.pipe, **_options(family))
    z = ours.noise(len(PROMPTS), seed=1)
    check_images(_ours(ours, z), _theirs(family.pipe, z), f"{family.name} in memory", len(PROMPTS), SIZE)


def test_an_original_single_file_loads_with_the_folders_configs(family):
    from sdlearn.convert import files, original

    parts = {name: m.state_dict() for name, m in family.pipe.components.items()
             if name in ("unet", "transformer", "vae") or (name.startswith("text_encoder") and m is not None)}
    kind = {"sd15": "sd1", "sd21-eps": "sd2", "sd21-v": "sd2"}.get(family.name, "sd3")
    state = original.join(parts, kind)
    if kind == "sd2":  # as published: OpenCLIP-H's last layer and its text projection, which SD 2.x does not read
        head = "cond_stage_model.model."
        layers = family.pipe.text_encoder.config.num_hidden_layers
        state.update({k.replace("resblocks.0.", f"resblocks.{layers}."): v.clone() for k, v in state.items()
                      if k.startswith(head + "transformer.resblocks.0.")})
        state[head + "text_projection"] = torch.randn(24, 24)
    # and what every published file may hold beside the parts: the EMA's counters, the training schedule's buffers,
    # the VAE's training loss (its LPIPS and discriminator), transformers' position_ids buffer
    state.update({"model_ema.decay": torch.tensor(0.9999), "model_ema.num_updates": torch.tensor(1000),
                  "alphas_cumprod": torch.rand(1000), "first_stage_model.loss.logvar": torch.zeros(()),
                  "first_stage_model.loss.discriminator.main.0.weight": torch.randn(8, 3, 4, 4)})
    if kind == "sd1":
        state["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    single = family.tmp / "single.safetensors"
    files.write(state, single)
    ours = convert.load(single, config=family.folder, **_options(family))
    z = ours.noise(len(PROMPTS), seed=2)
    check_images(_ours(ours, z), _theirs(family.pipe, z), f"{family.name} from an original single file",
                 len(PROMPTS), SIZE)


def test_save_writes_a_folder_diffusers_loads_with_the_same_images(family):
    from diffusers import DiffusionPipeline

    ours = convert.load(family.folder, **_options(family))
    out = convert.save(ours, family.tmp / "exported")
    absent = {"text_encoder_3": None, "tokenizer_3": None} if family.name == "sd3-no-t5" else {}
    theirs = DiffusionPipeline.from_pretrained(out, **absent)
    theirs.set_progress_bar_config(disable=True)
    assert type(theirs) is type(family.pipe)
    z = ours.noise(len(PROMPTS), seed=3)
    check_images(_ours(ours, z), _theirs(theirs, z), f"{family.name} saved by sdlearn, loaded by diffusers",
                 len(PROMPTS), SIZE)
    again = convert.load(out, **_options(family))
    assert torch.equal(_ours(again, z), _ours(ours, z))


# -----------------------------------------------------------------------------
# SDXL: base + refiner


@pytest.fixture(scope="module")
def xl(tmp_path_factory):
    torch.manual_seed(10)
    tmp = tmp_path_factory.mktemp("sdxl")
    (tmp / "vocab").mkdir()
    base, refiner = _sdxl(tmp / "vocab")
    for name, pipe in (("base", base), ("refiner", refiner)):
        pipe.set_progress_bar_config(disable=True)
        pipe.save_pretrained(tmp / name, safe_serialization=True)
    return SimpleNamespace(base=base, refiner=refiner, tmp=tmp)


def _ensemble(base, refiner, z):
    """diffusers' ensemble of experts: the base to 0.8 of the trajectory, its latents to the refiner."""
    latents = base(PROMPTS, num_inference_steps=STEPS, denoising_end=0.8, output_type="latent", latents=z.clone(),
                   guidance_scale=GUIDANCE, height=SIZE, width=SIZE).images
    return refiner(PROMPTS, image=latents, num_inference_steps=STEPS, denoising_start=0.8, output_type="pt",
                   guidance_scale=GUIDANCE).images


def test_sdxl_base_and_refiner_folders_load_as_one_pipeline_with_diffusers_images(xl):
    ours = convert.load(xl.tmp / "base", refiner=xl.tmp / "refiner")
    assert isinstance(ours, SDXLPipeline) and ours.refiner.conditioner.refiner
    z = ours.base.noise(len(PROMPTS), seed=0)
    mine = ours.generate(PROMPTS, STEPS, GUIDANCE, seed=0, progress=False)
    check_images(mine, _ensemble(xl.base, xl.refiner, z), "SDXL base + refiner from diffusers folders",
                 len(PROMPTS), SIZE)
    memory = convert.from_diffusers(xl.base, refiner=xl.refiner)
    assert torch.equal(memory.generate(PROMPTS, STEPS, GUIDANCE, seed=0, progress=False), mine)


def test_sdxl_single_files_and_the_saved_pair(xl):
    from diffusers import DiffusionPipeline

    from sdlearn.convert import files, original

    singles = {}
    for name, pipe, kind in (("base", xl.base, "sdxl-base"), ("refiner", xl.refiner, "sdxl-refiner")):
        parts = {k: m.state_dict() for k, m in pipe.components.items()
                 if k in ("unet", "vae", "text_encoder", "text_encoder_2") and m is not None}
        singles[name] = xl.tmp / f"{name}.safetensors"
        files.write(original.join(parts, kind), singles[name])
    base = convert.load(singles["base"], config=xl.tmp / "base")
    refiner = convert.load(singles["refiner"], config=xl.tmp / "refiner")
    ours = SDXLPipeline(base, refiner)
    z = base.noise(len(PROMPTS), seed=0)
    mine = ours.generate(PROMPTS, STEPS, GUIDANCE, seed=0, progress=False)
    check_images(mine, _ensemble(xl.base, xl.refiner, z), "SDXL base + refiner from single files",
                 len(PROMPTS), SIZE)

    out = convert.save(ours, xl.tmp / "exported")
    assert sorted(p.name for p in out.iterdir()) == ["base", "refiner"]
    theirs = [DiffusionPipeline.from_pretrained(out / k) for k in ("base", "refiner")]
    for p in theirs:
        p.set_progress_bar_config(disable=True)
    check_images(mine, _ensemble(*theirs, z), "SDXL saved by sdlearn, loaded by diffusers", len(PROMPTS), SIZE)
    assert torch.equal(convert.load(out).generate(PROMPTS, STEPS, GUIDANCE, seed=0, progress=False), mine)


def test_sdxl_side_by_side_with_the_refiner(xl):
    from sdlearn.convert import hub

    ours, theirs, _ = hub.side_by_side(str(xl.tmp / "base"), PROMPTS[0], steps=STEPS, guidance_scale=GUIDANCE,
                                       device="cpu", dtype=torch.float32, refiner=str(xl.tmp / "refiner"))
    print(f"SDXL base + refiner side by side: max abs error {err(ours, theirs):.2e}")
    assert ours.shape == theirs.shape == (1, 3, SIZE, SIZE) and err(ours, theirs) <= 1e-4


def test_side_by_side_on_a_local_folder(family):
    """What notebooks 06-08 show learners with a GPU for the real checkpoints (sdlearn.convert.hub), here on the
    tiny local folder: the same prompt and latents through sdlearn and diffusers."""
    from sdlearn.convert import hub

    ours, theirs, seconds = hub.side_by_side(str(family.folder), PROMPTS[0], steps=STEPS, guidance_scale=GUIDANCE,
                                             device="cpu", dtype=torch.float32)
    e = err(ours, theirs)
    print(f"{family.name} side by side: max abs error {e:.2e}, seconds {seconds}")
    assert ours.shape == theirs.shape == (1, 3, SIZE, SIZE) and e <= 1e-4 and set(seconds) == {"sdlearn", "diffusers"}
    assert theirs.std() > 0.05 and ((theirs > 0.01) & (theirs < 0.99)).float().mean() > 0.5  # an image, not a blank


@pytest.mark.parametrize("family", ["sd15"], indirect=True)
def test_side_by_side_with_a_controlnet(family, tmp_path, monkeypatch):
    """Notebook 08's real-weights cell ("sd15" steered by "sd15-canny") on tiny folders: a local ControlNet folder;
    then the names, with the base in an fp16 variant and the ControlNet without one, as the published pair is."""
    from test_controlnet import _controlnet_model

    from sdlearn.convert import hub

    torch.manual_seed(3)
    _controlnet_model(xl=False).save_pretrained(tmp_path / "controlnet", safe_serialization=True)
    g = torch.Generator().manual_seed(4)
    edges = [(torch.rand(1, 3, SIZE, SIZE, generator=g) > 0.8).float() for _ in range(2)]  # white edges on black
    run = dict(steps=STEPS, guidance_scale=GUIDANCE, device="cpu", dtype=torch.float32, control_scale=0.8)
    ours, theirs, _ = hub.side_by_side(str(family.folder), PROMPTS[0], controlnet=str(tmp_path / "controlnet"),
                                       control=edges[0], **run)
    print(f"ControlNet side by side: max abs error {err(ours, theirs):.2e}")
    assert ours.shape == theirs.shape == (1, 3, SIZE, SIZE) and err(ours, theirs) <= 1e-4

    family.pipe.save_pretrained(tmp_path / "fp16", variant="fp16", safe_serialization=True)
    monkeypatch.setitem(hub.CHECKPOINTS, "tiny", dict(hub.CHECKPOINTS["sd15"], repo=None))
    monkeypatch.setitem(hub.CONTROLNETS, "tiny-canny", dict(hub.CONTROLNETS["sd15-canny"], repo=None, base="tiny"))
    monkeypatch.setattr(hub, "download", {"tiny": tmp_path / "fp16", "tiny-canny": tmp_path / "controlnet"}.get)
    other, theirs, _ = hub.side_by_side("tiny", PROMPTS[0], controlnet="tiny-canny", control=edges[1], **run)
    assert err(other, theirs) <= 1e-4 and err(other, ours) > 1e-3, "the control image steers the image"
    with pytest.raises(ValueError, match="unknown ControlNet 'sd15-cany'; known: .*sd15-canny"):
        hub.side_by_side("sd15", PROMPTS[0], controlnet="sd15-cany", control=edges[0])
    with pytest.raises(ValueError, match="steers 'tiny', not 'sd15'"):
        hub.side_by_side("sd15", PROMPTS[0], controlnet="tiny-canny", control=edges[0])


@pytest.mark.parametrize("family", ["sd15"], indirect=True)  # one family is enough for the command line
def test_the_command_line_draws_from_a_checkpoint(family, tmp_path):
    from torchvision.io import read_image

    from sdlearn.__main__ import main

    out = tmp_path / "grid.png"
    assert main(["generate", *PROMPTS, "--checkpoint", str(family.folder), "--n", "1", "--steps", str(STEPS),
                 "--guidance", str(GUIDANCE), "--seed", "5", "--out", str(out)]) == 0
    grid = read_image(str(out)).float() / 255                                   # [3, H, W], padding 2 around each
    want = (convert.load(family.folder).generate(PROMPTS, STEPS, GUIDANCE, seed=5, progress=False) + 1) / 2
    assert grid.shape == (3, 2 * SIZE + 6, SIZE + 4)                          # a row per prompt
    assert (grid[:, 2:2 + SIZE, 2:2 + SIZE] - want[0]).abs().max() <= 1 / 255 + 1e-6   # PNG's 8 bits
    with pytest.raises(SystemExit):
        main(["generate", "x", "--checkpoint", str(family.folder), "--refiner"])


# -----------------------------------------------------------------------------
# what goes wrong


def test_bad_checkpoints_are_clear_errors(family, tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        convert.load(tmp_path / "nothing")
    with pytest.raises(FileNotFoundError, match="no model_index.json"):
        convert.load(tmp_path)
    single = tmp_path / "x.safetensors"
    single.write_bytes(b"")
    with pytest.raises(ValueError, match="pass config="):
        convert.load(single)
    with pytest.raises(FileExistsError, match="not empty"):
        convert.save(convert.load(family.folder, **_options(family)), family.folder)


def test_a_part_that_does_not_fit_its_config_names_the_part(family, tmp_path):
    import shutil

    folder = tmp_path / "broken"
    shutil.copytree(family.folder, folder)
    vae_config = folder / "vae" / "config.json"
    vae_config.write_text(vae_config.read_text().replace('"layers_per_block": 1', '"layers_per_block": 2'))
    with pytest.raises(ValueError, match=r"broken:vae: the weights do not fit"):
        convert.load(folder, **_options(family))


def test_an_sdlearn_schedule_and_scheduler_config_round_trip():
    from sdlearn.convert.pipeline import schedule_from_diffusers, schedule_to_diffusers

    for config in (_ddim(), _ddim("v_prediction")):
        schedule, prediction = schedule_from_diffusers(config)
        assert (schedule.kind, schedule.spacing, schedule.offset) == ("scaled_linear", "leading", 1)
        back = schedule_to_diffusers(schedule, prediction)
        assert {k: back.config[k] for k in DDIM} == DDIM
        assert back.config.prediction_type == config.config.prediction_type
    with pytest.raises(ValueError, match="trained_betas"):
        schedule_from_diffusers({"_class_name": "DDIMScheduler", **DDIM, "trained_betas": [0.1, 0.2]})


# -----------------------------------------------------------------------------
# the published checkpoints' own configs


_DOWN = ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]
_UP = ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3
_CLIP = dict(vocab_size=49408, max_position_embeddings=77, bos_token_id=0, pad_token_id=1, eos_token_id=2,
             layer_norm_eps=1e-5)
# the config.json of each part of the published checkpoints (the keys that differ from the class's defaults)
PUBLISHED_CONFIGS = [
    ("sd15-unet", "UNet2DConditionModel", dict(  # stable-diffusion-v1-5/stable-diffusion-v1-5, unet/
        attention_head_dim=8, block_out_channels=[320, 640, 1280, 1280], cross_attention_dim=768,
        down_block_types=_DOWN, up_block_types=_UP, layers_per_block=2, sample_size=64)),
    ("sd21base-unet", "UNet2DConditionModel", dict(  # stabilityai/stable-diffusion-2-1-base, unet/
        attention_head_dim=[5, 10, 20, 20], block_out_channels=[320, 640, 1280, 1280], cross_attention_dim=1024,
        down_block_types=_DOWN, up_block_types=_UP, layers_per_block=2, sample_size=64, use_linear_projection=True)),
    ("sdxl-unet", "UNet2DConditionModel", dict(  # stabilityai/stable-diffusion-xl-base-1.0, unet/
        addition_embed_type="text_time", addition_embed_type_num_heads=64, addition_time_embed_dim=256,
        attention_head_dim=[5, 10, 20], block_out_channels=[320, 640, 1280], cross_attention_dim=2048,
        down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], layers_per_block=2,
        projection_class_embeddings_input_dim=2816, sample_size=128, transformer_layers_per_block=[1, 2, 10],
        use_linear_projection=True)),
    ("sdxl-refiner-unet", "UNet2DConditionModel", dict(  # stabilityai/stable-diffusion-xl-refiner-1.0, unet/
        addition_embed_type="text_time", addition_time_embed_dim=256, attention_head_dim=[6, 12, 24, 24],
        block_out_channels=[384, 768, 1536, 1536], cross_attention_dim=1280,
        down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], layers_per_block=2,
        projection_class_embeddings_input_dim=2560, sample_size=128, transformer_layers_per_block=4,
        use_linear_projection=True)),
    ("sd-vae", "AutoencoderKL", dict(  # SD 1.5 / 2.1 / SDXL vae/
        block_out_channels=[128, 256, 512, 512], down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4, latent_channels=4, layers_per_block=2, sample_size=512)),
    ("sd3-vae", "AutoencoderKL", dict(  # stabilityai/stable-diffusion-3.5-medium, vae/
        block_out_channels=[128, 256, 512, 512], down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4, latent_channels=16, layers_per_block=2, sample_size=1024,
        scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False)),
    ("sd35-medium-mmdit", "SD3Transformer2DModel", dict(  # stabilityai/stable-diffusion-3.5-medium, transformer/
        attention_head_dim=64, caption_projection_dim=1536, dual_attention_layers=list(range(13)), in_channels=16,
        joint_attention_dim=4096, num_attention_heads=24, num_layers=24, out_channels=16, patch_size=2,
        pooled_projection_dim=2048, pos_embed_max_size=384, qk_norm="rms_norm", sample_size=128)),
    ("clip-l-text", "CLIPTextModel", dict(  # SD 1.5 text_encoder/, SDXL's text_encoder/
        **_CLIP, hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
        hidden_act="quick_gelu", projection_dim=768)),
    ("openclip-h-text", "CLIPTextModel", dict(  # stabilityai/stable-diffusion-2-1-base, text_encoder/
        **_CLIP, hidden_size=1024, intermediate_size=4096, num_attention_heads=16, num_hidden_layers=23,
        hidden_act="gelu", projection_dim=512)),
    ("clip-g-text", "CLIPTextModelWithProjection", dict(  # SDXL's text_encoder_2/, SD3.5's
        **_CLIP, hidden_size=1280, intermediate_size=5120, num_attention_heads=20, num_hidden_layers=32,
        hidden_act="gelu", projection_dim=1280)),
    ("t5-xxl-encoder", "T5EncoderModel", dict(  # SD3.5's text_encoder_3/ (google/t5-v1_1-xxl's encoder)
        vocab_size=32128, d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24,
        feed_forward_proj="gated-gelu", relative_attention_num_buckets=32, relative_attention_max_distance=128)),
]


@pytest.mark.parametrize("preset, class_name, config", PUBLISHED_CONFIGS, ids=[p[0] for p in PUBLISHED_CONFIGS])
def test_the_published_configs_build_the_full_size_presets(preset, class_name, config):
    """What convert.load builds from the real checkpoints' config.json files is the full-size preset (same config,
    same parameter count): the real weights have somewhere to go."""
    from sdlearn import presets
    from sdlearn.convert.pipeline import part_config

    cls, cfg, _, _ = part_config(class_name, config, pooled_dim=1280 if "sdxl" in preset else None)
    with torch.device("meta"):
        model = cls(cfg)
    assert presets.count_parameters(model) == presets.PUBLISHED[preset]
    shapes = {k: v.shape for k, v in presets.build(preset).state_dict().items()}
    assert {k: v.shape for k, v in model.state_dict().items()} == shapes


def test_parts_take_the_files_tensors_without_a_copy(family):
    from sdlearn.convert.pipeline import build_part

    model = family.pipe.components["transformer" if family.name.startswith("sd3") else "unet"]
    state = model.state_dict()
    part = build_part(type(model).__name__, model.config, state)
    ours = dict(part.named_parameters())
    pointers = {t.data_ptr() for t in state.values()}
    copied = sorted(k for k, p in ours.items() if p.data_ptr() not in pointers)
    # the MMDiT fuses diffusers' separate q, k, v into one qkv and swaps the (shift, scale) halves of the last
    # modulations (SD3's order, sdlearn.convert.mmdit.swap_halves): new tensors, one part at a time; nothing else
    last = f"joint_blocks.{len(getattr(part, 'joint_blocks', [])) - 1}.context_block.adaLN_modulation."
    assert all(".qkv." in k or k.startswith(("final_layer.adaLN_modulation.", last)) for k in copied), \
        f"parameters copied on loading: {copied}"
    assert len(copied) < len(ours) / 3


def test_a_half_precision_load_keeps_an_upcast_vae_in_float32(family):
    full = convert.load(family.folder, **_options(family))
    half = convert.load(family.folder, dtype=torch.bfloat16, **_options(family))
    fp16 = convert.load(family.folder, dtype=torch.float16, **_options(family))
    assert next(half.denoiser.parameters()).dtype == torch.bfloat16 == next(half.vae.parameters()).dtype
    assert next(fp16.denoiser.parameters()).dtype == torch.float16
    assert next(fp16.vae.parameters()).dtype == torch.float32  # force_upcast: fp16 would overflow SDXL's VAE
    z = full.noise(len(PROMPTS), seed=4)
    diff = (_ours(half, z) - _ours(full, z)).abs()
    print(f"{family.name}: bf16 against fp32, mean |diff| {diff.mean():.4f}")
    assert diff.mean() < 0.03
