"""The one trainer every training notebook uses (VAE, text encoder, UNets, MMDiT).

    history = fit(model, loss_fn, batches, TrainConfig(steps=P.vae_steps, lr=1e-3))

`loss_fn(model, batch) -> loss` (a scalar tensor) or `(loss, {name: float})` for extra
numbers to log; `batches` is any iterable of batches (cycled as needed) or a function
`step -> batch`. `fit` runs AdamW with linear warm-up then cosine decay, gradient
clipping, an optional EMA of the weights, bf16 autocast on CUDA, and a tqdm.auto bar
showing the loss. It stops with a clear error on a NaN / inf loss, naming the step.

Checkpoints (`checkpoint_dir=...`, every `cfg.checkpoint_every` steps and at the end):
model and EMA weights as safetensors, optimizer / RNG / loss history in a torch file
read back with `weights_only=True`. Each checkpoint is a complete folder written
before the `latest` pointer moves to it (atomically), so a crash while saving leaves
the last good checkpoint in charge. Calling `fit` again with the same folder resumes
where it stopped and ends with the same weights as a run that never stopped (bitwise
on CPU, given deterministic `batches`). Point the folder at Google Drive on Colab.

Under `torchrun --nproc_per_node=N` the same call trains data-parallel: each process
takes its 1/N slice of every batch, DistributedDataParallel averages the gradients,
and only rank 0 writes checkpoints and shows the bar.
"""
from __future__ import annotations

import atexit
import copy
import math
import os
import random
import shutil
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from sdlearn.pretrained import load_file_checked, load_state_checked


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
    checkpoint_every: int = 0        # with fit(checkpoint_dir=...): save every n steps (and at the end)
    keep_checkpoints: int = 2        # older checkpoints are deleted
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


def _batch_stream(batches, start: int):
    """Batches for steps start, start+1, ...: call a step -> batch function, or cycle an iterable
    (skipping the first `start` batches, so a resumed run sees what an uninterrupted one would)."""
    if callable(batches) and not isinstance(batches, Iterable):
        step = start
        while True:
            yield batches(step)
            step += 1

    def cycle():
        while True:
            empty = True
            for b in batches:
                empty = False
                yield b
            if empty:
                raise ValueError("fit: `batches` yielded nothing")

    it = cycle()
    for _ in range(start):
        next(it)
    yield from it


# ----------------------------------------------------------------------------
# data parallel (torchrun)

def world() -> tuple[int, int]:
    """(rank, world size); joins the process group torchrun describes in the environment, once.

    The group is destroyed at exit: a gloo group left to the interpreter's teardown can abort the
    process ("terminate called without an active exception") after the work is done.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        atexit.register(_leave_group)
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _leave_group():
    if dist.is_initialized():
        dist.destroy_process_group()


def shard(batch, rank: int, world_size: int):
    """This rank's slice of a batch (tensors, lists, tuples and dicts of them), along the first axis."""
    if world_size == 1:
        return batch
    if isinstance(batch, torch.Tensor) or isinstance(batch, list):
        if len(batch) % world_size:
            raise ValueError(f"batch of {len(batch)} does not split evenly over {world_size} processes")
        n = len(batch) // world_size
        return batch[rank * n:(rank + 1) * n]
    if isinstance(batch, tuple):
        return tuple(shard(b, rank, world_size) for b in batch)
    if isinstance(batch, dict):
        return {k: shard(v, rank, world_size) for k, v in batch.items()}
    return batch


class _Loss(nn.Module):
    """loss_fn bound to the model as a module, so DistributedDataParallel sees one forward per step."""

    def __init__(self, model: nn.Module, loss_fn: Callable):
        super().__init__()
        self.model, self.loss_fn = model, loss_fn

    def forward(self, batch):
        return self.loss_fn(self.model, batch)


# ----------------------------------------------------------------------------
# checkpoints

LATEST = "latest"  # a file naming the newest complete checkpoint folder


def _rng_state() -> dict:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]),
        "python": random.getstate(),
    }


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    random.setstate(state["python"])


def _write_pointer(folder: Path, target: str) -> None:
    tmp = folder / f".{LATEST}.tmp"
    tmp.write_text(target)
    os.replace(tmp, folder / LATEST)


def save_checkpoint(folder: Path, step: int, model: nn.Module, opt, ema: nn.Module | None, hist: History,
                    keep: int = 2) -> Path:
    """Write folder/step-000123/ completely, then point folder/latest at it; prune older ones."""
    folder = Path(folder)
    name = f"step-{step:07d}"
    final, tmp = folder / name, folder / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}, tmp / "model.safetensors")
    if ema is not None:
        save_file({k: v.detach().contiguous().cpu() for k, v in ema.state_dict().items()}, tmp / "ema.safetensors")
    torch.save({"step": step, "optimizer": opt.state_dict(), "rng": _rng_state(),
                "losses": torch.tensor(hist.losses, dtype=torch.float64),
                "logs": {k: torch.tensor(v, dtype=torch.float64) for k, v in hist.logs.items()}},
               tmp / "state.pt")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    _write_pointer(folder, name)
    done = sorted(p for p in folder.glob("step-*") if p.is_dir())
    for old in done[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(folder: Path) -> Path | None:
    pointer = Path(folder) / LATEST
    return Path(folder) / pointer.read_text().strip() if pointer.exists() else None


def load_checkpoint(path: Path, model: nn.Module, opt=None, ema: nn.Module | None = None) -> dict:
    """Load a checkpoint folder into model (and optimizer, EMA); return its state (step, rng, losses)."""
    path = Path(path)
    for f in ("model.safetensors", "state.pt"):
        if not (path / f).exists():
            raise FileNotFoundError(f"checkpoint {path} is incomplete: {f} is missing")
    load_state_checked(model, load_file_checked(path / "model.safetensors")[0], str(path / "model.safetensors"))
    if ema is not None and (path / "ema.safetensors").exists():
        load_state_checked(ema, load_file_checked(path / "ema.safetensors")[0], str(path / "ema.safetensors"))
    try:
        state = torch.load(path / "state.pt", weights_only=True)
    except Exception as e:  # a truncated or foreign file
        raise ValueError(f"{path / 'state.pt'} is not a readable training state (truncated or corrupted?): {e}") from e
    if opt is not None:
        opt.load_state_dict(state["optimizer"])
    return state


# ----------------------------------------------------------------------------

def _adamw(params: list[nn.Parameter], cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW over params. The fused kernel updates every parameter in one pass (on 2 CPU cores: 8 ms a step for
    notebook 06's UNet instead of 28 for the per-tensor loop); it needs floating-point parameters on a CPU or CUDA
    device."""
    fused = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay, fused=fused)


def _resume(checkpoint_dir, model: nn.Module, opt, ema: nn.Module | None, hist: History) -> int:
    """Load the latest checkpoint of checkpoint_dir (if any) into model, opt, ema, the RNGs and hist -> its step."""
    last = latest_checkpoint(checkpoint_dir) if checkpoint_dir else None
    if last is None:
        return 0
    state = load_checkpoint(last, model, opt, ema)
    _set_rng_state(state["rng"])
    hist.losses = state["losses"].tolist()
    hist.logs = {k: v.tolist() for k, v in state["logs"].items()}
    return state["step"]


def fit(model: nn.Module, loss_fn: Callable, batches, cfg: TrainConfig,
        params: Iterable[nn.Parameter] | None = None, callback: Callable | None = None,
        progress: bool = True, checkpoint_dir: str | Path | None = None) -> History:
    """Train `model` for cfg.steps steps of `loss_fn(model, batch)`; return the History.

    With `checkpoint_dir`, resume from its latest checkpoint if there is one, and save to it."""
    params = [p for p in (params if params is not None else model.parameters()) if p.requires_grad]
    if not params:
        raise ValueError("fit: the model has no trainable parameters")
    opt = _adamw(params, cfg)
    ema = copy.deepcopy(model).eval().requires_grad_(False) if cfg.ema_decay else None
    dev = next(iter(params)).device
    use_autocast = cfg.autocast and dev.type == "cuda"
    hist = History(ema=ema)
    rank, world_size = world()
    start_step = _resume(checkpoint_dir, model, opt, ema, hist)
    step_fn = _Loss(model, loss_fn)
    if world_size > 1:
        step_fn = nn.parallel.DistributedDataParallel(step_fn)
    model.train()
    data = _batch_stream(batches, start_step)
    # at most one redraw a second: in a notebook each redraw is a widget message, and thousands of them queued while
    # nbval waits for a long training cell overflow the kernel's output channel (the cell then fails in nbval)
    bar = tqdm(range(start_step, cfg.steps), desc=cfg.desc, disable=not progress or rank != 0,
               initial=start_step, total=cfg.steps, mininterval=1.0)
    start = time.perf_counter()
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=use_autocast):
            out = step_fn(shard(next(data), rank, world_size))
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
            bar.set_postfix(loss=f"{hist.losses[-1]:.4f}", **{k: f"{v:.3g}" for k, v in logs.items()}, refresh=False)
        done = step + 1
        if checkpoint_dir and rank == 0 and (
                done == cfg.steps or (cfg.checkpoint_every and done % cfg.checkpoint_every == 0)):
            save_checkpoint(Path(checkpoint_dir), done, model, opt, ema, hist, cfg.keep_checkpoints)
        if callback is not None and cfg.callback_every and done % cfg.callback_every == 0:
            callback(done, model, ema)
    hist.seconds = time.perf_counter() - start
    model.eval()
    return hist
