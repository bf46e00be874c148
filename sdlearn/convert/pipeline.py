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

Two tables say everything family-specific; load, from_diffusers, assemble, to_diffusers and save only read them.
- CONVERTERS, keyed by a part's diffusers / transformers class name: the sdlearn class it becomes, how its config
  is read and translated, how its state dict is renamed, and a finishing step (a UNet with SDXL's text_time
  embedding becomes an SDXLUNet around it).
- FAMILIES, one row (`Family`) per diffusers pipeline class (model_index.json's _class_name):
    StableDiffusionPipeline           -> TextToImage(TextConditioner, UNet, NoiseSchedule, VAE)        SD 1.x / 2.x
    StableDiffusionXLPipeline         -> TextToImage(SDXLConditioner, UNet, ...)                        SDXL base
    StableDiffusionXLImg2ImgPipeline  -> TextToImage(SDXLConditioner without text_encoder, UNet, ...)  SDXL refiner
    StableDiffusion3Pipeline          -> TextToImage(SD3Conditioner, MMDiT, FlowSchedule, VAE)          SD3 / SD3.5
    StableDiffusionControlNetPipeline -> TextToImage(ControlConditioner(TextConditioner),
                                                     Controlled(UNet, ControlNet), ...)           SD 1.x + ControlNet
    StableDiffusion3ControlNetPipeline -> TextToImage(ControlConditioner(SD3Conditioner, VAE),
                                                      Controlled(MMDiT, SD3ControlNet), ...)      SD3 + ControlNet
    StableDiffusionInpaintPipeline    -> TextToImage(InpaintConditioner(TextConditioner, VAE),
                                                     Inpainting(UNet with in_channels 2C + 1), ...)  SD inpainting
  A row names its parts (`Part`: the component's name in diffusers, where it sits in the sdlearn pipeline, whether
  it may be absent, what its converter needs from the parts built before it, the options it is written back with
  and the sdlearn classes diffusers can hold there), its tokenizers (the course's word-level one is written as a
  CLIP byte-pair vocabulary with the same ids: sdlearn.convert.text.tokenizer_to_transformers), the conditioner it
  builds (class, and a function of the parts, tokenizers and model_index.json's options), and what writing it
  back adds: model_index options read off the sdlearn pipeline and fixed keywords of the diffusers pipeline.
  The part at "denoiser" is what TextToImage samples with (or the row's `wrap` of the parts makes it: the
  inpainting row's Inpainting around its UNet), `denoiser` names the denoising network (its config holds the
  latents' sample_size); the scheduler's prediction type goes to every part whose sdlearn config has a `prediction`.

Adding a family is adding a row (and, for a new kind of part, a converter):
- SD inpainting (done: the "sd-inpaint" row): the "sd" parts with the UNet at "denoiser.unet" (its 9-channel
  conv_in converts as any UNet's), `wrap` puts sdlearn.inpaint.Inpainting around it and the conditioner is the
  text one wrapped to take image and mask (sdlearn.inpaint.InpaintConditioner). The UNet picks between the two
  rows: a StableDiffusionPipeline whose UNet reads 2C + 1 channels loads as an inpainting pipeline, a
  StableDiffusionInpaintPipeline around a plain UNet (diffusers blends latents with it) as a text-to-image one
  (sdlearn.inpaint.blended repaints with it); a single file's conv_in says how many channels its UNet reads,
  whatever the config folder says (SD's inpainting file with SD 1.5's configs).
- ControlNet (done: the "sd-controlnet" and "sd3-controlnet" rows): Part("unet", "denoiser.base") and
  Part("controlnet", "denoiser", needs=<the built UNet>); the CONVERTERS entry for ControlNetModel
  (sdlearn.convert.controlnet) finishes by wrapping that UNet (sdlearn.controlnet.Controlled), and the conditioner
  is the family's, wrapped to take the control image (sdlearn.controlnet.ControlConditioner). `load(...,
  controlnet=<folder or file>)` attaches a published ControlNet to any checkpoint it loads.
to_diffusers writes an sdlearn pipeline with the first row, in table order, whose conditioner class it has, whose
required parts it holds and whose `accepts` takes it: a special row goes before the general one it refines.

Sampling (sdlearn.convert.scheduler): a NoiseSchedule gets the checkpoint's betas, prediction type, timestep
spacing and offset, zero-SNR rescaling, Karras sigmas, final sigma / set_alpha_to_one and clipping, and samples with
the sampler of its scheduler class (DDIM, DDPM, Euler, Euler ancestral, DPM-Solver++(2M); PNDM falls back to DDIM,
with a warning); a FlowSchedule gets the shift, and samples with Euler as FlowMatchEulerDiscreteScheduler does.
"""
from __future__ import annotations

import dataclasses
import inspect
import json
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path

import torch
from torch import nn

from sdlearn.controlnet import ControlConditioner, ControlNet, SD3ControlNet, attach
from sdlearn.convert import controlnet as control
from sdlearn.convert import mmdit, t5, text, unet, vae
from sdlearn.convert.keys import rename
from sdlearn.convert.scheduler import schedule_from_diffusers, schedule_to_diffusers
from sdlearn.inpaint import InpaintConditioner, Inpainting
from sdlearn.pipeline import Conditioner, TextConditioner, TextToImage
from sdlearn.sd3 import SD3Conditioner
from sdlearn.sdxl import SDXLConditioner, SDXLPipeline
from sdlearn.t5 import T5Encoder
from sdlearn.text import PretrainedTokenizer, Tokenizer

# -----------------------------------------------------------------------------
# the parts: a diffusers / transformers class -> an sdlearn module


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


def _as_given(class_name: str, config):
    return config


def _itself(module: nn.Module, c) -> nn.Module:
    return module


def _as_stored(state: dict, config: dict) -> dict:
    return state


def _clip_as_configured(state: dict, config: dict, projection: bool) -> dict:
    """A single file's CLIP text encoder without what its diffusers config leaves out: SD 2.x files hold all 24 of
    OpenCLIP ViT-H's layers and its text projection, of which SD 2.x reads 23 layers (the penultimate layer's
    output) and no projection (a CLIPTextModel), as diffusers' converter drops them."""
    n = config.get("num_hidden_layers")
    if n is None:
        return state
    return {k: v for k, v in state.items() if (projection or k != "text_projection.weight")
            and not ((m := re.search(r"encoder\.layers\.(\d+)\.", k)) and int(m[1]) >= n)}


@dataclasses.dataclass(frozen=True)
class Converter:
    """How one diffusers / transformers class becomes an sdlearn module."""

    module: type[nn.Module]     # the sdlearn class built
    read: Callable              # (class name, config.json's dict or the model's config) -> their config, as used below
    config: Callable            # their config -> the sdlearn class's config
    state: Callable             # (their config, state dict in their names) -> the state dict in sdlearn's names
    finish: Callable = _itself  # (built module, their config, **the family's options for it) -> the part
    single_file: Callable = _as_stored  # (its state in an original single file, config.json) -> what the config reads
    upcast: bool = False        # kept in float32 when float16 is asked for and its config says force_upcast (a VAE)


CONVERTERS = {
    "UNet2DConditionModel": Converter(unet.UNet, _diffusers_config, unet.config_from_diffusers,
                                      unet.state_from_diffusers, finish=unet.with_addition),
    "AutoencoderKL": Converter(vae.AutoencoderKL, _diffusers_config, vae.config_from_diffusers,
                               lambda c, state: rename(state, vae.RENAMES, to="ours"), upcast=True),
    "SD3Transformer2DModel": Converter(mmdit.MMDiT, _diffusers_config, mmdit.config_from_diffusers,
                                       lambda c, state: mmdit.state_from_diffusers(state, c["num_layers"])),
    "CLIPTextModel": Converter(text.TextEncoder, _transformers_config, text.config_from_transformers,
                               lambda c, state: text.state_from_transformers(state),
                               single_file=partial(_clip_as_configured, projection=False)),
    "CLIPTextModelWithProjection": Converter(text.TextEncoder, _transformers_config,
                                             partial(text.config_from_transformers, with_projection=True),
                                             lambda c, state: text.state_from_transformers(state),
                                             single_file=partial(_clip_as_configured, projection=True)),
    "T5EncoderModel": Converter(t5.T5Encoder, _as_given, t5.config_from_transformers,
                                lambda c, state: t5.state_from_diffusers(state)),
    "ControlNetModel": Converter(ControlNet, _diffusers_config, control.config_from_diffusers,
                                 control.state_from_diffusers, finish=control.controlled),
    "SD3ControlNetModel": Converter(SD3ControlNet, _diffusers_config, control.sd3_config_from_diffusers,
                                    control.sd3_state_from_diffusers, finish=control.controlled),
}


def _converter(class_name: str) -> Converter:
    if class_name not in CONVERTERS:
        raise ValueError(f"sdlearn has no module for {class_name}; it reads {', '.join(CONVERTERS)}")
    return CONVERTERS[class_name]


# -----------------------------------------------------------------------------
# the families: a diffusers pipeline class -> which parts, and how they make an sdlearn pipeline


def _no_needs(parts: dict) -> dict:
    return {}


def _always(pipe) -> bool:
    return True


def _denoiser_part(placed: dict) -> nn.Module:
    return placed[DENOISER]


@dataclasses.dataclass(frozen=True)
class Part:
    """One component of a family: its name in diffusers (model_index.json's key, its folder, the pipeline's keyword)
    and where it sits in the sdlearn pipeline (a path of attributes and list indices from the TextToImage)."""

    name: str
    at: str
    optional: bool = False         # may be absent (None in model_index.json, or `skip`ped): SD3's T5
    needs: Callable = _no_needs    # (the parts built before it) -> options for its converter's finishing step
    writes: dict = dataclasses.field(default_factory=dict)  # options of convert.to_diffusers when written back
    kinds: tuple[type, ...] = ()   # the sdlearn classes diffusers' pipeline can hold here (empty: any)


@dataclasses.dataclass(frozen=True)
class Family:
    """One diffusers pipeline class and the sdlearn pipeline it is."""

    name: str
    pipeline: str                  # diffusers' class, model_index.json's _class_name
    parts: tuple[Part, ...]        # built in this order (a part's `needs` reads those before it)
    denoiser: str                  # the denoising network's part (its config holds the latents' sample_size)
    tokenizers: dict[str, str]     # diffusers' name -> where it sits in the sdlearn pipeline
    conditioner: type[Conditioner]
    build: Callable                # (parts, tok(name, max_length=None), model_index options, image size) -> conditioner
    options: dict[str, str] = dataclasses.field(default_factory=dict)  # written back: option -> where its value sits
    fixed: dict = dataclasses.field(default_factory=dict)    # keywords the diffusers pipeline gets as they are
    accepts: Callable = _always    # (an sdlearn pipeline) -> whether this row writes it (see to_diffusers)
    wrap: Callable = _denoiser_part  # (the parts by where they sit) -> the denoiser TextToImage samples with


def _sd_text(parts: dict, tok: Callable, options: dict, size: int) -> TextConditioner:
    return TextConditioner(parts["text_encoder"], tok("tokenizer"))


def _sdxl_text(parts: dict, tok: Callable, options: dict, size: int) -> SDXLConditioner:
    return SDXLConditioner(
        parts.get("text_encoder"), parts["text_encoder_2"], size,
        aesthetic_score=6.0 if options.get("requires_aesthetics_score", False) else None,
        tokenizer=tok("tokenizer"), tokenizer_2=tok("tokenizer_2"),
        zero_negative=options.get("force_zeros_for_empty_prompt", True))


def _sd3_text(parts: dict, tok: Callable, options: dict, size: int) -> SD3Conditioner:
    t5 = parts.get("text_encoder_3")
    third = options.get("max_sequence_length", 256)  # T5's tokens, or as many zeros without it (as diffusers)
    return SD3Conditioner(
        parts["text_encoder"], parts["text_encoder_2"], t5, joint_dim=parts["transformer"].config.context_dim,
        third_length=third, tokenizer=tok("tokenizer"), tokenizer_2=tok("tokenizer_2"),
        tokenizer_3=tok("tokenizer_3", third) if t5 is not None else None, zero_negative=False)


def _pooled_width(parts: dict) -> dict:
    """What an SDXL UNet needs beyond its config: the pooled text width, text_encoder_2's projection."""
    return {"pooled_dim": parts["text_encoder_2"].config.pooled_dim}


def _base(name: str) -> Callable:
    """What a ControlNet needs: the denoiser it steers, the part `name` built before it."""
    return lambda parts: {"base": parts[name]}


def _with_control(build: Callable) -> Callable:
    """A family's conditioner builder, wrapped to take the control image (with the VAE when the ControlNet reads
    latents: SD3's; without the VAE's shift when it reads zeros for the pooled text: InstantX's)."""
    def wrapped(parts: dict, tok: Callable, options: dict, size: int) -> ControlConditioner:
        cn = parts["controlnet"].controlnet
        shift = not (cn.reads_latents and cn.config.zero_pooled)
        return ControlConditioner(build(parts, tok, options, size), parts["vae"] if cn.reads_latents else None,
                                  latent_shift=shift)
    return wrapped


def _inpaint_text(parts: dict, tok: Callable, options: dict, size: int) -> InpaintConditioner:
    return InpaintConditioner(_sd_text(parts, tok, options, size), parts["vae"])


def _inpainting(placed: dict) -> Inpainting:
    return Inpainting(placed["denoiser.unet"])


def _reads_mask(unet) -> bool:
    """Whether a built UNet part reads latents, a mask and masked latents (in_channels = 2 out_channels + 1)."""
    cfg = getattr(unet, "config", None)
    return getattr(cfg, "in_channels", None) == 2 * getattr(cfg, "out_channels", -1) + 1


VAE, DENOISER = "vae", "denoiser"  # where TextToImage holds its VAE and its denoiser
STATES = dict(projection=False)  # a first text encoder read for its token states: a CLIPTextModel (no projection)
FAMILIES = (
    Family("sd", pipeline="StableDiffusionPipeline", denoiser="unet",
           parts=(Part("vae", VAE), Part("text_encoder", "conditioner.text_encoder", writes=STATES),
                  Part("unet", DENOISER)),
           tokenizers={"tokenizer": "conditioner.tokenizer"},
           conditioner=TextConditioner, build=_sd_text,
           fixed=dict(safety_checker=None, feature_extractor=None, requires_safety_checker=False)),
    Family("sdxl", pipeline="StableDiffusionXLPipeline", denoiser="unet",
           parts=(Part("vae", VAE), Part("text_encoder", "conditioner.text_encoder", writes=STATES),
                  Part("text_encoder_2", "conditioner.text_encoder_2"), Part("unet", DENOISER, needs=_pooled_width)),
           tokenizers={"tokenizer": "conditioner.tokenizer", "tokenizer_2": "conditioner.tokenizer_2"},
           conditioner=SDXLConditioner, build=_sdxl_text,
           options={"force_zeros_for_empty_prompt": "conditioner.zero_negative"},
           fixed=dict(add_watermarker=False)),
    Family("sdxl-refiner", pipeline="StableDiffusionXLImg2ImgPipeline", denoiser="unet",
           parts=(Part("vae", VAE), Part("text_encoder_2", "conditioner.text_encoder_2"),
                  Part("unet", DENOISER, needs=_pooled_width)),
           tokenizers={"tokenizer_2": "conditioner.tokenizer_2"},
           conditioner=SDXLConditioner, build=_sdxl_text,
           options={"force_zeros_for_empty_prompt": "conditioner.zero_negative",
                    "requires_aesthetics_score": "conditioner.refiner"},
           fixed=dict(text_encoder=None, tokenizer=None, add_watermarker=False)),
    Family("sd3", pipeline="StableDiffusion3Pipeline", denoiser="transformer",
           parts=(Part("vae", VAE), Part("text_encoder", "conditioner.text_encoder"),
                  Part("text_encoder_2", "conditioner.text_encoder_2"),
                  Part("text_encoder_3", "conditioner.text_encoder_3", optional=True, kinds=(T5Encoder,)),
                  Part("transformer", DENOISER)),
           tokenizers={"tokenizer": "conditioner.tokenizers.0", "tokenizer_2": "conditioner.tokenizers.1",
                       "tokenizer_3": "conditioner.tokenizers.2"},
           conditioner=SD3Conditioner, build=_sd3_text),
    Family("sd-controlnet", pipeline="StableDiffusionControlNetPipeline", denoiser="unet",
           parts=(Part("vae", VAE), Part("text_encoder", "conditioner.conditioner.text_encoder"),
                  Part("unet", "denoiser.base"), Part("controlnet", DENOISER, needs=_base("unet"))),
           tokenizers={"tokenizer": "conditioner.conditioner.tokenizer"},
           conditioner=ControlConditioner, build=_with_control(_sd_text),
           fixed=dict(safety_checker=None, feature_extractor=None, requires_safety_checker=False),
           accepts=lambda pipe: isinstance(pipe.conditioner.conditioner, TextConditioner)),
    Family("sd3-controlnet", pipeline="StableDiffusion3ControlNetPipeline", denoiser="transformer",
           parts=(Part("vae", VAE), Part("text_encoder", "conditioner.conditioner.text_encoder"),
                  Part("text_encoder_2", "conditioner.conditioner.text_encoder_2"),
                  Part("text_encoder_3", "conditioner.conditioner.text_encoder_3", optional=True),
                  Part("transformer", "denoiser.base"), Part("controlnet", DENOISER, needs=_base("transformer"))),
           tokenizers={"tokenizer": "conditioner.conditioner.tokenizers.0",
                       "tokenizer_2": "conditioner.conditioner.tokenizers.1",
                       "tokenizer_3": "conditioner.conditioner.tokenizers.2"},
           conditioner=ControlConditioner, build=_with_control(_sd3_text),
           accepts=lambda pipe: isinstance(pipe.conditioner.conditioner, SD3Conditioner)),
    Family("sd-inpaint", pipeline="StableDiffusionInpaintPipeline", denoiser="unet",
           parts=(Part("vae", VAE), Part("text_encoder", "conditioner.conditioner.text_encoder", writes=STATES),
                  Part("unet", "denoiser.unet")),
           tokenizers={"tokenizer": "conditioner.conditioner.tokenizer"},
           conditioner=InpaintConditioner, build=_inpaint_text, wrap=_inpainting,
           fixed=dict(safety_checker=None, feature_extractor=None, requires_safety_checker=False),
           accepts=lambda pipe: isinstance(pipe.conditioner.conditioner, TextConditioner)
           and isinstance(pipe.denoiser, Inpainting)),
)
PIPELINES = {f.pipeline: f for f in FAMILIES}
_FAMILY = {False: PIPELINES["StableDiffusionPipeline"], True: PIPELINES["StableDiffusionInpaintPipeline"]}


def _family(class_name: str, what: str) -> Family:
    if class_name not in PIPELINES:
        raise ValueError(f"{what} is a {class_name}; sdlearn reads {', '.join(PIPELINES)}")
    return PIPELINES[class_name]


def _at(obj, path: str):
    """The object at `path` (attributes and list indices, "conditioner.tokenizers.2") from obj; None where the
    path ends early (a part this pipeline does not hold)."""
    for piece in path.split("."):
        if obj is None:
            return None
        obj = obj[int(piece)] if piece.isdigit() else getattr(obj, piece, None)
    return obj


# -----------------------------------------------------------------------------
# one part: (class name, config, state in diffusers' / transformers' names) -> an sdlearn module


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


def part_config(class_name: str, config, prediction: str | None = None, **options):
    """(sdlearn class, its config, state renamer, finisher) for one diffusers / transformers part (CONVERTERS), from
    its class name and config (a dict as in config.json, or the model's config object). prediction: what a
    denoiser predicts (its sdlearn config's `prediction`; parts without one ignore it; None: the config's default).
    options (those not None) go to the finisher, which turns the built module into the part."""
    conv = _converter(class_name)
    c = conv.read(class_name, config)
    cfg = conv.config(c)
    if prediction is not None and hasattr(cfg, "prediction"):
        cfg = dataclasses.replace(cfg, prediction=prediction)
    options = {k: v for k, v in options.items() if v is not None}
    return conv.module, cfg, lambda state: conv.state(c, state), lambda module: conv.finish(module, c, **options)


def build_part(class_name: str, config, state: dict, source: str = "", prediction: str | None = None,
               **options) -> nn.Module:
    """The sdlearn module for one diffusers / transformers part (class name, config, state dict in its names)."""
    cls, cfg, to_ours, finish = part_config(class_name, config, prediction, **options)
    return finish(_assign(cls, cfg, to_ours(state), source or class_name))


def _place(part: nn.Module, class_name: str, config, device, dtype: torch.dtype | None) -> nn.Module:
    """The part on `device` in `dtype`; but a part whose converter says upcast (a VAE) and whose config says
    force_upcast stays in float32 when fp16 is asked for (as diffusers decodes it: SDXL's VAE overflows fp16)."""
    if _converter(class_name).upcast and dtype == torch.float16 and dict(config).get("force_upcast", True):
        dtype = torch.float32
    return part.to(device=device, dtype=dtype) if dtype is not None else part.to(device)


def _build_parts(family: Family, read: Callable, place: Callable, prediction: str, where: str,
                 skip: Sequence[str] = ()) -> dict:
    """The family's parts, in its order: read(name) -> (class name, config, state dict) or None when absent, each
    built with what it needs from those before it and moved by place(part, class name, config)."""
    parts = {}
    for p in family.parts:
        got = None if p.name in skip else read(p.name)
        if got is None:
            if p.optional:
                continue
            raise ValueError(f"{where} has no {p.name}, which sdlearn's {family.name} pipeline needs"
                             + (" (it cannot be skipped)" if p.name in skip else ""))
        class_name, config, state = got
        del got
        part = build_part(class_name, config, state, f"{where}:{p.name}", prediction, **p.needs(parts))
        del state  # the part holds the tensors now; as each part moves, the file's copy of it goes
        parts[p.name] = place(part, class_name, config)
    return parts


# -----------------------------------------------------------------------------
# the scheduler


# schedule_from_diffusers, schedule_to_diffusers: sdlearn.convert.scheduler (the class picks the sampler, every
# field is read or warned about)


# -----------------------------------------------------------------------------
# a checkpoint's parts -> the sdlearn pipeline


def assemble(family: Family, parts: dict, tokenizers: dict, scheduler: dict, options: dict) -> TextToImage:
    """The sdlearn pipeline of `family` from its parts (sdlearn modules), tokenizers (transformers'), scheduler
    config and pipeline options (model_index.json's, e.g. force_zeros_for_empty_prompt, requires_aesthetics_score;
    the denoiser's sample_size; max_sequence_length)."""
    schedule, prediction = schedule_from_diffusers(scheduler)
    if family.name in ("sd", "sd-inpaint"):  # the UNet says which: diffusers' inpaint pipeline also takes a
        family = _FAMILY[_reads_mask(parts.get("unet"))]  # plain UNet (blended latents: sdlearn.inpaint.blended)
    placed = {p.at: parts.get(p.name) for p in family.parts}
    size = options["sample_size"] * placed[VAE].downsampling_factor

    def tok(name, max_length=None):
        return PretrainedTokenizer(tokenizers[name], max_length) if tokenizers.get(name) is not None else None

    conditioner = family.build(parts, tok, options, size)
    return TextToImage(conditioner, family.wrap(placed), schedule, placed[VAE], prediction, size)


def from_diffusers(pipeline, refiner=None, dtype: torch.dtype | None = None, max_sequence_length: int = 256):
    """An in-memory diffusers pipeline (and optionally its SDXL refiner) -> the sdlearn pipeline, made of the
    same weight tensors (no copy: changing one changes the other; pass dtype for a converted copy)."""
    family = _family(type(pipeline).__name__, "the pipeline")
    components = pipeline.components

    def read(name):
        model = components.get(name)
        return None if model is None else (type(model).__name__, model.config, model.state_dict())

    def place(part, class_name, config):
        return part if dtype is None else _place(part, class_name, config, next(part.parameters()).device, dtype)

    scheduler = {"_class_name": type(pipeline.scheduler).__name__, **pipeline.scheduler.config}
    prediction = schedule_from_diffusers(scheduler)[1]
    parts = _build_parts(family, read, place, prediction, f"the {type(pipeline).__name__}")
    options = {**dict(pipeline.config), "sample_size": components[family.denoiser].config.sample_size,
               "max_sequence_length": max_sequence_length}
    tokenizers = {name: components.get(name) for name in family.tokenizers}
    pipe = assemble(family, parts, tokenizers, scheduler, options)
    return pipe if refiner is None else SDXLPipeline(pipe, from_diffusers(refiner, dtype=dtype))


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


def _read_index(folder: Path) -> dict:
    index = folder / "model_index.json"
    if not index.exists():
        raise FileNotFoundError(f"{folder} is not a diffusers pipeline folder: it has no model_index.json (a single "
                                f"file checkpoint is a path to a .safetensors file)")
    return json.loads(index.read_text())


def _tokenizers(folder: Path, index: dict, names) -> dict:
    from transformers import AutoTokenizer

    return {name: AutoTokenizer.from_pretrained(folder / name) for name in names
            if isinstance(index.get(name), list) and index[name][0] is not None}


def _checkpoint(path: Path, config, refiner, allow_pickle: bool):
    """(path, the folder of configs, the single file's parts or None, refiner) of what `load` was given."""
    from sdlearn.convert import files, original

    if path.is_dir() and not (path / "model_index.json").exists() and (path / "base").is_dir():
        refiner = path / "refiner" if (path / "refiner").is_dir() and refiner is None else refiner
        path = path / "base"
    if path.is_dir():
        return path, path, None, refiner
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}: expected a diffusers folder or a .safetensors file")
    if config is None:
        raise ValueError(f"{path} is a single-file checkpoint, which holds weights but no configs or tokenizers: "
                         f"pass config=<a diffusers folder of the same model> (only its *.json and tokenizer files "
                         f"are read)")
    return path, Path(config), original.split(files.read(path, allow_pickle=allow_pickle)), refiner


def load(path, config=None, refiner=None, refiner_config=None, device: str | torch.device = "cpu",
         dtype: torch.dtype | None = None, variant: str | None = None, allow_pickle: bool = False,
         max_sequence_length: int = 256, skip: Sequence[str] = (), controlnet=None, guess_mode: bool = False):
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
    controlnet: a published ControlNet for this checkpoint (a diffusers folder, or a single file in diffusers' names
        or the original control_model.* layout); with it the pipeline takes control= (sdlearn.controlnet.attach;
        guess_mode: diffusers' guess mode).
    """
    from sdlearn.convert import files

    path, folder, single, refiner = _checkpoint(Path(path), config, refiner, allow_pickle)
    index = _read_index(folder)
    family = _family(index.get("_class_name", "?"), f"{folder}/model_index.json's pipeline")
    scheduler = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())

    def read(name):
        spec = index.get(name)
        if spec is None or spec[0] is None or (single is not None and name not in single):
            return None
        cfg = json.loads((folder / name / "config.json").read_text())
        if single is not None:
            state = single.pop(name)
            if name == "unet" and "conv_in.weight" in state:  # an inpainting file (9 channels) with SD's configs
                cfg["in_channels"] = state["conv_in.weight"].shape[1]
            return spec[1], cfg, _converter(spec[1]).single_file(state, cfg)
        state = {}
        for f in _weights_file(folder / name, variant):
            state.update(files.read(f, allow_pickle=allow_pickle, device=device))
        return spec[1], cfg, state

    parts = _build_parts(family, read, lambda part, class_name, cfg: _place(part, class_name, cfg, device, dtype),
                         schedule_from_diffusers(scheduler)[1], f"the {family.name} checkpoint at {path}", skip)
    denoiser_cfg = json.loads((folder / family.denoiser / "config.json").read_text())
    options = {**{k: v for k, v in index.items() if not isinstance(v, list)},
               "sample_size": denoiser_cfg["sample_size"], "max_sequence_length": max_sequence_length}
    pipe = assemble(family, parts, _tokenizers(folder, index, family.tokenizers), scheduler, options)
    if controlnet is not None:
        steer = control.read(controlnet, pipe.denoiser, variant, allow_pickle, device)
        pipe = attach(pipe, _place(steer, "ControlNetModel", {}, device, dtype), guess_mode)
    if refiner is None:
        return pipe
    return SDXLPipeline(pipe, load(refiner, config=refiner_config, device=device, dtype=dtype, variant=variant,
                                   allow_pickle=allow_pickle))


# -----------------------------------------------------------------------------
# back: an sdlearn pipeline -> diffusers


def _tokenizer(t, what: str):
    """The transformers tokenizer a conditioner's tokenizer is: a PretrainedTokenizer's own; the course's word-level
    Tokenizer as a CLIPTokenizer giving its ids (sdlearn.convert.text.tokenizer_to_transformers)."""
    if t is None:
        return None
    if isinstance(t, Tokenizer):
        return text.tokenizer_to_transformers(t)
    if not isinstance(t, PretrainedTokenizer):
        raise TypeError(f"{what} is a {type(t).__name__}; sdlearn writes the course's Tokenizer or a transformers "
                        f"tokenizer (sdlearn.text.PretrainedTokenizer)")
    return t.tokenizer


def _written(family: Family, p: Part, module: nn.Module | None):
    """The diffusers / transformers model of one part, converted with the row's options; a part whose class the
    diffusers pipeline cannot hold is a clear error."""
    from sdlearn import convert

    if module is None:
        return None
    if p.kinds and not isinstance(module, p.kinds):
        left_out = "; it is optional: export the pipeline with None there" if p.optional else ""
        raise ValueError(f"diffusers' {family.pipeline} holds a {' or '.join(k.__name__ for k in p.kinds)} as "
                         f"{p.name}, got sdlearn's {type(module).__name__}{left_out}")
    return convert.to_diffusers(module, **p.writes)


def _writer(pipe: TextToImage) -> Family:
    """The first row, in table order, whose conditioner class `pipe` has, whose required parts it holds and whose
    `accepts` takes it."""
    for family in FAMILIES:
        if (isinstance(pipe.conditioner, family.conditioner) and family.accepts(pipe)
                and all(_at(pipe, p.at) is not None for p in family.parts if not p.optional)):
            return family
    raise ValueError(f"no diffusers pipeline for a {type(pipe.conditioner).__name__}; sdlearn writes "
                     f"{', '.join(f'{f.pipeline} ({f.conditioner.__name__})' for f in FAMILIES)}")


def to_diffusers(pipe):
    """The diffusers pipeline equivalent to an sdlearn TextToImage (SDXLPipeline: a (base, refiner) pair)."""
    import diffusers

    if isinstance(pipe, SDXLPipeline):
        return to_diffusers(pipe.base), to_diffusers(pipe.refiner)
    if not isinstance(pipe, TextToImage):
        raise TypeError(f"expected an sdlearn TextToImage or SDXLPipeline, got {type(pipe).__name__}")
    family = _writer(pipe)
    components = {**family.fixed, "scheduler": schedule_to_diffusers(pipe.schedule, pipe.prediction)}
    components.update({p.name: _written(family, p, _at(pipe, p.at)) for p in family.parts})
    components.update({name: _tokenizer(_at(pipe, at), name) for name, at in family.tokenizers.items()})
    components.update({name: _at(pipe, at) for name, at in family.options.items()})
    size = pipe.image_size // pipe.vae.downsampling_factor  # set before the pipeline reads it (the inpaint one does)
    components[family.denoiser].register_to_config(sample_size=size)
    with warnings.catch_warnings():  # StableDiffusionPipeline warns of, and sets, a steps_offset other than 1
        warnings.filterwarnings("ignore", "(?s).*steps_offset", FutureWarning)
        out = getattr(diffusers, family.pipeline)(**components)
    out.scheduler = schedule_to_diffusers(pipe.schedule, pipe.prediction)  # the one sdlearn samples with, as it is
    getattr(out, family.denoiser).register_to_config(sample_size=size)
    return out


def _vocabulary_files(pipeline, folder: Path) -> None:
    """vocab.json and merges.txt beside each CLIP tokenizer's tokenizer.json: the files every version of transformers'
    CLIPTokenizer reads (4.x's, without the tokenizers library, reads only these)."""
    for name, component in pipeline.components.items():
        if type(component).__name__ == "CLIPTokenizer":
            model = json.loads(component.backend_tokenizer.to_str())["model"]
            merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
            (folder / name / "vocab.json").write_text(json.dumps(model["vocab"], ensure_ascii=False))
            (folder / name / "merges.txt").write_text("".join(f"{m}\n" for m in ["#version: 0.2", *merges]))


def save(pipe, folder) -> Path:
    """Write `pipe` as a diffusers folder (safetensors) that DiffusionPipeline.from_pretrained and `load` read;
    an SDXLPipeline as folder/base and folder/refiner. The course's word-level tokenizer is written as CLIP's
    byte-pair one giving its ids (sdlearn.convert.text.tokenizer_to_transformers). The scheduler config is the one
    sdlearn samples with; diffusers' StableDiffusionPipeline sets a steps_offset other than 1 to 1 when it loads it
    (the course's models sample with 0: pipe.scheduler.register_to_config(steps_offset=0) gives sdlearn's images).
    Written to a temporary folder and moved into place, so a failed save leaves whatever was at `folder` as it was."""
    folder = Path(folder)
    if folder.exists() and any(folder.iterdir()):
        raise FileExistsError(f"{folder} exists and is not empty: save writes a new folder")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
    try:
        out = to_diffusers(pipe)
        for sub, written in zip(("base", "refiner"), out, strict=True) if isinstance(out, tuple) else [("", out)]:
            written.save_pretrained(tmp / sub, safe_serialization=True)
            _vocabulary_files(written, tmp / sub)
        if folder.exists():
            folder.rmdir()
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder
