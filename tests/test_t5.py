"""T5 v1.1's encoder (sdlearn.t5.T5Encoder, sdlearn.convert.t5) against transformers' T5EncoderModel, and SD3's
three-encoder conditioning (sdlearn.sd3.SD3Conditioner) against diffusers' StableDiffusion3Pipeline.encode_prompt.
Everything tiny and random, the tokenizers written here: nothing is downloaded."""
import json

import pytest
import torch
from tiny import clip_text, clip_tokenizer, err, one_thread, perturbed, vae  # noqa: F401

from sdlearn import convert, presets
from sdlearn.convert import t5
from sdlearn.sd3 import SD3Conditioner, without_third
from sdlearn.t5 import T5Encoder, relative_buckets
from sdlearn.text import PretrainedTokenizer, Tokenizer

pytest.importorskip("transformers")

T5_TINY = dict(vocab_size=100, d_model=32, d_kv=8, d_ff=48, num_layers=3, num_heads=4, feed_forward_proj="gated-gelu",
               relative_attention_num_buckets=8, relative_attention_max_distance=20)


def _theirs_t5(**config):
    from transformers import T5Config, T5EncoderModel

    return perturbed(T5EncoderModel(T5Config(**{**T5_TINY, **config})))


def test_t5_encoder_equals_transformers_both_directions():
    """T5 v1.1's encoder on a tiny random config, over 40 tokens: exact buckets (distance < 2), log-spaced ones and
    the shared last bucket beyond max_distance, both directions."""
    torch.manual_seed(0)
    theirs = _theirs_t5()
    ours = convert.from_diffusers(theirs)
    assert isinstance(ours, T5Encoder)
    # every bucket in use but 4 (distance 0 in the "key after the query" half, which only the other half has)
    assert set(relative_buckets(40, 40, 8, 20).flatten().tolist()) == {0, 1, 2, 3, 5, 6, 7}
    tokens = torch.randint(0, 100, (2, 40))
    with torch.no_grad():
        want = theirs(tokens).last_hidden_state
        e = err(ours(tokens)[0], want)
        back = err(convert.to_diffusers(ours)(tokens).last_hidden_state, want)
    print(f"T5 encoder vs transformers: max abs error {e:.2e} (states up to {want.abs().max():.1f}); back {back:.1e}")
    assert e <= 1e-4 and back <= 1e-6
    assert ours(tokens)[1] is None  # no pooled output
    with pytest.raises(ValueError, match="final states only"):
        ours(tokens, hidden_layer=-2)


def test_t5_state_and_config_round_trip_without_building_transformers():
    """What a loader reading text_encoder_3/ uses: renames on a plain state dict (the model's, with shared.weight
    and encoder.embed_tokens.weight, or a file's with one of them) and config.json as a plain dict."""
    torch.manual_seed(1)
    theirs = _theirs_t5()
    state = theirs.state_dict()
    ours = t5.state_from_diffusers(state)
    assert set(ours) == set(T5Encoder(t5.config_from_transformers(theirs.config)).state_dict())
    back = t5.state_to_diffusers(ours)
    assert set(back) == set(state) and all(torch.equal(back[k], state[k]) for k in state)
    for kept in ("shared.weight", "encoder.embed_tokens.weight"):  # a file holds the tied embedding once
        dropped = {"shared.weight", "encoder.embed_tokens.weight"} - {kept}
        one = {k: v for k, v in state.items() if k not in dropped}
        assert torch.equal(t5.state_from_diffusers(one)["token_embedding.weight"], state["shared.weight"])
    config = json.loads(theirs.config.to_json_string())  # as config.json holds it
    assert t5.config_from_transformers(config) == t5.config_from_transformers(theirs.config)
    assert t5.config_from_transformers(config).width == 32 and t5.config_from_transformers(config).buckets == 8


def test_t5_configs_sdlearn_lacks_are_refused():
    with pytest.raises(ValueError, match="feed_forward_proj='relu'.*gated-gelu"):
        convert.from_diffusers(_theirs_t5(feed_forward_proj="relu"))  # T5 1.0's ReLU feed-forward
    with pytest.raises(ValueError, match="feed_forward_proj='gelu'.*gated-gelu"):
        t5.config_from_transformers({**T5_TINY, "feed_forward_proj": "gelu"})
    with pytest.raises(ValueError, match="feed_forward_proj=None"):  # a config.json without it: transformers' relu
        t5.config_from_transformers({k: v for k, v in T5_TINY.items() if k != "feed_forward_proj"})


def test_the_t5_xxl_preset_has_the_published_parameter_count_and_transformers_agrees():
    """SD3's third encoder: 4,762,310,656 parameters; transformers' T5EncoderModel of the same config, on the meta
    device, counts the same (its tied shared / embed_tokens once)."""
    from transformers import T5Config, T5EncoderModel

    model = presets.build("t5-xxl-encoder")
    assert presets.count_parameters(model) == presets.PUBLISHED["t5-xxl-encoder"] == 4_762_310_656
    with torch.device("meta"):
        theirs = T5EncoderModel(T5Config(vocab_size=32128, d_model=4096, d_ff=10240, num_layers=24, num_heads=64,
                                         d_kv=64, feed_forward_proj="gated-gelu"))
    assert sum(p.numel() for p in theirs.parameters()) == presets.count_parameters(model)


def test_t5_in_float16_clamps_what_outgrows_it_as_transformers_does():
    from sdlearn.t5 import _fp16_safe

    x = torch.tensor([7e4, -float("inf"), 3.0])
    limit = torch.tensor(torch.finfo(torch.float16).max - 1000).half().item()  # 64504 rounds to 64512 in fp16
    assert _fp16_safe(x.half()).tolist() == [limit, -limit, 3.0]   # 7e4 is already inf in float16
    assert torch.equal(_fp16_safe(x), x)                             # float32: unchanged
    finite = torch.tensor([6e4, -5.0]).half()
    assert torch.equal(_fp16_safe(finite), finite)                   # finite fp16 values pass


# -----------------------------------------------------------------------------
# SD3's conditioning: CLIP-L + bigG on channels, T5 along the sequence


L, SEQ, JOINT = 12, 20, 48  # CLIP tokens; T5 tokens (max_sequence_length); T5's width = the joint width
PROMPTS = ["a red circle on the left", "a blue circle", "the red circle on the left the blue circle on the left"]
T5_PIECES = ["<pad>", "</s>", "<unk>", "▁", *("▁" + w for w in "a red blue circle on the left".split()),
             *"abcdefghijklmnopqrstuvwxyz"]


def t5_tokenizer():
    """A tiny SentencePiece-like Unigram vocabulary (SD3's tokenizer_3 is T5's): <pad> 0, </s> 1 appended."""
    from transformers import T5TokenizerFast

    vocab = [(p, 0.0 if i < 3 else -1.0 - 0.1 * i) for i, p in enumerate(T5_PIECES)]
    return T5TokenizerFast(vocab=vocab, extra_ids=0, model_max_length=SEQ)


@pytest.fixture(scope="module")
def sd3(tmp_path_factory):
    """diffusers' StableDiffusion3Pipeline with tiny CLIP-L-like, bigG-like (both with projection) and T5 encoders
    (only encode_prompt is used), and the same encoders and tokenizers in an sdlearn SD3Conditioner."""
    pytest.importorskip("diffusers")
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    torch.manual_seed(2)
    tmp = tmp_path_factory.mktemp("sd3_vocab")
    tokenizer, tokenizer_2, tokenizer_3 = clip_tokenizer(tmp, L), clip_tokenizer(tmp, L, pad_token="!"), t5_tokenizer()
    text_encoder = clip_text(tokenizer, 16, 2, projection=16, eos_token_id=2)  # pools at the largest id, as CLIP-L
    text_encoder_2 = clip_text(tokenizer_2, 24, 4, act="gelu", projection=24)
    text_encoder_3 = _theirs_t5(vocab_size=len(tokenizer_3), d_model=JOINT, relative_attention_max_distance=16)
    transformer = SD3Transformer2DModel(
        sample_size=4, patch_size=2, in_channels=16, out_channels=16, num_layers=1, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=JOINT, caption_projection_dim=16, pooled_projection_dim=16 + 24,
        pos_embed_max_size=4)
    parts = dict(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                 vae=vae(8, latent_channels=16, use_quant_conv=False, use_post_quant_conv=False),
                 text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2)
    pipes = {"t5": StableDiffusion3Pipeline(**parts, text_encoder_3=text_encoder_3, tokenizer_3=tokenizer_3),
             "no-t5": StableDiffusion3Pipeline(**parts, text_encoder_3=None, tokenizer_3=None)}
    ours = SD3Conditioner(
        convert.from_diffusers(text_encoder), convert.from_diffusers(text_encoder_2),
        convert.from_diffusers(text_encoder_3), joint_dim=JOINT, tokenizer=PretrainedTokenizer(tokenizer),
        tokenizer_2=PretrainedTokenizer(tokenizer_2), tokenizer_3=PretrainedTokenizer(tokenizer_3, SEQ),
        zero_negative=False)
    return pipes, {"t5": ours, "no-t5": without_third(ours)}


@pytest.mark.parametrize("variant", ["t5", "no-t5"])
def test_sd3_conditioner_equals_diffusers_encode_prompt(sd3, variant):
    """context = [CLIP-L ⊕ bigG penultimate states, zero-padded to T5's width ; T5's final states] (zeros of the
    joint width without T5), pooled = both projections; zero_negative=False: the encoded "" as the negative."""
    pipes, conditioners = sd3
    ours = conditioners[variant]
    with torch.no_grad():
        context, negative, pooled, negative_pooled = pipes[variant].encode_prompt(
            PROMPTS, None, None, do_classifier_free_guidance=True, negative_prompt="", max_sequence_length=SEQ)
        cond, uncond = ours(PROMPTS), ours.unconditional(len(PROMPTS))
    errors = {"context": err(cond["context"], context), "pooled": err(cond["pooled"], pooled),
              "negative": err(uncond["context"], negative), "negative pooled": err(uncond["pooled"], negative_pooled)}
    print(f"SD3Conditioner ({variant}) vs diffusers' encode_prompt, max abs errors: "
          + ", ".join(f"{k} {v:.1e}" for k, v in errors.items()))
    assert cond["context"].shape == context.shape == (len(PROMPTS), L + SEQ, JOINT)
    assert cond["pooled"].shape == pooled.shape == (len(PROMPTS), 16 + 24)
    assert uncond["context"].shape == negative.shape and uncond["pooled"].shape == negative_pooled.shape
    assert max(errors.values()) <= 1e-5, errors
    third = context[:, L:]
    assert (third.abs().amax() > 0) == (variant == "t5")  # T5's states, or diffusers' zeros without it
    assert negative.abs().amax() > 0.1  # the empty prompt's states, not zeros: what zero_negative=False is for
    zero = SD3Conditioner(**{**ours.init_args(), "zero_negative": True}, tokenizer=ours.tokenizers[0],
                          tokenizer_2=ours.tokenizers[1], tokenizer_3=ours.tokenizers[2])
    with torch.no_grad():
        assert torch.equal(zero(PROMPTS)["context"], cond["context"])
        assert all(not v.any() for v in zero.unconditional(1).values())  # the default: zeros, as a dropped caption


def test_a_t5_encoder_needs_a_tokenizer_from_transformers():
    """T5's vocabulary is SentencePiece pieces, not the course's words: without tokenizer_3, a clear error."""
    torch.manual_seed(3)
    t5_ours = convert.from_diffusers(_theirs_t5())
    with pytest.raises(ValueError, match="T5Encoder has no word vocabulary.*T5TokenizerFast"):
        Tokenizer.for_encoder(t5_ours)
