"""Notebook 08's learner code drives the training: flow.training_loss's `pair`, MMDiT.use_attention and the
recipe's `attention`; and sd3.WithoutEncoder zeroes one encoder's share of the text."""
import functools

import pytest
import torch
import torch.nn.functional as F

from sdlearn import flow
from sdlearn.flow import FlowSchedule
from sdlearn.mmdit import MMDiT, MMDiTConfig, joint_attention
from sdlearn.recipes import mmdit as recipe


def _pair(x0, noise, t):
    t = t.view(-1, *[1] * (x0.ndim - 1))
    return (1 - t) * x0 + t * noise, noise - x0


def _model():
    torch.manual_seed(0)
    model = MMDiT(MMDiTConfig(in_channels=4, out_channels=4, depth=2, heads=2, head_dim=8, context_dim=8,
                              pooled_dim=8, pos_embed_max_size=8))
    with torch.no_grad():                       # past adaLN-Zero's identity start, so attention changes the output
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model


def _inputs():
    g = torch.Generator().manual_seed(1)
    return (torch.randn(2, 4, 8, 8, generator=g), torch.tensor([300.0, 700.0]), torch.randn(2, 5, 8, generator=g),
            torch.randn(2, 8, generator=g))


def test_training_loss_makes_its_pair_with_the_given_function():
    model, (x0, _, context, pooled) = _model(), _inputs()
    cond = {"context": context, "pooled": pooled}

    def loss(pair):
        return flow.training_loss(model, FlowSchedule(1.0), x0, cond, None, 0.0,
                                  generator=torch.Generator().manual_seed(2), pair=pair)

    assert torch.equal(loss(None), loss(_pair))            # the learner's right pair is the schedule's, bit for bit
    flipped = loss(lambda x0, noise, t: (_pair(x0, noise, t)[0], x0 - noise))
    assert not torch.isclose(flipped, loss(None))


def test_use_attention_puts_the_learners_attention_in_every_block():
    model, inputs = _model(), _inputs()
    want = model(*inputs)
    calls = []

    def recording(*qkv):
        calls.append(qkv[0].shape)
        return joint_attention(*qkv)

    assert torch.equal(model.use_attention(recording)(*inputs), want) and len(calls) == 2
    separate = model.use_attention(lambda qx, kx, vx, qc, kc, vc: (F.scaled_dot_product_attention(qx, kx, vx),
                                                                   F.scaled_dot_product_attention(qc, kc, vc)))
    assert (separate(*inputs) - want).abs().max() > 1e-3     # two separate attentions: another model
    assert torch.equal(model.use_attention()(*inputs), want)


def test_the_recipe_trains_with_the_learners_pair_and_attention():
    seen = {"pair": 0, "attention": 0}

    def pair(x0, noise, t):
        seen["pair"] += 1
        return _pair(x0, noise, t)

    def attention(*qkv):
        seen["attention"] += 1
        return joint_attention(*qkv)

    r = recipe.MMDiTRecipe(steps=2, pool=4, batch_size=2, width=32, depth=1, heads=1)
    recipe.train(r, loss_fn=functools.partial(recipe.loss_with_third_dropped, pair=pair), attention=attention,
                 progress=False)
    assert seen["pair"] == 2 and seen["attention"] >= 2


@pytest.mark.parametrize("which", [1, 2, 3])
def test_without_encoder_zeroes_one_encoders_share(which):
    from sdlearn.sd3 import WithoutEncoder
    cond_model = recipe.conditioner()
    full = cond_model(["a red circle on the left"])
    part = WithoutEncoder(cond_model, which)(["a red circle on the left"])
    w1, p1 = cond_model.text_encoder.config.width, cond_model.text_encoder.config.pooled_dim
    w2, L = cond_model.text_encoder_2.config.width, cond_model.third.start
    zeroed = {1: (slice(0, L), slice(0, w1)), 2: (slice(0, L), slice(w1, w1 + w2)),
              3: (slice(L, None), slice(None))}[which]
    where = (slice(None), *zeroed)
    assert (part["context"][where] == 0).all() and full["context"][where].abs().sum() > 0
    kept = full["context"].clone()
    kept[(slice(None), *zeroed)] = 0
    assert torch.equal(part["context"], kept)
    pooled = {1: slice(0, p1), 2: slice(p1, None), 3: slice(0, 0)}[which]
    assert (part["pooled"][:, pooled] == 0).all()
    with pytest.raises(ValueError, match="which must be 1, 2 or 3"):
        WithoutEncoder(cond_model, 4)
