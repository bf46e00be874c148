"""sdlearn.unet.UNet (and SDXL's sdlearn.sdxl.SDXLUNet) <-> diffusers' UNet2DConditionModel.

    ours = from_diffusers(UNet2DConditionModel.from_pretrained(..., subfolder="unet"))   # SD 1.x / 2.x: a UNet
    ours = from_diffusers(sdxl_unet, pooled_dim=1280)      # addition_embed_type="text_time": an SDXLUNet
    theirs = to_diffusers(ours)

The tensors are the same; only names differ (our names are shorter), listed in RENAMES. diffusers' config
calls the number of heads `attention_head_dim` (unless `num_attention_heads` is set): we read it as heads.
The UNet's added conditioning vector (`added_cond`) is diffusers' "text_time" addition embedding inside an
SDXLUNet (pooled text + time ids; the pooled width is not in diffusers' config: SDXL's is 1280), and its
"projection" class embedding otherwise.
"""
from __future__ import annotations

import inspect
from dataclasses import replace

import torch

from sdlearn.convert.keys import rename
from sdlearn.unet import UNet, UNetConfig

# (ours, theirs) name pieces, applied by sdlearn.convert.keys.rename: {i} a level index; a piece without a
# leading "." is a key's prefix
RENAMES = [
    ("time_embed.", "time_embedding."),
    ("norm_out.", "conv_norm_out."),
    ("down.{i}.resample.", "down_blocks.{i}.downsamplers.0."),
    ("up.{i}.resample.", "up_blocks.{i}.upsamplers.0."),
    ("down.", "down_blocks."),
    ("up.", "up_blocks."),
    ("mid.resnet1.", "mid_block.resnets.0."),
    ("mid.resnet2.", "mid_block.resnets.1."),
    ("mid.attention.", "mid_block.attentions.0."),
    (".time_proj.", ".time_emb_proj."),
    (".shortcut.", ".conv_shortcut."),
    (".blocks.", ".transformer_blocks."),
    (".ff.proj.", ".ff.net.0.proj."),
    (".ff.out.", ".ff.net.2."),
    (".to_out.", ".to_out.0."),
]


# diffusers' UNet2DConditionModel options that sdlearn's UNet reproduces; every other option must keep its default
HANDLED = {"sample_size", "in_channels", "out_channels", "down_block_types", "up_block_types", "block_out_channels",
           "layers_per_block", "attention_head_dim", "num_attention_heads", "cross_attention_dim",
           "transformer_layers_per_block", "use_linear_projection", "norm_num_groups", "dropout",
           "addition_embed_type", "addition_time_embed_dim", "projection_class_embeddings_input_dim",
           "class_embed_type",
           "upcast_attention",  # only changes the precision of half-precision attention
           "addition_embed_type_num_heads"}  # unused by text_time


def _per_level(value, n: int, name: str) -> list:
    if isinstance(value, (list, tuple)):
        if len(value) != n or any(isinstance(v, (list, tuple)) for v in value):
            raise ValueError(f"diffusers UNet: {name}={value} is not one number per level ({n}), which sdlearn needs")
        return list(value)
    return [value] * n


def config_from_diffusers(c) -> UNetConfig:
    """A UNetConfig from a UNet2DConditionModel's config; a clear error for the options sdlearn lacks."""
    from diffusers import UNet2DConditionModel  # optional: only the diffusers conversions need it

    defaults = {k: p.default for k, p in inspect.signature(UNet2DConditionModel.__init__).parameters.items()
                if k != "self"}
    bad = [f"{k}={c[k]!r} (sdlearn supports only {v!r})" for k, v in defaults.items()
           if k not in HANDLED and k in c and _norm(c[k]) != _norm(v)]
    n = len(c["block_out_channels"])
    down = list(c["down_block_types"])
    attention = [t == "CrossAttnDownBlock2D" for t in down]
    if any(t not in ("CrossAttnDownBlock2D", "DownBlock2D") for t in down):
        bad.append(f"down_block_types={down}")
    want_up = ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)]
    if list(c["up_block_types"]) != want_up:
        bad.append(f"up_block_types={list(c['up_block_types'])} (sdlearn mirrors the down path: {want_up})")
    if c["addition_embed_type"] not in (None, "text_time"):
        bad.append(f"addition_embed_type={c['addition_embed_type']!r}")
    kinds = (c["addition_embed_type"], c.get("class_embed_type"))
    if kinds[1] not in (None, "projection") or all(kinds):
        bad.append(f"class_embed_type={kinds[1]!r} with addition_embed_type={kinds[0]!r}")
    layers = set(_per_level(c["layers_per_block"], n, "layers_per_block"))
    contexts = set(_per_level(c["cross_attention_dim"], n, "cross_attention_dim"))
    if len(layers) > 1:
        bad.append(f"layers_per_block={c['layers_per_block']} (sdlearn: the same at every level)")
    if len(contexts) > 1:
        bad.append(f"cross_attention_dim={c['cross_attention_dim']} (sdlearn: one text width)")
    if bad:
        raise ValueError("diffusers UNet uses options sdlearn.unet.UNet lacks: " + "; ".join(bad))
    heads = _per_level(c["num_attention_heads"] or c["attention_head_dim"], n, "attention_head_dim")
    added = c["projection_class_embeddings_input_dim"] if _added_kind(c) else 0
    return UNetConfig(
        in_channels=c["in_channels"], out_channels=c["out_channels"], channels=tuple(c["block_out_channels"]),
        layers_per_block=layers.pop(), attention=tuple(attention),
        transformer_layers=tuple(_per_level(c["transformer_layers_per_block"], n, "transformer_layers_per_block")),
        heads=tuple(heads), head_dim=None, context_dim=contexts.pop(), linear_proj=bool(c["use_linear_projection"]),
        added_cond_dim=added or 0, norm_groups=c["norm_num_groups"], dropout=c["dropout"])


def _added_kind(c) -> str | None:
    """How a diffusers UNet config adds a conditioning vector to the time embedding: "text_time" (SDXL),
    "projection" (a class embedding of a float vector) or None."""
    return c["addition_embed_type"] or c.get("class_embed_type")


def _renames(kind: str | None) -> list:
    """RENAMES, with the added-conditioning MLP's diffusers name for this kind."""
    return RENAMES + [("add_embed.", "class_embedding." if kind == "projection" else "add_embedding.")]


def _norm(v):
    return list(v) if isinstance(v, tuple) else v


def config_to_diffusers(cfg: UNetConfig, time_id_dim: int | None = None) -> dict:
    """UNet2DConditionModel keyword arguments for a UNetConfig (time_id_dim: an SDXLUNet's, for "text_time")."""
    n = cfg.levels
    heads = [cfg.level_heads(i) if (cfg.attention[i] or i == n - 1) else max(1, cfg.level_heads(i))
             for i in range(n)]
    kw = dict(
        in_channels=cfg.in_channels, out_channels=cfg.out_channels,
        down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in cfg.attention),
        up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(cfg.attention)),
        block_out_channels=tuple(cfg.channels), layers_per_block=cfg.layers_per_block,
        attention_head_dim=heads,  # diffusers' name for the number of heads
        cross_attention_dim=cfg.context_dim, transformer_layers_per_block=list(cfg.transformer_layers),
        use_linear_projection=cfg.linear_proj, norm_num_groups=cfg.norm_groups, dropout=cfg.dropout,
    )
    if cfg.added_cond_dim:
        kind = {"addition_embed_type": "text_time", "addition_time_embed_dim": time_id_dim} if time_id_dim else \
            {"class_embed_type": "projection"}
        kw.update(kind, projection_class_embeddings_input_dim=cfg.added_cond_dim)
    return kw


def from_diffusers(model, pooled_dim: int | None = None, prediction: str = "eps"):
    """UNet2DConditionModel -> sdlearn UNet with the same weights; one with SDXL's "text_time" addition embedding
    -> an SDXLUNet around it (pooled_dim: the pooled text width, when it is not SDXL's 1280). prediction: what it
    was trained to predict (in diffusers, the scheduler's prediction_type)."""
    c = model.config
    cfg = replace(config_from_diffusers(c), prediction=prediction)
    p = next(model.parameters())
    with torch.device("meta"):
        ours = UNet(cfg)
    ours.load_state_dict(state_from_diffusers(c, model.state_dict()), assign=True)
    return with_addition(ours.to(device=p.device, dtype=p.dtype), c, pooled_dim)


def state_from_diffusers(c, state: dict) -> dict:
    """A UNet2DConditionModel's state dict (its config c) in sdlearn's names."""
    return rename(state, _renames(_added_kind(c)), to="ours")


def with_addition(ours: UNet, c, pooled_dim: int | None = None):
    """The sdlearn denoiser for a UNet built from diffusers config c: the UNet itself, or, when c has SDXL's
    "text_time" addition embedding, an SDXLUNet around it (pooled_dim: the pooled width, default SDXL's 1280)."""
    from sdlearn.sdxl import SDXLUNet

    if _added_kind(c) != "text_time":
        if pooled_dim is not None:
            raise ValueError(f"pooled_dim={pooled_dim} is for a UNet with SDXL's text_time conditioning; this one has "
                             f"addition_embed_type={c['addition_embed_type']!r}: leave pooled_dim out")
        return ours
    id_dim, total, pooled = c["addition_time_embed_dim"], ours.config.added_cond_dim, pooled_dim or 1280
    if total <= pooled or (total - pooled) % id_dim:
        raise ValueError(f"diffusers UNet: projection_class_embeddings_input_dim={total} is not pooled text "
                         f"({pooled}) + time ids of {id_dim}: call sdlearn.convert.from_diffusers(unet, "
                         f"pooled_dim=<the pooled text width>) (in an SDXL-like pipeline, "
                         f"text_encoder_2.config.projection_dim)")
    return SDXLUNet(ours, (total - pooled) // id_dim, id_dim)


def to_diffusers(ours):
    """sdlearn UNet (or SDXLUNet) -> diffusers' UNet2DConditionModel with the same weights."""
    from diffusers import UNet2DConditionModel  # optional: only the diffusers conversions need it

    from sdlearn.sdxl import SDXLUNet

    unet, time_id_dim = (ours.unet, ours.time_id_dim) if isinstance(ours, SDXLUNet) else (ours, None)
    p = next(unet.parameters())
    theirs = UNet2DConditionModel(**config_to_diffusers(unet.config, time_id_dim))
    kind = ("text_time" if time_id_dim else "projection") if unet.config.added_cond_dim else None
    theirs.load_state_dict(rename(unet.state_dict(), _renames(kind), to="theirs"))
    theirs = theirs.to(p.device)
    return theirs if p.dtype == torch.float32 else theirs.to(p.dtype)
