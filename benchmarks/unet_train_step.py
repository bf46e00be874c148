"""One training step (forward, eps-MSE loss, backward, AdamW) of sdlearn's UNet vs diffusers' UNet2DConditionModel.

Same config, same weights (diffusers' model is made with sdlearn.convert.to_diffusers), same batch. The two
alternate step by step in one process (the order flips every repeat), so load from other processes on shared
cores hits both alike; the ratio of the medians is reported (< 1: sdlearn is faster).

    python benchmarks/unet_train_step.py                       # notebook 05's model, 16 px, batch 64
    python benchmarks/unet_train_step.py --preset sd-small --size 32 --batch 8 --repeats 40
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import torch
import torch.nn.functional as F

from sdlearn import convert
from sdlearn.unet import UNet, UNetConfig

CONFIGS = {
    # the pixel-space model of notebook 05 in the cpu profile (SD-1-style conv projections, attention at 8x8)
    "notebook": UNetConfig(in_channels=3, out_channels=3, channels=(32, 64), layers_per_block=1,
                           attention=(False, True), heads=4, context_dim=128, norm_groups=8),
    # a narrow SD-2 / SDXL-style UNet: linear projections, head_dim 32, two transformer layers at the bottom
    "sd-small": UNetConfig(in_channels=4, out_channels=4, channels=(64, 128, 128), layers_per_block=2,
                           attention=(False, True, True), transformer_layers=(1, 1, 2), heads=None, head_dim=32,
                           context_dim=128, linear_proj=True, norm_groups=32),
}


def step(model, opt, x, t, ctx, target, diffusers_model: bool) -> float:
    start = time.perf_counter()
    out = model(x, t, ctx).sample if diffusers_model else model(x, t, ctx)
    loss = F.mse_loss(out, target)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return time.perf_counter() - start


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=list(CONFIGS), default="notebook")
    ap.add_argument("--size", type=int, default=16)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=16, help="text tokens in the context")
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = CONFIGS[args.preset]
    torch.manual_seed(0)
    ours = UNet(cfg).train()
    theirs = convert.to_diffusers(ours).train()
    opts = {m: torch.optim.AdamW(m.parameters(), lr=1e-4) for m in (ours, theirs)}
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, cfg.in_channels, args.size, args.size, generator=g)
    t = torch.randint(0, 1000, (args.batch,), generator=g)
    ctx = torch.randn(args.batch, args.tokens, cfg.context_dim, generator=g)
    target = torch.randn(x.shape, generator=g)
    with torch.no_grad():
        assert (ours(x, t, ctx) - theirs(x, t, ctx).sample).abs().max() < 1e-4, "not the same model"
    times = {"sdlearn": [], "diffusers": []}
    pair = [("sdlearn", ours, False), ("diffusers", theirs, True)]
    for r in range(args.warmup + args.repeats):
        for name, model, is_theirs in (pair if r % 2 == 0 else pair[::-1]):
            dt = step(model, opts[model], x, t, ctx, target, is_theirs)
            if r >= args.warmup:
                times[name].append(dt)
    med = {k: statistics.median(v) for k, v in times.items()}
    params = sum(p.numel() for p in ours.parameters())
    print(f"config {args.preset}: {dataclasses.asdict(cfg)}")
    print(f"{params:,} parameters; batch {args.batch} x {cfg.in_channels}x{args.size}x{args.size}, "
          f"{args.tokens} text tokens; {torch.get_num_threads()} threads; {args.repeats} alternating repeats "
          f"after {args.warmup} warm-up")
    for k, v in times.items():
        q = statistics.quantiles(v, n=4)
        print(f"  {k:9}  median {med[k] * 1e3:8.1f} ms/step   (quartiles {q[0] * 1e3:.1f} .. {q[2] * 1e3:.1f})")
    ratio = med["sdlearn"] / med["diffusers"]
    print(f"ratio sdlearn / diffusers (medians): {ratio:.3f}")
    return ratio


if __name__ == "__main__":
    main()
