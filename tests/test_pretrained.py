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
