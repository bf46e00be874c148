import math

import pytest
import torch

from sdlearn import convert, presets, pretrained
from sdlearn.clip import CLIP, ImageEncoder, ImageEncoderConfig, clip_loss, retrieval
from sdlearn.data import ShapesDataset
from sdlearn.text import COURSE_VOCAB, TextConfig, TextEncoder, Tokenizer

# -----------------------------------------------------------------------------
# tokenizer


def test_tokenizer_round_trip_and_padding():
    tok = Tokenizer(context_length=16)
    prompts = ["a red circle on the left", "a magenta triangle at the bottom and a yellow square in the center"]
    t = tok(prompts)
    assert t.shape == (2, 16) and t.dtype == torch.long
    assert tok.decode(t) == prompts
    assert t[0, 0] == tok.bos_id and t[0, 7] == tok.eos_id and (t[0, 8:] == tok.pad_id).all()
    assert tok.vocab_size == len(COURSE_VOCAB) == len(tok)
    assert tok.eos_id == max(tok.ids.values())  # CLIP-like: <eos> is the largest id
    assert tok("A Red circle, on the LEFT.").tolist() == tok("a red circle on the left").tolist()


def test_every_dataset_caption_tokenizes():
    tok = Tokenizer()
    for split in ("train", "heldout"):
        ds = ShapesDataset(32, split=split, length=300)
        caps = [ds.item(i).caption for i in range(len(ds))]
        assert tok.decode(tok(caps)) == caps


def test_empty_prompt_is_bos_eos_pad():
    tok = Tokenizer(context_length=8)
    assert tok.tokens("") == ["<bos>", "<eos>"] + ["<pad>"] * 6
    assert tok.decode(tok("")) == [""]


def test_unknown_word_is_named_with_a_suggestion():
    with pytest.raises(ValueError, match=r"unknown word 'circel'.*did you mean 'circle'.*vocabulary is: a red"):
        Tokenizer()("a red circel on the left")
    with pytest.raises(ValueError, match="unknown word '<eos>'"):
        Tokenizer()("a <eos>")


def test_overlong_prompt_errors_or_truncates_with_a_warning():
    long = "a red circle on the left and a blue square on the right"  # 13 words, 15 tokens
    with pytest.raises(ValueError, match="13 words, 15 tokens.*longer than the context length 10"):
        Tokenizer(context_length=10)(long)
    with pytest.warns(UserWarning, match="truncated to its first 8 words"):
        t = Tokenizer(context_length=10, truncate=True)(long)
    assert t[0, -1] == Tokenizer().eos_id and Tokenizer().decode(t[0]) == "a red circle on the left and a"


def test_tokenizer_rejects_non_strings():
    with pytest.raises(TypeError, match="prompt must be a str, got int"):
        Tokenizer()(["a red circle on the left", 3])


# -----------------------------------------------------------------------------
# text encoder


def test_encoder_shapes_and_causality():
    torch.manual_seed(0)
    enc = TextEncoder(TextConfig(width=32, layers=2, heads=4, projection_dim=8)).eval()
    tok = Tokenizer()
    t = tok(["a red circle on the left", "a red circle on the right"])
    hidden, pooled = enc(t)
    assert hidden.shape == (2, 16, 32) and pooled.shape == (2, 8)
    # causal: the tokens before the first difference ("left"/"right", position 6) have identical states
    assert torch.allclose(hidden[0, :6], hidden[1, :6]) and not torch.allclose(hidden[0, 6], hidden[1, 6])
    # pooled = the state at <eos> (position 7), projected
    assert torch.allclose(pooled, enc.projection(hidden[:, 7]))


@pytest.mark.parametrize("name, count", [("clip-l-text", 123_060_480), ("clip-l-text-proj", 123_650_304),
                                         ("clip-g-text", 694_659_840), ("openclip-h-text", 340_387_840)])
def test_text_presets_have_the_published_parameter_count(name, count):
    """... and transformers' CLIPTextModel(WithProjection) of the same config, on the meta device, counts the same
    (openclip-h-text: SD 2.x's text_encoder/, 23 of OpenCLIP ViT-H's 24 layers, no projection)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    model = presets.build(name)
    assert presets.count_parameters(model) == presets.PUBLISHED[name] == count
    assert (model.projection is None) == (name in ("clip-l-text", "openclip-h-text"))
    assert model.config.pool == "argmax"
    c = model.config
    with torch.device("meta"):
        theirs = (CLIPTextModelWithProjection if c.projection_dim else CLIPTextModel)(CLIPTextConfig(
            vocab_size=c.vocab_size, max_position_embeddings=c.max_positions, hidden_size=c.width,
            num_hidden_layers=c.layers, num_attention_heads=c.heads, intermediate_size=c.mlp_dim,
            hidden_act=c.activation, projection_dim=c.projection_dim or c.width))
    assert sum(p.numel() for p in theirs.parameters()) == count


def test_penultimate_hidden_states_equal_transformers_hidden_states_minus_2():
    """SDXL reads the penultimate block's states, unnormalised: transformers' hidden_states[-2]."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    torch.manual_seed(0)
    theirs = CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        projection_dim=16, max_position_embeddings=20, hidden_act="gelu", eos_token_id=2)).eval()
    ours = convert.from_diffusers(theirs).eval()
    ids = torch.randint(3, 100, (2, 20))
    ids[:, 9] = 99  # the largest id: the pooled position (eos_token_id == 2: argmax, as old CLIP configs)
    with torch.no_grad():
        out = theirs(ids, output_hidden_states=True)
        hidden, pooled = ours(ids, hidden_layer=-2)
        assert (hidden - out.hidden_states[-2]).abs().max() == 0 and (pooled - out.text_embeds).abs().max() == 0
        assert not torch.equal(hidden, ours(ids)[0])  # not the final-normed states
    with pytest.raises(ValueError, match=r"hidden_layer must be in -3\.\.-1"):
        ours(ids, hidden_layer=-4)


def test_bad_tokens_are_clear_errors():
    enc = TextEncoder(TextConfig(width=16, layers=1, heads=2))
    with pytest.raises(ValueError, match=r"length 20, longer than the position table \(max_positions=16\)"):
        enc(torch.zeros(1, 20, dtype=torch.long))
    with pytest.raises(TypeError, match="LongTensor .* got torch.float32 tensor"):
        enc(torch.zeros(1, 4))
    with pytest.raises(ValueError, match=r"token ids must be in 0\.\.23, got ids from 0 to 99"):
        enc(torch.tensor([[0, 99]]))
    with pytest.raises(ValueError, match=r"expected tokens \[B, L\]"):
        enc(torch.zeros(4, dtype=torch.long))


def test_attention_errors_name_expected_and_got():
    from sdlearn.attention import Attention

    attn = Attention(32, context_dim=24, heads=4)
    with pytest.raises(ValueError, match=r"expected x \[B, N, dim=32\], got \[2, 5, 16\]"):
        attn(torch.randn(2, 5, 16), torch.randn(2, 3, 24))
    with pytest.raises(ValueError, match=r"expected context \[B, M, context_dim=24\], got \[2, 3, 32\]"):
        attn(torch.randn(2, 5, 32), torch.randn(2, 3, 32))


def test_config_validation():
    with pytest.raises(ValueError, match="width=30 is not divisible by heads=4"):
        TextConfig(width=30, heads=4)
    with pytest.raises(ValueError, match="unknown activation 'relu'"):
        TextConfig(activation="relu")
    with pytest.raises(ValueError, match="pooled width .*64.* embed_dim .*32"):
        CLIP(TextEncoder(TextConfig(width=16, layers=1, heads=2)), ImageEncoder(ImageEncoderConfig(embed_dim=32)))
    with pytest.raises(ValueError, match=r"expected images \[B, 3, 32, 32\], got \(2, 3, 64, 64\)"):
        ImageEncoder(ImageEncoderConfig())(torch.zeros(2, 3, 64, 64))


# -----------------------------------------------------------------------------
# parity with transformers


def _tiny(act, eos, proj, layers, heads, width, seed):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    c = CLIPTextConfig(vocab_size=50, hidden_size=width, intermediate_size=2 * width + 8, num_hidden_layers=layers,
                       num_attention_heads=heads, max_position_embeddings=12, projection_dim=12, hidden_act=act,
                       eos_token_id=eos, bos_token_id=48, pad_token_id=0)
    model = (CLIPTextModelWithProjection if proj else CLIPTextModel)(c).eval()
    with torch.no_grad():  # transformers' init is tiny: make every weight matter
        for p in model.parameters():
            p.normal_(0, 0.3)
    return model


def _ids(eos, L=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 48, (4, L), generator=g)
    ids[:, 0] = 48
    for row, at in enumerate((3, 9, 5, 1)):
        ids[row, at] = eos if eos != 2 else 49  # argmax pooling: the largest id marks the end
    ids[2, 7] = eos if eos != 2 else 49  # a second <eos> (as when padding with <eos>): the first one pools
    return ids


@pytest.mark.parametrize("act,eos,proj,layers,heads,width", [
    ("quick_gelu", 2, False, 2, 4, 32),   # OpenAI CLIP-L style: argmax pooling
    ("gelu", 49, True, 3, 2, 24),         # OpenCLIP style: first-<eos> pooling, projection (SDXL's 2nd encoder)
    ("quick_gelu", 47, True, 1, 8, 64),
    ("gelu", 2, False, 2, 1, 16),
])
def test_parity_with_transformers_both_directions(act, eos, proj, layers, heads, width):
    theirs = _tiny(act, eos, proj, layers, heads, width, seed=layers + heads)
    ours = convert.from_diffusers(theirs).eval()
    assert type(ours) is TextEncoder and (ours.projection is not None) == proj
    ids = _ids(eos)
    with torch.no_grad():
        ref = theirs(ids)
        hidden, pooled = ours(ids)
        assert (hidden - ref.last_hidden_state).abs().max() < 1e-4
        assert (pooled - (ref.text_embeds if proj else ref.pooler_output)).abs().max() < 1e-4
        back = convert.to_diffusers(ours)
        assert type(back).__name__ == type(theirs).__name__
        out = back(ids)
        assert (out.last_hidden_state - hidden).abs().max() < 1e-4
        assert (out.text_embeds if proj else out.pooler_output).sub(pooled).abs().max() < 1e-4


def test_course_encoder_to_transformers_and_back():
    torch.manual_seed(0)
    ours = TextEncoder(TextConfig(width=32, layers=2, heads=4, projection_dim=16)).eval()
    ids = Tokenizer()(["a red circle on the left", "", "a blue cross at the top and a green square in the center"])
    with torch.no_grad():
        hidden, pooled = ours(ids)
        theirs = convert.to_diffusers(ours)
        out = theirs(ids)
        assert (out.last_hidden_state - hidden).abs().max() < 1e-4 and (out.text_embeds - pooled).abs().max() < 1e-4
        again = convert.from_diffusers(theirs)
        assert torch.equal(again(ids)[1], pooled)


# -----------------------------------------------------------------------------
# contrastive training (sdlearn.clip)


def test_clip_loss_properties():
    torch.manual_seed(0)
    x = torch.randn(8, 16)
    perfect = clip_loss(x, x, torch.tensor(math.log(100.0)))
    assert perfect < 0.01  # identical pairs, sharp temperature
    assert abs(clip_loss(x, torch.randn(8, 16), torch.tensor(0.0)) - math.log(8)) < 0.5  # random: about log B


def test_a_few_steps_of_clip_training_reduce_the_loss():
    from sdlearn.train import TrainConfig, fit

    torch.manual_seed(0)
    tok = Tokenizer()
    ds = ShapesDataset(32, length=64)
    images = torch.stack([ds[i][0] for i in range(64)])
    caps = [ds[i][1] for i in range(64)]
    clip = CLIP(TextEncoder(TextConfig(width=32, layers=1, heads=2, projection_dim=16)),
                ImageEncoder(ImageEncoderConfig(channels=(8, 8, 16), embed_dim=16)))
    batch = (images[:32], tok(caps[:32]))
    hist = fit(clip, lambda m, b: m.loss(b), [batch], TrainConfig(steps=40, lr=3e-3, warmup=5), progress=False)
    assert hist.losses[-1] < 0.5 * hist.losses[0]
    acc = retrieval(clip, tok, images[:32], caps[:32])
    assert set(acc) >= {"t2i", "i2t", "t2i_1obj", "t2i_2obj"} and acc["t2i"] > 0.5


def test_released_encoder_loads_with_its_tokenizer():
    name = next((n for n in pretrained.available() if n.startswith("shapes-clip-") and n[12:].isdigit()), None)
    if name is None:
        pytest.skip("no shapes-clip release")
    size = int(name.rsplit("-", 1)[1])
    enc = pretrained.load("shapes-clip", size=size)
    tok = Tokenizer.for_encoder(enc)
    hidden, pooled = enc(tok(["a red circle on the left", ""]))
    assert hidden.shape == (2, tok.context_length, enc.config.width)
    assert pretrained.metadata("shapes-clip", size)["command"].startswith("python -m sdlearn train clip")
    image = pretrained.load("shapes-clip-image", size=size)
    assert image.config.embed_dim == enc.config.pooled_dim


def test_released_encoder_retrieves_held_out_single_objects():
    if "shapes-clip-32" not in pretrained.available():
        pytest.skip("no shapes-clip-32 release")
    enc, image = pretrained.load("shapes-clip", size=32), pretrained.load("shapes-clip-image", size=32)
    clip = CLIP(enc, image)
    ds = ShapesDataset(32, split="heldout", max_objects=1, length=100)
    images = torch.stack([ds[i][0] for i in range(100)])
    acc = retrieval(clip, Tokenizer.for_encoder(enc), images, [ds[i][1] for i in range(100)])
    assert acc["t2i_1obj"] > 0.8


def test_for_encoder_needs_a_vocabulary():
    with pytest.raises(ValueError, match="no word vocabulary"):
        Tokenizer.for_encoder(presets.build("clip-l-text"))


def test_text_module_holds_notebook_02_only_and_presets_import_it_lazily():
    """Growth rule: sdlearn.text imports neither CLIP's training (sdlearn.clip) nor T5 (sdlearn.t5, notebook 08);
    presets imports sdlearn.text only when a text preset is built."""
    import subprocess
    import sys

    code = ("import sys; from sdlearn import presets; assert 'sdlearn.text' not in sys.modules; "
            "import sdlearn.text; assert not {'sdlearn.clip', 'sdlearn.t5'} & set(sys.modules); "
            "presets.build('clip-l-text'); assert 'sdlearn.t5' not in sys.modules; "
            "presets.build('t5-xxl-encoder'); assert 'sdlearn.t5' in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)
