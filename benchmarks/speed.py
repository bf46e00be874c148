"""Speed side by side: sdlearn's UNet, VAE and MMDiT against diffusers' classes, same configs, same weights.

Each model is a released one (its config and its weights), and diffusers' twin is made from it with
sdlearn.convert.to_diffusers (their outputs are checked equal first). For each: a training step (forward, MSE,
backward, fused AdamW as in sdlearn.train.fit) at the training batch, and a sampling step (no grad, the guided batch
of 2 x 16). The two models alternate step by step in one process, the order flipping every repeat, so load from
elsewhere hits both alike; the median of the repeat-by-repeat ratios is reported, with its interquartile range
(< 1: sdlearn is faster). Then FLOPs per training step (counted with torch.utils.flop_counter) and the rate
achieved (MFU against --peak-tflops on a GPU), and the released pipelines' sampling throughput (images per second,
50 steps, guidance).
Results go to benchmarks/results/speed_<device>.json.

    python benchmarks/speed.py                          # CPU, every model
    python benchmarks/speed.py --models t2i-unet --repeats 10
    python benchmarks/speed.py --device cuda --bf16     # a GPU, bf16 autocast (MFU against 989 TFLOP/s)
    python benchmarks/speed.py --compile                # torch.compile'd sdlearn too (compile time apart)
    python benchmarks/speed.py --channels-last          # sdlearn's weights and inputs in NHWC too
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import statistics
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from sdlearn import convert, pretrained

RESULTS = Path(__file__).resolve().parent / "results"


# -----------------------------------------------------------------------------
# the models: a release, the batch it trains on, and how each side is called

def _denoiser_case(release: str, train_batch: int):
    pipe = pretrained.load(release, 32)
    ours = pipe.denoiser
    c, h, w = pipe.latent_shape
    dims = ours.cond_dims  # what the denoiser reads (sdlearn.diffusion.Denoiser)

    def inputs(batch, g):
        x = torch.randn(batch, c, h, w, generator=g)
        t = torch.rand(batch, generator=g) * 999
        ctx = torch.randn(batch, 16, dims["context"], generator=g)
        extra = {}
        if "pooled" in dims:  # SDXL's UNet and the MMDiT take pooled text
            extra["pooled"] = torch.randn(batch, dims["pooled"], generator=g)
        if "time_ids" in dims:  # SDXL's size and crop ids
            extra["time_ids"] = torch.tensor([[32.0, 32, 0, 0, 32, 32, 6][:dims["time_ids"]]]).repeat(batch, 1)
        return x, t, ctx, extra

    if type(ours).__name__ == "MMDiT":
        def call_theirs(m, x, t, ctx, extra):
            return m(x, ctx, extra["pooled"], t).sample
    else:
        def call_theirs(m, x, t, ctx, extra):
            added = {"added_cond_kwargs": {"text_embeds": extra["pooled"], "time_ids": extra["time_ids"]}} \
                if extra else {}
            return m(x, t, ctx, **added).sample

    def call_ours(m, x, t, ctx, extra):
        return m(x, t, ctx, **extra)

    return ours, call_ours, call_theirs, inputs, train_batch


def _vae_case(release: str, train_batch: int):
    ours = pretrained.load(release, 32)
    f = ours.downsampling_factor

    def inputs(batch, g, sampling=False):
        if sampling:  # the sampling step of a VAE is the decode at the end of a generation
            return (torch.randn(batch, ours.config.latent_channels, 32 // f, 32 // f, generator=g),)
        return (torch.rand(batch, 3, 32, 32, generator=g) * 2 - 1,)

    def call_ours(m, x):
        return m.decode(m.encode(x).mode()) if x.shape[1] == 3 else m.decode(x)

    def call_theirs(m, x):
        return m.decode(m.encode(x).latent_dist.mode()).sample if x.shape[1] == 3 else m.decode(x).sample

    return ours, call_ours, call_theirs, inputs, train_batch


CASES = {
    "t2i-unet": lambda: _denoiser_case("shapes-t2i", 64),          # notebook 06's UNet
    "sdxl-unet": lambda: _denoiser_case("shapes-sdxl-base", 64),   # notebook 07's base (pooled text, time ids)
    "mmdit": lambda: _denoiser_case("shapes-mmdit", 64),           # notebook 08's MMDiT
    "vae": lambda: _vae_case("shapes-vae", 32),                    # notebook 03's autoencoder
}


# -----------------------------------------------------------------------------
# timing

def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _alternate(fns: dict, repeats: int, warmup: int, device) -> dict:
    """Seconds of each zero-argument fn per repeat, called in alternation (order flipped every repeat)."""
    times = {k: [] for k in fns}
    order = list(fns)
    for r in range(warmup + repeats):
        for k in (order if r % 2 == 0 else order[::-1]):
            _sync(device)
            start = time.perf_counter()
            fns[k]()
            _sync(device)
            if r >= warmup:
                times[k].append(time.perf_counter() - start)
    return times


def _ratio(times: dict, k: str) -> tuple[float, list[float]]:
    """k's time over diffusers', repeat by repeat (each pair ran back to back, so load from elsewhere cancels):
    the median ratio and its interquartile range."""
    ratios = [a / b for a, b in zip(times[k], times["diffusers"], strict=True)]
    q1, _, q3 = statistics.quantiles(ratios, n=4)
    return round(statistics.median(ratios), 3), [round(q1, 3), round(q3, 3)]


def bench_model(name: str, args, device) -> dict:
    ours, call_ours, call_theirs, inputs, train_batch = CASES[name]()
    ours = ours.to(device).requires_grad_(True)  # released models load frozen
    theirs = convert.to_diffusers(ours).to(device).requires_grad_(True)
    g = torch.Generator().manual_seed(0)
    is_vae = name == "vae"
    train_in = [a.to(device) if torch.is_tensor(a) else {k: v.to(device) for k, v in a.items()}
                for a in inputs(train_batch, g)]
    sample_in = [a.to(device) if torch.is_tensor(a) else {k: v.to(device) for k, v in a.items()}
                 for a in (inputs(32, g, sampling=True) if is_vae else inputs(32, g))]
    with torch.no_grad():
        err = (call_ours(ours.eval(), *sample_in) - call_theirs(theirs.eval(), *sample_in)).abs().max().item()
    assert err < 1e-3, f"{name}: sdlearn and diffusers disagree by {err}: not the same model"
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if args.bf16 else nullcontext()
    models = {"sdlearn": (ours, call_ours), "diffusers": (theirs, call_theirs)}
    compile_s = None
    if args.compile:
        start = time.perf_counter()
        compiled = torch.compile(ours)
        with autocast:
            call_ours(compiled, *train_in).float().mean().backward()
        _sync(device)
        compile_s = time.perf_counter() - start
        models["sdlearn compiled"] = (compiled, call_ours)
    if args.channels_last:  # the same weights in NHWC, which oneDNN / cuDNN convolutions prefer

        def call_nhwc(m, x, *rest):
            return call_ours(m, x.contiguous(memory_format=torch.channels_last), *rest)

        models["sdlearn channels_last"] = (copy.deepcopy(ours).to(memory_format=torch.channels_last), call_nhwc)
    fused = device.type in ("cpu", "cuda")  # as sdlearn.train.fit
    opts = {k: torch.optim.AdamW(m.parameters(), lr=1e-5, fused=fused) for k, (m, _) in models.items()}

    def train_step(k):
        m, call = models[k]
        m.train()
        with autocast:
            out = call(m, *train_in)
            loss = F.mse_loss(out.float(), train_in[0] if is_vae else torch.zeros_like(out, dtype=torch.float32))
        opts[k].zero_grad(set_to_none=True)
        loss.backward()
        opts[k].step()

    @torch.no_grad()
    def sample_step(k):
        m, call = models[k]
        m.eval()
        with autocast:
            call(m, *sample_in)

    train_times = _alternate({k: (lambda k=k: train_step(k)) for k in models}, args.repeats, args.warmup, device)
    sample_times = _alternate({k: (lambda k=k: sample_step(k)) for k in models}, args.repeats, args.warmup, device)
    train = {k: statistics.median(v) for k, v in train_times.items()}
    sample = {k: statistics.median(v) for k, v in sample_times.items()}
    train_ratio, train_iqr = _ratio(train_times, "sdlearn")
    sample_ratio, sample_iqr = _ratio(sample_times, "sdlearn")
    with FlopCounterMode(display=False) as fc:
        train_step("sdlearn")
    flops = fc.get_total_flops()
    row = {
        "parameters": sum(p.numel() for p in ours.parameters()),
        "train_batch": train_batch, "sample_batch": 32,
        "train_step_ms": {k: round(v * 1e3, 2) for k, v in train.items()},
        "sample_step_ms": {k: round(v * 1e3, 2) for k, v in sample.items()},
        "train_ratio": train_ratio, "train_ratio_iqr": train_iqr,
        "sample_ratio": sample_ratio, "sample_ratio_iqr": sample_iqr,
        "train_step_gflop": round(flops / 1e9, 2),
        "train_tflops_achieved": round(flops / train["sdlearn"] / 1e12, 4),
        "max_abs_error_vs_diffusers": err,
    }
    if device.type == "cuda":
        row["train_mfu"] = round(flops / train["sdlearn"] / (args.peak_tflops * 1e12), 4)
    row["variants"] = {k.removeprefix("sdlearn "): {"train_ratio": _ratio(train_times, k)[0],
                                                     "sample_ratio": _ratio(sample_times, k)[0]}
                       for k in models if k not in ("sdlearn", "diffusers")}
    if compile_s is not None:
        row["variants"]["compiled"]["compile_s"] = round(compile_s, 1)
    return row


def bench_generate(release: str, args, device) -> dict:
    """Images per second of a released pipeline: 16 prompts, 50 steps, guidance 3 (one warm-up call first)."""
    pipe = pretrained.load(release, 32, device=device)
    prompts = ["a red circle on the left", "a blue square at the top"] * 8
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if args.bf16 else nullcontext()
    with autocast:
        pipe.generate(prompts[:2], steps=2, progress=False)
        _sync(device)
        start = time.perf_counter()
        pipe.generate(prompts, steps=args.sample_steps, progress=False)
        _sync(device)
    return {"images": len(prompts), "steps": args.sample_steps,
            "images_per_s": round(len(prompts) / (time.perf_counter() - start), 2)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="*", choices=list(CASES), default=list(CASES))
    ap.add_argument("--pipelines", nargs="*", default=["shapes-t2i", "shapes-sdxl-base", "shapes-mmdit"],
                    help="released pipelines whose sampling throughput is measured (none: skip)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast, as the trainer does on CUDA")
    ap.add_argument("--compile", action="store_true", help="also time torch.compile(sdlearn model)")
    ap.add_argument("--channels-last", action="store_true", help="also time sdlearn's model in channels_last")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--sample-steps", type=int, default=50)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="the GPU's dense bf16 peak, for MFU")
    ap.add_argument("--out", type=Path, default=None, help="results file (default results/speed_<device>.json)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    result = {
        "date": datetime.date.today().isoformat(), "device": device.type,
        "machine": torch.cuda.get_device_name() if device.type == "cuda"
        else f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores",
        "threads": torch.get_num_threads(), "bf16": args.bf16, "torch": torch.__version__,
        "command": "python benchmarks/speed.py " + " ".join(argv if argv is not None else __import__("sys").argv[1:]),
        "models": {}, "generate": {},
    }
    for name in args.models:
        row = result["models"][name] = bench_model(name, args, device)
        print(f"{name:10} train {row['train_step_ms']} ratio {row['train_ratio']} (IQR {row['train_ratio_iqr']}); "
              f"sample {row['sample_step_ms']} ratio {row['sample_ratio']} (IQR {row['sample_ratio_iqr']}); "
              f"{row['train_step_gflop']} GFLOP/step")
    for release in args.pipelines:
        row = result["generate"][release] = bench_generate(release, args, device)
        print(f"{release:14} {row['images_per_s']} images/s ({row['steps']} steps)")
    out = args.out or RESULTS / f"speed_{device.type}.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
