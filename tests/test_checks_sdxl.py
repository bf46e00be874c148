"""The notebook-07 checkers (sdlearn.checks.sdxl) pass the reference answers and name the usual mistakes."""
import math

import pytest
import torch
from einops import rearrange

from sdlearn.checks import CheckFailed
from sdlearn.checks import sdxl as check
from sdlearn.diffusion import NoiseSchedule
from sdlearn.pipeline import training_loss
from sdlearn.recipes import sdxl as sdxl_recipe
from sdlearn.sdxl import handoff, refiner_timesteps, text_time_input, time_ids
from sdlearn.unet import timestep_embedding


def todo(*args):
    raise NotImplementedError("write this")


# -----------------------------------------------------------------------------
# exercise 1: sdxl_text


def text_with(layer_1=-2, layer_2=-2, order="12", dim=-1, feed="right", pooled="right"):
    def fn(text_encoder, text_encoder_2, tokens, tokens_2):
        t1, t2 = (tokens, tokens_2) if feed == "right" else (tokens_2, tokens)
        h1 = text_encoder(t1, hidden_layer=layer_1)[0]
        h2, p2 = text_encoder_2(t2, hidden_layer=layer_2)
        context = torch.cat([h1, h2] if order == "12" else [h2, h1], dim=dim)
        final_2 = text_encoder_2(tokens_2)[0]
        eos = final_2[torch.arange(len(tokens_2)), text_encoder_2.pool_index(tokens_2)]
        return context, {
            "right": p2,
            "first": text_encoder(tokens)[1],
            "unprojected": eos,
            "mean": text_encoder_2.projection(final_2.mean(1)),
            "mean-unprojected": final_2.mean(1),
            "last": text_encoder_2.projection(final_2[:, -1]),
        }[pooled]
    return fn


def test_sdxl_text_passes_the_reference(capsys):
    check.sdxl_text(text_with())
    assert "sdxl_text: correct" in capsys.readouterr().out

    def with_conditioner_layout(text_encoder, text_encoder_2, tokens, tokens_2):  # as SDXLConditioner writes it
        hidden_2, pooled = text_encoder_2(tokens_2, hidden_layer=-2)
        return torch.cat([text_encoder(tokens, hidden_layer=-2)[0], hidden_2], dim=2), pooled

    check.sdxl_text(with_conditioner_layout)


@pytest.mark.parametrize("kwargs, message", [
    (dict(layer_1=-1), r"first encoder's states are its final .*hidden_layer=-2"),
    (dict(layer_2=-1), r"second encoder's states are its final"),
    (dict(layer_1=-1, layer_2=-1), r"first encoder's states are its final.*; the second encoder's states are its"),
    (dict(order="21"), r"concatenated in the wrong order: the first encoder's channels come first"),
    (dict(order="21", layer_2=-1), r"second encoder's states are its final.*; the encoders are concatenated in the"),
    (dict(feed="swapped"), r"each encoder was given the other's tokens"),
    (dict(pooled="first"), r"pooled is wrong on .*: pooled from the first encoder"),
    (dict(pooled="unprojected"), r"without its projection"),
    (dict(pooled="mean"), r"pooled as the mean over the tokens: it is the projected state of the <eos>"),
    (dict(pooled="mean-unprojected"), r"pooled as the mean over the tokens, unprojected"),
    (dict(pooled="last"), r"last position \(a <pad> token\)"),
])
def test_sdxl_text_names_mistakes(kwargs, message):
    with pytest.raises(CheckFailed, match=message):
        check.sdxl_text(text_with(**kwargs))


def test_sdxl_text_names_a_concatenation_on_the_sequence_or_batch_axis():
    # widths 16 and 24: torch.cat on the sequence axis crashes; the crash names the input and the fix
    with pytest.raises(CheckFailed, match=r"sdxl_text: raised RuntimeError on 3 prompts, tokens and tokens_2 \[3, 16\]"
                                          r".*except in dimension 1.* -- .*channel axis.*not on the sequence axis"):
        check.sdxl_text(text_with(dim=1))
    with pytest.raises(CheckFailed, match=r"raised RuntimeError.* -- .*dim=0 is the batch axis"):
        check.sdxl_text(text_with(dim=0))

    def seq_axis_when_it_runs(text_encoder, text_encoder_2, tokens, tokens_2):  # the equal-width case: [B, 2L, D]
        equal = text_encoder.config.width == text_encoder_2.config.width
        return text_with(dim=1 if equal else -1)(text_encoder, text_encoder_2, tokens, tokens_2)

    with pytest.raises(CheckFailed, match=r"the context is wrong on .*width 16 and a text_encoder_2 of width 16.*: "
                                          r"concatenated on the sequence axis \(\[B, 2L, D\]\)"):
        check.sdxl_text(seq_axis_when_it_runs)


def test_sdxl_text_asks_for_a_tuple_of_two_tensors():
    with pytest.raises(CheckFailed, match=r"return a tuple \(context, pooled\) of two tensors, got a Tensor"):
        check.sdxl_text(lambda e1, e2, t1, t2: text_with()(e1, e2, t1, t2)[0])
    with pytest.raises(CheckFailed, match=r"pooled \(the second of the two results\) should be a torch.Tensor"):
        check.sdxl_text(lambda e1, e2, t1, t2: (text_with()(e1, e2, t1, t2)[0], None))


def test_sdxl_text_unknown_mistake_points_at_the_first_wrong_element():
    def doubled(e1, e2, t1, t2):
        context, pooled = text_with()(e1, e2, t1, t2)
        return 2 * context, pooled

    with pytest.raises(CheckFailed, match=r"the context differs from the reference .*first wrong element at index"):
        check.sdxl_text(doubled)


def test_sdxl_text_lets_an_unsolved_exercise_through():
    with pytest.raises(NotImplementedError, match="write this") as err:
        check.sdxl_text(todo)
    assert not isinstance(err.value, CheckFailed)


def test_sdxl_text_hints_at_its_shape_errors():
    def cats_the_tuples(text_encoder, text_encoder_2, tokens, tokens_2):  # forgot that an encoder returns a pair
        return torch.cat([text_encoder(tokens, hidden_layer=-2), text_encoder_2(tokens_2, hidden_layer=-2)], -1), None

    def stacks(text_encoder, text_encoder_2, tokens, tokens_2):
        hidden_2, pooled = text_encoder_2(tokens_2, hidden_layer=-2)
        return torch.stack([text_encoder(tokens, hidden_layer=-2)[0], hidden_2], -1), pooled

    with pytest.raises(CheckFailed, match=r"raised TypeError on 3 prompts.* -- a TextEncoder returns a tuple "
                                          r"\(hidden, pooled\): unpack it"):
        check.sdxl_text(cats_the_tuples)
    with pytest.raises(CheckFailed, match=r"-- torch.stack makes a new axis.*torch.cat\(\[hidden_1, hidden_2\], "
                                          r"dim=-1\)"):
        check.sdxl_text(stacks)


# -----------------------------------------------------------------------------
# exercise 2: text_time_input


def text_time_with(order="oct", w_h=False, crop_lt=False, layout="kd", swap_halves=False, pooled_at="before"):
    """A learner's text_time_input, written out from scratch, with the chosen mistakes."""
    def fn(pooled, original_size, crop_top_left, target_size, dim):
        o, c, t = original_size, crop_top_left, target_size
        if w_h:
            o, t = o.flip(-1), t.flip(-1)
        if crop_lt:
            c = c.flip(-1)
        ids = torch.cat([o, t, c] if order == "otc" else [o, c, t], dim=1)  # [B, 6]
        half = dim // 2
        args = ids[..., None] * torch.exp(-math.log(10000) * torch.arange(half) / half)  # [B, 6, half]
        first, second = (args.sin(), args.cos()) if swap_halves else (args.cos(), args.sin())
        if layout == "kd":
            emb = torch.cat([first, second], -1).flatten(1)  # id after id
        elif layout == "dk":
            emb = torch.cat([first, second], -1).transpose(1, 2).flatten(1)  # channel after channel
        else:  # "together": the cos of all six, then the sin of all six
            emb = torch.cat([first.flatten(1), second.flatten(1)], -1)
        return torch.cat({"before": [pooled, emb], "after": [emb, pooled], "missing": [emb]}[pooled_at], -1)
    return fn


def test_text_time_input_passes_the_reference(capsys):
    check.text_time_input(lambda p, o, c, t, dim: text_time_input(p, time_ids(o, c, t), dim))
    assert "text_time_input: correct" in capsys.readouterr().out
    check.text_time_input(text_time_with())  # the same, written out


@pytest.mark.parametrize("kwargs, message", [
    (dict(order="otc"), r"wrong order: target_size before crop_top_left"),
    (dict(w_h=True), r"original_size taken as \(w, h\).*; target_size taken as \(w, h\)"),
    (dict(crop_lt=True), r"crop_top_left taken as \(left, top\)"),
    (dict(w_h=True, crop_lt=True), r"original_size taken as \(w, h\).*; crop_top_left taken as \(left, top\)"),
    (dict(layout="dk"), r"laid out channel by channel across the ids \('\(b k\) d -> b \(d k\)'\)"),
    (dict(layout="together"), r"one sinusoid for the six ids together"),
    (dict(swap_halves=True), r"sin and cos halves are swapped"),
    (dict(pooled_at="after"), r"pooled comes after the ids: it goes first"),
    (dict(pooled_at="missing"), r"pooled is missing"),
    (dict(order="otc", swap_halves=True), r"target_size before crop_top_left.*; the sin and cos halves are swapped"),
])
def test_text_time_input_names_mistakes(kwargs, message):
    with pytest.raises(CheckFailed, match=message):
        check.text_time_input(text_time_with(**kwargs))


def test_text_time_input_names_mixed_up_rows():
    def column_major(pooled, o, c, t, dim):
        ids = torch.cat([o, c, t], 1)
        emb = timestep_embedding(ids.T.flatten(), dim)  # flattened id by id, reshaped row by row
        return torch.cat([pooled, emb.reshape(len(pooled), -1)], -1)

    with pytest.raises(CheckFailed, match=r"rows of the batch are mixed up"):
        check.text_time_input(column_major)


def test_text_time_input_crash_and_unsolved():
    def embeds_the_2d_ids(pooled, o, c, t, dim):
        return torch.cat([pooled, timestep_embedding(torch.cat([o, c, t], 1), dim)], -1)

    with pytest.raises(CheckFailed, match=r"text_time_input: raised RuntimeError on pooled \[3, 4\], original_size "
                                          r".* -- timestep_embedding\(t, dim\) embeds a 1-d tensor"):
        check.text_time_input(embeds_the_2d_ids)
    with pytest.raises(NotImplementedError):
        check.text_time_input(todo)
    with pytest.raises(CheckFailed, match=r"the text_time input differs from the reference .*matches none of"):
        check.text_time_input(lambda p, o, c, t, dim: 1.5 * text_time_input(p, time_ids(o, c, t), dim))


def test_text_time_input_names_ids_concatenated_on_the_batch_axis():
    def default_dim(pooled, o, c, t, dim):
        ids = torch.cat([o, c, t])                               # [3B, 2]: torch.cat's default axis
        return torch.cat([pooled, timestep_embedding(ids.flatten(), dim).reshape(len(pooled), -1)], -1)

    with pytest.raises(CheckFailed, match=r"concatenated on the batch axis \(torch.cat's default dim=0, giving "
                                          r"\[3B, 2\]\): each image's six ids form one row"):
        check.text_time_input(default_dim)


def test_text_time_input_hints_at_an_unreshaped_embedding():
    def unreshaped(pooled, o, c, t, dim):
        return torch.cat([pooled, timestep_embedding(torch.cat([o, c, t], 1).flatten(), dim)], -1)  # [B*6, dim]

    with pytest.raises(CheckFailed, match=r"raised RuntimeError on pooled \[3, 4\].* -- pooled is \[B, P\] and "
                                          r"the embedded ids must be \[B, 6 \* dim\].*reshape it id after id"):
        check.text_time_input(unreshaped)


def test_text_time_input_hints_at_a_wrong_reshape():
    def reshaped_by_ids(pooled, o, c, t, dim):  # [B, 6] ids, then the embeddings reshaped with the wrong count
        emb = timestep_embedding(torch.cat([o, c, t], 1).flatten(), dim)
        return torch.cat([pooled, emb.reshape(len(pooled), 6)], -1)

    def rearranged_with_b_6(pooled, o, c, t, dim):
        emb = timestep_embedding(torch.cat([o, c, t], 1).flatten(), dim)
        return torch.cat([pooled, rearrange(emb, "(b k) d -> b (k d)", b=6, k=6)], -1)

    for fn in (reshaped_by_ids, rearranged_with_b_6):
        with pytest.raises(CheckFailed, match=r"-- timestep_embedding\(ids.flatten\(\), dim\) gives \[B \* 6, dim\]"
                                              r".*reshape it to \[B, 6 \* dim\] with B = pooled.shape\[0\]"):
            check.text_time_input(fn)


# -----------------------------------------------------------------------------
# exercise 3: handoff


def handoff_with(mistake=None):
    def fn(timesteps, switch):
        n = len(timesteps)
        if mistake == "int":
            return timesteps[:int(n * switch)], timesteps[int(n * switch):]
        if mistake == "round":
            return timesteps[:round(n * switch)], timesteps[round(n * switch):]
        cutoff = round(1000 * (switch if mistake == "wrong-way" else 1 - switch))
        if mistake == ">":
            return [t for t in timesteps if t > cutoff], [t for t in timesteps if t <= cutoff]
        base, refiner = [t for t in timesteps if t >= cutoff], [t for t in timesteps if t < cutoff]
        if mistake == "tensor":
            return torch.tensor(base), torch.tensor(refiner)
        if mistake == "ascending":
            return base[::-1], refiner[::-1]
        if mistake == "repeat":
            return base, base[-1:] + refiner
        if mistake == "0-d tensors":
            return list(torch.tensor(base)), list(torch.tensor(refiner))
        if mistake == "swapped":
            return refiner, base
        return base, refiner
    return fn


def test_handoff_passes_the_reference(capsys):
    check.handoff(handoff)
    assert "handoff: correct" in capsys.readouterr().out
    check.handoff(handoff_with())
    check.handoff(lambda ts, s: tuple(handoff(ts, s)))  # a tuple of tuples is fine too
    base, refiner = handoff(NoiseSchedule("scaled_linear").timesteps(50).tolist(), 1.0)
    assert len(base) == 50 and refiner == []


@pytest.mark.parametrize("mistake, message", [
    ("int", r"timesteps\(30\) with switch=0.8: split by step count"),
    ("round", r"split by step count"),
    ("wrong-way", r"the fraction is read the wrong way.*round\(1000 \* \(1 - switch\)\) = 200, not round\(1000 \* "
                  r"switch\) = 800"),
    (">", r"timesteps\(50\) with switch=0.8: t > cutoff: the base runs every t >= cutoff"),
    ("tensor", r"the base's timesteps are a Tensor: return lists of ints"),
    ("0-d tensors", r"list of Python ints, got an element of type Tensor .*: use .tolist\(\)"),
    ("ascending", r"ascending order"),
    ("repeat", r"the last base timestep is repeated in the refiner's list"),
    ("swapped", r"the two lists are swapped"),
])
def test_handoff_names_mistakes(mistake, message):
    with pytest.raises(CheckFailed, match=message):
        check.handoff(handoff_with(mistake))


def test_handoff_at_switch_one_gives_the_refiner_nothing():
    def refiner_keeps_the_last(timesteps, switch):  # right except at switch=1, where the refiner gets t = 0
        cutoff = max(round(1000 * (1 - switch)), 1)
        return [t for t in timesteps if t >= cutoff], [t for t in timesteps if t < cutoff]

    with pytest.raises(CheckFailed, match=r"timesteps\(50\) with switch=1.0: t > cutoff"):
        check.handoff(refiner_keeps_the_last)


def test_handoff_wrong_shapes_crashes_and_unknown_mistakes():
    with pytest.raises(CheckFailed, match=r"return a tuple \(base_timesteps, refiner_timesteps\) of two lists, got "
                                          r"a list of 23"):
        check.handoff(lambda ts, s: handoff(ts, s)[0])
    with pytest.raises(CheckFailed, match=r"handoff: raised ValueError on the 30 timesteps \[957, 924, \.\.\., 0\] "
                                          r"of NoiseSchedule\('scaled_linear'\).timesteps\(30\) with switch=0.8: "
                                          r"200 is not in list"):
        check.handoff(lambda ts, s: (ts[:ts.index(round(1000 * (1 - s))) + 1], []))
    with pytest.raises(CheckFailed, match=r"expected the base to get 23 timesteps \(957 ... 231\) and the refiner 7 "
                                          r"timesteps \(198 ... 0\), got 23 timesteps \(957 ... 231\) and 0 timesteps, "
                                          r"which matches none"):
        check.handoff(lambda ts, s: (handoff(ts, s)[0], []))
    with pytest.raises(NotImplementedError):
        check.handoff(todo)


# -----------------------------------------------------------------------------
# exercise 4: refiner_timesteps


def test_refiner_timesteps_passes_the_reference(capsys):
    check.refiner_timesteps(refiner_timesteps)
    assert "refiner_timesteps: correct" in capsys.readouterr().out
    check.refiner_timesteps(lambda n, t_max: torch.randint(t_max, (n,)))  # low defaults to 0
    check.refiner_timesteps(lambda n, t_max: (torch.rand(n) * t_max).long())  # floored uniform floats are fine


@pytest.mark.parametrize("fn, message", [
    (lambda n, t_max: torch.randint(1000 - t_max, 1000, (n,)),
     r"wrong timesteps on n=4096, t_max=200: they lie in 800 .. 999, the high-noise end: t counts noise levels from "
     r"the clean image \(t = 0\)"),
    (lambda n, t_max: torch.randint(0, 1000, (n,)),
     r"they reach 999: the refiner learns only the low-noise end, t < t_max = 200; drawing from all 1000 levels"),
    (lambda n, t_max: torch.randint(0, t_max + 1, (n,)), r"t = t_max = 200 was drawn: torch.randint's high end is "
                                                           r"exclusive"),
    (lambda n, t_max: torch.rand(n) * t_max, r"the timesteps are torch.float32 on n=4096, t_max=200: they index"),
    (lambda n, t_max: torch.randint(0, t_max, (n, 1)), r"shape \(4096, 1\) on n=4096, t_max=200, expected "
                                                       r"\(4096,\): one timestep per sample"),
    (lambda n, t_max: torch.randint(0, t_max, (1,)).repeat(n), r"every sample got the same timestep"),
    (lambda n, t_max: torch.randint(0, t_max, (n,)) // 2, r"not uniform over 0 .. 199: min 0, max 99"),
    (lambda n, t_max: torch.randint(0, t_max, (n,))[None], r"shape \(1, 4096\)"),
    (lambda n, t_max: torch.randint(0, 200, (n,)), r"on n=4096, t_max=350: they are not uniform over 0 .. 349"),
    (lambda n, t_max: torch.randint(0, t_max, n),
     r"(?s)raised TypeError on n=4096, t_max=200: .* -- torch.randint\(low, high, size\) takes the size as a tuple"),
    (lambda n, t_max: [0] * n, r"should be a torch.Tensor, got list"),
])
def test_refiner_timesteps_names_mistakes(fn, message):
    with pytest.raises(CheckFailed, match=message):
        check.refiner_timesteps(fn)


def test_refiner_timesteps_lets_an_unsolved_exercise_through():
    with pytest.raises(NotImplementedError):
        check.refiner_timesteps(todo)


def test_the_refiners_timesteps_drive_its_training_loss():
    """training_loss draws t with `timesteps` when given: the refiner's recipe trains on a learner's sampler."""
    seen = []

    def model(z, t, context):
        seen.append(t)
        return z * 0 + context.mean()

    def low_end(n):
        return torch.randint(0, 200, (n,))

    schedule, z0 = NoiseSchedule("cosine"), torch.randn(64, 4, 2, 2)
    cond, uncond = {"context": torch.randn(64, 3, 5)}, {"context": torch.zeros(1, 3, 5)}
    training_loss(model, schedule, z0, cond, uncond, prediction="v", timesteps=low_end)
    assert seen[-1].shape == (64,) and seen[-1].max() < 200
    training_loss(model, schedule, z0, cond, uncond, prediction="v")
    assert seen[-1].max() >= 200  # uniform over all 1000 otherwise (64 draws all under 200: chance 0.2^64)
    with pytest.raises(ValueError, match=r"timesteps\(64\) must give 64 integer timesteps \[B\], got torch.float32"):
        training_loss(model, schedule, z0, cond, uncond, timesteps=lambda n: torch.rand(n) * 200)
    with pytest.raises(ValueError, match="the base learns all of them"):
        sdxl_recipe.train(sdxl_recipe.SDXLRecipe(part="base", steps=1), timesteps=low_end)
