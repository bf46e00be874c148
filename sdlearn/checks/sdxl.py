"""Checkers for 07_sdxl: the two text encoders' outputs, the micro-conditioning input, the base/refiner handoff,
the refiner's training timesteps.

    from sdlearn.checks import sdxl as check
    check.sdxl_text(sdxl_text)              # (context, pooled) from two text encoders
    check.text_time_input(text_time_input)  # pooled text + six size/crop ids, each its own sinusoid
    check.handoff(handoff)                  # a sampler's timesteps split between the base and the refiner
    check.refiner_timesteps(refiner_timesteps)   # the refiner's training timesteps: the low-noise end

Each runs the learner's function next to sdlearn.sdxl's (and sdlearn.unet's) reference on small inputs chosen so
that the usual mistakes give different answers, and names the mistake: the final states instead of the
penultimate, channels vs sequence concatenation, pooled from the wrong encoder, ids in the wrong order, the
handoff split by step count or at the wrong end of the trajectory, the refiner trained on the high-noise end, ...
"""
from __future__ import annotations

import numbers

import torch
from einops import rearrange

from sdlearn.checks import call, diagnose, diagnose_combinations, expect_tensor, fail, passed
from sdlearn.diffusion import NoiseSchedule
from sdlearn.sdxl import SDXLConditioner
from sdlearn.sdxl import handoff as _reference_handoff
from sdlearn.sdxl import text_time_input as _reference_text_time_input
from sdlearn.sdxl import time_ids as _reference_time_ids
from sdlearn.text import BOS, EOS, PAD, TextConfig, TextEncoder, Tokenizer, course_words
from sdlearn.unet import timestep_embedding


def _kind(value) -> str:
    """A short description of what a function returned: 'a Tensor of shape (2, 3)', 'a tuple of 3', ..."""
    if isinstance(value, torch.Tensor):
        return f"a Tensor of shape {tuple(value.shape)}"
    if isinstance(value, (tuple, list)):
        return f"a {type(value).__name__} of {len(value)}"
    return f"a {type(value).__name__}"


# -----------------------------------------------------------------------------
# exercise 1: two text encoders -> (context, pooled)

_PROMPTS = ["a red circle on the left", "a blue square at the top and a green cross", ""]
# the second encoder's vocabulary in another order, so that its token ids differ from the first's (as CLIP's and
# OpenCLIP's tokenizers pad differently): tokens fed to the wrong encoder give another answer
_VOCAB_2 = (PAD, *reversed(course_words()), BOS, EOS)


def tiny_text_encoders(width: int = 16, width_2: int = 24, projection_2: int = 20,
                       seed: int = 0) -> SDXLConditioner:
    """Two random text encoders (CLIP-L's role: `width`, no projection; bigG's: `width_2`, projected to
    `projection_2`) in an SDXLConditioner with their tokenizers. Weights perturbed so that every layer counts."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        enc = TextEncoder(TextConfig(width=width, layers=2, heads=2, projection_dim=None))
        enc_2 = TextEncoder(TextConfig(vocab=_VOCAB_2, width=width_2, layers=3, heads=2, projection_dim=projection_2))
        with torch.no_grad():
            for p in [*enc.parameters(), *enc_2.parameters()]:
                p.add_(0.3 * torch.randn_like(p))
    return SDXLConditioner(enc.eval(), enc_2.eval(), tokenizer=Tokenizer(vocab=enc.config.vocab),
                           tokenizer_2=Tokenizer(vocab=_VOCAB_2))


_CONTEXT_HINTS = [
    {"final": "the first encoder's states are its final (LayerNorm'd) ones: SDXL reads the penultimate block's, "
              "text_encoder(tokens, hidden_layer=-2)[0]"},
    {"final": "the second encoder's states are its final (LayerNorm'd) ones: SDXL reads the penultimate block's, "
              "text_encoder_2(tokens_2, hidden_layer=-2)[0]"},
    {"21": "the encoders are concatenated in the wrong order: the first encoder's channels come first, "
           "torch.cat([hidden_1, hidden_2], dim=-1)"},
    {"sequence": "concatenated on the sequence axis ([B, 2L, D]): the two encoders describe the same L tokens, "
                 "concatenate their channels, torch.cat([hidden_1, hidden_2], dim=-1)",
     "batch": "concatenated on the batch axis ([2B, L, D], torch.cat's default dim=0): concatenate the channels, "
              "torch.cat([hidden_1, hidden_2], dim=-1)"},
    {"swapped": "each encoder was given the other's tokens: text_encoder reads tokens, text_encoder_2 tokens_2 "
                "(their vocabularies differ)"},
]

_CONCAT_CRASH_HINTS = {
    "got tuple": "a TextEncoder returns a tuple (hidden, pooled): unpack it, hidden_1, _ = text_encoder(tokens, "
                 "hidden_layer=-2), and concatenate the hidden states [B, L, D]",
    "stack expects": "torch.stack makes a new axis and needs equal shapes; the states [B, L, D1] and [B, L, D2] are "
                     "joined on their channels, torch.cat([hidden_1, hidden_2], dim=-1)",
    "except in dimension 1": "the states [B, L, D1] and [B, L, D2] share B and L, not the width: concatenate them "
                             "on the channel axis, torch.cat([hidden_1, hidden_2], dim=-1), not on the sequence axis",
    "except in dimension 0": "the states [B, L, D1] and [B, L, D2] share B and L, not the width: concatenate them "
                             "on the channel axis, torch.cat([hidden_1, hidden_2], dim=-1) (torch.cat's default "
                             "dim=0 is the batch axis)",
}


def _pooled_mistakes(enc, enc_2, tokens, tokens_2):
    """(hint, the pooled vector that mistake gives) pairs, computed lazily."""
    B = len(tokens)
    rows, eos = torch.arange(B), enc_2.pool_index(tokens_2)
    final_2, pooled_2 = enc_2(tokens_2)
    penultimate_2 = enc_2(tokens_2, hidden_layer=-2)[0]
    proj = enc_2.projection
    yield ("pooled from the first encoder: SDXL's pooled vector is the second encoder's, "
           "text_encoder_2(tokens_2)[1]"), enc(tokens)[1]
    yield ("pooled is the second encoder's <eos> state without its projection: the encoder's pooled output "
           "(text_encoder_2(tokens_2)[1]) is projected by text_projection"), final_2[rows, eos]
    yield ("pooled as the mean over the tokens: it is the projected state of the <eos> token, "
           "text_encoder_2(tokens_2)[1]"), proj(final_2.mean(1))
    yield ("pooled as the mean over the tokens, unprojected: it is the projected state of the <eos> token, "
           "text_encoder_2(tokens_2)[1]"), final_2.mean(1)
    yield ("pooled as the mean of the penultimate states over the tokens: it is the projected final state of the "
           "<eos> token, text_encoder_2(tokens_2)[1]"), penultimate_2.mean(1)
    yield ("pooled taken from the penultimate states: only the context is penultimate; pooled is the projected "
           "final state of <eos>, text_encoder_2(tokens_2)[1]"), proj(penultimate_2[rows, eos])
    yield ("pooled taken from the penultimate states, unprojected: pooled is the projected final state of "
           "<eos>, text_encoder_2(tokens_2)[1]"), penultimate_2[rows, eos]
    yield ("pooled from the last position (a <pad> token): the pooled state is the <eos> token's, wherever it "
           "is; text_encoder_2(tokens_2)[1] finds it"), proj(final_2[:, -1])
    yield ("pooled from the first position (<bos>): the pooled state is the <eos> token's, "
           "text_encoder_2(tokens_2)[1]"), proj(final_2[:, 0])
    yield ("pooled from both encoders concatenated: SDXL's pooled vector is the second encoder's alone, "
           "text_encoder_2(tokens_2)[1]"), torch.cat([enc(tokens)[1], pooled_2], -1)
    yield ("pooled from the first encoder's tokens: text_encoder_2 reads tokens_2"), enc_2(tokens)[1]


def _context_variant(states, layer_1, layer_2, order, axis, feed) -> torch.Tensor:
    """The context a combination of choices gives; states: (encoder index, hidden_layer, which tokens) -> [B, L, D].
    A concatenation that would crash here (on the sequence or batch axis, widths differing) gives an empty tensor,
    which matches nothing."""
    t1, t2 = ("tokens", "tokens_2") if feed == "right" else ("tokens_2", "tokens")
    h1 = states[1, -1 if layer_1 == "final" else -2, t1]
    h2 = states[2, -1 if layer_2 == "final" else -2, t2]
    if axis != "channel" and h1.shape[-1] != h2.shape[-1]:
        return torch.empty(0)
    return torch.cat([h1, h2] if order == "12" else [h2, h1], {"channel": -1, "sequence": 1, "batch": 0}[axis])


def _check_text(name: str, fn, width: int, width_2: int) -> None:
    cond = tiny_text_encoders(width, width_2)
    enc, enc_2 = cond.text_encoder, cond.text_encoder_2
    tokens, tokens_2 = cond.tokenizer(_PROMPTS), cond.tokenizer_2(_PROMPTS)
    B, L = tokens.shape
    on = (f"{B} prompts, tokens and tokens_2 [{B}, {L}], a text_encoder of width {width} and a text_encoder_2 "
          f"of width {width_2} (pooled {enc_2.config.pooled_dim})")
    got = call(name, fn, enc, enc_2, tokens.clone(), tokens_2.clone(), on=on, hints=_CONCAT_CRASH_HINTS)
    if not (isinstance(got, (tuple, list)) and len(got) == 2):
        fail(name, f"return a tuple (context, pooled) of two tensors, got {_kind(got)}")
    context, pooled = got
    expect_tensor(name, context, what="the context (the first of the two results)")
    expect_tensor(name, pooled, what="pooled (the second of the two results)")
    expected_context, expected_pooled = cond.encode_text(_PROMPTS)
    toks = {"tokens": tokens, "tokens_2": tokens_2}
    states = {(i, layer, k): e(t, hidden_layer=layer)[0]
              for i, e in ((1, enc), (2, enc_2)) for layer in (-1, -2) for k, t in toks.items()}
    right = ("penultimate", "penultimate", "12", "channel", "right")

    def compute(*choices):
        return expected_context if choices == right else _context_variant(states, *choices)

    axes = [("penultimate", "final"), ("penultimate", "final"), ("12", "21"), ("channel", "sequence", "batch"),
            ("right", "swapped")]
    diagnose_combinations(name, context, compute, axes, _CONTEXT_HINTS, on=on, what="the context",
                          advice="Expected torch.cat([text_encoder(tokens, hidden_layer=-2)[0], "
                                 "text_encoder_2(tokens_2, hidden_layer=-2)[0]], dim=-1)")
    diagnose(name, pooled, expected_pooled, _pooled_mistakes(enc, enc_2, tokens, tokens_2), on=on, what="pooled",
             advice="Expected the second encoder's pooled output, text_encoder_2(tokens_2)[1] (its final state at "
                    "<eos>, projected)")


def sdxl_text(fn) -> None:
    """fn(text_encoder, text_encoder_2, tokens [B,L], tokens_2 [B,L]) -> (context [B, L, D1 + D2], pooled [B, P2]):
    the penultimate states of both encoders concatenated on channels, and the second encoder's pooled output."""
    name = "sdxl_text"
    with torch.no_grad():
        # widths 16 and 24 (as CLIP-L's 768 and bigG's 1280): a concatenation on the wrong axis crashes, and the
        # crash is named; then equal widths, where it runs and gives [B, 2L, D] or [2B, L, D]
        for width, width_2 in [(16, 24), (16, 16)]:
            _check_text(name, fn, width, width_2)
    passed(name)


# -----------------------------------------------------------------------------
# exercise 2: the micro-conditioning input, pooled text + six sinusoids

_TEXT_TIME_HINTS = [
    {"otc": "the ids are in the wrong order: target_size before crop_top_left; SDXL's order is original_size, "
            "crop_top_left, target_size"},
    {True: "original_size taken as (w, h): the ids are (height, width), in the order given"},
    {True: "crop_top_left taken as (left, top): the ids are (top, left), in the order given"},
    {True: "target_size taken as (w, h): the ids are (height, width), in the order given"},
    {0: "the three [B, 2] tensors are concatenated on the batch axis (torch.cat's default dim=0, giving [3B, 2]): "
        "each image's six ids form one row, torch.cat([original_size, crop_top_left, target_size], dim=1) -> [B, 6]"},
    {"dk": "the embeddings are laid out channel by channel across the ids ('(b k) d -> b (d k)'): each id's dim "
           "channels must stay together, id after id, '(b k) d -> b (k d)' (a plain .reshape(B, -1))",
     "halves": "one sinusoid for the six ids together (the cos halves of all six, then the sin halves): each id "
               "is its own timestep_embedding(id, dim), cos then sin, laid out id after id",
     "kb": "the rows of the batch are mixed up: flatten the [B, 6] ids row by row (time_ids.flatten()) and "
           "reshape the embeddings back with '(b k) d -> b (k d)'"},
    {"sin-cos": "the sin and cos halves are swapped: timestep_embedding puts cos first, then sin (notebook 05)"},
    {"after": "pooled comes after the ids: it goes first, torch.cat([pooled, ids], dim=-1)",
     "missing": "pooled is missing: the result is torch.cat([pooled, embedded ids], dim=-1)"},
]


def _text_time_variant(pooled, original, crop, target, dim, order, flip_o, flip_c, flip_t, axis, layout, halves,
                       place):
    """What text_time_input gives with the given choices (the right ones: 'oct', False x 3, 1, 'kd', 'cos-sin',
    'before')."""
    parts = {"o": original.flip(-1) if flip_o else original, "c": crop.flip(-1) if flip_c else crop,
             "t": target.flip(-1) if flip_t else target}
    ids = torch.cat([parts[k] for k in order], dim=axis)  # [B, 6] (axis 0: [3B, 2], the batch's rows interleaved)
    B = pooled.shape[0]
    emb = timestep_embedding(ids.flatten(), dim)  # [(b k), dim]
    if halves == "sin-cos":
        emb = torch.cat([emb[:, dim // 2:], emb[:, :dim // 2]], -1)
    if layout == "kd":
        emb = rearrange(emb, "(b k) d -> b (k d)", b=B)
    elif layout == "dk":
        emb = rearrange(emb, "(b k) d -> b (d k)", b=B)
    elif layout == "halves":
        emb = rearrange(emb, "(b k) (h d) -> b (h k d)", b=B, h=2)
    else:  # "kb": flattened column by column, reshaped row by row
        emb = rearrange(rearrange(emb, "(b k) d -> (k b) d", b=B), "(b k) d -> b (k d)", b=B)
    return {"before": torch.cat([pooled, emb], -1), "after": torch.cat([emb, pooled], -1), "missing": emb}[place]


def text_time_input(fn) -> None:
    """fn(pooled [B,P], original_size [B,2], crop_top_left [B,2], target_size [B,2], dim) -> [B, P + 6 dim]:
    pooled, then the six ids (orig_h, orig_w, crop_top, crop_left, target_h, target_w), each its own sinusoid."""
    name = "text_time_input"
    g = torch.Generator().manual_seed(0)
    pooled = torch.randn(3, 4, generator=g)
    # non-square sizes, non-zero crops, every number different, so that each order mistake shows
    original = torch.tensor([[480.0, 640.0], [300.0, 200.0], [1024.0, 768.0]])
    crop = torch.tensor([[16.0, 48.0], [0.0, 20.0], [100.0, 7.0]])
    target = torch.tensor([[512.0, 384.0], [256.0, 320.0], [640.0, 896.0]])
    dim = 8
    on = (f"pooled [3, 4], original_size {original.int().tolist()}, crop_top_left {crop.int().tolist()}, "
          f"target_size {target.int().tolist()} (each [3, 2]), dim={dim}")
    got = call(name, fn, pooled.clone(), original.clone(), crop.clone(), target.clone(), dim, on=on, hints={
        "Sizes of tensors must match": (
            "pooled is [B, P] and the embedded ids must be [B, 6 * dim] before they are joined on the last axis: "
            "timestep_embedding gives [B * 6, dim], reshape it id after id ('(b k) d -> b (k d)'), then "
            "torch.cat([pooled, emb], dim=-1)"),
        r"is invalid for input of size|can't divide axis|Shape mismatch": (
            "timestep_embedding(ids.flatten(), dim) gives [B * 6, dim], B * 6 * dim numbers: reshape it to "
            "[B, 6 * dim] with B = pooled.shape[0], emb.reshape(B, -1) or rearrange(emb, '(b k) d -> b (k d)', b=B)"),
        "view size is not compatible": "use .reshape (or rearrange) instead of .view: the tensor is not contiguous",
        "must match the size|size of tensor|same number of dimensions": (
            "timestep_embedding(t, dim) embeds a 1-d tensor [N] of numbers: put the six ids in a [B, 6] tensor "
            "(torch.cat along dim=1), flatten it, embed, reshape to [B, 6 * dim], then concatenate after pooled")})
    got = expect_tensor(name, got, what="the text_time input")
    expected = _reference_text_time_input(pooled, _reference_time_ids(original, crop, target), dim)
    right = ("oct", False, False, False, 1, "kd", "cos-sin", "before")

    def compute(*choices):
        if choices == right:
            return expected
        return _text_time_variant(pooled, original, crop, target, dim, *choices)

    axes = [("oct", "otc"), (False, True), (False, True), (False, True), (1, 0), ("kd", "dk", "halves", "kb"),
            ("cos-sin", "sin-cos"), ("before", "after", "missing")]
    diagnose_combinations(name, got, compute, axes, _TEXT_TIME_HINTS, on=on, atol=1e-5, what="the text_time input",
                          advice="Expected torch.cat([pooled, embedding], -1), the embedding [B, 6 * dim] being "
                                 "timestep_embedding(ids.flatten(), dim) reshaped id after id, ids = "
                                 "(orig_h, orig_w, crop_top, crop_left, target_h, target_w)")
    passed(name)


# -----------------------------------------------------------------------------
# exercise 3: the base/refiner handoff


def _span(ts: list) -> str:
    return f"{len(ts)} timesteps" + (f" ({ts[0]} ... {ts[-1]})" if len(ts) > 1 else f" ({ts[0]})" if ts else "")


def _handoff_mistakes(ts: list[int], switch: float):
    """(hint, (base, refiner) that mistake gives) pairs."""
    n, cutoff, wrong_way = len(ts), round(1000 * (1 - switch)), round(1000 * switch)
    base, refiner = _reference_handoff(ts, switch)
    by_count = ("split by step count: the handoff is at a noise level, not a step; the base runs every t >= "
                "round(1000 * (1 - switch)), the refiner every t below (the sampler's steps need not be evenly "
                "spaced, and need not start at 999)")
    for k in (int(n * switch), round(n * switch)):
        yield by_count, (ts[:k], ts[k:])
    yield (f"the fraction is read the wrong way: switch={switch} is how much of the trajectory the base runs, "
           f"from the noisy end, so the cut-off is round(1000 * (1 - switch)) = {cutoff}, not "
           f"round(1000 * switch) = {wrong_way}"), ([t for t in ts if t >= wrong_way], [t for t in ts if t < wrong_way])
    yield (f"t > cutoff: the base runs every t >= cutoff (diffusers' denoising_end), here t = {cutoff} too; the "
           f"refiner every t < cutoff"), ([t for t in ts if t > cutoff], [t for t in ts if t <= cutoff])
    yield (f"the fraction is read the wrong way and t > cutoff: the base runs every t >= round(1000 * (1 - switch)) "
           f"= {cutoff}"), ([t for t in ts if t > wrong_way], [t for t in ts if t <= wrong_way])
    if base:
        yield ("the last base timestep is repeated in the refiner's list: the two lists split the sampler's "
               "timesteps, each timestep runs once (the refiner starts at the first t < cutoff)"), \
            (base, [base[-1], *refiner])
    yield ("the lists are in ascending order: keep the sampler's order, descending (noisy to clean)"), \
        (sorted(base), sorted(refiner))
    yield ("the two lists are swapped: return (base, refiner), the base's timesteps (the noisy ones) first"), \
        (refiner, base)


def _as_timesteps(name: str, value, which: str, on: str) -> list[int]:
    if isinstance(value, torch.Tensor):
        fail(name, f"the {which}'s timesteps are a Tensor: return lists of ints (e.g. [t for t in timesteps if ...], "
                   f"or .tolist()), in the sampler's descending order{on}")
    if not isinstance(value, (list, tuple)):
        fail(name, f"the {which}'s timesteps should be a list of ints, got {_kind(value)}{on}")
    for t in value:
        if isinstance(t, bool) or not isinstance(t, numbers.Integral):
            fail(name, f"the {which}'s timesteps should be a list of Python ints, got an element of type "
                       f"{type(t).__name__} ({t!r}){on}" + (": use .tolist() or int(t)"
                                                            if isinstance(t, torch.Tensor) else ""))
    return [int(t) for t in value]


def handoff(fn) -> None:
    """fn(timesteps, switch) -> (base_timesteps, refiner_timesteps): the base runs every t >= cutoff =
    round(1000 * (1 - switch)), the refiner every t < cutoff (diffusers' denoising_end / denoising_start)."""
    name = "handoff"
    sched = NoiseSchedule("scaled_linear")
    cases = [
        (sched.timesteps(30).tolist(), 0.8, "timesteps(30)"),  # cut-off 200 between two sampled steps
        (sched.timesteps(50).tolist(), 0.8, "timesteps(50)"),  # cut-off 200 is itself a sampled timestep
        (sched.timesteps(50).tolist(), 1.0, "timesteps(50)"),  # the base runs all the way: the refiner gets none
    ]
    for ts, switch, how in cases:
        phrase = (f"the {len(ts)} timesteps [{ts[0]}, {ts[1]}, ..., {ts[-1]}] of NoiseSchedule('scaled_linear')."
                  f"{how} with switch={switch}")
        on = f" on {phrase}"
        got = call(name, fn, list(ts), switch, on=phrase)
        if not (isinstance(got, (tuple, list)) and len(got) == 2):
            fail(name, f"return a tuple (base_timesteps, refiner_timesteps) of two lists, got {_kind(got)}{on}")
        got = (_as_timesteps(name, got[0], "base", on), _as_timesteps(name, got[1], "refiner", on))
        expected = _reference_handoff(ts, switch)
        if got == tuple(expected):
            continue
        for hint, wrong in _handoff_mistakes(ts, switch):
            if got == tuple(wrong):
                fail(name, f"wrong split{on}: {hint}")
        cutoff = round(1000 * (1 - switch))
        fail(name, f"wrong split{on}: expected the base to get {_span(expected[0])} and the refiner "
                   f"{_span(expected[1])}, got {_span(got[0])} and {_span(got[1])}, which matches none of the usual "
                   f"mistakes. The cut-off is round(1000 * (1 - switch)) = {cutoff}: the base runs every t >= "
                   f"{cutoff}, the refiner every t < {cutoff}, both in the sampler's order")
    passed(name)



# -----------------------------------------------------------------------------
# exercise 4: the refiner's training timesteps

_RANDINT_HINTS = {
    "randint": "torch.randint(low, high, size) takes the size as a tuple, (n,), and draws from low to high - 1",
    "rand|float": "the timesteps index the schedule's tables: draw integers, torch.randint(0, t_max, (n,))",
}


def _timesteps_mistake(t: torch.Tensor, n: int, t_max: int) -> str:
    """What is wrong with n drawn timesteps t [n] (ints), or '' if they look uniform over 0 .. t_max - 1."""
    lo, hi = int(t.min()), int(t.max())
    if lo >= 1000 - t_max and hi >= 1000 - t_max // 2:
        return (f"they lie in {lo} .. {hi}, the high-noise end: t counts noise levels from the clean image (t = 0) "
                f"up to pure noise (t = 999), and the refiner learns the low-noise end, 0 .. {t_max - 1}")
    if hi >= t_max and lo < t_max // 8 and hi > (t_max + 1000) // 2:
        return (f"they reach {hi}: the refiner learns only the low-noise end, t < t_max = {t_max}"
                + ("; drawing from all 1000 levels trains a second base" if hi >= 990 else ""))
    if hi == t_max:
        return f"t = t_max = {t_max} was drawn: torch.randint's high end is exclusive, randint(0, t_max, (n,))"
    if hi > t_max or lo < 0:
        return f"they lie in {lo} .. {hi}, outside 0 .. t_max - 1 = {t_max - 1}"
    if len(t.unique()) == 1:
        return (f"every sample got the same timestep ({lo}): draw one per sample, torch.randint(0, t_max, (n,)), "
                f"so that each batch mixes noise levels")
    counts = torch.bincount(t * 4 // t_max, minlength=4).double()  # [4]: how many in each quarter of 0 .. t_max - 1
    if lo > t_max // 8 or hi < t_max - 1 - t_max // 8 or (counts - n / 4).abs().max() > 6 * (n / 4) ** 0.5:
        return (f"they are not uniform over 0 .. {t_max - 1}: min {lo}, max {hi}, per quarter of the range "
                f"{counts.long().tolist()} (about {n // 4} each expected)")
    return ""


def refiner_timesteps(fn) -> None:
    """fn(n, t_max) -> [n] integer timesteps, uniform over 0 .. t_max - 1: the refiner's low-noise end."""
    name = "refiner_timesteps"
    for n, t_max in [(4096, 200), (4096, 350), (3, 200)]:
        on = f" on n={n}, t_max={t_max}"
        with torch.random.fork_rng():
            torch.manual_seed(n + t_max)
            got = call(name, fn, n, t_max, on=on[4:], hints=_RANDINT_HINTS)
        got = expect_tensor(name, got, what=f"the timesteps{on}")
        if got.shape != (n,):
            fail(name, f"the timesteps have shape {tuple(got.shape)}{on}, expected ({n},): one timestep per sample "
                       f"of the batch, a 1-d tensor (torch.randint(0, t_max, (n,)))")
        if got.is_floating_point() or got.dtype == torch.bool:
            fail(name, f"the timesteps are {got.dtype}{on}: they index the schedule's tables, so draw integers, "
                       f"torch.randint(0, t_max, (n,)) (torch.rand(n) * t_max gives floats)")
        mistake = _timesteps_mistake(got.long().cpu(), n, t_max) if n > 100 else ""
        if mistake:
            fail(name, f"wrong timesteps{on}: {mistake}")
    passed(name)
