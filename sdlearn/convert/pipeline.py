"""Whole pipelines: the published Stable Diffusion checkpoints in sdlearn's own modules, and back.

    pipe = convert.load("stable-diffusion-v1-5/")                  # a diffusers folder -> sdlearn TextToImage
    pipe = convert.load("sd_xl_base_1.0.safetensors", config="sdxl-base/")   # an original single file
    xl = convert.load("sdxl-base/", refiner="sdxl-refiner/")       # SDXLPipeline: base + refiner
    pipe = convert.from_diffusers(diffusers_pipeline)              # in memory
    convert.save(pipe, "out/")                                     # a folder DiffusionPipeline.from_pretrained reads

A checkpoint is a set of parts, each a config and a state dict in diffusers' / transformers' names: a diffusers
folder holds them as <part>/config.json + safetensors, an in-memory pipeline as modules, an original single file
as one state dict that sdlearn.convert.original splits (its configs come from `config`, a diffusers folder of the
same model: weights there are not read). Every part is built on the meta device and its tensors are assigned,
not copied: loading holds one copy of the weights.

The family comes from the pipeline class (model_index.json's _class_name):
    StableDiffusionPipeline           -> TextToImage(TextConditioner, UNet, NoiseSchedule, VAE)        SD 1.x / 2.x
    StableDiffusionXLPipeline         -> TextToImage(SDXLConditioner, UNet, ...)                        SDXL base
    StableDiffusionXLImg2ImgPipeline  -> TextToImage(SDXLConditioner without text_encoder, UNet, ...)  SDXL refiner
    StableDiffusion3Pipeline          -> TextToImage(SD3Conditioner, MMDiT, FlowSchedule, VAE)          SD3 / SD3.5
Sampling: a NoiseSchedule gets the checkpoint's betas, prediction type, timestep spacing and offset, and samples
with sdlearn's DDIM (diffusers' equivalent: DDIMScheduler.from_config(scheduler.config, set_alpha_to_one=True));
a FlowSchedule gets the shift, and samples with Euler as FlowMatchEulerDiscreteScheduler does.
"""
from __future__ import annotations

import dataclasses
import inspect
import json
import os
import re
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from sdlearn.convert.keys import rename
from sdlearn.diffusion import NoiseSchedule
from sdlearn.flow import FlowSchedule
from sdlearn.pipeline import TextConditioner, TextToImage
from sdlearn.sd3 import SD3Conditioner
from sdlearn.sdxl import SDXLConditioner, SDXLPipeline
from sdlearn.text import PretrainedTokenizer

FAMILIES = {"StableDiffusionPipeline": "sd", "StableDiffusionXLPipeline": "sdxl",
            "StableDiffusionXLImg2ImgPipeline": "sdxl-refiner", "StableDiffusion3Pipeline": "sd3"}
# the parts each family reads (an absent optional part: None in model_index.json)
PARTS = {"sd": ("vae", "text_encoder", "unet"),
         "sdxl": ("vae", "text_encoder", "text_encoder_2", "unet"),
         "sdxl-refiner": ("vae", "text_encoder_2", "unet"),
         "sd3": ("vae", "text_encoder", "text_encoder_2", "text_encoder_3", "transformer")}
OPTIONAL = {"text_encoder_3"}  # SD3 runs without T5: zeros in its place
BETA_SCHEDULES = {"linear": "linear", "scaled_linear": "scaled_linear", "squaredcos_cap_v2": "cosine"}
PREDICTIONS = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}


# -----------------------------------------------------------------------------
# one part: (class name, config, state in diffusers' / transformers' names) -> an sdlearn module


def _diffusers_config(class_name: str, config) -> dict:
    """A diffusers model's config with its class's defaults filled in, as its from_config would see it."""
    import diffusers
    from diffusers.configuration_utils import FrozenDict

    init = inspect.signature(getattr(diffusers, class_name).__init__).parameters
    defaults = {k: p.default for k, p in init.items() if p.default is not inspect.Parameter.empty}
    return FrozenDict({**defaults, **dict(config)})


def _transformers_config(class_name: str, config):
    import transformers

    if not isinstance(config, dict):
        return config  # already a transformers config (an in-memory model's)
    return getattr(transformers, class_name).config_class.from_dict(config)


def _assign(cls, cfg, state: dict, source: str) -> nn.Module:
    """cls(cfg) built on the meta device, then given `state`'s tensors (no copy); a clear error on a mismatch."""
    with torch.device("meta"):
        module = cls(cfg)
    missing, unexpected = module.load_state_dict(state, strict=False, assign=True)
    if missing or unexpected:
        raise ValueError(f"{source}: the weights do not fit sdlearn's {cls.__name__} built from its config: "
                         f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''}, unexpected "
                         f"{unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
    return module


def part_config(class_name: str, config, pooled_dim: int | None = None, prediction: str = "eps"):
    """(sdlearn class, its config, state renamer, finisher) for one diffusers / transformers part, from its class
    name and config (a dict as in config.json, or the model's config object); the finisher turns the built module
    into the part (a UNet with SDXL's text_time embedding into an SDXLUNet)."""
    from sdlearn.convert import mmdit, t5, text, unet, vae

    def same(m):
        return m

    if class_name == "UNet2DConditionModel":
        c = _diffusers_config(class_name, config)
        cfg = dataclasses.replace(unet.config_from_diffusers(c), prediction=prediction)
        return (unet.UNet, cfg, lambda state: unet.state_from_diffusers(c, state),
                lambda m: unet.with_addition(m, c, pooled_dim))
    if class_name == "AutoencoderKL":
        cfg = vae.config_from_diffusers(_diffusers_config(class_name, config))
        return vae.AutoencoderKL, cfg, lambda state: rename(state, vae.RENAMES, to="ours"), same
    if class_name == "SD3Transformer2DModel":
        cfg = dataclasses.replace(mmdit.config_from_diffusers(_diffusers_config(class_name, config)),
                                  prediction=prediction)
        return mmdit.MMDiT, cfg, lambda state: mmdit.state_from_diffusers(state, cfg.depth), same
    if class_name in ("CLIPTextModel", "CLIPTextModelWithProjection"):
        cfg = text.config_from_transformers(_transformers_config(class_name, config),
                                            class_name == "CLIPTextModelWithProjection")
        return text.TextEncoder, cfg, text.state_from_transformers, same
    if class_name == "T5EncoderModel":
        return t5.T5Encoder, t5.config_from_transformers(config), t5.state_from_diffusers, same
    raise ValueError(f"sdlearn has no module for {class_name}; it reads UNet2DConditionModel, AutoencoderKL, "
                     f"SD3Transformer2DModel, CLIPTextModel(WithProjection) and T5EncoderModel")


def build_part(class_name: str, config, state: dict, source: str = "", pooled_dim: int | None = None,
               prediction: str = "eps") -> nn.Module:
    """The sdlearn module for one diffusers / transformers part (class name, config, state dict in its names)."""
    cls, cfg, to_ours, finish = part_config(class_name, config, pooled_dim, prediction)
    return finish(_assign(cls, cfg, to_ours(state), source or class_name))


# -----------------------------------------------------------------------------
# the scheduler


def schedule_from_diffusers(config: dict) -> tuple[NoiseSchedule | FlowSchedule, str]:
    """(schedule, prediction) of a diffusers scheduler config (scheduler_config.json, or scheduler.config)."""
    c = dict(config)
    name = c.get("_class_name", "?")
    if name.startswith("FlowMatch"):
        if c.get("use_dynamic_shifting"):
            raise ValueError(f"scheduler {name} uses dynamic shifting (a shift per resolution); sdlearn's "
                             f"FlowSchedule has one shift")
        return FlowSchedule(shift=float(c.get("shift", 1.0)),
                            num_train_timesteps=c.get("num_train_timesteps", 1000)), "v"
    if c.get("trained_betas") is not None or c.get("beta_schedule", "linear") not in BETA_SCHEDULES:
        raise ValueError(f"scheduler {name}: beta_schedule {c.get('beta_schedule')!r} with trained_betas "
                         f"{c.get('trained_betas') is not None}; sdlearn's NoiseSchedule makes "
                         f"{', '.join(BETA_SCHEDULES)}")
    kind = BETA_SCHEDULES[c.get("beta_schedule", "linear")]
    betas = {} if kind == "cosine" else dict(beta_start=c.get("beta_start", 1e-4), beta_end=c.get("beta_end", 0.02))
    schedule = NoiseSchedule(kind, c.get("num_train_timesteps", 1000), **betas,
                             spacing=c.get("timestep_spacing", "leading"), offset=c.get("steps_offset", 0))
    prediction = c.get("prediction_type", "epsilon")
    if prediction not in PREDICTIONS:
        raise ValueError(f"scheduler {name}: prediction_type {prediction!r}, expected one of {', '.join(PREDICTIONS)}")
    return schedule, PREDICTIONS[prediction]


def schedule_to_diffusers(schedule, prediction: str):
    """The diffusers scheduler that samples as sdlearn does with `schedule`: DDIM or flow-matching Euler."""
    from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

    if isinstance(schedule, FlowSchedule):
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=schedule.num_train_timesteps, shift=schedule.shift)
    betas = {} if schedule.kind == "cosine" else dict(beta_start=schedule.beta_start, beta_end=schedule.beta_end)
    return DDIMScheduler(num_train_timesteps=schedule.num_steps, beta_schedule={v: k for k, v in
                         BETA_SCHEDULES.items()}[schedule.kind], **betas, timestep_spacing=schedule.spacing,
                         steps_offset=schedule.offset, set_alpha_to_one=True, clip_sample=False,
                         prediction_type={v: k for k, v in PREDICTIONS.items()}[prediction])


# -----------------------------------------------------------------------------
# a checkpoint's parts -> the sdlearn pipeline


def assemble(family: str, parts: dict, tokenizers: dict, scheduler: dict, options: dict) -> TextToImage:
    """The sdlearn pipeline of `family` from its parts (sdlearn modules), tokenizers (transformers'), scheduler
    config and pipeline options (model_index.json's force_zeros_for_empty_prompt, requires_aesthetics_score,
    and the denoiser's sample_size)."""
    schedule, prediction = schedule_from_diffusers(scheduler)
    vae = parts["vae"]
    size = options["sample_size"] * vae.downsampling_factor

    def tok(name, max_length=None):
        return PretrainedTokenizer(tokenizers[name], max_length) if tokenizers.get(name) is not None else None

    if family == "sd":
        conditioner = TextConditioner(parts["text_encoder"], tok("tokenizer"))
    elif family in ("sdxl", "sdxl-refiner"):
        refiner = family == "sdxl-refiner" and options.get("requires_aesthetics_score", False)
        conditioner = SDXLConditioner(
            parts.get("text_encoder"), parts["text_encoder_2"], size, aesthetic_score=6.0 if refiner else None,
            tokenizer=tok("tokenizer"), tokenizer_2=tok("tokenizer_2"),
            zero_negative=options.get("force_zeros_for_empty_prompt", True))
    elif family == "sd3":
        t5 = parts.get("text_encoder_3")
        third = options.get("max_sequence_length", 256)  # T5's tokens, or as many zeros without it (as diffusers)
        conditioner = SD3Conditioner(
            parts["text_encoder"], parts["text_encoder_2"], t5, joint_dim=parts["transformer"].config.context_dim,
            third_length=third, tokenizer=tok("tokenizer"), tokenizer_2=tok("tokenizer_2"),
            tokenizer_3=tok("tokenizer_3", third) if t5 is not None else None, zero_negative=False)
    else:
        raise ValueError(f"unknown family {family!r}, expected one of {', '.join(PARTS)}")
    denoiser = parts["transformer" if family == "sd3" else "unet"]
    return TextToImage(conditioner, denoiser, schedule, vae, prediction, size)


def _pooled_dim(parts: dict) -> int | None:
    """The pooled text width an SDXL UNet reads: text_encoder_2's projection (absent from the UNet's config)."""
    te2 = parts.get("text_encoder_2")
    return te2.config.pooled_dim if te2 is not None else None


def _place(part: nn.Module, name: str, config, device, dtype: torch.dtype | None) -> nn.Module:
    """The part on `device` in `dtype`; but a VAE whose config says force_upcast stays in float32 when fp16 is
    asked for (as diffusers decodes it: SDXL's VAE overflows fp16)."""
    if name == "vae" and dtype == torch.float16 and dict(config).get("force_upcast", True):
        dtype = torch.float32
    return part.to(device=device, dtype=dtype) if dtype is not None else part.to(device)


def from_diffusers(pipeline, refiner=None, dtype: torch.dtype | None = None, max_sequence_length: int = 256):
    """An in-memory diffusers pipeline (and optionally its SDXL refiner) -> the sdlearn pipeline, made of the
    same weight tensors (no copy: changing one changes the other; pass dtype for a converted copy)."""
    family = _family(type(pipeline).__name__, "the pipeline")
    components = pipeline.components
    prediction = schedule_from_diffusers(pipeline.scheduler.config)[1]
    parts = {}
    for name in PARTS[family]:
        model = components.get(name)
        if model is None:
            if name in OPTIONAL:
                continue
            raise ValueError(f"the {type(pipeline).__name__} has no {name}, which sdlearn's {family} pipeline needs")
        part = build_part(type(model).__name__, model.config, model.state_dict(), name,
                          pooled_dim=_pooled_dim(parts) if name == "unet" else None, prediction=prediction)
        parts[name] = part if dtype is None else _place(part, name, model.config, next(part.parameters()).device, dtype)
    denoiser = components["transformer" if family == "sd3" else "unet"]
    options = {**dict(pipeline.config), "sample_size": denoiser.config.sample_size,
               "max_sequence_length": max_sequence_length}
    tokenizers = {k: v for k, v in components.items() if k.startswith("tokenizer")}
    pipe = assemble(family, parts, tokenizers, pipeline.scheduler.config, options)
    return pipe if refiner is None else SDXLPipeline(pipe, from_diffusers(refiner, dtype=dtype))


def _family(class_name: str, what: str) -> str:
    if class_name not in FAMILIES:
        raise ValueError(f"{what} is a {class_name}; sdlearn reads {', '.join(FAMILIES)}")
    return FAMILIES[class_name]


# -----------------------------------------------------------------------------
# a diffusers folder, or an original single file with a diffusers folder's configs


def _weights_file(folder: Path, variant: str | None) -> list[Path]:
    """The weights of one part folder: a sharded index's files, or the one safetensors (or pickle) file."""
    for stem in ("diffusion_pytorch_model", "model"):
        for ext in ("safetensors", "bin"):
            name = f"{stem}.{variant}.{ext}" if variant else f"{stem}.{ext}"
            index = folder / f"{name}.index.json"
            if index.exists():
                return sorted({folder / f for f in json.loads(index.read_text())["weight_map"].values()})
            if (folder / name).exists():
                return [folder / name]
    found = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else "no such folder"
    raise FileNotFoundError(f"{folder}: no weights (diffusion_pytorch_model or model{f'.{variant}' if variant else ''}"
                            f".safetensors, or a sharded *.index.json); found {found}")


def _fit_text_config(state: dict, config: dict, class_name: str) -> dict:
    """A single file's text encoder without what its diffusers config leaves out: SD 2.x files hold all 24 of
    OpenCLIP ViT-H's layers and its text projection, of which SD 2.x reads 23 layers (the penultimate layer's
    output) and no projection (a CLIPTextModel), as diffusers' converter drops them."""
    n = config.get("num_hidden_layers")
    if n is None:
        return state
    if class_name == "CLIPTextModel":
        state = {k: v for k, v in state.items() if k != "text_projection.weight"}
    return {k: v for k, v in state.items() if not ((m := re.search(r"encoder\.layers\.(\d+)\.", k)) and int(m[1]) >= n)}


def _read_index(folder: Path) -> dict:
    index = folder / "model_index.json"
    if not index.exists():
        raise FileNotFoundError(f"{folder} is not a diffusers pipeline folder: it has no model_index.json (a single "
                                f"file checkpoint is a path to a .safetensors file)")
    return json.loads(index.read_text())


def _tokenizers(folder: Path, index: dict) -> dict:
    from transformers import AutoTokenizer

    return {name: AutoTokenizer.from_pretrained(folder / name) for name, spec in index.items()
            if name.startswith("tokenizer") and isinstance(spec, list) and spec[0] is not None}


def load(path, config=None, refiner=None, refiner_config=None, device: str | torch.device = "cpu",
         dtype: torch.dtype | None = None, variant: str | None = None, allow_pickle: bool = False,
         max_sequence_length: int = 256, skip: Sequence[str] = ()):
    """A published checkpoint -> the sdlearn pipeline of its family, on `device` in `dtype` (default: as stored).

    path: a diffusers folder (model_index.json, a folder per part), or an original single .safetensors file, whose
        configs and tokenizers come from `config`, a diffusers folder of the same model (its weights are not read;
        e.g. huggingface_hub.snapshot_download(repo, allow_patterns=["*.json", "*.txt", "tokenizer*/*"])).
    refiner, refiner_config: an SDXL refiner's checkpoint (a folder, or a file with its config folder); with it,
        an SDXLPipeline. A folder holding base/ and refiner/ (what `save` writes for an SDXLPipeline) loads as one.
    variant: diffusers' weight variant, e.g. "fp16" (diffusion_pytorch_model.fp16.safetensors).
    allow_pickle: read .bin / .ckpt files with torch.load(weights_only=True); by default only safetensors.
    max_sequence_length: SD3's T5 tokens per prompt (diffusers' pipeline argument of that name).
    skip: optional parts not to load: ["text_encoder_3"] runs SD3 without T5 (zeros in its place), saving its
        4.8 B parameters.
    """
    from sdlearn.convert import files, original

    path = Path(path)
    if path.is_dir() and not (path / "model_index.json").exists() and (path / "base").is_dir():
        refiner = path / "refiner" if (path / "refiner").is_dir() and refiner is None else refiner
        path = path / "base"
    if path.is_dir():
        folder, single = path, None
    elif path.is_file():
        if config is None:
            raise ValueError(f"{path} is a single-file checkpoint, which holds weights but no configs or tokenizers: "
                             f"pass config=<a diffusers folder of the same model> (only its *.json and tokenizer files "
                             f"are read)")
        folder = Path(config)
        single = original.split(files.read(path, allow_pickle=allow_pickle))
    else:
        raise FileNotFoundError(f"no checkpoint at {path}: expected a diffusers folder or a .safetensors file")
    index = _read_index(folder)
    family = _family(index.get("_class_name", "?"), f"{folder}/model_index.json's pipeline")
    scheduler = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    prediction = schedule_from_diffusers(scheduler)[1]
    parts = {}
    for name in PARTS[family]:
        spec = index.get(name)
        if spec is None or spec[0] is None or name in skip or (single is not None and name not in single):
            if name in OPTIONAL:
                continue
            raise ValueError(f"the {family} checkpoint at {path} has no {name}, which sdlearn's {family} pipeline "
                             f"needs" + (" (it cannot be skipped)" if name in skip else ""))
        cfg = json.loads((folder / name / "config.json").read_text())
        if single is not None:
            state = _fit_text_config(single.pop(name), cfg, spec[1])
        else:
            state = {}
            for f in _weights_file(folder / name, variant):
                state.update(files.read(f, allow_pickle=allow_pickle, device=device))
        part = build_part(spec[1], cfg, state, f"{path}:{name}",
                          pooled_dim=_pooled_dim(parts) if name == "unet" else None, prediction=prediction)
        del state  # the part holds the tensors now; as each part moves, the file's copy of it goes
        parts[name] = _place(part, name, cfg, device, dtype)
    denoiser_cfg = json.loads((folder / ("transformer" if family == "sd3" else "unet") / "config.json").read_text())
    options = {**{k: v for k, v in index.items() if not isinstance(v, list)},
               "sample_size": denoiser_cfg["sample_size"], "max_sequence_length": max_sequence_length}
    pipe = assemble(family, parts, _tokenizers(folder, index), scheduler, options)
    if refiner is None:
        return pipe
    return SDXLPipeline(pipe, load(refiner, config=refiner_config, device=device, dtype=dtype, variant=variant,
                                   allow_pickle=allow_pickle))


# -----------------------------------------------------------------------------
# back: an sdlearn pipeline -> diffusers


def _tokenizer(t, what: str):
    if t is None:
        return None
    if not isinstance(t, PretrainedTokenizer):
        raise ValueError(f"{what} is the course's word-level tokenizer, which diffusers cannot load: export a pipeline "
                         f"whose conditioner has transformers tokenizers (sdlearn.text.PretrainedTokenizer)")
    return t.tokenizer


def to_diffusers(pipe):
    """The diffusers pipeline equivalent to an sdlearn TextToImage (SDXLPipeline: a (base, refiner) pair)."""
    import diffusers

    from sdlearn import convert

    if isinstance(pipe, SDXLPipeline):
        return to_diffusers(pipe.base), to_diffusers(pipe.refiner)
    if not isinstance(pipe, TextToImage):
        raise TypeError(f"expected an sdlearn TextToImage or SDXLPipeline, got {type(pipe).__name__}")
    c, scheduler = pipe.conditioner, schedule_to_diffusers(pipe.schedule, pipe.prediction)
    common = dict(vae=convert.to_diffusers(pipe.vae), scheduler=scheduler)
    if isinstance(c, TextConditioner):
        out = diffusers.StableDiffusionPipeline(
            **common, text_encoder=convert.to_diffusers(c.text_encoder), tokenizer=_tokenizer(c.tokenizer, "tokenizer"),
            unet=convert.to_diffusers(pipe.denoiser), safety_checker=None, feature_extractor=None,
            requires_safety_checker=False)
    elif isinstance(c, SDXLConditioner):
        encoders = dict(text_encoder_2=convert.to_diffusers(c.text_encoder_2),
                        tokenizer_2=_tokenizer(c.tokenizer_2, "tokenizer_2"), unet=convert.to_diffusers(pipe.denoiser),
                        force_zeros_for_empty_prompt=c.zero_negative, add_watermarker=False)
        if c.text_encoder is None:
            out = diffusers.StableDiffusionXLImg2ImgPipeline(
                **common, **encoders, text_encoder=None, tokenizer=None, requires_aesthetics_score=c.refiner)
        else:
            out = diffusers.StableDiffusionXLPipeline(
                **common, **encoders, text_encoder=convert.to_diffusers(c.text_encoder),
                tokenizer=_tokenizer(c.tokenizer, "tokenizer"))
    elif isinstance(c, SD3Conditioner):
        encoders = {}
        for i, (enc, tok) in enumerate(zip(c.encoders, c.tokenizers, strict=True)):
            suffix = f"_{i + 1}" if i else ""
            encoders[f"text_encoder{suffix}"] = convert.to_diffusers(enc) if enc is not None else None
            encoders[f"tokenizer{suffix}"] = _tokenizer(tok, f"tokenizer{suffix}")
        out = diffusers.StableDiffusion3Pipeline(**common, **encoders, transformer=convert.to_diffusers(pipe.denoiser))
    else:
        raise ValueError(f"no diffusers pipeline for a {type(c).__name__}")
    denoiser = out.transformer if isinstance(c, SD3Conditioner) else out.unet
    denoiser.register_to_config(sample_size=pipe.image_size // pipe.vae.downsampling_factor)
    return out


def save(pipe, folder) -> Path:
    """Write `pipe` as a diffusers folder (safetensors) that DiffusionPipeline.from_pretrained and `load` read;
    an SDXLPipeline as folder/base and folder/refiner. Written to a temporary folder and moved into place, so a
    failed save leaves whatever was at `folder` as it was."""
    folder = Path(folder)
    if folder.exists() and any(folder.iterdir()):
        raise FileExistsError(f"{folder} exists and is not empty: save writes a new folder")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
    try:
        out = to_diffusers(pipe)
        if isinstance(out, tuple):
            out[0].save_pretrained(tmp / "base", safe_serialization=True)
            out[1].save_pretrained(tmp / "refiner", safe_serialization=True)
        else:
            out.save_pretrained(tmp, safe_serialization=True)
        if folder.exists():
            folder.rmdir()
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder
