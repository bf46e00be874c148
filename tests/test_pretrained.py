import json
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from sdlearn import pretrained


@dataclass
class TinyConfig:
    width: int = 3


class Tiny(nn.Module):
    def __init__(self, config: TinyConfig):
        super().__init__()
        self.config = config
        self.lin = nn.Linear(config.width, 2)


@pytest.fixture
def weights(tmp_path, monkeypatch):
    monkeypatch.setattr(pretrained, "WEIGHTS", tmp_path)
    return tmp_path


def test_save_then_load_round_trip(weights):
    model = Tiny(TinyConfig(width=5))
    pretrained.save(model, "tiny", 32, command="python make_tiny.py")
    back = pretrained.load("tiny", size=32)
    assert isinstance(back, Tiny) and back.config == TinyConfig(width=5) and not back.training
    assert torch.equal(back.lin.weight, model.lin.weight)
    assert pretrained.metadata("tiny", 32)["command"] == "python make_tiny.py"
    assert pretrained.available() == ["tiny-32"]


def test_missing_release_lists_what_exists(weights):
    pretrained.save(Tiny(TinyConfig()), "tiny", 32, command="x")
    with pytest.raises(FileNotFoundError, match="no released model 'tiny' at size 64: released are tiny-32"):
        pretrained.load("tiny", size=64)


def test_without_a_size_the_profile_size_falls_back_to_one_released_saying_so(weights, monkeypatch):
    pretrained.save(Tiny(TinyConfig(width=4)), "tiny", 32, command="x")
    monkeypatch.setenv("SDLEARN_PROFILE", "gpu")  # 64 px images: tiny is released at 32 px only
    with pytest.warns(UserWarning, match=r"tiny is not released at the gpu profile's 64 px: loading the 32 px"):
        assert pretrained.load("tiny").config == TinyConfig(width=4)
    with pytest.raises(FileNotFoundError, match="at size 64"):  # a size asked for is never swapped
        pretrained.load("tiny", size=64)
    pretrained.save(Tiny(TinyConfig(width=6)), "tiny", 64, command="x")
    assert pretrained.load("tiny").config == TinyConfig(width=6)


def test_truncated_file_is_a_clear_error(weights):
    dest = pretrained.save(Tiny(TinyConfig()), "tiny", 32, command="x")
    dest.write_bytes(dest.read_bytes()[:40])
    with pytest.raises(ValueError, match="truncated or corrupted"):
        pretrained.load("tiny", size=32)


def test_failed_save_keeps_the_good_file(weights, monkeypatch):
    dest = pretrained.save(Tiny(TinyConfig()), "tiny", 32, command="good")
    good = dest.read_bytes()

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(pretrained, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        pretrained.save(Tiny(TinyConfig()), "tiny", 32, command="bad")
    assert dest.read_bytes() == good and list(weights.iterdir()) == [dest]


def test_a_release_saved_by_python_dash_m_names_the_importable_module(weights, tmp_path):
    import subprocess
    import sys

    script = tmp_path / "pkg" / "mod.py"
    script.parent.mkdir()
    script.write_text(
        "import sys\nfrom dataclasses import dataclass\nfrom pathlib import Path\nfrom torch import nn\n"
        "from sdlearn import pretrained\n"
        "@dataclass\nclass C:\n    w: int = 2\n"
        "class M(nn.Module):\n    def __init__(self, config: C):\n"
        "        super().__init__(); self.config = config; self.l = nn.Linear(config.w, 1)\n"
        "if __name__ == '__main__':\n    pretrained.save(M(C()), 'm', 32, command='x', dest=Path(sys.argv[1]))\n")
    (script.parent / "__init__.py").write_text("")
    out = tmp_path / "m-32.safetensors"
    r = subprocess.run([sys.executable, "-m", "pkg.mod", str(out)], cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    from safetensors import safe_open
    with safe_open(out, framework="pt") as f:
        assert f.metadata()["class"] == "pkg.mod.M"


@pytest.mark.parametrize("name, own", [("shapes-controlnet-seg", "denoiser.controlnet."),
                                       ("shapes-ip-adapter", "denoiser.adapter.")])
def test_a_release_that_steers_shapes_t2i_holds_only_its_own_weights(name, own):
    """Its frozen base is a reference to a part of another release (shapes-t2i-32:denoiser), loaded equal to it."""
    if not {f"{name}-32", "shapes-t2i-32"} <= set(pretrained.available()):
        pytest.skip(f"needs the released {name}-32 and shapes-t2i-32")
    state, meta = pretrained.load_file_checked(pretrained.path(name, 32))
    assert state and all(k.startswith(own) for k in state), "the base, the VAE and the encoders are references"
    assert json.loads(meta["parts"])["denoiser"]["parts"]["base"] == {
        "release": "shapes-t2i-32", "part": "denoiser",
        "sha256": pretrained._sha256(pretrained.path("shapes-t2i", 32))}
    ours, theirs = pretrained.load(name, 32).denoiser.base.state_dict(), pretrained.load("shapes-t2i", 32).denoiser
    theirs = theirs.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], v) for k, v in theirs.items())
