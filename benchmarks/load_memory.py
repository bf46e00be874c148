"""What loading a full-size checkpoint costs: time and peak memory of sdlearn.convert.load against the weights' size.

Writes a full-size SD 1.5 pipeline (the published configs: UNet 859.5 M, CLIP-L text 123.1 M, VAE 83.7 M
parameters; random weights, nothing downloaded) as a diffusers folder in fp32, then loads it in fresh processes
with sdlearn.convert.load and with diffusers' from_pretrained, and reports each one's wall time and peak resident
memory (ru_maxrss) next to the size of the weights. Loading builds every part on the meta device and assigns the
file's tensors, so the peak should be about one copy of the weights above the interpreter's baseline.

    python benchmarks/load_memory.py [--folder /tmp/sd15-random]   # -> benchmarks/results/load_memory_cpu.json
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
TESTS = Path(__file__).resolve().parent.parent / "tests"


def write(folder: Path) -> None:
    """A random full-size SD 1.5 pipeline, saved as the published one is laid out."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    sys.path.insert(0, str(TESTS))
    from test_convert_pipeline import PUBLISHED_CONFIGS  # the published config.json files
    from tiny import clip_tokenizer

    configs = {preset: config for preset, _, config in PUBLISHED_CONFIGS}
    torch.manual_seed(0)
    (folder / "vocab").mkdir(parents=True, exist_ok=True)
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL(**configs["sd-vae"]), text_encoder=CLIPTextModel(CLIPTextConfig(**configs["clip-l-text"])),
        tokenizer=clip_tokenizer(folder / "vocab", 77), unet=UNet2DConditionModel(**configs["sd15-unet"]),
        scheduler=DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder / "diffusers", safe_serialization=True)


def _peak_gib() -> float:
    """This process's peak resident memory (VmHWM: unlike ru_maxrss, not inherited from the parent)."""
    line = next(ln for ln in Path("/proc/self/status").read_text().splitlines() if ln.startswith("VmHWM:"))
    return int(line.split()[1]) / 2**20


def load(folder: Path, how: str) -> dict:
    """Load in this (fresh) process and read every weight once (a lazily mapped file counts when it is used);
    wall time, and the peak resident memory before and after."""
    import torch
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel  # noqa: F401
    from transformers import CLIPTextModel  # noqa: F401  (imports apart: sdlearn reads diffusers' config defaults)

    from sdlearn import convert
    base = _peak_gib()
    start = time.perf_counter()
    if how == "sdlearn":
        pipe = convert.load(folder)
        modules = (pipe.denoiser, pipe.vae, pipe.conditioner)
    else:
        pipe = StableDiffusionPipeline.from_pretrained(folder)
        modules = (pipe.unet, pipe.vae, pipe.text_encoder)
    with torch.no_grad():
        params = sum(p.numel() for m in modules for p in m.parameters() if p.sum().isfinite())
    seconds = time.perf_counter() - start
    peak = _peak_gib()
    return {"seconds": round(seconds, 1), "baseline_gib": round(base, 2), "peak_gib": round(peak, 2),
            "above_baseline_gib": round(peak - base, 2), "weights_gib": round(params * 4 / 2**30, 2)}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--folder", type=Path, default=Path("/tmp/sd15-random"))
    p.add_argument("--child", choices=("sdlearn", "diffusers", "write"))
    args = p.parse_args()
    if args.child in ("sdlearn", "diffusers"):
        print(json.dumps(load(args.folder / "diffusers", args.child)))
        return
    if args.child == "write" or not (args.folder / "diffusers" / "model_index.json").exists():
        if args.child != "write":  # in its own process, so that this one stays small
            subprocess.run([sys.executable, __file__, "--folder", str(args.folder), "--child", "write"], check=True)
            return main()
        return write(args.folder)
    runs = {}
    for how in ("sdlearn", "diffusers"):
        out = subprocess.run([sys.executable, __file__, "--folder", str(args.folder), "--child", how], check=True,
                             capture_output=True, text=True).stdout.strip().splitlines()[-1]
        runs[how] = json.loads(out)
        print(how, runs[how])
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "load_memory_cpu.json").write_text(json.dumps({
        "command": "python benchmarks/load_memory.py", "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores", "case": "SD 1.5 layout, random fp32 weights",
        "runs": runs}, indent=1) + "\n")


if __name__ == "__main__":
    main()
