"""Weights between sdlearn and diffusers / transformers: same weights, same outputs.

    ours = convert.from_diffusers(diffusers_model)    # an sdlearn module
    theirs = convert.to_diffusers(ours)               # a diffusers / transformers module

One submodule per model family holds the key mapping; this module dispatches on
the class name, so it imports diffusers only when asked to build one of its models.
"""
from __future__ import annotations

import importlib

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
    # ours (sdlearn)
    "sdlearn.attention.Attention": "attention",
    "sdlearn.text.TextEncoder": "text",
    "sdlearn.vae.AutoencoderKL": "vae",
    "sdlearn.unet.UNet": "unet",
    "sdlearn.mmdit.MMDiT": "mmdit",
}


def _converter(model: nn.Module, ours: bool):
    cls = type(model)
    key = f"{cls.__module__}.{cls.__qualname__}" if ours else cls.__name__
    if key not in _BY_CLASS:
        side = "an sdlearn" if ours else "a diffusers / transformers"
        known = [k for k in _BY_CLASS if k.startswith("sdlearn.") == ours]
        raise TypeError(f"expected {side} model, one of {', '.join(known)}; got {cls.__module__}.{cls.__qualname__}")
    return importlib.import_module(f"sdlearn.convert.{_BY_CLASS[key]}")


def from_diffusers(model: nn.Module) -> nn.Module:
    """The sdlearn module equivalent to a diffusers / transformers `model`, with its weights."""
    return _converter(model, ours=False).from_diffusers(model)


def to_diffusers(module: nn.Module) -> nn.Module:
    """The diffusers / transformers model equivalent to an sdlearn `module`, with its weights."""
    return _converter(module, ours=True).to_diffusers(module)
