"""sdlearn.unet.UNet <-> diffusers' UNet2DConditionModel (SD 1.x / 2.x / SDXL layouts).

    ours = from_diffusers(UNet2DConditionModel.from_pretrained(..., subfolder="unet"))
    theirs = to_diffusers(ours)

The tensors are the same; only names differ (our names are shorter), listed in RENAMES. diffusers' config
calls the number of heads `attention_head_dim` (unless `num_attention_heads` is set): we read it as heads.
"""
from __future__ import annotations

import inspect

import torch

from sdlearn.convert.keys import rename
from sdlearn.unet import UNet, UNetConfig

# (ours, theirs) name pieces, applied by sdlearn.convert.keys.rename: {i} a level index; a piece without a
# leading "." is a key's prefix
RENAMES = [
    ("time_embed.", "time_embedding."),
    ("add_embed.", "add_embedding."),
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
           "upcast_attention",  # only changes the precision of half-precision attention
           "addition_embed_type_num_heads"}  # unused by text_time


def _per_level(value, n: int, name: str) -> list:
    if isinstance(value, (list, tuple)):
        if len(value) != n or any(isinstance(v, (list, tuple)) for v in value):
            raise ValueError(f"diffusers UNet: {name}={value} is not one number per level ({n}), which sdlearn needs")
        return list(value)
    return [value] * n


def config_from_diffusers(c, pooled_dim: int | None = None) -> UNetConfig:
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
    layers = set(_per_level(c["layers_per_block"], n, "layers_per_block"))
    contexts = set(_per_level(c["cross_attention_dim"], n, "cross_attention_dim"))
    if len(layers) > 1:
        bad.append(f"layers_per_block={c['layers_per_block']} (sdlearn: the same at every level)")
    if len(contexts) > 1:
        bad.append(f"cross_attention_dim={c['cross_attention_dim']} (sdlearn: one text width)")
    if bad:
        raise ValueError("diffusers UNet uses options sdlearn.unet.UNet lacks: " + "; ".join(bad))
    heads = _per_level(c["num_attention_heads"] or c["attention_head_dim"], n, "attention_head_dim")
    num_ids = pooled = 0
    if c["addition_embed_type"] == "text_time":
        id_dim, total = c["addition_time_embed_dim"], c["projection_class_embeddings_input_dim"]
        pooled = pooled_dim or 1280  # the pooled text width is not in diffusers' config; SDXL's is 1280
        if total <= pooled or (total - pooled) % id_dim:
            raise ValueError(f"diffusers UNet: projection_class_embeddings_input_dim={total} is not pooled text "
                             f"({pooled}) + time ids of {id_dim}: call sdlearn.convert.from_diffusers(unet, "
                             f"pooled_dim=<the pooled text width>) (in an SDXL-like pipeline, "
                             f"text_encoder_2.config.projection_dim)")
        num_ids = (total - pooled) // id_dim
    elif pooled_dim is not None:
        raise ValueError(f"pooled_dim={pooled_dim} is for a UNet with SDXL's text_time conditioning; this one has "
                         f"addition_embed_type={c['addition_embed_type']!r}: leave pooled_dim out")
    return UNetConfig(
        in_channels=c["in_channels"], out_channels=c["out_channels"], channels=tuple(c["block_out_channels"]),
        layers_per_block=layers.pop(), attention=tuple(attention),
        transformer_layers=tuple(_per_level(c["transformer_layers_per_block"], n, "transformer_layers_per_block")),
        heads=tuple(heads), head_dim=None, context_dim=contexts.pop(), linear_proj=bool(c["use_linear_projection"]),
        pooled_dim=pooled, num_time_ids=num_ids, time_id_dim=c["addition_time_embed_dim"] or 256,
        norm_groups=c["norm_num_groups"], dropout=c["dropout"])


def _norm(v):
    return list(v) if isinstance(v, tuple) else v


def config_to_diffusers(cfg: UNetConfig) -> dict:
    """UNet2DConditionModel keyword arguments for a UNetConfig."""
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
    if cfg.text_time:
        kw.update(addition_embed_type="text_time", addition_time_embed_dim=cfg.time_id_dim,
                  projection_class_embeddings_input_dim=cfg.pooled_dim + cfg.num_time_ids * cfg.time_id_dim)
    return kw


def from_diffusers(model, pooled_dim: int | None = None) -> UNet:
    """UNet2DConditionModel -> sdlearn UNet with the same weights (pooled_dim: the SDXL pooled text width,
    when it is not the usual 1280)."""
    cfg = config_from_diffusers(model.config, pooled_dim)
    p = next(model.parameters())
    with torch.device("meta"):
        ours = UNet(cfg)
    ours.load_state_dict(rename(model.state_dict(), RENAMES, to="ours"), assign=True)
    return ours.to(device=p.device, dtype=p.dtype)


def to_diffusers(ours: UNet):
    """sdlearn UNet -> diffusers' UNet2DConditionModel with the same weights."""
    from diffusers import UNet2DConditionModel  # optional: only the diffusers conversions need it

    p = next(ours.parameters())
    theirs = UNet2DConditionModel(**config_to_diffusers(ours.config))
    theirs.load_state_dict(rename(ours.state_dict(), RENAMES, to="theirs"))
    theirs = theirs.to(p.device)
    return theirs if p.dtype == torch.float32 else theirs.to(p.dtype)
