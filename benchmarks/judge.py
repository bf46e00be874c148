"""How trustworthy is the judge? Exact adherence on clean, blurred and noised shapes images.

    python benchmarks/judge.py [--n 1000]

Prints one table per image size: clean train / held-out images, held-out images under Gaussian blur and
additive Gaussian noise, and with another image's caption (which should score near 0).
"""
import argparse
import time

import torch
from torchvision.transforms.functional import gaussian_blur

from sdlearn.data import ShapesDataset
from sdlearn.metrics import prompt_adherence


def batch(split, size, n, seed=1):
    ds = ShapesDataset(size=size, split=split, seed=seed)
    images, captions = zip(*(ds[i] for i in range(n)))
    return torch.stack(images), list(captions)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--sizes", type=int, nargs="+", default=[16, 32, 64])
    args = ap.parse_args()
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    for size in args.sizes:
        rows = []
        for split in ("train", "heldout"):
            x, c = batch(split, size, args.n)
            t = time.perf_counter()
            rows.append((f"clean {split}", prompt_adherence(x, c)["exact"]))
            seconds = time.perf_counter() - t
        rows.append(("someone else's caption", prompt_adherence(x, c[1:] + c[:1])["exact"]))
        for sigma in (0.5, 1.0, 1.5, 2.0):
            s = sigma * size / 32
            blurred = gaussian_blur(x, 2 * round(3 * s) + 1, s)
            rows.append((f"blur sigma {sigma} px@32", prompt_adherence(blurred, c)["exact"]))
        for std in (0.1, 0.2, 0.4, 0.8):
            noisy = (x + std * torch.randn(x.shape, generator=gen)).clamp(-1, 1)
            rows.append((f"noise std {std}", prompt_adherence(noisy, c)["exact"]))
        print(f"\n{size} px, {args.n} images per row ({seconds:.2f} s to judge {args.n} images, 1 thread)")
        print("| images | exact |\n| --- | --- |")
        for name, v in rows:
            print(f"| {name} | {v:.3f} |")


if __name__ == "__main__":
    main()
