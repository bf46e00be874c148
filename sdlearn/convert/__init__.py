"""Weights between sdlearn and diffusers / transformers: same weights, same outputs.

    ours = convert.from_diffusers(diffusers_model)    # an sdlearn module
    theirs = convert.to_diffusers(ours)               # a diffusers / transformers module
    ours = convert.from_diffusers(sdxl_unet, pooled_dim=1280)   # options go to the family's converter
    pipe = convert.from_diffusers(diffusers_pipeline)             # whole pipelines too (convert.pipeline)
    pipe = convert.load("stable-diffusion-v1-5/")                 # a published checkpoint, folder or single file
    convert.save(pipe, "out/")                                    # a folder diffusers loads

One submodule per model family holds the key mapping (its RENAMES, applied both ways by
sdlearn.convert.keys.rename), the config translation and from_diffusers / to_diffusers; this module
dispatches on the class name, so it imports diffusers only when asked to build one of its models. Whole
diffusers pipelines go to sdlearn.convert.pipeline, whose table (FAMILIES) says which it reads.
"""
from __future__ import annotations

import importlib
import inspect

from torch import nn

# class name (theirs or ours) -> the submodule that converts it
_BY_CLASS = {
    # theirs
    "Attention": "attention",
    "CLIPTextModel": "text",
    "CLIPTextModelWithProjection": "text",
    "AutoencoderKL": "vae",
    "UNet2DConditionModel": "unet",
    "SD3Transformer2DModel": "mmdit",
    "T5EncoderModel": "t5",
    "ControlNetModel": "controlnet",
    "SD3ControlNetModel": "controlnet",
    "ImageProjection": "adapters",                  # IP-Adapter's image projection
    "IPAdapterAttnProcessor2_0": "adapters",        # IP-Adapter's keys / values of one cross-attention
    "IPAdapterAttnProcessor": "adapters",
    # diffusers' pipelines: the rows of sdlearn.convert.pipeline.FAMILIES (`_pipelines`)
    # ours (sdlearn)
    "sdlearn.attention.Attention": "attention",
    "sdlearn.text.TextEncoder": "text",
    "sdlearn.vae.AutoencoderKL": "vae",
    "sdlearn.unet.UNet": "unet",
    "sdlearn.sdxl.SDXLUNet": "unet",
    "sdlearn.mmdit.MMDiT": "mmdit",
    "sdlearn.t5.T5Encoder": "t5",
    "sdlearn.controlnet.ControlNet": "controlnet",
    "sdlearn.controlnet.SD3ControlNet": "controlnet",
    "sdlearn.controlnet.Controlled": "controlnet",
    "sdlearn.adapters.ImageProjection": "adapters",
    "sdlearn.adapters.IPAttention": "adapters",
    "sdlearn.pipeline.TextToImage": "pipeline",
    "sdlearn.sdxl.SDXLPipeline": "pipeline",
}
_MODULES = {"keys", "files", "original", *_BY_CLASS.values()}


def __getattr__(name: str):
    """The family submodules (convert.unet, convert.text, ...) and convert.keys, imported on first use."""
    if name in _MODULES:
        return importlib.import_module(f"sdlearn.convert.{name}")
    raise AttributeError(f"module 'sdlearn.convert' has no attribute {name!r}")


def _pipelines() -> dict:
    """The diffusers pipeline classes sdlearn.convert.pipeline reads (its FAMILIES) -> "pipeline"."""
    return dict.fromkeys(importlib.import_module("sdlearn.convert.pipeline").PIPELINES, "pipeline")


def _converter(model: nn.Module, ours: bool):
    cls = type(model)
    key = f"{cls.__module__}.{cls.__qualname__}" if ours else cls.__name__
    by_class = _BY_CLASS if ours or key in _BY_CLASS else {**_BY_CLASS, **_pipelines()}
    if key not in by_class:
        side = "an sdlearn" if ours else "a diffusers / transformers"
        known = [k for k in by_class if k.startswith("sdlearn.") == ours]
        raise TypeError(f"expected {side} model, one of {', '.join(known)}; got {cls.__module__}.{cls.__qualname__}")
    return importlib.import_module(f"sdlearn.convert.{by_class[key]}")


def _options(convert, model: nn.Module, options: dict) -> dict:
    """`options` when the family's `convert` (its from_diffusers / to_diffusers) takes them all; else a TypeError
    naming them, the family and the options it does take."""
    params = list(inspect.signature(convert).parameters.values())[1:]  # the first is the model
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return options
    takes = [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    unknown = [k for k in options if k not in takes]
    if unknown:
        family = convert.__module__.rpartition(".")[2]
        raise TypeError(f"sdlearn.convert.{convert.__name__}({type(model).__name__}, ...): the {family!r} family's "
                        f"converter ({convert.__module__}.{convert.__name__}) takes no option "
                        f"{', '.join(map(repr, unknown))}; its options: {', '.join(takes) or 'none'}")
    return options


def from_diffusers(model: nn.Module, **options) -> nn.Module:
    """The sdlearn module equivalent to a diffusers / transformers `model`, with its weights; `options` go to
    the family's converter (e.g. pooled_dim to sdlearn.convert.unet.from_diffusers)."""
    convert = _converter(model, ours=False).from_diffusers
    return convert(model, **_options(convert, model, options))


def to_diffusers(module: nn.Module, **options) -> nn.Module:
    """The diffusers / transformers model equivalent to an sdlearn `module`, with its weights; `options` go to
    the family's converter."""
    convert = _converter(module, ours=True).to_diffusers
    return convert(module, **_options(convert, module, options))


def load(path, **options):
    """A published checkpoint (a diffusers folder, or an original single file) -> the sdlearn pipeline of its
    family: sdlearn.convert.pipeline.load."""
    return importlib.import_module("sdlearn.convert.pipeline").load(path, **options)


def save(pipe, folder):
    """An sdlearn pipeline -> a diffusers folder: sdlearn.convert.pipeline.save."""
    return importlib.import_module("sdlearn.convert.pipeline").save(pipe, folder)
