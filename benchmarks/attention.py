"""sdlearn.attention.Attention: parity with diffusers / torch, and time against diffusers' Attention.

Parity: the max |difference| of outputs (fp32) against diffusers' Attention (both conversion directions) and
torch.nn.MultiheadAttention, over the configurations the tests use. Speed: one forward of sdlearn's Attention and
of diffusers' Attention with the same weights, alternating in one process (so load from other processes on shared
cores hits both alike); the ratio of medians is reported (< 1: sdlearn is faster).

    python benchmarks/attention.py                                # parity, then speed at 32x32 tokens, dim 320
    python benchmarks/attention.py --tokens 4096 --dim 320 --heads 8 --repeats 20 --device cuda
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from sdlearn import convert
from sdlearn.attention import Attention
from sdlearn.convert.attention import from_torch

# (query_dim, cross_attention_dim, heads, dim_head, bias, out_bias), as in tests/test_attention.py
CONFIGS = [(32, None, 4, 8, False, True), (32, 16, 4, 8, False, True), (32, 16, 2, 24, True, True),
           (24, 40, 3, 5, False, False), (64, None, 1, 64, True, True), (48, 20, 8, 6, False, True)]


def _randomise(m: nn.Module) -> nn.Module:
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.3)
    return m.eval()


@torch.no_grad()
def parity() -> dict[str, float]:
    # optional: only the parity check needs diffusers
    from diffusers.models.attention_processor import Attention as DiffusersAttention

    worst = {"from_diffusers": 0.0, "to_diffusers": 0.0, "reference_math": 0.0, "MultiheadAttention": 0.0}
    for q_dim, c_dim, heads, dim_head, bias, out_bias in CONFIGS:
        theirs = _randomise(DiffusersAttention(query_dim=q_dim, cross_attention_dim=c_dim, heads=heads,
                                               dim_head=dim_head, bias=bias, out_bias=out_bias))
        ours = convert.from_diffusers(theirs)
        x = torch.randn(2, 11, q_dim)
        c = torch.randn(2, 6, c_dim) if c_dim else None
        expected = theirs(x, encoder_hidden_states=c)
        worst["from_diffusers"] = max(worst["from_diffusers"], (ours(x, c) - expected).abs().max().item())
        worst["reference_math"] = max(worst["reference_math"],
                                      (ours.forward_reference(x, c) - expected).abs().max().item())
        back = convert.to_diffusers(ours).eval()
        worst["to_diffusers"] = max(worst["to_diffusers"],
                                    (back(x, encoder_hidden_states=c) - expected).abs().max().item())
    for kdim in (None, 12):
        mha = _randomise(nn.MultiheadAttention(32, 4, bias=True, batch_first=True, kdim=kdim, vdim=kdim))
        x = torch.randn(2, 9, 32)
        c = torch.randn(2, 6, kdim) if kdim else x
        expected, _ = mha(x, c, c, need_weights=False)
        err = (from_torch(mha)(x, c if kdim else None) - expected).abs().max().item()
        worst["MultiheadAttention"] = max(worst["MultiheadAttention"], err)
    return worst


@torch.no_grad()
def speed(tokens: int, dim: int, heads: int, repeats: int, device: str) -> tuple[float, float]:
    ours = _randomise(Attention(dim, heads=heads)).to(device)
    theirs = convert.to_diffusers(ours).eval().to(device)
    x = torch.randn(1, tokens, dim, device=device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    runs = {"sdlearn": [], "diffusers": []}
    fns = {"sdlearn": lambda: ours(x), "diffusers": lambda: theirs(x)}
    for fn in fns.values():  # warm-up
        fn()
        sync()
    for r in range(repeats):
        for name in (list(fns) if r % 2 == 0 else list(fns)[::-1]):
            t = time.perf_counter()
            fns[name]()
            sync()
            runs[name].append(time.perf_counter() - t)
    return statistics.median(runs["sdlearn"]), statistics.median(runs["diffusers"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--dim", type=int, default=320)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    torch.manual_seed(0)
    for name, err in parity().items():
        print(f"parity, max |difference| vs {name:18}: {err:.2e}")
    t_ours, t_theirs = speed(args.tokens, args.dim, args.heads, args.repeats, args.device)
    print(f"forward, {args.tokens} tokens, dim {args.dim}, {args.heads} heads, {args.device}: "
          f"sdlearn {t_ours * 1e3:.2f} ms, diffusers {t_theirs * 1e3:.2f} ms, ratio {t_ours / t_theirs:.2f} "
          f"(medians of {args.repeats})")


if __name__ == "__main__":
    main()
