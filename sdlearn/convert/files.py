"""Reading and writing weights files safely.

    state = files.read("model.safetensors")                       # safetensors: tensors only, nothing runs
    state = files.read("v1-5-pruned.ckpt", allow_pickle=True)     # a pickle, read with torch.load(weights_only=True)
    files.write(state, "out.safetensors")                          # atomically: a failed write leaves no file

A pickle (.ckpt, .pt, .pth, .bin) can run code when loaded; it is refused unless asked for, and then read with
torch's restricted unpickler, which refuses anything but tensors and plain containers.
"""
from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import torch

from sdlearn.pretrained import save_file_atomic

PICKLES = (".ckpt", ".pt", ".pth", ".bin")


def _convert_hint(path: Path) -> str:
    return (f"Convert it once, if you trust where it came from: state = torch.load('{path}', weights_only=True) "
            f"(its 'state_dict' entry if it has one), then safetensors.torch.save_file(state, "
            f"'{path.with_suffix('.safetensors')}'); or pass allow_pickle=True")


def read(path, allow_pickle: bool = False, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """The tensors of a weights file, on `device`; a checkpoint that wraps them in {"state_dict": ...} is unwrapped."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no weights file at {path}")
    if path.suffix in PICKLES:
        if not allow_pickle:
            raise ValueError(f"{path} is a pickle, which can run code when loaded; sdlearn reads safetensors. "
                             + _convert_hint(path))
        try:
            state = torch.load(path, map_location=device, weights_only=True, mmap=zipfile.is_zipfile(path))
        except pickle.UnpicklingError as e:
            if "weights only" not in str(e).lower():
                raise ValueError(f"{path} is not a readable torch checkpoint (truncated or corrupted?): {e}") from e
            reason = next((line for line in str(e).splitlines() if "GLOBAL" in line or "Unsupported" in line), "")
            raise ValueError(f"{path}: refused: the pickle holds more than tensors, which torch.load(weights_only="
                             f"True) will not build. {reason.strip()}") from e
        except (RuntimeError, OSError, EOFError, zipfile.BadZipFile) as e:
            raise ValueError(f"{path} is not a readable torch checkpoint (truncated or corrupted?): {e}") from e
    elif path.suffix == ".safetensors":
        try:
            state = load_file(path, device=str(device))
        except (SafetensorError, OSError, ValueError) as e:
            raise ValueError(f"{path} is not a readable safetensors file (truncated or corrupted?): {e}") from e
    else:
        raise ValueError(f"{path}: expected a .safetensors file (or, with allow_pickle=True, one of "
                         f"{', '.join(PICKLES)}), got {path.suffix or 'no extension'}")
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} holds {type(state).__name__}, not a dict of tensors")
    return state


def write(state: dict[str, torch.Tensor], path, metadata: dict[str, str] | None = None) -> Path:
    """Write `state` as safetensors at `path`, through a temporary file and os.replace."""
    save_file_atomic(state, Path(path), metadata)
    return Path(path)
