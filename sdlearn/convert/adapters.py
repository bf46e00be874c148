"""sdlearn.adapters' IP-Adapter <-> the published files (h94/IP-Adapter) and diffusers' IP-Adapter modules.

    adapter = from_published(files.read("ip-adapter_sd15.safetensors"))   # an sdlearn IPAdapter
    state = to_published(adapter)                       # {"image_proj.proj.weight": ..., "ip_adapter.1.to_k_ip.weight"}
    ours = from_diffusers(image_projection)             # diffusers' ImageProjection -> sdlearn ImageProjection
    adapter = from_diffusers_unet(unet)                 # a UNet2DConditionModel after pipe.load_ip_adapter(...)
    ipipe = from_diffusers_pipeline(pipe, image_encoder)   # a StableDiffusionPipeline with an IP-Adapter loaded

The published layout (ip-adapter_sd15.bin holds it nested: {"image_proj": {...}, "ip_adapter": {...}}; the
.safetensors flat, with those prefixes):
    image_proj.proj.{weight,bias}, image_proj.norm.{weight,bias}       our image_proj.image_embeds.*, image_proj.norm.*
    ip_adapter.<n>.to_k_ip.weight, ip_adapter.<n>.to_v_ip.weight        our layers.<j>.to_k_ip.weight, ...
<n> numbers the UNet's attention processors (diffusers' `attn_processors` order: down, up, mid; attn1 and attn2
of each transformer block in turn), so the j-th cross-attention is n = 2 j + 1 (diffusers' loaders/unet.py,
_convert_ip_adapter_attn_to_diffusers: key_id starts at 1 and steps by 2). diffusers' own modules: ImageProjection
(image_embeds, norm: our names) and, per cross-attention, IPAdapterAttnProcessor2_0 (to_k_ip.0, to_v_ip.0: one
adapter; ours IPAttention's to_k_ip, to_v_ip).
"""
from __future__ import annotations

import re

import torch

from sdlearn.adapters import ImageProjection, IPAdapter, IPAdapterConfig, IPAttention, attach

PROJ = [("image_proj.image_embeds.", "image_proj.proj.")]     # (ours, published); image_proj.norm.* alike
_LAYER = re.compile(r"ip_adapter\.(\d+)\.(to_[kv]_ip)\.weight$")
_OURS_LAYER = re.compile(r"layers\.(\d+)\.(to_[kv]_ip)\.weight$")


def flatten(state: dict) -> dict[str, torch.Tensor]:
    """A published IP-Adapter state dict, nested ({"image_proj": {...}, "ip_adapter": {...}}, the .bin) or flat
    (the .safetensors), -> flat keys "image_proj.*", "ip_adapter.*"."""
    flat = {}
    for k, v in state.items():
        if isinstance(v, dict):
            flat.update({f"{k}.{name}": t for name, t in v.items()})
        else:
            flat[k] = v
    return flat


def nested(state: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """Flat published keys -> the nested dict ip-adapter_sd15.bin holds (what pipe.load_ip_adapter(dict) reads)."""
    out = {"image_proj": {}, "ip_adapter": {}}
    for k, v in state.items():
        group, _, name = k.partition(".")
        if group not in out:
            raise ValueError(f"not an IP-Adapter key: {k!r} (expected image_proj.* or ip_adapter.*)")
        out[group][name] = v
    return out


def config_from_published(state: dict, source: str = "the IP-Adapter state dict") -> IPAdapterConfig:
    """The IPAdapterConfig of a published state dict, from its tensors' shapes (the files hold no config)."""
    s = flatten(state)
    proj, norm = s.get("image_proj.proj.weight"), s.get("image_proj.norm.weight")
    if proj is None or norm is None:
        kind = ("IP-Adapter Plus (a resampler: image_proj.latents)" if "image_proj.latents" in s else
                "IP-Adapter Full Face (image_proj.proj.3.*)" if "image_proj.proj.3.weight" in s else None)
        raise ValueError(f"{source} is not a plain IP-Adapter (ip-adapter_sd15's layout: image_proj.proj.weight, "
                         f"image_proj.norm.weight, ip_adapter.<n>.to_k_ip.weight): "
                         + (f"it is an {kind}, which sdlearn.adapters lacks" if kind else
                            f"its keys begin {sorted(s)[:4]}"))
    context = norm.shape[0]
    if proj.shape[0] % context:
        raise ValueError(f"{source}: image_proj.proj.weight {list(proj.shape)} is not num_tokens x {context} "
                         f"(image_proj.norm's width) rows")
    ids = sorted({int(m[1]) for k in s if (m := _LAYER.match(k))})
    want = [2 * j + 1 for j in range(len(ids))]
    if not ids or ids != want:
        raise ValueError(f"{source}: expected ip_adapter.<n>.to_k_ip.weight / to_v_ip.weight for n = 1, 3, 5, ... "
                         f"(one per cross-attention), got n = {ids}")
    return IPAdapterConfig(proj.shape[1], context, proj.shape[0] // context,
                           tuple(s[f"ip_adapter.{n}.to_k_ip.weight"].shape[0] for n in ids))


def state_from_published(state: dict) -> dict[str, torch.Tensor]:
    """Published keys (flat or nested) -> an sdlearn IPAdapter's state_dict keys."""
    out = {}
    for k, v in flatten(state).items():
        if m := _LAYER.match(k):
            k = f"layers.{(int(m[1]) - 1) // 2}.{m[2]}.weight"
        else:
            k = k.replace(PROJ[0][1], PROJ[0][0]) if k.startswith(PROJ[0][1]) else k
        out[k] = v
    return out


def state_to_published(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An sdlearn IPAdapter's state_dict -> the published flat keys (state_from_published's inverse)."""
    out = {}
    for k, v in state.items():
        if m := _OURS_LAYER.match(k):
            k = f"ip_adapter.{2 * int(m[1]) + 1}.{m[2]}.weight"
        elif k.startswith(PROJ[0][0]):
            k = k.replace(PROJ[0][0], PROJ[0][1])
        out[k] = v
    return out


def from_published(state: dict, source: str = "the IP-Adapter state dict") -> IPAdapter:
    """A published IP-Adapter state dict (ip-adapter_sd15.bin's nested dict, or the .safetensors' flat one) -> an
    sdlearn IPAdapter holding its tensors."""
    from sdlearn.pretrained import check_state

    cfg = config_from_published(state, source)
    with torch.device("meta"):
        ours = IPAdapter(cfg)
    named = state_from_published(state)
    check_state(ours.state_dict(), named, source, f"an IPAdapter with {cfg}")
    ours.load_state_dict(named, assign=True)
    return ours


def to_published(adapter: IPAdapter) -> dict[str, torch.Tensor]:
    """An sdlearn IPAdapter -> the published flat state dict (ip-adapter_sd15.safetensors' keys; nested() for the
    .bin's)."""
    return state_to_published(adapter.state_dict())


def read(path, allow_pickle: bool = False, device="cpu") -> IPAdapter:
    """A published IP-Adapter file (.safetensors; .bin with allow_pickle) -> an sdlearn IPAdapter."""
    from pathlib import Path

    from sdlearn.convert import files

    path = Path(path)
    if allow_pickle and path.suffix in files.PICKLES and path.is_file():   # the .bin nests its two dicts
        try:
            state = torch.load(path, map_location=device, weights_only=True)
        except Exception as e:
            raise ValueError(f"{path} is not a readable torch checkpoint of tensors: {e}") from e
    else:
        state = files.read(path, allow_pickle=allow_pickle, device=device)
    return from_published(state, str(path))


# -----------------------------------------------------------------------------
# diffusers' modules: ImageProjection and IPAdapterAttnProcessor2_0 (sdlearn.convert.from_diffusers dispatches here)

_PROCESSORS = ("IPAdapterAttnProcessor2_0", "IPAdapterAttnProcessor")


def from_diffusers(model):
    """diffusers' ImageProjection -> sdlearn ImageProjection; an IPAdapterAttnProcessor2_0 (one adapter) -> an
    IPAttention; the same tensors."""
    name = type(model).__name__
    if name == "ImageProjection":
        ours = ImageProjection(model.image_embeds.in_features, model.norm.normalized_shape[0],
                               model.num_image_text_embeds).to(model.image_embeds.weight.device)
        ours.load_state_dict(model.state_dict(), assign=True)
        return ours
    if name in _PROCESSORS:
        if len(model.to_k_ip) != 1:
            raise ValueError(f"the {name} holds {len(model.to_k_ip)} IP-Adapters; sdlearn's IPAttention is one")
        k = model.to_k_ip[0]
        ours = IPAttention(k.in_features, k.out_features).to(k.weight.device)
        ours.load_state_dict({"to_k_ip.weight": k.weight, "to_v_ip.weight": model.to_v_ip[0].weight}, assign=True)
        return ours
    raise TypeError(f"expected diffusers' ImageProjection or {' / '.join(_PROCESSORS)}, got {name}")


def to_diffusers(ours, num_tokens: int = 4):
    """sdlearn ImageProjection -> diffusers' ImageProjection; IPAttention -> IPAdapterAttnProcessor2_0 (scale 1;
    num_tokens: the adapter's image tokens, which diffusers keeps for a deprecated call)."""
    from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0
    from diffusers.models.embeddings import ImageProjection as Theirs

    p = next(ours.parameters())
    if isinstance(ours, ImageProjection):
        theirs = Theirs(ours.image_embeds.in_features, ours.norm.normalized_shape[0], ours.num_tokens)
        theirs.load_state_dict(ours.state_dict())
        return theirs.to(p.device, p.dtype)
    if isinstance(ours, IPAttention):
        theirs = IPAdapterAttnProcessor2_0(ours.to_k_ip.out_features, ours.to_k_ip.in_features, num_tokens)
        theirs.load_state_dict({"to_k_ip.0.weight": ours.to_k_ip.weight, "to_v_ip.0.weight": ours.to_v_ip.weight})
        return theirs.to(p.device, p.dtype)
    raise TypeError(f"expected an sdlearn ImageProjection or IPAttention, got {type(ours).__name__}")


# -----------------------------------------------------------------------------
# a diffusers UNet / pipeline with an IP-Adapter loaded (pipe.load_ip_adapter)


def _cross_attention_processors(unet) -> list[tuple[str, object]]:
    return [(n, p) for n, p in unet.attn_processors.items() if n.endswith("attn2.processor")]


def from_diffusers_unet(unet) -> IPAdapter:
    """The IP-Adapter loaded into a diffusers UNet2DConditionModel (by pipe.load_ip_adapter) -> an sdlearn
    IPAdapter with the same tensors. One adapter, with ImageProjection (ip-adapter_sd15's kind)."""
    hid = getattr(unet, "encoder_hid_proj", None)
    layers = getattr(hid, "image_projection_layers", None)
    if layers is None:
        raise ValueError(f"the {type(unet).__name__} has no IP-Adapter loaded (encoder_hid_proj is "
                         f"{type(hid).__name__}): call pipe.load_ip_adapter(...) first")
    if len(layers) != 1 or type(layers[0]).__name__ != "ImageProjection":
        raise ValueError(f"sdlearn reads one IP-Adapter with an ImageProjection; this UNet holds "
                         f"{[type(m).__name__ for m in layers]}")
    image_proj = from_diffusers(layers[0])
    attn = [(n, from_diffusers(p)) for n, p in _cross_attention_processors(unet)]
    if not attn or any(type(unet.attn_processors[n]).__name__ not in _PROCESSORS for n, _ in attn):
        raise ValueError("the UNet's cross-attentions are not all IP-Adapter processors")
    cfg = IPAdapterConfig(image_proj.image_embeds.in_features, image_proj.norm.normalized_shape[0],
                          image_proj.num_tokens, tuple(a.to_k_ip.out_features for _, a in attn))
    with torch.device("meta"):
        ours = IPAdapter(cfg)
    ours.image_proj, ours.layers = image_proj, torch.nn.ModuleList(a for _, a in attn)
    return ours


def into_diffusers_unet(adapter: IPAdapter, unet) -> None:
    """Load an sdlearn IPAdapter into a diffusers UNet2DConditionModel, as pipe.load_ip_adapter does."""
    unet._load_ip_adapter_weights([nested(to_published(adapter))])


def _base_unet(unet):
    """A copy of a diffusers UNet without its IP-Adapter, sharing its tensors (no weight is copied)."""
    from diffusers import UNet2DConditionModel

    config = {**dict(unet.config), "encoder_hid_dim_type": None}
    state = {k: v for k, v in unet.state_dict().items()
             if not k.startswith("encoder_hid_proj.") and ".processor." not in k}
    with torch.device("meta"):
        base = UNet2DConditionModel.from_config(config)
    base.load_state_dict(state, assign=True)
    return base


def from_diffusers_pipeline(pipe, image_encoder, **options):
    """A diffusers StableDiffusionPipeline with an IP-Adapter loaded -> the sdlearn pipeline with its image prompt
    (sdlearn.adapters.attach), the same tensors. image_encoder: an sdlearn image encoder (`.config.embed_dim` the
    adapter's, `.config.image_size`); diffusers' CLIP vision tower is not converted. options go to
    sdlearn.convert.pipeline.from_diffusers."""
    from sdlearn.convert import pipeline

    adapter = from_diffusers_unet(pipe.unet)
    base = type(pipe)(**{**pipe.components, "unet": _base_unet(pipe.unet)},
                      **{k: pipe.config[k] for k in ("requires_safety_checker",) if k in pipe.config})
    return attach(pipeline.from_diffusers(base, **options), adapter, image_encoder)


def to_diffusers_pipeline(ipipe):
    """An sdlearn pipeline with an image prompt (attach's) -> the diffusers pipeline of its base with the adapter
    loaded (no image encoder: call it with ip_adapter_image_embeds)."""
    from sdlearn.adapters import ImagePromptConditioner, ImagePrompted
    from sdlearn.convert import pipeline
    from sdlearn.pipeline import TextToImage

    if not isinstance(ipipe.denoiser, ImagePrompted) or not isinstance(ipipe.conditioner, ImagePromptConditioner):
        raise ValueError(f"expected a pipeline made by sdlearn.adapters.attach, got a {type(ipipe.denoiser).__name__} "
                         f"under a {type(ipipe.conditioner).__name__}")
    base = TextToImage(ipipe.conditioner.conditioner, ipipe.denoiser.base, ipipe.schedule, ipipe.vae,
                       image_size=ipipe.image_size)
    theirs = pipeline.to_diffusers(base)
    into_diffusers_unet(ipipe.denoiser.adapter, theirs.unet)
    return theirs
