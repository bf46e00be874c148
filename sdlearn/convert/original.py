"""The original single-file checkpoints (CompVis / Stability "LDM" and "SGM" layouts) <-> diffusers' parts.

    parts = split(read("v1-5-pruned-emaonly.safetensors"))   # {"unet": ..., "vae": ..., "text_encoder": ...}
    state = join(parts, "sd1")                                # back to one original-layout state dict

One file holds every part under a prefix (FAMILIES); `split` renames each part to the names of the diffusers /
transformers model it becomes (UNet2DConditionModel, AutoencoderKL, CLIPTextModel(WithProjection),
SD3Transformer2DModel, T5EncoderModel), so that sdlearn's converters apply; `join` is its inverse. The renames:

UNet (LDM's flat numbering -> diffusers' levels; L = layers per level, level b of n):
    input_blocks.0.0              conv_in
    input_blocks.{1+b(L+1)+j}.0   down_blocks.b.resnets.j        .1: down_blocks.b.attentions.j
    input_blocks.{1+b(L+1)+L}.0.op  down_blocks.b.downsamplers.0.conv
    middle_block.0 / .1 / .2      mid_block.resnets.0 / attentions.0 / resnets.1
    output_blocks.{u(L+1)+j}.0    up_blocks.u.resnets.j          .1: up_blocks.u.attentions.j
    output_blocks.{u(L+1)+L}.{1 or 2}.conv   up_blocks.u.upsamplers.0.conv (2 after an attention)
    time_embed.0 / .2, label_emb.0.0 / .0.2, out.0 / .2: time_embedding, add_embedding (SDXL), conv_norm_out / conv_out
    in a resnet: in_layers.0 / .2, emb_layers.1, out_layers.0 / .3, skip_connection: norm1, conv1, time_emb_proj,
    norm2, conv2, conv_shortcut. Attention blocks have the same names on both sides.
VAE: encoder.down.i.block.j / decoder.up.i.block.j (decoder levels numbered from the bottom) -> down_blocks /
    up_blocks (from the top); mid.block_1 / block_2 / attn_1; the mid attention's 1x1 convs -> linear layers.
OpenCLIP text (SD 2.x's ViT-H, SDXL's bigG): resblocks.i.attn.in_proj (q, k, v fused) -> self_attn.{q,k,v}_proj,
    positional_embedding, ln_final, text_projection (stored transposed: x @ P). SD 2.x files hold all 24 of ViT-H's
    layers while diffusers' config reads 23: `split` keeps what the file holds (sdlearn.convert.load drops the layers
    beyond the config).
CLIP-L (SD 1.x, SDXL's first encoder) and SD3's three encoders are stored in transformers' own names.
SD's inpainting files are "sd1" files whose input_blocks.0.0 reads 9 channels (latents, mask, masked latents): the
same renames; sdlearn.convert.load reads the channel count off the file and builds an inpainting pipeline.
Keys outside the parts are left out: EMA copies and counters (model_ema.*), the noise schedule's buffers
(alphas_cumprod, ...), the VAE's training loss (first_stage_model.loss.*: LPIPS and a discriminator).
"""
from __future__ import annotations

import re

import torch

from sdlearn.convert import mmdit

UNET, VAE = "model.diffusion_model.", "first_stage_model."
# family -> {part: (prefix in the file, layout)}
FAMILIES = {
    "sd1": {"unet": (UNET, "ldm"), "vae": (VAE, "ldm"), "text_encoder": ("cond_stage_model.transformer.", "hf")},
    "sd2": {"unet": (UNET, "ldm"), "vae": (VAE, "ldm"), "text_encoder": ("cond_stage_model.model.", "openclip")},
    "sdxl-base": {"unet": (UNET, "ldm"), "vae": (VAE, "ldm"),
                  "text_encoder": ("conditioner.embedders.0.transformer.", "hf"),
                  "text_encoder_2": ("conditioner.embedders.1.model.", "openclip")},
    "sdxl-refiner": {"unet": (UNET, "ldm"), "vae": (VAE, "ldm"),
                     "text_encoder_2": ("conditioner.embedders.0.model.", "openclip")},
    "sd3": {"transformer": (UNET, "mmdit"), "vae": (VAE, "ldm"),
            "text_encoder": ("text_encoders.clip_l.transformer.", "hf"),
            "text_encoder_2": ("text_encoders.clip_g.transformer.", "hf"),
            "text_encoder_3": ("text_encoders.t5xxl.transformer.", "hf")},
}
# a key each family's file has, checked in this order (SD3 first: it also has model.diffusion_model.)
SIGNS = [("sd3", UNET + "joint_blocks.0."), ("sdxl-base", "conditioner.embedders.1.model."),
         ("sdxl-refiner", "conditioner.embedders.0.model."), ("sd2", "cond_stage_model.model."),
         ("sd1", "cond_stage_model.transformer.")]


def detect(state: dict) -> str:
    """The family of an original-layout state dict, from its keys."""
    for family, prefix in SIGNS:
        if any(k.startswith(prefix) for k in state) and any(k.startswith(UNET) for k in state):
            return family
    raise ValueError(f"not a Stable Diffusion single-file checkpoint sdlearn knows: it needs {UNET}* (the denoiser) "
                     f"and one of {', '.join(p + '*' for _, p in SIGNS[1:])} (the text encoders); its "
                     f"{len(state)} keys start {sorted(state)[:4]}")


# -----------------------------------------------------------------------------
# the UNet


RESNET = [("in_layers.0.", "norm1."), ("in_layers.2.", "conv1."), ("emb_layers.1.", "time_emb_proj."),
          ("out_layers.0.", "norm2."), ("out_layers.3.", "conv2."), ("skip_connection.", "conv_shortcut.")]
UNET_GLOBAL = [("time_embed.0.", "time_embedding.linear_1."), ("time_embed.2.", "time_embedding.linear_2."),
               ("label_emb.0.0.", "add_embedding.linear_1."), ("label_emb.0.2.", "add_embedding.linear_2."),
               ("input_blocks.0.0.", "conv_in."), ("out.0.", "conv_norm_out."), ("out.2.", "conv_out.")]


def _swap(rest: str, pairs, to_diffusers: bool) -> str:
    """`rest` with its leading piece renamed by the first matching (ldm, diffusers) pair."""
    for ldm, diffusers in pairs:
        old, new = (ldm, diffusers) if to_diffusers else (diffusers, ldm)
        if rest.startswith(old):
            return new + rest[len(old):]
    return rest


def _unet_to_ldm(state: dict) -> dict:
    L = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"down_blocks\.\d+\.resnets\.(\d+)\.", k)))
    attends_up = {int(m.group(1)) for k in state if (m := re.match(r"up_blocks\.(\d+)\.attentions\.", k))}
    out = {}
    for k, v in state.items():
        if m := re.match(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", k):
            b, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
            k = f"input_blocks.{1 + b * (L + 1) + j}." + (f"0.{_swap(rest, RESNET, False)}" if kind == "resnets"
                                                         else f"1.{rest}")
        elif m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", k):
            k = f"input_blocks.{1 + int(m[1]) * (L + 1) + L}.0.op.{m[2]}"
        elif m := re.match(r"mid_block\.(resnets|attentions)\.(\d)\.(.*)", k):
            k = f"middle_block.{2 * int(m[2]) if m[1] == 'resnets' else 1}." + \
                (_swap(m[3], RESNET, False) if m[1] == "resnets" else m[3])
        elif m := re.match(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", k):
            u, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
            k = f"output_blocks.{u * (L + 1) + j}." + (f"0.{_swap(rest, RESNET, False)}" if kind == "resnets"
                                                      else f"1.{rest}")
        elif m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)", k):
            u = int(m[1])
            k = f"output_blocks.{u * (L + 1) + L}.{2 if u in attends_up else 1}.conv.{m[2]}"
        else:
            k = _swap(k, UNET_GLOBAL, False)
        out[k] = v
    return out


def _unet_from_ldm(state: dict) -> dict:
    blocks = {int(m[1]) for k in state if (m := re.match(r"input_blocks\.(\d+)\.", k))}
    ops = sorted(int(m[1]) for k in state if (m := re.match(r"input_blocks\.(\d+)\.0\.op\.", k)))
    L = ops[0] - 1 if ops else max(blocks)  # the first downsampler sits after the first level's L layers
    out = {}
    for k, v in state.items():
        if m := re.match(r"input_blocks\.(\d+)\.(\d)\.(.*)", k):
            i, part, rest = int(m[1]), m[2], m[3]
            if i == 0:
                k = _swap(k, UNET_GLOBAL, True)
            else:
                b, j = divmod(i - 1, L + 1)
                k = (f"down_blocks.{b}.downsamplers.0.conv.{rest[3:]}" if rest.startswith("op.") else
                     f"down_blocks.{b}.resnets.{j}.{_swap(rest, RESNET, True)}" if part == "0" else
                     f"down_blocks.{b}.attentions.{j}.{rest}")
        elif m := re.match(r"middle_block\.(\d)\.(.*)", k):
            k = (f"mid_block.attentions.0.{m[2]}" if m[1] == "1" else
                 f"mid_block.resnets.{int(m[1]) // 2}.{_swap(m[2], RESNET, True)}")
        elif m := re.match(r"output_blocks\.(\d+)\.(\d)\.(.*)", k):
            u, j = divmod(int(m[1]), L + 1)
            part, rest = m[2], m[3]
            k = (f"up_blocks.{u}.resnets.{j}.{_swap(rest, RESNET, True)}" if part == "0" else
                 f"up_blocks.{u}.upsamplers.0.{rest}" if rest.startswith("conv.") else
                 f"up_blocks.{u}.attentions.{j}.{rest}")
        else:
            k = _swap(k, UNET_GLOBAL, True)
        out[k] = v
    return out


# -----------------------------------------------------------------------------
# the VAE


VAE_ATTENTION = [("norm.", "group_norm."), ("q.", "to_q."), ("k.", "to_k."), ("v.", "to_v."),
                 ("proj_out.", "to_out.0.")]
VAE_NAMES = [("nin_shortcut.", "conv_shortcut."), ("norm_out.", "conv_norm_out.")]


def _vae(state: dict, to_diffusers: bool) -> dict:
    """VAE renames both ways; decoder levels are numbered from the bottom in LDM, from the top in diffusers."""
    pattern = r"encoder\.down\.(\d+)\." if to_diffusers else r"encoder\.down_blocks\.(\d+)\."
    n = 1 + max(int(m[1]) for k in state if (m := re.match(pattern, k)))
    out = {}
    for k, v in state.items():
        side, _, rest = k.partition(".")
        if to_diffusers:
            if m := re.match(r"(down|up)\.(\d+)\.(block\.(\d+)|downsample|upsample)\.(.*)", rest):
                level = int(m[2]) if m[1] == "down" else n - 1 - int(m[2])
                where = f"resnets.{m[4]}" if m[4] else f"{m[3]}rs.0"
                rest = f"{m[1]}_blocks.{level}.{where}.{_swap(m[5], VAE_NAMES, True)}"
            elif m := re.match(r"mid\.block_(\d)\.(.*)", rest):
                rest = f"mid_block.resnets.{int(m[1]) - 1}.{_swap(m[2], VAE_NAMES, True)}"
            elif m := re.match(r"mid\.attn_1\.(.*)", rest):
                rest = f"mid_block.attentions.0.{_swap(m[1], VAE_ATTENTION, True)}"
                v = v.flatten(1) if v.dim() == 4 else v             # 1x1 conv [C, C, 1, 1] -> linear [C, C]
            else:
                rest = _swap(rest, VAE_NAMES, True)
        else:
            if m := re.match(r"(down|up)_blocks\.(\d+)\.(resnets\.(\d+)|downsamplers\.0|upsamplers\.0)\.(.*)", rest):
                level = int(m[2]) if m[1] == "down" else n - 1 - int(m[2])
                where = f"block.{m[4]}" if m[4] else m[3].split("rs.")[0]
                rest = f"{m[1]}.{level}.{where}.{_swap(m[5], VAE_NAMES, False)}"
            elif m := re.match(r"mid_block\.resnets\.(\d)\.(.*)", rest):
                rest = f"mid.block_{int(m[1]) + 1}.{_swap(m[2], VAE_NAMES, False)}"
            elif m := re.match(r"mid_block\.attentions\.0\.(.*)", rest):
                rest = f"mid.attn_1.{_swap(m[1], VAE_ATTENTION, False)}"
                v = v[:, :, None, None] if v.dim() == 2 else v      # linear [C, C] -> 1x1 conv [C, C, 1, 1]
            else:
                rest = _swap(rest, VAE_NAMES, False)
        out[f"{side}.{rest}" if rest else side] = v
    return out


# -----------------------------------------------------------------------------
# OpenCLIP's text tower


OPENCLIP = [("token_embedding.", "text_model.embeddings.token_embedding."),
            ("ln_final.", "text_model.final_layer_norm."), ("ln_1.", "layer_norm1."), ("ln_2.", "layer_norm2."),
            ("mlp.c_fc.", "mlp.fc1."), ("mlp.c_proj.", "mlp.fc2."), ("attn.out_proj.", "self_attn.out_proj.")]


def _openclip_from(state: dict) -> dict:
    out = {}
    for k, v in state.items():
        if k == "positional_embedding":
            out["text_model.embeddings.position_embedding.weight"] = v
        elif k == "text_projection":
            out["text_projection.weight"] = v.T.contiguous()                # x @ P  ->  Linear weight P^T
        elif m := re.match(r"transformer\.resblocks\.(\d+)\.(.*)", k):
            head = f"text_model.encoder.layers.{m[1]}."
            if m[2].startswith("attn.in_proj_"):
                kind = m[2].removeprefix("attn.in_proj_")                    # weight [3D, D] / bias [3D]: q, k, v
                for name, chunk in zip("qkv", v.chunk(3), strict=True):
                    out[f"{head}self_attn.{name}_proj.{kind}"] = chunk.contiguous()
            else:
                out[head + _swap(m[2], OPENCLIP, True)] = v
        elif k != "logit_scale":
            out[_swap(k, OPENCLIP, True)] = v
    return out


def _openclip_to(state: dict) -> dict:
    state = {k if k.startswith("text_") else f"text_model.{k}": v for k, v in state.items()}  # transformers 5 drops it
    out = {}
    for k, v in state.items():
        if k == "text_model.embeddings.position_embedding.weight":
            out["positional_embedding"] = v
        elif k == "text_projection.weight":
            out["text_projection"] = v.T.contiguous()
        elif m := re.match(r"text_model\.encoder\.layers\.(\d+)\.(.*)", k):
            head, rest = f"transformer.resblocks.{m[1]}.", m[2]
            if a := re.match(r"self_attn\.([qkv])_proj\.(weight|bias)", rest):
                if a[1] == "q":                                              # q, k, v -> in_proj [3D, ...]
                    out[f"{head}attn.in_proj_{a[2]}"] = torch.cat([state[k.replace(".q_proj.", f".{p}_proj.")]
                                                                   for p in "qkv"])
            else:
                out[head + _swap(rest, OPENCLIP, False)] = v
        elif not k.endswith("position_ids"):
            out[_swap(k, OPENCLIP, False)] = v
    return out


# -----------------------------------------------------------------------------
# the whole file


def _hf_to(state: dict, prefix: str) -> dict:
    """A transformers CLIP / T5 state as the file stores it: CLIP under text_model. (transformers 5 drops it)."""
    clip = any("embeddings.token_embedding" in k for k in state)
    tied = "shared.weight" in state  # T5: embed_tokens is the same tensor as shared; the file holds it once
    return {prefix + (f"text_model.{k}" if clip and not k.startswith("text_") else k): v for k, v in state.items()
            if not k.endswith("position_ids") and not (tied and k == "encoder.embed_tokens.weight")}


def split(state: dict, family: str | None = None) -> dict[str, dict]:
    """An original-layout state dict -> {part: its state dict in diffusers' / transformers' names}; parts the file
    lacks (an SD3 file without T5) are absent."""
    family = family or detect(state)
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}, expected one of {', '.join(FAMILIES)}")
    parts = {}
    for part, (prefix, layout) in FAMILIES[family].items():
        sub = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)
               and not (part == "vae" and k.startswith(prefix + "loss."))}  # the VAE's training loss: not a part
        if not sub:
            continue
        if layout == "ldm":
            sub = _unet_from_ldm(sub) if part == "unet" else _vae(sub, to_diffusers=True)
        elif layout == "openclip":
            sub = _openclip_from(sub)
        elif layout == "mmdit":
            sub = mmdit.state_to_diffusers(sub, 1 + max(int(k.split(".")[1]) for k in sub if k.startswith("joint_")))
        parts[part] = sub
    return parts


def join(parts: dict[str, dict], family: str) -> dict:
    """split's inverse: diffusers' / transformers' part state dicts -> one original-layout state dict."""
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}, expected one of {', '.join(FAMILIES)}")
    unknown = set(parts) - set(FAMILIES[family])
    if unknown:
        raise ValueError(f"the {family} layout has no place for {sorted(unknown)}; its parts: "
                         f"{', '.join(FAMILIES[family])}")
    out = {}
    for part, sub in parts.items():
        prefix, layout = FAMILIES[family][part]
        if layout == "hf":
            out.update(_hf_to(sub, prefix))
            continue
        if layout == "ldm":
            sub = _unet_to_ldm(sub) if part == "unet" else _vae(sub, to_diffusers=False)
        elif layout == "openclip":
            sub = _openclip_to(sub)
        else:
            sub = mmdit.state_from_diffusers(sub, 1 + max(int(k.split(".")[1]) for k in sub
                                                          if k.startswith("transformer_blocks.")))
        out.update({prefix + k: v for k, v in sub.items()})
    return out
