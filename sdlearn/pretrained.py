"""The course's released models: small weights trained on the shapes data, shipped in the package.

    vae = pretrained.load("shapes-vae")             # at the active profile's image size
    vae = pretrained.load("shapes-vae", size=64)
    pipe = pretrained.load("shapes-t2i", size=32)  # a TextToImage (sdlearn.pipeline)

A release is one safetensors file, sdlearn/weights/<name>-<size>.safetensors, whose metadata says how to
rebuild what it holds (`describe` / `build`), so `load` needs no code per model: a model's class and config; a
pipeline's class and its parts, each described the same way, or named as another release (the frozen VAE and
text encoder a text-to-image model was trained with, checked by sha256); plus the command that reproduced it.
`save` writes one atomically (temporary file, then rename): a crash while saving never leaves a half-written
release behind.
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib
import inspect
import json
import os
import sys
import tempfile
import typing
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file
from torch import nn

from sdlearn.course import profile

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


def _class_path(obj) -> str:
    """"module.Class" of obj, importable: a class of a module run as `python -m sdlearn.x` names sdlearn.x."""
    cls = type(obj)
    module = cls.__module__
    if module == "__main__":
        spec = getattr(sys.modules["__main__"], "__spec__", None)
        if spec is None:
            raise ValueError(f"cannot release a {cls.__qualname__} defined in a script: define it in a module")
        module = spec.name
    return f"{module}.{cls.__qualname__}"


def _is_part(value) -> bool:
    return isinstance(value, nn.Module) or hasattr(value, "init_args")


def describe(obj, state: dict[str, torch.Tensor], prefix: str = "", released: dict[str, str] | None = None) -> dict:
    """The spec that rebuilds `obj`, adding its weights to `state` under `prefix`. Three kinds of spec:
    {"release": name, "sha256": ...}  a part that is a release of its own (`released` maps its path, e.g.
                                      "vae" or "conditioner.text_encoder", to the release's file stem), or a
                                      part of one ("shapes-t2i-32:denoiser", with "part": "denoiser");
    {"class", "parts", "args"}        a composite (anything with init_args(): a pipeline, a conditioner, a schedule,
                                      a wrapper such as SDXL's UNet or a ControlNet): its init_args(), parts
                                      described in turn, plain values (str, numbers) as they are, and the weights
                                      it holds itself, outside its parts;
    {"class", "config"}               a module built from a config dataclass (its weights go into state)."""
    released = released or {}
    path = prefix.rstrip(".")
    if path in released:
        name, _, part = released[path].partition(":")
        return {"release": name, "sha256": _sha256(WEIGHTS / f"{name}.safetensors"), **({"part": part} if part else {})}
    spec = {"class": _class_path(obj)}
    if hasattr(obj, "init_args"):
        args = obj.init_args()
        spec["parts"] = {k: describe(v, state, f"{prefix}{k}.", released) for k, v in args.items() if _is_part(v)}
        spec["args"] = {k: v for k, v in args.items() if not _is_part(v)}
        state.update({prefix + k: v for k, v in _own_state(obj, spec["parts"]).items()})
        return spec
    if dataclasses.is_dataclass(getattr(obj, "config", None)):
        spec["config"] = dataclasses.asdict(obj.config)
        state.update({prefix + k: v for k, v in obj.state_dict().items()})
        return spec
    raise TypeError(f"cannot describe a {type(obj).__qualname__}: give it a dataclass `.config` (a model) or an "
                    f"init_args() method (a composite)")


def _own_state(obj, parts) -> dict[str, torch.Tensor]:
    """The weights a composite holds itself: its state_dict without its parts' entries."""
    if not isinstance(obj, nn.Module):
        return {}
    return {k: v for k, v in obj.state_dict().items() if k.split(".", 1)[0] not in parts}


def save(obj, name: str, size: int, command: str, dest: Path | None = None, released: dict[str, str] | None = None,
         dtype: torch.dtype | None = None, **extra: str) -> Path:
    """Release `obj` (a model with a dataclass `.config`, or a composite such as a pipeline) as name-size, with the
    command that reproduces it. Parts named in `released` are stored as references to those releases (checked by
    sha256 when loaded); dtype (e.g. torch.float16) stores the weights smaller."""
    state: dict[str, torch.Tensor] = {}
    spec = describe(obj, state, "", released)
    meta = {"class": spec["class"], **{k: json.dumps(spec[k]) for k in ("config", "parts", "args") if k in spec},
            "command": command, **extra}
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    dest = dest or path(name, size)
    save_file_atomic(state, dest, metadata=meta)
    return dest


def metadata(name: str, size: int | None = None) -> dict[str, str]:
    with safe_open(_resolve(name, size), framework="pt") as f:
        return f.metadata() or {}


def sizes(name: str) -> list[int]:
    """The image sizes `name` is released at."""
    return sorted(int(stem.rsplit("-", 1)[1]) for stem in available() if stem.rsplit("-", 1)[0] == name)


def _resolve(name: str, size: int | None) -> Path:
    if size is None:  # the profile's size, else the largest one released (SDXL's and SD3's parts: 32 px only)
        size, wanted = profile().image_size, profile().image_size
        if not path(name, size).exists() and sizes(name):
            size = max(sizes(name))
            warnings.warn(f"{name} is not released at the {profile().name} profile's {wanted} px: loading the "
                          f"{size} px release (pass size= to choose; released sizes: {sizes(name)})", stacklevel=3)
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


def check_state(expected: dict[str, torch.Tensor], state: dict[str, torch.Tensor], source: str, what: str) -> None:
    """A clear error when `state` does not fit the names and shapes of `expected` (a module's state_dict)."""
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{source} does not fit {what}: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]} (a checkpoint of another model or config?)")
    for k, v in state.items():
        if expected[k].shape != v.shape:
            raise ValueError(f"{source} does not fit {what}: parameter {k!r} has shape "
                             f"{list(v.shape)} in the file but {list(expected[k].shape)} in the model "
                             f"(a checkpoint of another config?)")


def load_state_checked(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """model.load_state_dict(state), but a mismatch names the parameter and both shapes."""
    check_state(model.state_dict(), state, source, type(model).__name__)
    model.load_state_dict(state)


def _sha256(file: Path) -> str:
    return hashlib.sha256(Path(file).read_bytes()).hexdigest()


def _import(class_path: str):
    module_name, _, cls_name = class_path.rpartition(".")
    return getattr(importlib.import_module(module_name), cls_name)


def build(spec: dict, state: dict[str, torch.Tensor], prefix: str = "", source: str = "a release"):
    """The object a spec describes (see `describe`), with its weights from `state` under `prefix`."""
    if "release" in spec:
        name, file = spec["release"], WEIGHTS / f"{spec['release']}.safetensors"
        if not file.exists():
            raise FileNotFoundError(f"{source} needs the released {name}, which is missing")
        if _sha256(file) != spec["sha256"]:
            raise ValueError(f"{source} was trained on another {name} than the one installed (its sha256 "
                             f"differs): retrain it with the command in its metadata")
        obj = load_path(file)
        for attr in filter(None, spec.get("part", "").split(".")):
            obj = getattr(obj, attr)
        return obj
    cls = _import(spec["class"])
    if "config" in spec:
        model = cls(_config_class(cls)(**spec["config"]))
        load_state_checked(model, {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}, source)
        return model
    parts = {k: build(v, state, f"{prefix}{k}.", source) for k, v in spec["parts"].items()}
    obj = cls(**parts, **spec["args"])
    own = _own_state(obj, parts)
    if own:  # a composite that holds weights of its own (a wrapper's new layers)
        stored = {k[len(prefix):]: v for k, v in state.items()
                  if k.startswith(prefix) and k[len(prefix):].split(".", 1)[0] not in parts}
        check_state(own, stored, source, type(obj).__name__)
        obj.load_state_dict(stored, strict=False)
    return obj


def load_path(file: Path, device: str | torch.device = "cpu"):
    """The model or pipeline a release file holds, rebuilt from its metadata, in eval mode, on `device`."""
    state, meta = load_file_checked(Path(file))
    spec = {"class": meta["class"], **{k: json.loads(meta[k]) for k in ("config", "parts", "args") if k in meta}}
    obj = build(spec, state, "", str(file))
    return obj.to(device).eval() if isinstance(obj, nn.Module) else obj


def load(name: str, size: int | None = None, device: str | torch.device = "cpu"):
    """The released model or pipeline `name` at image `size` (default: the active profile's), in eval mode."""
    return load_path(_resolve(name, size), device)


def _config_class(cls):
    """The config dataclass a model class is built from: the annotation of its __init__'s first argument."""
    hints = typing.get_type_hints(cls.__init__, vars(importlib.import_module(cls.__module__)))
    params = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    if not params or params[0] not in hints or not dataclasses.is_dataclass(hints[params[0]]):
        raise TypeError(f"{cls.__qualname__}.__init__ must take a config dataclass as its first argument")
    return hints[params[0]]
