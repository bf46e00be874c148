"""The learner's model in diffusers: the released course pipelines (shapes-t2i, the SDXL pair, shapes-mmdit) written
by sdlearn.convert.save as folders that diffusers' DiffusionPipeline.from_pretrained runs with sdlearn's images, and
the course's word-level tokenizer written as CLIP's byte-pair one (sdlearn.convert.text.tokenizer_to_transformers)
that gives its ids for every course prompt. The released models are small (32 px); a few sampling steps.
"""
import itertools
import json
import random
import shutil

import pytest
import torch
from tiny import err, one_thread  # noqa: F401

from sdlearn import convert, pretrained
from sdlearn.convert.text import tokenizer_to_transformers
from sdlearn.data import COLORS, POSITION_PHRASES, SHAPES, ShapeObject, caption
from sdlearn.pipeline import TextToImage
from sdlearn.sd3 import without_third
from sdlearn.sdxl import SDXLPipeline
from sdlearn.text import PretrainedTokenizer, Tokenizer

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

PROMPTS = ["a red circle on the left", "a blue square at the top and a green cross in the center"]
STEPS, GUIDANCE, SIZE = 4, 3.0, 32


def _captions(n_random: int = 300) -> list[str]:
    """Every one-object caption, and two- and three-object ones drawn at random (three overflow 16 tokens)."""
    objects = [ShapeObject(c, s, p) for c, s, p in itertools.product(COLORS, SHAPES, POSITION_PHRASES)]
    rng = random.Random(0)
    many = [caption(rng.sample(objects, rng.choice((2, 3)))) for _ in range(n_random)]
    return [caption([o]) for o in objects] + many + ["", "  A Red   CIRCLE on the LEFT ", "and and and"]


def _course_ids(tok: Tokenizer, prompts) -> torch.Tensor:
    return Tokenizer(tok.context_length, tok.vocab, truncate=True)(prompts)  # [N, L]


def test_clip_vocabulary_gives_the_course_ids_padded_and_truncated():
    course = Tokenizer()
    theirs = tokenizer_to_transformers(course)
    words = [w for w in course.vocab if w not in ("<pad>", "<bos>", "<eos>")]
    for w in words:  # every word one token, with the course's id
        assert theirs.tokenize(w) == [f"{w}</w>"] and theirs.convert_tokens_to_ids(f"{w}</w>") == course.ids[w]
    prompts = _captions() + [" ".join(words)]
    assert max(len(course.split(p)) for p in prompts) + 2 > course.context_length  # some are truncated
    with pytest.warns(UserWarning, match="truncated"):
        expected = _course_ids(course, prompts)
    assert torch.equal(PretrainedTokenizer(theirs)(prompts), expected)
    assert theirs.model_max_length == course.context_length
    assert (theirs.pad_token_id, theirs.bos_token_id, theirs.eos_token_id) == (course.pad_id, course.bos_id,
                                                                                course.eos_id)


def test_a_vocabulary_clip_cannot_tokenize_is_a_clear_error():
    with pytest.raises(ValueError, match="'x-ray'"):
        tokenizer_to_transformers(Tokenizer(vocab=("<pad>", "a", "x-ray", "<bos>", "<eos>")))
    with pytest.raises(TypeError, match="sdlearn.text.Tokenizer"):
        tokenizer_to_transformers(PretrainedTokenizer)


@pytest.fixture(scope="module")
def released():
    return {name: pretrained.load(name, size=SIZE) for name in
            ("shapes-t2i", "shapes-sdxl-base", "shapes-sdxl-refiner", "shapes-mmdit")}


def _theirs(folder, **absent):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(folder, **absent)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _ours(pipe: TextToImage, z: torch.Tensor) -> torch.Tensor:
    return pipe.generate(PROMPTS, STEPS, GUIDANCE, latents=z, progress=False)


def _call(pipe, z, output_type="pt", **options):
    return pipe(PROMPTS, num_inference_steps=STEPS, guidance_scale=GUIDANCE, latents=z.clone(), height=SIZE,
                width=SIZE, output_type=output_type, **options).images


def _same(ours: torch.Tensor, theirs: torch.Tensor, label: str, images: bool = True):
    """sdlearn's images [N,3,H,W] in [-1, 1] (or latents) against diffusers' (in [0, 1]): equal to 1e-4, and worth
    comparing (the prompts give different results). The course's images are mostly clipped white canvas: the
    latents, compared too, are not."""
    ours = (ours + 1) / 2 if images else ours
    e = err(ours, theirs)
    print(f"{label}: max abs error {e:.2e}")
    assert ours.shape == theirs.shape and ours.shape[0] == len(PROMPTS)
    assert err(theirs[0], theirs[1]) > 1e-2, "the two prompts gave the same result: the text is not read"
    assert e <= 1e-4, f"{label}: max abs error {e:.2e}"


def _same_latents(ours: TextToImage, theirs, z, label: str, **options):
    mine = ours.denoise(z, ours.encode_prompts(PROMPTS), STEPS, GUIDANCE, progress=False)
    _same(mine, _call(theirs, z, "latent", **options), f"{label} (latents)", images=False)


def test_shapes_t2i_exports_to_a_diffusers_folder_with_the_same_images(released, tmp_path):
    from transformers import CLIPTokenizer

    ours = released["shapes-t2i"]
    out = convert.save(ours, tmp_path / "shapes-t2i")
    with pytest.warns(FutureWarning, match="steps_offset"):
        theirs = _theirs(out)
    assert type(theirs).__name__ == "StableDiffusionPipeline"
    assert type(theirs.text_encoder).__name__ == "CLIPTextModel"  # its states, not a ...WithProjection's pooled
    # diffusers' StableDiffusionPipeline rewrites a steps_offset other than 1 when it is built; the folder keeps
    # sdlearn's (0), which the scheduler is set back to
    assert json.loads((out / "scheduler" / "scheduler_config.json").read_text())["steps_offset"] == 0
    assert theirs.scheduler.config.steps_offset == 1
    theirs.scheduler.register_to_config(steps_offset=0)
    z = ours.noise(len(PROMPTS), seed=1)
    mine = _ours(ours, z)
    _same(mine, _call(theirs, z), "shapes-t2i saved by sdlearn, run by diffusers")
    _same_latents(ours, theirs, z, "shapes-t2i")
    assert torch.equal(_ours(convert.load(out), z), mine)  # and back into sdlearn

    # vocab.json + merges.txt alone (transformers 4.x's CLIPTokenizer reads only these) give the same ids
    shutil.copytree(out / "tokenizer", tmp_path / "bpe", ignore=shutil.ignore_patterns("tokenizer.json"))
    legacy = CLIPTokenizer.from_pretrained(tmp_path / "bpe")
    assert torch.equal(PretrainedTokenizer(legacy)(_captions(30)), PretrainedTokenizer(theirs.tokenizer)(_captions(30)))


def test_the_sdxl_pair_exports_as_base_and_refiner_folders_with_the_same_images(released, tmp_path):
    ours = SDXLPipeline(released["shapes-sdxl-base"], released["shapes-sdxl-refiner"])
    out = convert.save(ours, tmp_path / "shapes-sdxl")
    assert sorted(p.name for p in out.iterdir()) == ["base", "refiner"]
    base, refiner = _theirs(out / "base"), _theirs(out / "refiner")
    assert (type(base).__name__, type(refiner).__name__) == ("StableDiffusionXLPipeline",
                                                            "StableDiffusionXLImg2ImgPipeline")
    z = ours.base.noise(len(PROMPTS), seed=0)
    mine = ours.generate(PROMPTS, STEPS, GUIDANCE, seed=0, progress=False)  # the same latents z
    latents = base(PROMPTS, num_inference_steps=STEPS, denoising_end=ours.switch, output_type="latent",
                   latents=z.clone(), guidance_scale=GUIDANCE, height=SIZE, width=SIZE).images
    both = refiner(PROMPTS, image=latents, num_inference_steps=STEPS, denoising_start=ours.switch, output_type="pt",
                   guidance_scale=GUIDANCE).images
    _same(mine, both, "the SDXL pair saved by sdlearn, run by diffusers")
    _same_latents(ours.base, base, z, "shapes-sdxl-base alone")
    assert torch.equal(convert.load(out).generate(PROMPTS, STEPS, GUIDANCE, seed=0, progress=False), mine)


def test_shapes_mmdit_exports_without_its_third_encoder_which_diffusers_cannot_hold(released, tmp_path):
    """Its third encoder is a bidirectional CLIP-like transformer: SD3's pipeline holds a T5 encoder there (and
    pads the CLIP states to that encoder's width, 128 here, narrower than their 192). Without it, as SD3 without T5."""
    mmdit = released["shapes-mmdit"]
    with pytest.raises(ValueError, match="T5Encoder as text_encoder_3, got sdlearn's TextEncoder"):
        convert.save(mmdit, tmp_path / "refused")
    assert not (tmp_path / "refused").exists()
    with pytest.raises(ValueError, match="bidirectional"):  # transformers' CLIPTextModel always masks causally
        convert.to_diffusers(mmdit.conditioner.text_encoder_3)
    ours = TextToImage(without_third(mmdit.conditioner), mmdit.denoiser, mmdit.schedule, mmdit.vae, mmdit.prediction,
                       mmdit.image_size)
    out = convert.save(ours, tmp_path / "shapes-mmdit")
    theirs = _theirs(out, text_encoder_3=None, tokenizer_3=None)
    assert type(theirs).__name__ == "StableDiffusion3Pipeline"
    third = ours.conditioner.third_length
    z = ours.noise(len(PROMPTS), seed=0)
    zeros = ours.conditioner.unconditional(len(PROMPTS))  # the course's unconditional twin: zeros
    negative = dict(negative_prompt_embeds=zeros["context"], negative_pooled_prompt_embeds=zeros["pooled"])
    _same(_ours(ours, z), _call(theirs, z, max_sequence_length=third, **negative),
          "shapes-mmdit without its third encoder, run by diffusers")
    _same_latents(ours, theirs, z, "shapes-mmdit", max_sequence_length=third, **negative)
    again = convert.load(out, max_sequence_length=third)  # diffusers' negative: the empty prompt, read back as such
    _same(_ours(again, z), _call(theirs, z, max_sequence_length=third),
          "shapes-mmdit read back, diffusers' empty negative prompt")
