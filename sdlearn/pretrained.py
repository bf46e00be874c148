"""The course's released models: small weights trained on the shapes data, shipped in the package.

    vae = pretrained.load("shapes-vae")             # at the active profile's image size
    vae = pretrained.load("shapes-vae", size=64)
    pipe = pretrained.load("shapes-t2i", size=32)  # a TextToImage (sdlearn.pipeline)

A release is one safetensors file, sdlearn/weights/<name>-<size>.safetensors, whose
metadata holds the model class, its config and the command that reproduced it, so
`load` needs no code per model (a class with a `from_release(state, metadata, source)`
classmethod, such as the text-to-image pipeline, rebuilds itself). `save` writes one atomically (temporary file, then
rename): a crash while saving never leaves a half-written release behind.
"""
from __future__ import annotations

import dataclasses
import importlib
import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file
from torch import nn

WEIGHTS = Path(__file__).resolve().parent / "weights"


def path(name: str, size: int) -> Path:
    return WEIGHTS / f"{name}-{size}.safetensors"


def available() -> list[str]:
    """Released files, as "name-size" stems."""
    return sorted(p.stem for p in WEIGHTS.glob("*.safetensors"))


def save_file_atomic(tensors: dict[str, torch.Tensor], dest: Path, metadata: dict[str, str] | None = None) -> None:
    """safetensors' save_file, but through a temporary file in the same folder and os.replace."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)
        os.chmod(tmp, 0o644)  # mkstemp made it private; a release is for everyone
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save(model: nn.Module, name: str, size: int, command: str, dest: Path | None = None, **extra: str) -> Path:
    """Release `model` (which has a dataclass `.config`) as name-size, recording the reproducing command."""
    cls = type(model)
    module = cls.__module__
    if module == "__main__":  # saved by `python -m sdlearn.x ...`: record the importable name
        import sys

        spec = getattr(sys.modules["__main__"], "__spec__", None)
        if spec is None:
            raise ValueError(f"cannot release a {cls.__qualname__} defined in a script: define it in a module")
        module = spec.name
    meta = {
        "class": f"{module}.{cls.__qualname__}",
        "config": json.dumps(dataclasses.asdict(model.config)),
        "command": command,
        **extra,
    }
    dest = dest or path(name, size)
    save_file_atomic(model.state_dict(), dest, metadata=meta)
    return dest


def metadata(name: str, size: int | None = None) -> dict[str, str]:
    with safe_open(_resolve(name, size), framework="pt") as f:
        return f.metadata() or {}


def _resolve(name: str, size: int | None) -> Path:
    if size is None:
        from sdlearn.course import profile

        size = profile().image_size
    p = path(name, size)
    if not p.exists():
        raise FileNotFoundError(
            f"no released model {name!r} at size {size}: released are {', '.join(available()) or 'none'}"
        )
    return p


def load_file_checked(file: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a safetensors file; a truncated or corrupted file is a clear error."""
    try:
        with safe_open(file, framework="pt") as f:
            meta = f.metadata() or {}
        return load_file(file), meta
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{file} is not a readable safetensors file (truncated or corrupted?): {e}") from e


def load_state_checked(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """model.load_state_dict(state), but a mismatch names the parameter and both shapes."""
    ours = model.state_dict()
    missing, unexpected = sorted(set(ours) - set(state)), sorted(set(state) - set(ours))
    if missing or unexpected:
        raise ValueError(f"{source} does not fit {type(model).__name__}: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]} (a checkpoint of another model or config?)")
    for k, v in state.items():
        if ours[k].shape != v.shape:
            raise ValueError(f"{source} does not fit {type(model).__name__}: parameter {k!r} has shape "
                             f"{list(v.shape)} in the file but {list(ours[k].shape)} in the model "
                             f"(a checkpoint of another config?)")
    model.load_state_dict(state)


def load(name: str, size: int | None = None, device: str | torch.device = "cpu") -> nn.Module:
    """The released model `name` at image `size` (default: the active profile's), in eval mode."""
    file = _resolve(name, size)
    state, meta = load_file_checked(file)
    module_name, _, cls_name = meta["class"].rpartition(".")
    cls = getattr(importlib.import_module(module_name), cls_name)
    if hasattr(cls, "from_release"):  # a composite (a pipeline): it knows how to rebuild itself
        return cls.from_release(state, meta, str(file)).to(device).eval()
    config = _config_class(cls)(**json.loads(meta["config"]))
    model = cls(config)
    load_state_checked(model, state, str(file))
    return model.to(device).eval()


def _config_class(cls):
    """The config dataclass a model class is built from: the annotation of its __init__'s first argument."""
    import inspect
    import typing

    hints = typing.get_type_hints(cls.__init__, vars(importlib.import_module(cls.__module__)))
    params = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    if not params or params[0] not in hints or not dataclasses.is_dataclass(hints[params[0]]):
        raise TypeError(f"{cls.__qualname__}.__init__ must take a config dataclass as its first argument")
    return hints[params[0]]
