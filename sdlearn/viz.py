"""Pictures for the notebooks: image grids, loss curves. Images are [N,3,H,W] in [-1,1]."""
from __future__ import annotations

import textwrap

import matplotlib.pyplot as plt
import torch


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """[-1,1] -> [0,1], clamped: what matplotlib and image files expect."""
    return (images.detach().float().cpu().clamp(-1, 1) + 1) / 2


def show_images(images: torch.Tensor, captions: list[str] | None = None, ncols: int = 8,
                title: str | None = None, scale: float = 1.6):
    """Show a batch as a grid, each image under its (wrapped) caption."""
    images = to_unit(images)
    n = len(images)
    ncols = min(ncols, n)
    nrows = (n + ncols - 1) // ncols
    fig, axes = plt.subplots(nrows, ncols, figsize=(scale * ncols, scale * nrows * (1.3 if captions else 1)),
                             squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i, ax in enumerate(axes.flat[:n]):
        ax.imshow(images[i].permute(1, 2, 0).numpy(), interpolation="nearest")
        if captions:
            ax.set_title(textwrap.fill(captions[i], 18), fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    plt.show()
    return fig


def plot_losses(losses: list[float], title: str = "training loss", smooth: int = 20, ax=None):
    """Raw loss per step (faint) and its running mean."""
    ax = ax or plt.subplots(figsize=(5, 3))[1]
    t = torch.tensor(losses, dtype=torch.float64)
    ax.plot(t.numpy(), alpha=0.3, label="per step")
    if len(t) >= smooth > 1:
        ax.plot(range(smooth - 1, len(t)), t.unfold(0, smooth, 1).mean(1).numpy(), label=f"mean of {smooth}")
    ax.set(xlabel="step", ylabel="loss", title=title, yscale="log" if t.min() > 0 else "linear")
    ax.legend()
    return ax
