"""sdlearn.convert: the shared key renaming (convert.keys) and the generic entry points' options."""
import pytest
import torch

from sdlearn import convert, presets
from sdlearn.convert.keys import rename, rename_key

PAIRS = [  # (ours, theirs)
    ("down.{i}.resample.", "down_blocks.{i}.downsamplers.0."),
    ("down.", "down_blocks."),
    ("blocks.{i}.attn.to_{p}.", "layers.{i}.self_attn.{p}_proj."),
    (".skip.", ".conv_shortcut."),
    (".to_out.", ".to_out.0."),
]
OURS_THEIRS = {
    "down.1.resample.conv.weight": "down_blocks.1.downsamplers.0.conv.weight",  # specific before general
    "down.0.resnets.1.skip.bias": "down_blocks.0.resnets.1.conv_shortcut.bias",  # prefix, then a piece inside
    "blocks.3.attn.to_q.weight": "layers.3.self_attn.q_proj.weight",  # placeholders copied across
    "blocks.3.attn.to_out.bias": "layers.3.self_attn.out_proj.bias",
    "mid.attn.to_out.weight": "mid.attn.to_out.0.weight",  # renamed text is not read again: not to_out.0.0
    "conv_in.weight": "conv_in.weight",  # no piece matches: the name is kept
    "skip.weight": "skip.weight",  # a piece with a leading "." only matches inside a key
    "updown.0.weight": "updown.0.weight",  # pieces are whole names
}


def test_rename_both_ways_from_one_list_of_pairs():
    ours = {k: i for i, k in enumerate(OURS_THEIRS)}
    theirs = rename(ours, PAIRS, to="theirs")
    assert list(theirs) == list(OURS_THEIRS.values()) and list(theirs.values()) == list(ours.values())
    assert rename(theirs, PAIRS, to="ours") == ours
    assert rename_key("layers.12.self_attn.v_proj.weight", PAIRS, "ours") == "blocks.12.attn.to_v.weight"


def test_rename_reads_a_key_once_left_to_right():
    pairs = [("a.", "b."), ("b.", "c.")]
    assert rename_key("a.w", pairs, "theirs") == "b.w"  # not renamed again to c.w
    assert rename_key("b.w", pairs, "theirs") == "c.w"
    assert rename_key("c.w", pairs, "ours") == "b.w"


@pytest.mark.parametrize("pairs, match", [
    ([("to_out", "to_out.0.")], "whole names ending with '.'"),
    ([(".skip.", "conv_shortcut.")], "both pieces or neither should start with '.'"),
    ([("blocks.{i}.", "layers.{j}.")], "the same placeholders"),
    ([("a.{i}.{i}.", "b.{i}.")], "a placeholder appears twice"),
    ([("a.", "b.", "c.")], r"an \(ours, theirs\) pair"),
])
def test_bad_renames_are_clear_errors(pairs, match):
    with pytest.raises(ValueError, match=match):
        rename({"a.0.0.w": 0}, pairs, to="theirs")


def test_rename_refuses_a_bad_side_and_two_keys_becoming_one():
    with pytest.raises(ValueError, match="to should be 'ours' or 'theirs', got 'diffusers'"):
        rename({}, PAIRS, to="diffusers")
    assert rename({"a.w": 0}, [], to="ours") == {"a.w": 0}
    with pytest.raises(ValueError, match=r"'down.w' and 'down_blocks.w' both become 'down_blocks.w'"):
        rename({"down.w": 0, "down_blocks.w": 1}, PAIRS, to="theirs")


@pytest.mark.parametrize("name, family", [("sd15-unet", "unet"), ("sdxl-unet", "unet"), ("sdxl-refiner-unet", "unet"),
                                          ("sd-vae", "vae"), ("sd3-vae", "vae"), ("clip-l-text", "text"),
                                          ("sd3-medium-mmdit", "mmdit"), ("sd35-medium-mmdit", "mmdit")])
def test_every_family_converts_the_released_layouts_both_ways(name, family):
    """On the meta device (names and shapes only): to_diffusers loads strictly, so every key is mapped."""
    ours = presets.build(name)
    with torch.device("meta"):
        theirs = convert.to_diffusers(ours)
        back = convert.from_diffusers(theirs)
    assert list(back.state_dict()) == list(ours.state_dict())
    renames = getattr(convert, family).RENAMES
    assert list(rename(rename(ours.state_dict(), renames, "theirs"), renames, "ours")) == list(ours.state_dict())


def test_family_modules_are_attributes_of_convert():
    assert convert.unet.RENAMES and convert.vae.RENAMES and convert.text.RENAMES and convert.attention.RENAMES
    assert convert.mmdit.RENAMES
    assert convert.keys.rename is rename
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        _ = convert.nope


def test_an_option_the_family_converter_lacks_is_a_clear_error():
    from diffusers.models.attention_processor import Attention as DiffusersAttention

    theirs = DiffusersAttention(query_dim=32, heads=4, dim_head=8)
    with pytest.raises(TypeError, match=r"from_diffusers\(Attention, \.\.\.\): the 'attention' family's "
                                        r"converter \(sdlearn\.convert\.attention\.from_diffusers\) takes no "
                                        r"option 'pooled_dim'; its options: none"):
        convert.from_diffusers(theirs, pooled_dim=8)
    ours = convert.from_diffusers(theirs)
    with pytest.raises(TypeError, match=r"sdlearn\.convert\.to_diffusers\(Attention, .*'attention'.* takes no "
                                        r"option 'dtype', 'device'; its options: none"):
        convert.to_diffusers(ours, dtype=torch.float16, device="cpu")
