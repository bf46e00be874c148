"""sdlearn.convert.original against diffusers' own single-file converters (diffusers.loaders.single_file_utils),
and sdlearn.convert.files' safe reading.

For every family, tiny random diffusers / transformers parts are joined into one original-layout state dict by
sdlearn; diffusers' converters must read that file back into exactly the same tensors (so sdlearn writes the
layout diffusers reads from the published files), and sdlearn's split must too.
"""
import pickle

import pytest
import torch
from tiny import clip_text, clip_tokenizer, one_thread, unet, vae  # noqa: F401

from sdlearn.convert import files, original

su = pytest.importorskip("diffusers.loaders.single_file_utils")
pytest.importorskip("transformers")

SIZE = 16


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same(a: dict, b: dict, what: str):
    assert sorted(a) == sorted(b), f"{what}: keys differ: {sorted(set(a) ^ set(b))[:6]}"
    bad = [k for k in a if not torch.equal(a[k], b[k])]
    assert not bad, f"{what}: tensors differ at {bad[:6]}"


def _without_text_model(state):
    """transformers 5 names CLIPTextModel's keys without text_model. (its files keep it)."""
    return {k.removeprefix("text_model.") if not k.startswith("text_projection") else k: v for k, v in state.items()}


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return clip_tokenizer(tmp_path_factory.mktemp("bpe"), 12)


def _sd_parts(tok, family):
    torch.manual_seed(0)
    sd2 = family == "sd2"
    return {"unet": unet(SIZE, 24, down=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                         use_linear_projection=sd2, layers_per_block=2),
            "vae": vae(SIZE), "text_encoder": clip_text(tok, 24, 4, act="gelu" if sd2 else "quick_gelu")}


def _sdxl_parts(tok, refiner):
    torch.manual_seed(1)
    xl = dict(addition_embed_type="text_time", addition_time_embed_dim=8, use_linear_projection=True)
    models = {"vae": vae(SIZE, scaling_factor=0.13025),
              "text_encoder_2": clip_text(tok, 24, 4, act="gelu", projection=24)}  # OpenCLIP: projection = width
    if refiner:
        models["unet"] = unet(SIZE, 24, down=("CrossAttnDownBlock2D",) * 2,
                              projection_class_embeddings_input_dim=24 + 5 * 8, **xl)
    else:
        models["text_encoder"] = clip_text(tok, 16, 2, eos_token_id=2)
        models["unet"] = unet(SIZE, 40, projection_class_embeddings_input_dim=24 + 6 * 8, **xl)
    return models


def _sd3_parts(tok):
    from diffusers import SD3Transformer2DModel
    from transformers import T5Config, T5EncoderModel

    from sdlearn.convert import mmdit
    from sdlearn.mmdit import MMDiTConfig

    torch.manual_seed(2)
    cfg = MMDiTConfig(in_channels=16, out_channels=16, patch_size=2, depth=2, heads=2, head_dim=8, context_dim=40,
                      pooled_dim=40, pos_embed_max_size=8, qk_norm=True, dual_attention_layers=(0,))
    return {"transformer": SD3Transformer2DModel(**mmdit.config_to_diffusers(cfg, sample_size=8)),
            "vae": vae(SIZE, latent_channels=16, use_quant_conv=False, use_post_quant_conv=False),
            "text_encoder": clip_text(tok, 16, 2, projection=16),
            "text_encoder_2": clip_text(tok, 24, 4, projection=24),
            "text_encoder_3": T5EncoderModel(T5Config(vocab_size=20, d_model=16, d_kv=4, d_ff=24, num_layers=2,
                                                      num_heads=4, feed_forward_proj="gated-gelu"))}


def _diffusers_read(file: dict, family: str, models: dict) -> dict:
    """What diffusers' single-file converters make of an original-layout state dict, part by part."""
    out = {}
    if "unet" in models:
        out["unet"] = su.convert_ldm_unet_checkpoint(file, dict(models["unet"].config))
    out["vae"] = su.convert_ldm_vae_checkpoint(file, dict(models["vae"].config))
    if family == "sd1":
        out["text_encoder"] = su.convert_ldm_clip_checkpoint(file)
    elif family == "sd2":
        out["text_encoder"] = su.convert_open_clip_checkpoint(models["text_encoder"], file)
    elif family.startswith("sdxl"):
        if "text_encoder" in models:
            out["text_encoder"] = su.convert_ldm_clip_checkpoint(file)
        prefix = "conditioner.embedders.0.model." if family == "sdxl-refiner" else "conditioner.embedders.1.model."
        out["text_encoder_2"] = su.convert_open_clip_checkpoint(models["text_encoder_2"], file, prefix=prefix)
    else:
        out["transformer"] = su.convert_sd3_transformer_checkpoint_to_diffusers(dict(file))
        for part, name in (("text_encoder", "clip_l"), ("text_encoder_2", "clip_g")):
            out[part] = su.convert_ldm_clip_checkpoint(file, remove_prefix=f"text_encoders.{name}.transformer.")
            out[part] = {k: v for k, v in out[part].items() if not k.startswith(("text_encoders.", "first_stage"))}
        out["text_encoder_3"] = su.convert_sd3_t5_checkpoint_to_diffusers(file)
    return out


FAMILIES = ["sd1", "sd2", "sdxl-base", "sdxl-refiner", "sd3"]


@pytest.mark.parametrize("family", FAMILIES)
def test_joined_files_read_back_the_same_by_diffusers_and_by_split(family, tok):
    models = (_sd_parts(tok, family) if family in ("sd1", "sd2") else
              _sdxl_parts(tok, family == "sdxl-refiner") if family.startswith("sdxl") else _sd3_parts(tok))
    parts = {name: _state(m) for name, m in models.items()}
    file = original.join(parts, family)
    assert original.detect(file) == family
    theirs = _diffusers_read(file, family, models)
    ours = original.split(file)
    for name, state in parts.items():
        if name.startswith("text_encoder") and name != "text_encoder_3":
            _same(_without_text_model(theirs[name]), _without_text_model(state), f"{family} {name} (diffusers)")
            _same(_without_text_model(ours[name]), _without_text_model(state), f"{family} {name} (split)")
        elif name == "text_encoder_3":
            want = {k: v for k, v in state.items() if k != "encoder.embed_tokens.weight"}  # tied to shared.weight
            _same(theirs[name], want, f"{family} T5 (diffusers)")
            _same(ours[name], want, f"{family} T5 (split)")
        else:
            _same(theirs[name], state, f"{family} {name} (diffusers)")
            _same(ours[name], state, f"{family} {name} (split)")
    assert set(ours) == set(parts)


def test_an_unknown_file_names_what_it_looked_for():
    with pytest.raises(ValueError, match=r"needs model\.diffusion_model\.\*.*cond_stage_model\.transformer"):
        original.detect({"first_stage_model.encoder.conv_in.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="unknown family 'sd4'"):
        original.split({}, "sd4")
    with pytest.raises(ValueError, match=r"no place for \['text_encoder_3'\]"):
        original.join({"text_encoder_3": {}}, "sd1")


# -----------------------------------------------------------------------------
# files: safe reading


class _Payload:
    """A pickle that runs code when loaded: it writes a marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_safetensors_round_trip_and_pickles_only_on_request(tmp_path):
    state = {"a": torch.randn(3, 4), "b": torch.arange(5)}
    files.write(state, tmp_path / "w.safetensors")
    _same(files.read(tmp_path / "w.safetensors"), state, "safetensors round trip")
    torch.save({"state_dict": state, "epoch": 3}, tmp_path / "w.ckpt")
    with pytest.raises(ValueError, match="is a pickle.*weights_only=True.*allow_pickle=True"):
        files.read(tmp_path / "w.ckpt")
    _same(files.read(tmp_path / "w.ckpt", allow_pickle=True), state, "an opted-in pickle, unwrapped")
    with pytest.raises(ValueError, match=r"expected a \.safetensors file"):
        (tmp_path / "w.npz").write_bytes(b"x")
        files.read(tmp_path / "w.npz")
    with pytest.raises(FileNotFoundError, match="no weights file"):
        files.read(tmp_path / "absent.safetensors")


def test_a_pickle_that_would_run_code_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "ran"
    with open(tmp_path / "evil.ckpt", "wb") as f:                             # a plain pickle
        pickle.dump({"state_dict": {"w": _Payload(marker)}}, f)
    torch.save({"w": _Payload(marker)}, tmp_path / "evil.pt")                 # torch's zip format
    for name in ("evil.ckpt", "evil.pt"):
        with pytest.raises(ValueError, match="refused: the pickle holds more than tensors"):
            files.read(tmp_path / name, allow_pickle=True)
        assert not marker.exists(), f"loading {name} ran its code"


def test_a_truncated_file_is_a_clear_error(tmp_path):
    files.write({"w": torch.randn(64, 64)}, tmp_path / "w.safetensors")
    data = (tmp_path / "w.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="cut.safetensors is not a readable safetensors file"):
        files.read(tmp_path / "cut.safetensors")
    torch.save({"w": torch.randn(64, 64)}, tmp_path / "w.pt")
    data = (tmp_path / "w.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="cut.pt is not a readable torch checkpoint"):
        files.read(tmp_path / "cut.pt", allow_pickle=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cut.pt", "cut.safetensors", "w.pt", "w.safetensors"]
