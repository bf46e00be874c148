"""transformers' CLIPTextModel / CLIPTextModelWithProjection <-> sdlearn.text.TextEncoder.

    ours = from_diffusers(CLIPTextModel.from_pretrained(...))   # hidden == last_hidden_state, pooled == pooler_output
    theirs = to_diffusers(ours)                                   # CLIPTextModelWithProjection when ours projects

Key map (theirs -> ours), per layer i:
    embeddings.token_embedding / position_embedding -> token_embedding / position_embedding
    encoder.layers.i.self_attn.{q,k,v,out}_proj     -> blocks.i.attn.to_{q,k,v,out}
    encoder.layers.i.layer_norm{1,2}                 -> blocks.i.norm{1,2}
    encoder.layers.i.mlp.fc{1,2}                     -> blocks.i.mlp.fc{1,2}
    final_layer_norm                                 -> final_norm
    text_projection (WithProjection only)            -> projection

Pooling: transformers takes the *largest* token id's position when config.eos_token_id == 2 (the configs of
the original OpenAI checkpoints, whose <eos> 49407 is the largest id) and the first eos_token_id otherwise;
ours says which in TextConfig.pool ("argmax" / "eos").

The course's word-level Tokenizer as CLIP's byte-pair tokenizer (what diffusers' pipelines load):

    theirs = tokenizer_to_transformers(Tokenizer())   # a CLIPTokenizer: the same ids for every course prompt

Its vocabulary holds each course word as one token, "red</w>", with the course's id (so the text encoder's
embedding rows keep their order), and the merges that build it from its letters (Sennrich et al. 2016): the
letters and part-words they pass through get the ids after the course's, which no course prompt produces.
"""
from __future__ import annotations

from torch import nn

from sdlearn.convert.keys import rename
from sdlearn.text import BOS, EOS, PAD, TextConfig, TextEncoder, Tokenizer

# (ours, theirs) name pieces on the CLIPTextModel state dict, applied by sdlearn.convert.keys.rename
RENAMES = [
    ("token_embedding.", "embeddings.token_embedding."),
    ("position_embedding.", "embeddings.position_embedding."),
    ("blocks.{i}.attn.to_{p}.", "encoder.layers.{i}.self_attn.{p}_proj."),  # p: q, k, v, out
    ("blocks.{i}.norm{n}.", "encoder.layers.{i}.layer_norm{n}."),  # n: 1, 2
    ("blocks.{i}.mlp.", "encoder.layers.{i}.mlp."),
    ("final_norm.", "final_layer_norm."),
]
_ACTS = {"quick_gelu": "quick_gelu", "gelu": "gelu"}


def config_from_transformers(c, with_projection: bool = False) -> TextConfig:
    """TextConfig of a transformers CLIPTextConfig (no word vocabulary: CLIP's tokenizer is byte-pair)."""
    if c.hidden_act not in _ACTS:
        raise ValueError(f"unsupported hidden_act {c.hidden_act!r}; sdlearn supports {', '.join(_ACTS)}")
    return TextConfig(
        vocab=None, vocab_size=c.vocab_size, max_positions=c.max_position_embeddings, width=c.hidden_size,
        layers=c.num_hidden_layers, heads=c.num_attention_heads, mlp_dim=c.intermediate_size,
        activation=_ACTS[c.hidden_act], layer_norm_eps=c.layer_norm_eps, eos_token_id=c.eos_token_id,
        pool="argmax" if c.eos_token_id == 2 else "eos",
        projection_dim=c.projection_dim if with_projection else None,
    )


def state_from_transformers(state: dict) -> dict:
    """A CLIPTextModel(WithProjection) state dict, as the model holds it or as a checkpoint stores it (under
    "text_model."), -> ours."""
    state = {k.removeprefix("text_model."): v for k, v in state.items() if not k.endswith("position_ids")}
    projection = state.pop("text_projection.weight", None)
    state = rename(state, RENAMES, to="ours")
    return state if projection is None else {**state, "projection.weight": projection}


def from_diffusers(model: nn.Module) -> TextEncoder:
    """An sdlearn TextEncoder with the weights of a transformers CLIPTextModel / CLIPTextModelWithProjection."""
    name = type(model).__name__
    if name not in ("CLIPTextModel", "CLIPTextModelWithProjection"):
        raise TypeError(f"expected a transformers CLIPTextModel or CLIPTextModelWithProjection, got {name}")
    ours = TextEncoder(config_from_transformers(model.config, name == "CLIPTextModelWithProjection"))
    ours.load_state_dict(state_from_transformers(model.state_dict()), strict=True)
    return ours.to(next(model.parameters()).dtype)


def to_diffusers(module: TextEncoder, projection: bool = True) -> nn.Module:
    """The transformers CLIPTextModel (or ...WithProjection when `module` projects) with `module`'s weights.
    projection=False: a CLIPTextModel, without the projection (SD's and SDXL's first encoder: diffusers' pipelines
    read its token states, and would take a ...WithProjection's first output, the pooled vector, for them)."""
    # optional: only to_diffusers needs transformers
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = module.config
    if not cfg.causal:
        raise ValueError("this TextEncoder is bidirectional (causal=False); transformers' CLIPTextModel always masks "
                         "causally, and no transformers class has its layout (T5's encoder has RMSNorm and relative "
                         "positions, no biases)")
    projection = projection and bool(cfg.projection_dim)
    if cfg.pool == "argmax":
        eos = 2  # transformers' switch for "pool at the largest token id"
    elif cfg.eos_token_id == 2:
        raise ValueError("transformers cannot pool at the first <eos> when eos_token_id == 2 (it takes the largest "
                         "id instead); give <eos> another id")
    else:
        eos = cfg.eos_token_id
    if cfg.vocab is not None:  # the course tokenizer's special ids
        ids = dict(bos_token_id=cfg.vocab.index("<bos>"), pad_token_id=cfg.vocab.index("<pad>"))
    else:  # CLIP's (49406, 1) where they exist; pooling never reads them
        ids = dict(bos_token_id=49406 if cfg.vocab_size > 49406 else None,
                   pad_token_id=1 if cfg.vocab_size > 1 else None)
    c = CLIPTextConfig(
        vocab_size=cfg.vocab_size, max_position_embeddings=cfg.max_positions, hidden_size=cfg.width,
        num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads, intermediate_size=cfg.mlp_dim,
        hidden_act=cfg.activation, layer_norm_eps=cfg.layer_norm_eps, eos_token_id=eos,
        projection_dim=cfg.projection_dim if projection else cfg.width, **ids,
    )
    theirs = CLIPTextModelWithProjection(c) if projection else CLIPTextModel(c)
    body = theirs.text_model if projection else theirs
    state = rename({k: v for k, v in module.state_dict().items() if not k.startswith("projection.")}, RENAMES,
                   to="theirs")
    missing, unexpected = body.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if not k.endswith("position_ids")]:
        raise RuntimeError(f"weight mismatch converting to transformers: missing {missing}, unexpected {unexpected}")
    if projection:
        theirs.text_projection.weight.data.copy_(module.projection.weight)
    dtype = next(module.parameters()).dtype
    return theirs.to(dtype).eval()


# -----------------------------------------------------------------------------
# the course's tokenizer -> CLIP's byte-pair tokenizer

UNK = "<unk>"  # what CLIP's tokenizer makes of a letter no course word has: an id after the course's


def _merge(pieces: list[str], ranks: dict) -> list[str]:
    """Byte-pair encoding of one word's pieces: merge the adjacent pair of lowest rank until none is in `ranks`."""
    while len(pieces) > 1:
        rank, i = min((ranks.get(pair, len(ranks)), i) for i, pair in enumerate(zip(pieces, pieces[1:])))
        if rank == len(ranks):
            break
        pieces = [*pieces[:i], pieces[i] + pieces[i + 1], *pieces[i + 2:]]
    return pieces


def clip_vocabulary(tok: Tokenizer, backend) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """(vocab.json's token -> id, merges.txt's pairs in rank order) of a CLIP tokenizer whose tokens are `tok`'s words
    with its ids. backend: a CLIP tokenizers.Tokenizer, whose normalizer and pre-tokenizer give a word's letters
    (as bytes) and mark its last one with </w>. Each word's merges are added after all earlier ones, until byte-pair
    encoding with the merges so far makes it one token: later merges never change how an earlier word merges."""
    ids = {s: tok.ids[s] for s in (PAD, BOS, EOS)}
    extra, ranks = [UNK], {}
    for i, word in enumerate(tok.vocab):
        if word in (PAD, BOS, EOS):
            continue
        split = backend.pre_tokenizer.pre_tokenize_str(backend.normalizer.normalize_str(word))
        pieces = [*split[0][0]] if split else []
        if pieces:
            pieces[-1] += "</w>"
        ids.setdefault("".join(pieces), i)
        extra += pieces
        while len(pieces := _merge(pieces, ranks)) > 1:
            ranks[pieces[0], pieces[1]] = len(ranks)
            extra.append(pieces[0] + pieces[1])
    for piece in extra:
        ids.setdefault(piece, max(ids.values()) + 1)
    return ids, list(ranks)


def tokenizer_to_transformers(tok: Tokenizer):
    """The transformers CLIPTokenizer that gives `tok`'s ids for every prompt of its words, padded with <pad> and
    truncated (<eos> kept last) to its context length; a ValueError naming the words CLIP's tokenizer cannot give
    as one token (it lower-cases and splits a word at anything not a letter: "x-ray", "3d")."""
    from transformers import CLIPTokenizer

    if not isinstance(tok, Tokenizer):
        raise TypeError(f"expected the course's sdlearn.text.Tokenizer, got {type(tok).__name__}")
    vocab, merges = clip_vocabulary(tok, CLIPTokenizer().backend_tokenizer)
    theirs = CLIPTokenizer(vocab=vocab, merges=merges, unk_token=UNK, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                           model_max_length=tok.context_length)
    words = [w for w in tok.vocab if w not in (PAD, BOS, EOS)]
    wrong = [f"{w!r} -> {theirs.tokenize(w)}" for w, ids in zip(words, theirs(words).input_ids, strict=True)
             if ids != [tok.bos_id, tok.ids[w], tok.eos_id]]
    if wrong:
        raise ValueError(f"CLIP's tokenizer cannot give these words of the vocabulary as one token each (it "
                         f"lower-cases, splits at anything not a letter): {', '.join(wrong)}")
    return theirs
