"""sdlearn.controlnet's ControlNets <-> diffusers' ControlNetModel and SD3ControlNetModel.

    ours = from_diffusers(ControlNetModel.from_pretrained("lllyasviel/control_v11p_sd15_canny"))  # a ControlNet
    theirs = to_diffusers(ours)

The UNet's ControlNet is the UNet's first half: its copy's names are sdlearn.convert.unet's (RENAMES there), plus
the conditioning embedding (ours `hint`, theirs `controlnet_cond_embedding`: the same inner names) and the zero
convolutions (`zero_skips` / `controlnet_down_blocks`, `zero_mid` / `controlnet_mid_block`). Its config is a
UNet2DConditionModel's without the up path, plus the embedding's widths. SD3's is the MMDiT's names
(sdlearn.convert.mmdit) plus `pos_embed_input` and `controlnet_blocks`, which both sides name alike.
"""
from __future__ import annotations

import re
from dataclasses import asdict, replace

import torch

from sdlearn.controlnet import Controlled, ControlNet, ControlNetConfig, SD3ControlNet, SD3ControlNetConfig
from sdlearn.convert import mmdit, unet
from sdlearn.convert.keys import rename

# (ours, theirs), before the UNet's: the embedding's own `blocks` must not read as a transformer's
RENAMES = [
    ("hint.blocks.", "controlnet_cond_embedding.blocks."),
    ("hint.", "controlnet_cond_embedding."),
    ("zero_skips.", "controlnet_down_blocks."),
    ("zero_mid.", "controlnet_mid_block."),
]

# ControlNetModel options beyond UNet2DConditionModel's, and the values sdlearn supports
OWN = {"controlnet_conditioning_channel_order": "rgb", "global_pool_conditions": False}


def _as_unet_config(c) -> dict:
    """A ControlNetModel config as the UNet2DConditionModel config of its base (up path mirrored)."""
    up = ["CrossAttnUpBlock2D" if t == "CrossAttnDownBlock2D" else "UpBlock2D" for t in reversed(c["down_block_types"])]
    return {**c, "up_block_types": up, "out_channels": c["in_channels"], "dropout": 0.0}


def config_from_diffusers(c, pooled_dim: int | None = None) -> ControlNetConfig:
    """A ControlNetConfig from a ControlNetModel's config; a clear error for the options sdlearn lacks."""
    bad = [f"{k}={c[k]!r} (sdlearn supports only {v!r})" for k, v in OWN.items() if c.get(k, v) != v]
    if bad:
        raise ValueError("diffusers ControlNetModel uses options sdlearn.controlnet.ControlNet lacks: "
                         + "; ".join(bad))
    base = unet.config_from_diffusers(_as_unet_config(c))
    ids = {}
    if unet._added_kind(c) == "text_time":
        pooled = pooled_dim or 1280
        ids = {"num_time_ids": (base.added_cond_dim - pooled) // c["addition_time_embed_dim"],
               "time_id_dim": c["addition_time_embed_dim"]}
    return ControlNetConfig(**asdict(base), conditioning_channels=c["conditioning_channels"],
                            embedding_channels=tuple(c["conditioning_embedding_out_channels"]), **ids)


def config_to_diffusers(cfg: ControlNetConfig) -> dict:
    """ControlNetModel keyword arguments for a ControlNetConfig."""
    if cfg.embedding_strides:
        raise ValueError(f"diffusers' ControlNetModel strides its conditioning embedding (1, 2) per pair; this one "
                         f"has embedding_strides {cfg.embedding_strides}")
    kw = unet.config_to_diffusers(cfg, cfg.time_id_dim if cfg.num_time_ids else None)
    del kw["up_block_types"], kw["out_channels"], kw["dropout"]  # a ControlNetModel has no up path, no dropout
    return {**kw, "conditioning_channels": cfg.conditioning_channels,
            "conditioning_embedding_out_channels": tuple(cfg.embedding_channels)}


def controlled(module, c, base=None):
    """The finishing step of a ControlNet part in a pipeline: the denoiser `base` steered by it."""
    return module if base is None else Controlled(base, module)


def _renames(c) -> list:
    return RENAMES + unet._renames(unet._added_kind(c))


def state_from_diffusers(c, state: dict) -> dict:
    """A ControlNetModel's state dict (its config c) in sdlearn's names."""
    return rename(state, _renames(c), to="ours")


def from_diffusers(model, pooled_dim: int | None = None, prediction: str = "eps"):
    """ControlNetModel -> sdlearn ControlNet with the same weights (SD3ControlNetModel -> SD3ControlNet;
    pooled_dim: SDXL's pooled text width when not 1280)."""
    if type(model).__name__ == "SD3ControlNetModel":
        return sd3_from_diffusers(model)
    cfg = config_from_diffusers(model.config, pooled_dim)
    cfg.prediction = prediction
    return _assign(ControlNet, cfg, state_from_diffusers(model.config, model.state_dict()), model)


def _assign(cls, cfg, state: dict, like):
    p = next(like.parameters())
    with torch.device("meta"):
        ours = cls(cfg)
    ours.load_state_dict(state, assign=True)
    return ours.to(device=p.device, dtype=p.dtype)


def to_diffusers(ours):
    """sdlearn ControlNet (or SD3ControlNet, or the Controlled denoiser holding one) -> diffusers' ControlNetModel
    (SD3ControlNetModel)."""
    ours = ours.controlnet if isinstance(ours, Controlled) else ours  # a pipeline's part: the ControlNet it holds
    if isinstance(ours, SD3ControlNet):
        return sd3_to_diffusers(ours)
    from diffusers import ControlNetModel  # optional: only the diffusers conversions need it

    kw = config_to_diffusers(ours.config)
    theirs = ControlNetModel(**kw)
    theirs.load_state_dict(rename(ours.state_dict(), _renames(theirs.config), to="theirs"))
    return _like(theirs, ours)


def _like(theirs, ours):
    p = next(ours.parameters())
    theirs = theirs.to(p.device)
    return theirs if p.dtype == torch.float32 else theirs.to(p.dtype)


# -----------------------------------------------------------------------------
# SD3


def sd3_config_from_diffusers(c) -> SD3ControlNetConfig:
    """An SD3ControlNetConfig from an SD3ControlNetModel's config (the joint-block kind: SD3.5-large's 8B
    ControlNets, without pos_embed and context_embedder, are not supported)."""
    if c.get("joint_attention_dim") is None or not c.get("use_pos_embed", True) or c.get("pos_embed_type") != "sincos":
        raise ValueError(f"diffusers SD3ControlNetModel without joint blocks or without its own sin-cos position "
                         f"embedding (joint_attention_dim={c.get('joint_attention_dim')}, use_pos_embed="
                         f"{c.get('use_pos_embed')}, pos_embed_type={c.get('pos_embed_type')!r}; SD3.5-large's "
                         f"ControlNets): sdlearn's SD3ControlNet copies the MMDiT's joint blocks")
    base = mmdit.config_from_diffusers(c)
    return SD3ControlNetConfig(**asdict(base), extra_conditioning_channels=c["extra_conditioning_channels"],
                               zero_pooled=bool(c["force_zeros_for_pooled_projection"]))


def sd3_from_diffusers(model) -> SD3ControlNet:
    """SD3ControlNetModel -> sdlearn SD3ControlNet with the same weights."""
    cfg = sd3_config_from_diffusers(model.config)
    return _assign(SD3ControlNet, cfg, sd3_state_from_diffusers(model.config, model.state_dict()), model)


def sd3_state_from_diffusers(c, state: dict) -> dict:
    """An SD3ControlNetModel's state dict in sdlearn's names. Every copied block is a full joint block (none
    pre-only): depth + 1 keeps the MMDiT's swap of the last block's continuous adaLN off them."""
    return mmdit.state_from_diffusers(state, c["num_layers"] + 1)


def sd3_to_diffusers(ours: SD3ControlNet):
    from diffusers import SD3ControlNetModel

    cfg = ours.config
    theirs = SD3ControlNetModel(**mmdit.config_to_diffusers(cfg), extra_conditioning_channels=
                                cfg.extra_conditioning_channels, force_zeros_for_pooled_projection=cfg.zero_pooled)
    theirs.load_state_dict(mmdit.state_to_diffusers(ours.state_dict(), cfg.depth + 1))
    return _like(theirs, ours)


# -----------------------------------------------------------------------------
# the original layout (lllyasviel's ControlNet: control_model.*) and published files beside a base checkpoint

ORIGINAL_PREFIX = "control_model."
ORIGINAL_OWN = ("input_hint_block.", "zero_convs.", "middle_block_out.")  # the rest is the copy: the UNet's names
# (diffusers, original) pieces for keys.rename: the zero convolutions; the embedding's are _original_pairs'
ORIGINAL_ZERO = [("controlnet_down_blocks.{i}.", "zero_convs.{i}.0."), ("controlnet_mid_block.", "middle_block_out.0.")]


def _original_pairs(blocks: int) -> list:
    """(diffusers, original) pieces for an embedding of `blocks` convs: input_hint_block.{0, 2, ..., 2 blocks + 2}
    (SiLUs between) are conv_in, blocks.{0 .. blocks-1}, conv_out."""
    names = {0: "conv_in", 2 * (blocks + 1): "conv_out", **{2 * (j + 1): f"blocks.{j}" for j in range(blocks)}}
    return [(f"controlnet_cond_embedding.{n}.", f"input_hint_block.{i}.") for i, n in names.items()] + ORIGINAL_ZERO


def from_original(state: dict) -> dict:
    """An original ControlNet checkpoint (keys under "control_model.", or without the prefix) -> diffusers' names:
    the conditioning embedding and zero convolutions by _original_pairs, the copy (time_embed, input_blocks,
    middle_block, label_emb) as the UNet's (sdlearn.convert.original)."""
    from sdlearn.convert import original

    prefixed = any(k.startswith(ORIGINAL_PREFIX) for k in state)
    s = {k.removeprefix(ORIGINAL_PREFIX): v for k, v in state.items() if k.startswith(ORIGINAL_PREFIX) or not prefixed}
    hints = [int(m[1]) for k in s if (m := re.match(r"input_hint_block\.(\d+)\.weight$", k))]
    if not hints or "middle_block_out.0.weight" not in s:
        raise ValueError(f"not an original ControlNet checkpoint: no {ORIGINAL_PREFIX}input_hint_block.* and "
                         f"middle_block_out.0.* among its {len(state)} keys (first: {list(state)[:3]})")
    own = {k: v for k, v in s.items() if k.startswith(ORIGINAL_OWN)}
    copy = original._unet_from_ldm({k: v for k, v in s.items() if k not in own})
    return {**rename(own, _original_pairs(len(hints) - 2), to="ours"), **copy}


def to_original(state: dict) -> dict:
    """diffusers' ControlNetModel names -> the original layout, under "control_model." (from_original's inverse)."""
    from sdlearn.convert import original

    blocks = len({k.split(".")[2] for k in state if k.startswith("controlnet_cond_embedding.blocks.")})
    own = {k: v for k, v in state.items() if k.startswith("controlnet_")}
    copy = original._unet_to_ldm({k: v for k, v in state.items() if k not in own})
    out = {**rename(own, _original_pairs(blocks), to="theirs"), **copy}
    return {ORIGINAL_PREFIX + k: v for k, v in out.items()}


def from_state(state: dict, base, source: str = "a ControlNet file") -> ControlNet:
    """The ControlNet for `base` (the denoiser it will steer) from a state dict in diffusers' names, with no
    config: the copy's from the base, the conditioning embedding's widths from the tensors' shapes."""
    from sdlearn.pretrained import check_state

    first = state.get("controlnet_cond_embedding.conv_in.weight")
    if first is None:
        raise ValueError(f"{source} is not a ControlNet for a UNet: no controlnet_cond_embedding.conv_in.weight")
    n = len({k.split(".")[2] for k in state if k.startswith("controlnet_cond_embedding.blocks.")})
    widths = [first.shape[0], *(state[f"controlnet_cond_embedding.blocks.{j}.weight"].shape[0]
                                for j in range(1, n, 2))]
    cfg = ControlNet.config_for(base, widths, first.shape[1])
    with torch.device("meta"):
        ours = ControlNet(replace(cfg, prediction=base.prediction))
    kind = "text_time" if cfg.num_time_ids else "projection" if cfg.added_cond_dim else None
    named = rename(state, RENAMES + unet._renames(kind), to="ours")
    check_state(ours.state_dict(), named, source, "a ControlNet for this base")  # names and shapes: a clear error
    ours.load_state_dict(named, assign=True)
    return ours


def read(path, base, variant: str | None = None, allow_pickle: bool = False, device="cpu"):
    """A published ControlNet beside the denoiser `base` it steers: a diffusers folder (config.json and weights:
    a ControlNetModel or SD3ControlNetModel), or a single file, in diffusers' names or the original layout
    (control_model.*), whose config comes from the base."""
    import json
    from pathlib import Path

    from sdlearn.convert import files
    from sdlearn.convert.pipeline import _weights_file, build_part

    path = Path(path)
    if path.is_dir():
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"{path} is not a diffusers ControlNet folder: it has no config.json")
        config = json.loads((path / "config.json").read_text())
        state = {}
        for f in _weights_file(path, variant):
            state.update(files.read(f, allow_pickle=allow_pickle, device=device))
        return build_part(config.get("_class_name", "ControlNetModel"), config, state, str(path), base.prediction)
    if not path.is_file():
        raise FileNotFoundError(f"no ControlNet at {path}: expected a diffusers folder or a .safetensors file")
    state = files.read(path, allow_pickle=allow_pickle, device=device)
    if any(k.startswith(ORIGINAL_PREFIX) or k.startswith("input_hint_block.") for k in state):
        state = from_original(state)
    return from_state(state, base, str(path))
