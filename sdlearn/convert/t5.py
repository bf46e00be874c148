"""transformers' T5EncoderModel <-> sdlearn.t5.T5Encoder (SD3's third text encoder).

    ours = from_diffusers(T5EncoderModel.from_pretrained(..., subfolder="text_encoder_3"))
    theirs = to_diffusers(ours)

Key map (ours <- theirs), per layer i; the position bias lives in layer 0 of theirs and is shared by all:
    token_embedding      <- encoder.embed_tokens (= shared: tied; a checkpoint may hold either)
    position_bias        <- encoder.block.0.layer.0.SelfAttention.relative_attention_bias
    blocks.i.norm1 / attn.{q,k,v,o} <- encoder.block.i.layer.0.layer_norm / SelfAttention.{q,k,v,o}
    blocks.i.norm2 / wi_0, wi_1, wo <- encoder.block.i.layer.1.layer_norm / DenseReluDense.{wi_0,wi_1,wo}
    final_norm           <- encoder.final_layer_norm
"""
from __future__ import annotations

from torch import nn

from sdlearn.convert.keys import rename
from sdlearn.t5 import T5Config, T5Encoder

RENAMES = [
    ("token_embedding.", "encoder.embed_tokens."),
    ("position_bias.", "encoder.block.0.layer.0.SelfAttention.relative_attention_bias."),
    ("blocks.{i}.norm1.", "encoder.block.{i}.layer.0.layer_norm."),
    ("blocks.{i}.attn.", "encoder.block.{i}.layer.0.SelfAttention."),
    ("blocks.{i}.norm2.", "encoder.block.{i}.layer.1.layer_norm."),
    ("blocks.{i}.", "encoder.block.{i}.layer.1.DenseReluDense."),
    ("final_norm.", "encoder.final_layer_norm."),
]


def config_from_transformers(c) -> T5Config:
    """A T5Config from a transformers T5Config or its dict (config.json); a clear error for what sdlearn lacks."""
    c = c if isinstance(c, dict) else c.to_dict()
    if c.get("feed_forward_proj", "relu") != "gated-gelu":
        raise ValueError(f"T5 with feed_forward_proj={c.get('feed_forward_proj')!r}: sdlearn's T5Encoder is T5 "
                         f"v1.1's, with 'gated-gelu' (as SD3's T5-XXL)")
    return T5Config(vocab_size=c["vocab_size"], width=c["d_model"], layers=c["num_layers"], heads=c["num_heads"],
                    head_dim=c["d_kv"], mlp_dim=c["d_ff"], buckets=c.get("relative_attention_num_buckets", 32),
                    max_distance=c.get("relative_attention_max_distance", 128), eps=c.get("layer_norm_epsilon", 1e-6))


def state_from_diffusers(state: dict) -> dict:
    """A T5EncoderModel state dict (the model's, or a file's: with shared.weight, encoder.embed_tokens.weight or
    both) -> ours."""
    state = dict(state)
    shared = state.pop("shared.weight", None)
    if "encoder.embed_tokens.weight" not in state and shared is not None:
        state["encoder.embed_tokens.weight"] = shared
    return rename(state, RENAMES, to="ours")


def state_to_diffusers(state: dict) -> dict:
    theirs = rename(state, RENAMES, to="theirs")
    return {**theirs, "shared.weight": theirs["encoder.embed_tokens.weight"]}


def from_diffusers(model: nn.Module) -> T5Encoder:
    """transformers' T5EncoderModel -> sdlearn T5Encoder with the same weights."""
    ours = T5Encoder(config_from_transformers(model.config))
    ours.load_state_dict(state_from_diffusers(model.state_dict()), strict=True)
    p = next(model.parameters())
    return ours.to(device=p.device, dtype=p.dtype).eval()


def to_diffusers(ours: T5Encoder) -> nn.Module:
    """sdlearn T5Encoder -> transformers' T5EncoderModel with the same weights."""
    from transformers import T5Config as TheirConfig  # optional: only to_diffusers needs transformers
    from transformers import T5EncoderModel

    c, p = ours.config, next(ours.parameters())
    theirs = T5EncoderModel(TheirConfig(
        vocab_size=c.vocab_size, d_model=c.width, num_layers=c.layers, num_heads=c.heads, d_kv=c.head_dim,
        d_ff=c.mlp_dim, relative_attention_num_buckets=c.buckets, relative_attention_max_distance=c.max_distance,
        layer_norm_epsilon=c.eps, feed_forward_proj="gated-gelu", dropout_rate=0.0))
    theirs.load_state_dict(state_to_diffusers(ours.state_dict()), strict=True)
    return theirs.to(device=p.device, dtype=p.dtype).eval()
