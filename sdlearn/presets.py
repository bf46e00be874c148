"""Full-size configurations of the real models, built from sdlearn's own classes.

    unet = presets.build("sd15-unet")            # on the meta device: shapes only, no memory
    presets.count_parameters(unet) == presets.PUBLISHED["sd15-unet"]

Each model module owns its presets (a dict `PRESETS` of name -> zero-argument
builder); this module only finds them, so it imports no model until asked. The
real text encoders are the exception: notebook 02's sdlearn.text holds the
course's small encoder only, so their sizes are written here, in `PRESETS`,
whose builders import sdlearn.text when called.
"""
from __future__ import annotations

import importlib

import torch
from torch import nn

# name -> the sdlearn module that defines it
WHERE = {
    "clip-l-text": "sdlearn.presets",
    "clip-l-text-proj": "sdlearn.presets",
    "clip-g-text": "sdlearn.presets",
    "openclip-h-text": "sdlearn.presets",
    "t5-xxl-encoder": "sdlearn.t5",
    "sd-vae": "sdlearn.vae",
    "sd3-vae": "sdlearn.vae",
    "sd15-unet": "sdlearn.unet",
    "sd21base-unet": "sdlearn.unet",
    "sdxl-unet": "sdlearn.unet",
    "sdxl-refiner-unet": "sdlearn.unet",
    "sd3-medium-mmdit": "sdlearn.mmdit",
    "sd35-medium-mmdit": "sdlearn.mmdit",
    "sd15-controlnet": "sdlearn.controlnet",
    "sdxl-controlnet": "sdlearn.controlnet",
    "sd3-controlnet": "sdlearn.controlnet",
    "sd15-ip-adapter": "sdlearn.adapters",
    "sd15-inpaint-unet": "sdlearn.inpaint",
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
    "sd15-controlnet": 361_279_120,       # ControlNetModel.from_unet(SD 1.5's UNet)
    "sdxl-controlnet": 1_251_014_160,     # ControlNetModel.from_unet(SDXL base's UNet)
    "sd3-controlnet": 538_805_760,        # SD3ControlNetModel at InstantX/SD3-Controlnet-Canny's config
    "sd15-ip-adapter": 22_319_616,        # h94/IP-Adapter ip-adapter_sd15: ImageProjection + 16 x (to_k_ip, to_v_ip)
    "sd15-inpaint-unet": 859_535_364,     # runwayml/stable-diffusion-inpainting's UNet (in_channels 9)
}


# -----------------------------------------------------------------------------
# the real text encoders: CLIP's and OpenCLIP's text towers, as sdlearn.text.TextEncoder

# CLIP ViT-L/14's text tower (openai/clip-vit-large-patch14): 49,408 BPE tokens, 77 positions, argmax pooling
CLIP_L = dict(vocab=None, vocab_size=49408, max_positions=77, width=768, layers=12, heads=12, mlp_dim=3072,
              activation="quick_gelu", eos_token_id=2, pool="argmax")
# OpenCLIP ViT-H/14's (SD 2.x) and ViT-bigG/14's (SDXL, SD3): the same tokenizer, GELU
OPENCLIP_H = dict(CLIP_L, width=1024, layers=24, heads=16, mlp_dim=4096, activation="gelu")
OPENCLIP_G = dict(CLIP_L, width=1280, layers=32, heads=20, mlp_dim=5120, activation="gelu")


def _text_encoder(projection_dim: int | None, **sizes) -> nn.Module:
    from sdlearn.text import TextConfig, TextEncoder  # imported when a text preset is built, not before

    return TextEncoder(TextConfig(**sizes, projection_dim=projection_dim))


PRESETS = {
    # SD 1.x's text encoder, SDXL's first one (CLIPTextModel: no projection)
    "clip-l-text": lambda: _text_encoder(None, **CLIP_L),
    # the same with its text projection, as SD3 uses it (CLIPTextModelWithProjection)
    "clip-l-text-proj": lambda: _text_encoder(768, **CLIP_L),
    # SD 2.x reads 23 of ViT-H's 24 layers (the penultimate's output), no projection
    "openclip-h-text": lambda: _text_encoder(None, **{**OPENCLIP_H, "layers": 23}),
    # SDXL's second text encoder, SD3's too, with its projection
    "clip-g-text": lambda: _text_encoder(1280, **OPENCLIP_G),
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
