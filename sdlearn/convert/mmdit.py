"""sdlearn.mmdit.MMDiT <-> diffusers' SD3Transformer2DModel, and the original SD3 / SD3.5 single-file layout.

    ours = from_diffusers(SD3Transformer2DModel.from_pretrained(..., subfolder="transformer"))
    theirs = to_diffusers(ours)
    ours.load_state_dict(from_original(safetensors.torch.load_file("sd3_medium.safetensors")))

sdlearn's MMDiT keeps the original checkpoints' names and layout, so the original state dict is ours once its
"model.diffusion_model." prefix is gone. diffusers renames the keys (RENAMES), splits each fused QKV into
to_q / to_k / to_v (the image stream) and add_q_proj / add_k_proj / add_v_proj (the text stream), and stores
the continuous adaLN's two chunks as (scale, shift) where the original has (shift, scale): in the final layer
and in the last block's pre-only text stream (diffusers' swap_scale_shift).
"""
from __future__ import annotations

import re

import torch

from sdlearn.convert.keys import rename
from sdlearn.mmdit import MMDiT, MMDiTConfig

# (ours, theirs) name pieces for sdlearn.convert.keys.rename; "q." / "k." / "v." stand for the thirds of a fused
# qkv (split by _split_qkv before renaming to theirs, fused by _fuse_qkv after renaming to ours)
RENAMES = [
    ("pos_embed.", "pos_embed.pos_embed."),   # the buffer itself (a whole key)
    ("x_embedder.proj.", "pos_embed.proj."),
    ("t_embedder.mlp.0.", "time_text_embed.timestep_embedder.linear_1."),
    ("t_embedder.mlp.2.", "time_text_embed.timestep_embedder.linear_2."),
    ("y_embedder.mlp.0.", "time_text_embed.text_embedder.linear_1."),
    ("y_embedder.mlp.2.", "time_text_embed.text_embedder.linear_2."),
    ("joint_blocks.{i}.x_block.attn.q.", "transformer_blocks.{i}.attn.to_q."),
    ("joint_blocks.{i}.x_block.attn.k.", "transformer_blocks.{i}.attn.to_k."),
    ("joint_blocks.{i}.x_block.attn.v.", "transformer_blocks.{i}.attn.to_v."),
    ("joint_blocks.{i}.x_block.attn.ln_q.", "transformer_blocks.{i}.attn.norm_q."),
    ("joint_blocks.{i}.x_block.attn.ln_k.", "transformer_blocks.{i}.attn.norm_k."),
    ("joint_blocks.{i}.x_block.attn.proj.", "transformer_blocks.{i}.attn.to_out.0."),
    ("joint_blocks.{i}.context_block.attn.q.", "transformer_blocks.{i}.attn.add_q_proj."),
    ("joint_blocks.{i}.context_block.attn.k.", "transformer_blocks.{i}.attn.add_k_proj."),
    ("joint_blocks.{i}.context_block.attn.v.", "transformer_blocks.{i}.attn.add_v_proj."),
    ("joint_blocks.{i}.context_block.attn.ln_q.", "transformer_blocks.{i}.attn.norm_added_q."),
    ("joint_blocks.{i}.context_block.attn.ln_k.", "transformer_blocks.{i}.attn.norm_added_k."),
    ("joint_blocks.{i}.context_block.attn.proj.", "transformer_blocks.{i}.attn.to_add_out."),
    ("joint_blocks.{i}.x_block.attn2.q.", "transformer_blocks.{i}.attn2.to_q."),
    ("joint_blocks.{i}.x_block.attn2.k.", "transformer_blocks.{i}.attn2.to_k."),
    ("joint_blocks.{i}.x_block.attn2.v.", "transformer_blocks.{i}.attn2.to_v."),
    ("joint_blocks.{i}.x_block.attn2.ln_q.", "transformer_blocks.{i}.attn2.norm_q."),
    ("joint_blocks.{i}.x_block.attn2.ln_k.", "transformer_blocks.{i}.attn2.norm_k."),
    ("joint_blocks.{i}.x_block.attn2.proj.", "transformer_blocks.{i}.attn2.to_out.0."),
    ("joint_blocks.{i}.x_block.adaLN_modulation.1.", "transformer_blocks.{i}.norm1.linear."),
    ("joint_blocks.{i}.context_block.adaLN_modulation.1.", "transformer_blocks.{i}.norm1_context.linear."),
    ("joint_blocks.{i}.x_block.mlp.fc1.", "transformer_blocks.{i}.ff.net.0.proj."),
    ("joint_blocks.{i}.x_block.mlp.fc2.", "transformer_blocks.{i}.ff.net.2."),
    ("joint_blocks.{i}.context_block.mlp.fc1.", "transformer_blocks.{i}.ff_context.net.0.proj."),
    ("joint_blocks.{i}.context_block.mlp.fc2.", "transformer_blocks.{i}.ff_context.net.2."),
    ("final_layer.linear.", "proj_out."),
    ("final_layer.adaLN_modulation.1.", "norm_out.linear."),
]
_WHOLE = ("pos_embed", "pos_embed.pos_embed")  # the position buffer, ours and theirs
ORIGINAL_PREFIX = "model.diffusion_model."
_QKV = re.compile(r"^(.*\.attn2?)\.qkv\.(weight|bias)$")
_THIRD = re.compile(r"^(.*\.attn2?)\.([qkv])\.(weight|bias)$")


def _rename(state: dict, to: str) -> dict:
    """rename() with the position buffer's whole key (a piece must end with ".") handled."""
    out = rename({(k + "." if k in _WHOLE else k): v for k, v in state.items()}, RENAMES, to)
    return {k.removesuffix("."): v for k, v in out.items()}


def _split_qkv(state: dict) -> dict:
    out = {}
    for key, value in state.items():
        m = _QKV.match(key)
        if m:
            for name, third in zip("qkv", value.chunk(3, dim=0), strict=True):
                out[f"{m[1]}.{name}.{m[2]}"] = third
        else:
            out[key] = value
    return out


def _fuse_qkv(state: dict) -> dict:
    out, thirds = {}, {}
    for key, value in state.items():
        m = _THIRD.match(key)
        if m:
            thirds.setdefault((m[1], m[3]), {})[m[2]] = value
        else:
            out[key] = value
    for (prefix, kind), parts in thirds.items():
        if set(parts) != set("qkv"):
            raise ValueError(f"{prefix}: found only {sorted(parts)} of q, k, v {kind}s")
        out[f"{prefix}.qkv.{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return out


def swap_halves(t: torch.Tensor) -> torch.Tensor:
    """(shift, scale) <-> (scale, shift) along the output axis; its own inverse."""
    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def _swap_continuous(state: dict, depth: int) -> dict:
    """Swap the chunks of the two continuous adaLNs (named ours): the final layer and the last text stream."""
    last = f"joint_blocks.{depth - 1}.context_block.adaLN_modulation.1."
    return {k: swap_halves(v) if k.startswith(("final_layer.adaLN_modulation.1.", last)) else v
            for k, v in state.items()}


def state_to_diffusers(state: dict, depth: int) -> dict:
    """An MMDiT state dict (ours = the original layout) -> SD3Transformer2DModel's."""
    return _rename(_split_qkv(_swap_continuous(state, depth)), to="theirs")


def state_from_diffusers(state: dict, depth: int) -> dict:
    """SD3Transformer2DModel's state dict -> ours."""
    return _swap_continuous(_fuse_qkv(_rename(state, to="ours")), depth)


def from_original(state: dict) -> dict:
    """An original SD3 / SD3.5 checkpoint's MMDiT state dict (keys under "model.diffusion_model.", or without the
    prefix) -> ours: the same names and tensors; other parts (VAE, text encoders) are left out."""
    prefixed = any(k.startswith(ORIGINAL_PREFIX) for k in state)
    out = {k.removeprefix(ORIGINAL_PREFIX): v for k, v in state.items() if k.startswith(ORIGINAL_PREFIX) or
           not prefixed}
    if "joint_blocks.0.x_block.attn.qkv.weight" not in out:
        raise ValueError(f"not an SD3 / SD3.5 MMDiT state dict: no {ORIGINAL_PREFIX}joint_blocks.0.x_block.attn.qkv."
                         f"weight among its {len(state)} keys (first: {list(state)[:3]})")
    return out


def config_from_original(state: dict, head_dim: int = 64) -> MMDiTConfig:
    """The MMDiTConfig of an original-layout state dict (from_original's output), read from its shapes. The head
    width is not in the tensors unless qk norm is (its gain has one value per head channel): SD3 uses 64."""
    depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("joint_blocks."))
    width, in_channels, p, _ = state["x_embedder.proj.weight"].shape
    out = state["final_layer.linear.weight"].shape[0] // (p * p)
    grid = int(round(state["pos_embed"].shape[1] ** 0.5))
    qk_norm = "joint_blocks.0.x_block.attn.ln_q.weight" in state
    head_dim = state["joint_blocks.0.x_block.attn.ln_q.weight"].shape[0] if qk_norm else head_dim
    if width % head_dim:
        raise ValueError(f"width {width} is not a whole number of {head_dim}-wide heads: pass head_dim")
    return MMDiTConfig(
        in_channels=in_channels, out_channels=out, patch_size=p, depth=depth, heads=width // head_dim,
        head_dim=head_dim,
        context_dim=state["context_embedder.weight"].shape[1], pooled_dim=state["y_embedder.mlp.0.weight"].shape[1],
        pos_embed_max_size=grid, qk_norm=qk_norm,
        dual_attention_layers=tuple(i for i in range(depth) if f"joint_blocks.{i}.x_block.attn2.qkv.weight" in state))


def config_from_diffusers(c) -> MMDiTConfig:
    """An MMDiTConfig from an SD3Transformer2DModel's config; a clear error for what sdlearn's MMDiT lacks."""
    width = c["num_attention_heads"] * c["attention_head_dim"]
    bad = []
    if c["caption_projection_dim"] != width:
        bad.append(f"caption_projection_dim={c['caption_projection_dim']} (sdlearn: the width, heads x head_dim "
                   f"= {width})")
    if c["qk_norm"] not in (None, "rms_norm"):
        bad.append(f"qk_norm={c['qk_norm']!r} (sdlearn: None or 'rms_norm')")
    if not c.get("pos_embed_max_size"):
        bad.append("pos_embed_max_size=None (sdlearn: a cropped position embedding, as SD3)")
    if bad:
        raise ValueError("diffusers SD3Transformer2DModel uses options sdlearn.mmdit.MMDiT lacks: " + "; ".join(bad))
    return MMDiTConfig(
        in_channels=c["in_channels"], out_channels=c["out_channels"] or c["in_channels"], patch_size=c["patch_size"],
        depth=c["num_layers"], heads=c["num_attention_heads"], head_dim=c["attention_head_dim"],
        context_dim=c["joint_attention_dim"], pooled_dim=c["pooled_projection_dim"],
        pos_embed_max_size=c["pos_embed_max_size"], qk_norm=c["qk_norm"] == "rms_norm",
        dual_attention_layers=tuple(c["dual_attention_layers"]))


def config_to_diffusers(cfg: MMDiTConfig, sample_size: int = 128) -> dict:
    """SD3Transformer2DModel keyword arguments for an MMDiTConfig (sample_size only sets diffusers' sin-cos
    initialisation of the position buffer, which the conversion overwrites)."""
    return dict(sample_size=sample_size, patch_size=cfg.patch_size, in_channels=cfg.in_channels,
                num_layers=cfg.depth, attention_head_dim=cfg.head_dim, num_attention_heads=cfg.heads,
                joint_attention_dim=cfg.context_dim, caption_projection_dim=cfg.width,
                pooled_projection_dim=cfg.pooled_dim,
                out_channels=cfg.out_channels, pos_embed_max_size=cfg.pos_embed_max_size,
                dual_attention_layers=tuple(cfg.dual_attention_layers), qk_norm="rms_norm" if cfg.qk_norm else None)


def from_diffusers(model) -> MMDiT:
    """SD3Transformer2DModel -> sdlearn MMDiT with the same weights."""
    cfg = config_from_diffusers(model.config)
    p = next(model.parameters())
    with torch.device("meta"):
        ours = MMDiT(cfg)
    ours.load_state_dict(state_from_diffusers(model.state_dict(), cfg.depth), assign=True)
    return ours.to(device=p.device, dtype=p.dtype)


def to_diffusers(ours: MMDiT):
    """sdlearn MMDiT -> diffusers' SD3Transformer2DModel with the same weights."""
    from diffusers import SD3Transformer2DModel  # optional: only the diffusers conversions need it

    p = next(ours.parameters())
    theirs = SD3Transformer2DModel(**config_to_diffusers(ours.config))
    theirs.load_state_dict(state_to_diffusers(ours.state_dict(), ours.config.depth))
    theirs = theirs.to(p.device)
    return theirs if p.dtype == torch.float32 else theirs.to(p.dtype)
