"""The one trainer every training notebook uses (VAE, text encoder, UNets, MMDiT).

    history = fit(model, loss_fn, batches, TrainConfig(steps=P.vae_steps, lr=1e-3))

`loss_fn(model, batch) -> loss` (a scalar tensor) or `(loss, {name: float})` for extra
numbers to log; `batches` is any iterable of batches, cycled as needed. `fit` runs
AdamW with linear warm-up then cosine decay, gradient clipping, an optional EMA of
the weights, bf16 autocast on CUDA, and a tqdm.auto bar showing the loss. It stops
with a clear error on a NaN / inf loss, naming the step.
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
from torch import nn
from tqdm.auto import tqdm


@dataclass
class TrainConfig:
    steps: int
    lr: float = 1e-3
    warmup: int = 50                 # linear warm-up steps (capped at steps // 5)
    min_lr_ratio: float = 0.1        # cosine decays to lr * min_lr_ratio
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float | None = 1.0    # max global grad norm
    ema_decay: float | None = None   # e.g. 0.999; None: no EMA
    autocast: bool = True            # bf16 autocast when training on CUDA
    callback_every: int = 0          # call `callback(step, model, ema)` every n steps (sample grids)
    desc: str = "train"


@dataclass
class History:
    losses: list[float] = field(default_factory=list)
    logs: dict[str, list[float]] = field(default_factory=dict)
    seconds: float = 0.0
    ema: nn.Module | None = None     # the EMA copy of the model, when ema_decay was set

    @property
    def steps_per_second(self) -> float:
        return len(self.losses) / max(self.seconds, 1e-9)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up to cfg.lr, then cosine decay to cfg.lr * cfg.min_lr_ratio."""
    warmup = min(cfg.warmup, cfg.steps // 5)
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, cfg.steps - warmup)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model (parameters); buffers copied."""
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p.detach(), 1 - decay)
    for e, b in zip(ema.buffers(), model.buffers()):
        e.copy_(b)


def _cycle(batches: Iterable):
    while True:
        empty = True
        for b in batches:
            empty = False
            yield b
        if empty:
            raise ValueError("fit: `batches` yielded nothing")


def fit(model: nn.Module, loss_fn: Callable, batches: Iterable, cfg: TrainConfig,
        params: Iterable[nn.Parameter] | None = None, callback: Callable | None = None,
        progress: bool = True) -> History:
    """Train `model` for cfg.steps steps of `loss_fn(model, batch)`; return the History."""
    params = [p for p in (params if params is not None else model.parameters()) if p.requires_grad]
    if not params:
        raise ValueError("fit: the model has no trainable parameters")
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    ema = copy.deepcopy(model).eval().requires_grad_(False) if cfg.ema_decay else None
    dev = next(iter(params)).device
    use_autocast = cfg.autocast and dev.type == "cuda"
    hist = History(ema=ema)
    model.train()
    data = _cycle(batches)
    bar = tqdm(range(cfg.steps), desc=cfg.desc, disable=not progress)
    start = time.perf_counter()
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=use_autocast):
            out = loss_fn(model, next(data))
        loss, logs = out if isinstance(out, tuple) else (out, {})
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"{cfg.desc}: loss is {loss.item()} at step {step}; likely causes: learning rate too high "
                f"(lr={cfg.lr}), inputs not normalised, or log/division of zero in the loss")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        if ema is not None:
            ema_update(ema, model, cfg.ema_decay)
        hist.losses.append(loss.item())
        for k, v in logs.items():
            hist.logs.setdefault(k, []).append(float(v))
        if step % 10 == 0 or step == cfg.steps - 1:
            bar.set_postfix(loss=f"{hist.losses[-1]:.4f}", **{k: f"{v:.3g}" for k, v in logs.items()})
        if callback is not None and cfg.callback_every and (step + 1) % cfg.callback_every == 0:
            callback(step + 1, model, ema)
    hist.seconds = time.perf_counter() - start
    model.eval()
    return hist
