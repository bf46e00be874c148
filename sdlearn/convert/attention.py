"""sdlearn.attention.Attention <-> diffusers' Attention (and torch.nn.MultiheadAttention).

The layouts are the same up to one name: diffusers wraps the output projection in a ModuleList
(to_out.0 = Linear, to_out.1 = Dropout), ours is the Linear itself.

    ours = from_diffusers(Attention(query_dim=320, cross_attention_dim=768, heads=8, dim_head=40))
    theirs = to_diffusers(ours)
    ours = from_torch(nn.MultiheadAttention(64, 4, batch_first=True))   # note: torch's bool masks are inverted
"""
from __future__ import annotations

from torch import nn

from sdlearn.attention import Attention
from sdlearn.convert.keys import rename

# (ours, theirs) name pieces, applied by sdlearn.convert.keys.rename
RENAMES = [
    ("to_out.", "to_out.0."),
]


def _unsupported(m) -> list[str]:
    """Options of diffusers' Attention that sdlearn's plain Attention does not have (set to non-defaults)."""
    bad = []
    for name in ("norm_q", "norm_k", "norm_cross", "group_norm", "spatial_norm", "add_q_proj", "add_k_proj",
                 "norm_added_q", "to_add_out"):
        if getattr(m, name, None) is not None:
            bad.append(name)
    if getattr(m, "rescale_output_factor", 1.0) != 1.0:
        bad.append("rescale_output_factor")
    if getattr(m, "residual_connection", False):
        bad.append("residual_connection")
    if abs(m.scale - (m.inner_dim // m.heads) ** -0.5) > 1e-12:  # scale_qk=False, or a custom scale
        bad.append("scale")
    if getattr(m, "only_cross_attention", False):
        bad.append("only_cross_attention")
    if getattr(m, "out_dim", m.query_dim) != m.query_dim:
        bad.append("out_dim")
    if m.to_k.out_features != m.inner_dim:
        bad.append("kv_heads")
    if getattr(m, "is_causal", False):
        bad.append("is_causal (pass is_causal=True to forward instead)")
    return bad


def from_diffusers(m) -> Attention:
    """diffusers.models.attention_processor.Attention -> sdlearn Attention with the same weights."""
    bad = _unsupported(m)
    if bad:
        raise ValueError(f"diffusers Attention uses options sdlearn.attention.Attention lacks: {', '.join(bad)}")
    heads = m.heads
    head_dim = m.inner_dim // heads
    ours = Attention(m.query_dim, context_dim=m.to_k.in_features, heads=heads, head_dim=head_dim,
                     qkv_bias=m.to_q.bias is not None, out_bias=m.to_out[0].bias is not None,
                     dropout=m.to_out[1].p)
    ours = ours.to(device=m.to_q.weight.device, dtype=m.to_q.weight.dtype)
    ours.load_state_dict(rename(m.state_dict(), RENAMES, to="ours"))
    return ours


def to_diffusers(ours: Attention):
    """sdlearn Attention -> diffusers' Attention with the same weights."""
    # optional: only to_diffusers needs diffusers
    from diffusers.models.attention_processor import Attention as DiffusersAttention

    theirs = DiffusersAttention(query_dim=ours.dim, cross_attention_dim=ours.context_dim, heads=ours.heads,
                                dim_head=ours.head_dim, bias=ours.to_q.bias is not None,
                                out_bias=ours.to_out.bias is not None, dropout=ours.dropout.p)
    theirs = theirs.to(device=ours.to_q.weight.device, dtype=ours.to_q.weight.dtype)
    theirs.load_state_dict(rename(ours.state_dict(), RENAMES, to="theirs"))
    return theirs


def from_torch(mha: nn.MultiheadAttention) -> Attention:
    """torch.nn.MultiheadAttention (batch_first) -> sdlearn Attention with the same weights.

    torch packs W_q, W_k, W_v into in_proj_weight [3E, E] when kdim = vdim = embed_dim, else keeps
    q_proj_weight / k_proj_weight / v_proj_weight. Careful with masks: torch's bool attn_mask means
    True = do NOT attend, ours True = attend.
    """
    if not mha.batch_first:
        raise ValueError("expected nn.MultiheadAttention(..., batch_first=True): sdlearn uses [B, N, C]")
    if mha.kdim != mha.vdim:
        raise ValueError(f"sdlearn Attention needs kdim == vdim, got kdim={mha.kdim}, vdim={mha.vdim}")
    if mha.bias_k is not None or mha.add_zero_attn:
        raise ValueError("add_bias_kv / add_zero_attn are not supported")
    e = mha.embed_dim
    has_bias = mha.in_proj_bias is not None
    ours = Attention(e, context_dim=mha.kdim, heads=mha.num_heads, qkv_bias=has_bias,
                     out_bias=mha.out_proj.bias is not None, dropout=0.0)
    ours = ours.to(device=mha.out_proj.weight.device, dtype=mha.out_proj.weight.dtype)
    if mha._qkv_same_embed_dim:
        wq, wk, wv = mha.in_proj_weight.chunk(3)  # [E, E] each
    else:
        wq, wk, wv = mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight
    sd = {"to_q.weight": wq, "to_k.weight": wk, "to_v.weight": wv, "to_out.weight": mha.out_proj.weight}
    if has_bias:
        sd |= dict(zip(("to_q.bias", "to_k.bias", "to_v.bias"), mha.in_proj_bias.chunk(3)))
    if mha.out_proj.bias is not None:
        sd["to_out.bias"] = mha.out_proj.bias
    ours.load_state_dict({k: v.detach().clone() for k, v in sd.items()})
    return ours
