"""sdlearn.vae.AutoencoderKL <-> diffusers' AutoencoderKL: same weights, same encode / decode.

The layouts differ only in names:

    diffusers                                      sdlearn
    encoder.down_blocks.i.resnets.j.*              encoder.down.i.resnets.j.*
    encoder.down_blocks.i.downsamplers.0.conv      encoder.down.i.resample.conv
    decoder.up_blocks.i.resnets.j.*                decoder.up.i.resnets.j.*
    decoder.up_blocks.i.upsamplers.0.conv          decoder.up.i.resample.conv
    *.mid_block.resnets.0 / .1                     *.mid.resnet1 / .resnet2
    *.mid_block.attentions.0.group_norm            *.mid.attention.norm
    *.mid_block.attentions.0.to_{q,k,v}            *.mid.attention.attn.to_{q,k,v}
    *.mid_block.attentions.0.to_out.0              *.mid.attention.attn.to_out
    *.conv_shortcut / *.conv_norm_out              *.shortcut / *.norm_out

    ours = from_diffusers(diffusers.AutoencoderKL(...))
    theirs = to_diffusers(ours)
"""
from __future__ import annotations

import torch

from sdlearn.convert.keys import rename
from sdlearn.vae import AutoencoderKL, VAEConfig

# (ours, theirs) name pieces, applied by sdlearn.convert.keys.rename
RENAMES = [
    ("encoder.down.{i}.resnets.{j}.", "encoder.down_blocks.{i}.resnets.{j}."),
    ("encoder.down.{i}.resample.", "encoder.down_blocks.{i}.downsamplers.0."),
    ("decoder.up.{i}.resnets.{j}.", "decoder.up_blocks.{i}.resnets.{j}."),
    ("decoder.up.{i}.resample.", "decoder.up_blocks.{i}.upsamplers.0."),
    (".mid.resnet1.", ".mid_block.resnets.0."),
    (".mid.resnet2.", ".mid_block.resnets.1."),
    (".mid.attention.norm.", ".mid_block.attentions.0.group_norm."),
    (".mid.attention.attn.to_out.", ".mid_block.attentions.0.to_out.0."),
    (".mid.attention.attn.to_{p}.", ".mid_block.attentions.0.to_{p}."),  # p: q, k, v
    (".shortcut.", ".conv_shortcut."),
    (".norm_out.", ".conv_norm_out."),
]


def config_from_diffusers(c) -> VAEConfig:
    """diffusers AutoencoderKL.config -> VAEConfig; options sdlearn lacks are a clear error."""
    n = len(c.block_out_channels)
    bad = []
    if c.out_channels != c.in_channels:
        bad.append(f"out_channels={c.out_channels} != in_channels={c.in_channels}")
    if tuple(c.down_block_types) != ("DownEncoderBlock2D",) * n:
        bad.append(f"down_block_types={tuple(c.down_block_types)} (expected DownEncoderBlock2D at every level)")
    if tuple(c.up_block_types) != ("UpDecoderBlock2D",) * n:
        bad.append(f"up_block_types={tuple(c.up_block_types)} (expected UpDecoderBlock2D at every level)")
    if c.act_fn != "silu":
        bad.append(f"act_fn={c.act_fn!r} (expected 'silu')")
    if getattr(c, "latents_mean", None) is not None or getattr(c, "latents_std", None) is not None:
        bad.append("per-channel latents_mean / latents_std")
    if bad:
        raise ValueError("diffusers AutoencoderKL uses options sdlearn.vae.AutoencoderKL lacks: " + "; ".join(bad))
    return VAEConfig(
        in_channels=c.in_channels, latent_channels=c.latent_channels, channels=tuple(c.block_out_channels),
        layers_per_block=c.layers_per_block, norm_groups=c.norm_num_groups,
        mid_attention=getattr(c, "mid_block_add_attention", True),
        use_quant_conv=getattr(c, "use_quant_conv", True), use_post_quant_conv=getattr(c, "use_post_quant_conv", True),
        scaling_factor=c.scaling_factor, shift_factor=c.shift_factor or 0.0)


def from_diffusers(model) -> AutoencoderKL:
    """diffusers.AutoencoderKL -> sdlearn AutoencoderKL with the same weights (device and dtype kept)."""
    p = next(model.parameters())
    with torch.device("meta"):
        ours = AutoencoderKL(config_from_diffusers(model.config))
    state = rename({k: v.detach().clone() for k, v in model.state_dict().items()}, RENAMES, to="ours")
    ours.load_state_dict(state, strict=True, assign=True)
    return ours.to(device=p.device, dtype=p.dtype)


def to_diffusers(ours: AutoencoderKL):
    """sdlearn AutoencoderKL -> diffusers.AutoencoderKL with the same weights."""
    from diffusers import AutoencoderKL as DiffusersVAE  # optional: only to_diffusers needs it

    c, p = ours.config, next(ours.parameters())
    n = len(c.channels)
    theirs = DiffusersVAE(
        in_channels=c.in_channels, out_channels=c.in_channels, down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n, block_out_channels=tuple(c.channels),
        layers_per_block=c.layers_per_block, act_fn="silu", latent_channels=c.latent_channels,
        norm_num_groups=c.norm_groups, scaling_factor=c.scaling_factor, shift_factor=c.shift_factor or None,
        use_quant_conv=c.use_quant_conv, use_post_quant_conv=c.use_post_quant_conv,
        mid_block_add_attention=c.mid_attention)
    theirs.load_state_dict(rename(ours.state_dict(), RENAMES, to="theirs"), strict=True)
    theirs = theirs.to(p.device)
    return theirs if p.dtype == torch.float32 else theirs.to(p.dtype)
