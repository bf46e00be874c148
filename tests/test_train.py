import pytest
import torch
from torch import nn

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
    loss_fn = lambda m, b: nn.functional.mse_loss(m(b[0]).squeeze(-1), b[1])
    hist = fit(model, loss_fn, batches, TrainConfig(steps=300, lr=5e-2, ema_decay=0.9), progress=False)
    assert len(hist.losses) == 300 and hist.losses[-1] < 1e-3 < hist.losses[0]
    assert hist.ema is not None and loss_fn(hist.ema, (x, y)).item() < 1e-2
    assert not model.training


def test_fit_logs_extra_numbers_and_calls_back():
    model = nn.Linear(2, 1)
    seen = []
    loss_fn = lambda m, b: (m(b).pow(2).mean(), {"scale": 2.0})
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
    loss_fn = lambda m, b: m(b).mean() * (float("nan") if next(calls) == 4 else 1.0)
    with pytest.raises(FloatingPointError, match="at step 4; likely causes"):
        fit(model, loss_fn, [torch.ones(1, 2)], TrainConfig(steps=10), progress=False)


def test_empty_batches_is_an_error():
    with pytest.raises(ValueError, match="yielded nothing"):
        fit(nn.Linear(2, 1), lambda m, b: m(b).mean(), [], TrainConfig(steps=1), progress=False)
