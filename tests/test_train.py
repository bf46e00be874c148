import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from sdlearn import train as train_mod
from sdlearn.train import TrainConfig, ema_update, fit, lr_at


def _regression(n=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    return x, x @ torch.tensor([1.0, -2.0, 0.5, 3.0]) + 0.1


def test_fit_learns_a_linear_map():
    torch.manual_seed(0)
    x, y = _regression()
    model = nn.Linear(4, 1)
    batches = [(x[i:i + 32], y[i:i + 32]) for i in range(0, 256, 32)]

    def loss_fn(m, b):
        return nn.functional.mse_loss(m(b[0]).squeeze(-1), b[1])

    hist = fit(model, loss_fn, batches, TrainConfig(steps=300, lr=5e-2, ema_decay=0.9), progress=False)
    assert len(hist.losses) == 300 and hist.losses[-1] < 1e-3 < hist.losses[0]
    assert hist.ema is not None and loss_fn(hist.ema, (x, y)).item() < 1e-2
    assert not model.training


def test_fit_logs_extra_numbers_and_calls_back():
    model = nn.Linear(2, 1)
    seen = []

    def loss_fn(m, b):
        return m(b).pow(2).mean(), {"scale": 2.0}

    hist = fit(model, loss_fn, [torch.ones(3, 2)], TrainConfig(steps=6, callback_every=3),
               callback=lambda step, m, ema: seen.append(step), progress=False)
    assert hist.logs["scale"] == [2.0] * 6 and seen == [3, 6]


def test_warmup_then_cosine():
    cfg = TrainConfig(steps=100, lr=1.0, warmup=10, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(0.1) and lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(99, cfg) == pytest.approx(0.1, abs=1e-3)
    assert all(lr_at(s, cfg) >= lr_at(s + 1, cfg) for s in range(10, 99))


def test_ema_update_moves_towards_the_model():
    a, b = nn.Linear(2, 2), nn.Linear(2, 2)
    before = a.weight.clone()
    ema_update(a, b, decay=0.75)
    assert torch.allclose(a.weight, 0.75 * before + 0.25 * b.weight)


def test_nan_loss_names_the_step():
    model = nn.Linear(2, 1)
    calls = iter(range(100))

    def loss_fn(m, b):
        return m(b).mean() * (float("nan") if next(calls) == 4 else 1.0)

    with pytest.raises(FloatingPointError, match="at step 4; likely causes"):
        fit(model, loss_fn, [torch.ones(1, 2)], TrainConfig(steps=10), progress=False)


def test_empty_batches_is_an_error():
    with pytest.raises(ValueError, match="yielded nothing"):
        fit(nn.Linear(2, 1), lambda m, b: m(b).mean(), [], TrainConfig(steps=1), progress=False)


# ----------------------------------------------------------------------------
# checkpoints, resume, data parallel


class Net(nn.Module):
    def __init__(self, width=8):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, width), nn.Dropout(0.2), nn.ReLU(), nn.Linear(width, 1))

    def forward(self, x):
        return self.net(x)


def _data(step):  # a deterministic batch for every step
    g = torch.Generator().manual_seed(step)
    x = torch.randn(16, 4, generator=g)
    return x, x.sum(1, keepdim=True)


def _loss(m, b):
    return nn.functional.mse_loss(m(b[0]), b[1])


CFG = dict(steps=12, lr=1e-2, warmup=3, ema_decay=0.9, checkpoint_every=4)


def _run(folder=None, stop_after=None, batches=_data):
    torch.manual_seed(0)
    model = Net()

    def stop(step, m, ema):
        if step == stop_after:
            raise KeyboardInterrupt  # the kernel dies, the Colab runtime disconnects...

    cfg = TrainConfig(**CFG, callback_every=1)
    try:
        hist = fit(model, _loss, batches, cfg, callback=stop, progress=False, checkpoint_dir=folder)
    except KeyboardInterrupt:
        return model, None
    return model, hist


@pytest.mark.parametrize("batches", ["function", "iterable"])
def test_resume_gives_the_same_weights_as_an_uninterrupted_run(tmp_path, batches):
    data = _data if batches == "function" else [_data(s) for s in range(5)]
    straight, hist = _run(batches=data)
    _run(tmp_path, stop_after=6, batches=data)  # saved at 4, died at 6
    assert (tmp_path / "latest").read_text() == "step-0000004"
    torch.manual_seed(123)  # a new session: whatever the RNG was, resuming restores it
    resumed, hist2 = _run(tmp_path, batches=data)
    for a, b in zip(straight.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)
    for a, b in zip(hist.ema.state_dict().values(), hist2.ema.state_dict().values()):
        assert torch.equal(a, b)
    assert hist2.losses == hist.losses and len(hist2.losses) == CFG["steps"]
    assert sorted(p.name for p in tmp_path.glob("step-*")) == ["step-0000008", "step-0000012"]


def test_a_crash_while_saving_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    _run(tmp_path, stop_after=5)  # step-4 is good
    good = (tmp_path / "step-0000004" / "model.safetensors").read_bytes()
    real = train_mod.torch.save

    def crash(obj, f, *a, **k):
        Path(f).write_bytes(b"half a file")
        raise OSError("the disk filled up")

    monkeypatch.setattr(train_mod.torch, "save", crash)
    with pytest.raises(OSError, match="disk filled"):
        _run(tmp_path)  # resumes from 4, tries to save 8
    monkeypatch.setattr(train_mod.torch, "save", real)
    assert (tmp_path / "latest").read_text() == "step-0000004"
    assert (tmp_path / "step-0000004" / "model.safetensors").read_bytes() == good
    straight, _ = _run()
    resumed, _ = _run(tmp_path)  # and the run still finishes as if nothing happened
    assert all(torch.equal(a, b) for a, b in zip(straight.state_dict().values(), resumed.state_dict().values()))


def test_a_checkpoint_of_another_config_names_the_parameter(tmp_path):
    _run(tmp_path)
    with pytest.raises(ValueError, match=r"parameter 'net.0.bias' has shape \[8\] in the file but \[16\]"):
        fit(Net(width=16), _loss, _data, TrainConfig(**CFG), progress=False, checkpoint_dir=tmp_path)


def test_a_corrupted_checkpoint_is_a_clear_error(tmp_path):
    _run(tmp_path)
    last = train_mod.latest_checkpoint(tmp_path)
    (last / "state.pt").write_bytes(b"\0" * 10)
    with pytest.raises(ValueError, match="state.pt is not a readable training state"):
        _run(tmp_path)
    (last / "model.safetensors").write_bytes(b"\0" * 10)
    with pytest.raises(ValueError, match="truncated or corrupted"):
        _run(tmp_path)


def test_shard_splits_every_kind_of_batch():
    batch = (torch.arange(8), ["a", "b", "c", "d", "e", "f", "g", "h"], {"t": torch.arange(8) * 2})
    x, caps, d = train_mod.shard(batch, 1, 2)
    assert x.tolist() == [4, 5, 6, 7] and caps == ["e", "f", "g", "h"] and d["t"].tolist() == [8, 10, 12, 14]
    with pytest.raises(ValueError, match="batch of 8 does not split evenly over 3"):
        train_mod.shard(batch, 0, 3)


DDP_SCRIPT = '''
import sys, torch
from torch import nn
from sdlearn.train import TrainConfig, fit, world
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
def data(step):
    g = torch.Generator().manual_seed(step)
    x = torch.randn(16, 4, generator=g)
    return x, x.sum(1, keepdim=True)
fit(model, lambda m, b: nn.functional.mse_loss(m(b[0]), b[1]), data, TrainConfig(steps=10, lr=1e-2, warmup=2),
    progress=False)
rank, size = world()
if rank == 0:
    torch.save(model.state_dict(), sys.argv[1])
'''


def test_the_same_script_runs_data_parallel_under_torchrun(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(DDP_SCRIPT)
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1"}
    for n in (1, 2):
        r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
                            str(script), str(tmp_path / f"w{n}.pt")], capture_output=True, text=True, env=env,
                           timeout=240)
        assert r.returncode == 0, r.stderr[-3000:]
    one, two = (torch.load(tmp_path / f"w{n}.pt", weights_only=True) for n in (1, 2))
    for k in one:  # 2 processes x 8 examples, gradients averaged == 1 process x 16 examples
        assert torch.allclose(one[k], two[k], atol=1e-6), k
