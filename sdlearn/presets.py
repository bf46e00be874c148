"""Full-size configurations of the real models, built from sdlearn's own classes.

    unet = presets.build("sd15-unet")            # on the meta device: shapes only, no memory
    presets.count_parameters(unet) == presets.PUBLISHED["sd15-unet"]

Each model module owns its presets (a dict `PRESETS` of name -> zero-argument
builder); this module only finds them, so it imports no model until asked.
"""
from __future__ import annotations

import importlib

import torch
from torch import nn

# name -> the sdlearn module that defines it
WHERE = {
    "clip-l-text": "sdlearn.text",
    "clip-l-text-proj": "sdlearn.text",
    "clip-g-text": "sdlearn.text",
    "openclip-h-text": "sdlearn.text",
    "t5-xxl-encoder": "sdlearn.text",
    "sd-vae": "sdlearn.vae",
    "sd3-vae": "sdlearn.vae",
    "sd15-unet": "sdlearn.unet",
    "sd21base-unet": "sdlearn.unet",
    "sdxl-unet": "sdlearn.unet",
    "sdxl-refiner-unet": "sdlearn.unet",
    "sd3-medium-mmdit": "sdlearn.mmdit",
    "sd35-medium-mmdit": "sdlearn.mmdit",
}

# parameter counts of the released models (diffusers 0.42.1 / transformers); buffers excluded
PUBLISHED = {
    "clip-l-text": 123_060_480,
    "clip-l-text-proj": 123_650_304,
    "clip-g-text": 694_659_840,
    "openclip-h-text": 340_387_840,
    "t5-xxl-encoder": 4_762_310_656,
    "sd-vae": 83_653_863,
    "sd3-vae": 83_819_683,
    "sd15-unet": 859_520_964,
    "sd21base-unet": 865_910_724,
    "sdxl-unet": 2_567_463_684,
    "sdxl-refiner-unet": 2_259_526_660,
    "sd3-medium-mmdit": 2_028_328_000,
    "sd35-medium-mmdit": 2_243_171_520,
}


def build(name: str, device: str | torch.device = "meta") -> nn.Module:
    """The model `name` with its real hyper-parameters, on `device` (meta: no memory used)."""
    if name not in WHERE:
        raise ValueError(f"unknown preset {name!r}; known: {', '.join(WHERE)}")
    try:
        module = importlib.import_module(WHERE[name])
    except ModuleNotFoundError as e:
        raise NotImplementedError(f"preset {name!r} needs {WHERE[name]}, which this version of sdlearn lacks") from e
    with torch.device(device):
        return module.PRESETS[name]()


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
