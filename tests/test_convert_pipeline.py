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
    single = family.tmp / "single.safetensors"
    files.write(original.join(parts, kind), single)
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

    for config in (dict(_ddim().config), dict(_ddim("v_prediction").config)):
        schedule, prediction = schedule_from_diffusers(config)
        assert (schedule.kind, schedule.spacing, schedule.offset) == ("scaled_linear", "leading", 1)
        back = schedule_to_diffusers(schedule, prediction)
        assert {k: back.config[k] for k in DDIM} == DDIM
        assert back.config.prediction_type == config["prediction_type"]
    with pytest.raises(ValueError, match="trained_betas"):
        schedule_from_diffusers({**DDIM, "trained_betas": [0.1, 0.2]})
