"""The recipe of the released shapes text encoder (notebook 02): CLIP's contrastive pretraining of a text encoder
against an image encoder on rendered shapes with their captions.

    python -m sdlearn train clip --size 32 --steps 4000 --pool 30000 --threads 1 --release   # shapes-clip-32
    python -m sdlearn eval clip                                                              # its retrieval

The release is two files: shapes-clip (the text encoder every later notebook conditions on) and shapes-clip-image
(its training partner, for measuring retrieval). shapes-clip-g is SDXL's second, wider text encoder, trained by the
same recipe (notebook 07), and shapes-clip-bidir (RELEASE_BIDIR) a bidirectional one for SD3's T5 role (notebook 08):

    python -m sdlearn train clip --name shapes-clip-g --width 128 --layers 4 --heads 8 --activation gelu \
        --size 32 --steps 4000 --pool 30000 --threads 1 --release
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from sdlearn import pretrained
from sdlearn.clip import CLIP, ImageEncoder, ImageEncoderConfig, retrieval
from sdlearn.course import seed_everything
from sdlearn.data import ShapesDataset, render_pool
from sdlearn.recipes import Recipe, Release, command, option, parser, reproduce, set_threads, settings
from sdlearn.text import TextConfig, TextEncoder, Tokenizer
from sdlearn.train import History, TrainConfig, fit

RELEASE = "python -m sdlearn train clip --size 32 --steps 4000 --pool 30000 --threads 1 --release"
RELEASE_BIDIR = ("python -m sdlearn train clip --name shapes-clip-bidir --width 128 --layers 4 --heads 8 "
                 "--activation gelu --attention bidirectional --size 32 --steps 3000 --pool 30000 --threads 1 "
                 "--release")
RELEASE_G = ("python -m sdlearn train clip --name shapes-clip-g --width 128 --layers 4 --heads 8 --activation gelu "
             "--size 32 --steps 4000 --pool 30000 --threads 1 --release")


@dataclass(frozen=True, kw_only=True)
class CLIPRecipe(Recipe):
    """The settings of notebook 02's CLIP: its text encoder is `text`, or TextConfig(width, layers, heads,
    activation) with a projection as wide as it (the released shapes-clip: 64 wide, 3 layers; shapes-clip-g, SDXL's
    second and larger encoder: 128 wide, 4 layers, GELU like OpenCLIP bigG; shapes-clip-bidir, in SD3's T5 role in
    notebook 08: as wide, and bidirectional); its image encoder `image`, or the default ImageEncoderConfig."""

    CHOICES = {"attention": {"causal": "CLIP", "bidirectional": "T5's encoder"}}

    size: int = option(32, "image size of the image encoder")
    steps: int = 1500
    batch_size: int = option(128, "training batch (no caption twice in a batch)")
    lr: float = 2e-3
    pool: int = option(10000, "training images rendered once and reused")
    eval_n: int = option(1000, "held-out images to measure retrieval on; 0: none")
    width: int = option(64, "the text encoder's width (and its projection's)")
    layers: int = option(3, "the text encoder's transformer blocks")
    heads: int = option(4, "attention heads per block")
    activation: str = option("quick_gelu", "the MLP's activation: quick_gelu (OpenAI CLIP) or gelu (OpenCLIP)")
    attention: str = option("causal", "causal (CLIP's text encoders) or bidirectional (T5's encoder; SD3's third "
                                      "encoder's role)")
    text: TextConfig | None = option(None, "the text encoder's whole configuration, instead of width, layers, heads, "
                                           "activation and attention", command_line=False)
    image: ImageEncoderConfig | None = option(None, "the image encoder's configuration", command_line=False)


@dataclass(frozen=True, kw_only=True)
class CLIPRelease(Release):
    """The command line's options around the CLIP recipe: the release's name."""

    name: str = option("shapes-clip", "release name (its image partner: <name>-image)")


def unique_caption_batches(images: torch.Tensor, captions: list[str], tokenizer: Tokenizer, batch_size: int,
                           seed: int = 0):
    """Endless (images, tokens) batches with no caption twice in a batch.

    CLIP's loss says caption i is the *only* right caption of image i; with a small vocabulary, a random
    batch often holds two images with the same caption, and the loss would push apart a right pair.
    """
    g = torch.Generator().manual_seed(seed)
    tokens = tokenizer(captions)  # [n, L]
    while True:
        order, batch, seen = torch.randperm(len(captions), generator=g).tolist(), [], set()
        for i in order:
            if captions[i] in seen:
                continue
            batch.append(i)
            seen.add(captions[i])
            if len(batch) == batch_size:
                yield images[batch], tokens[batch]
                batch, seen = [], set()


def clip_step(model: CLIP, batch) -> tuple[torch.Tensor, dict]:
    """The default loss_fn: CLIP.loss (the reference clip_loss) on a batch of (images, tokens)."""
    return model.loss(batch)


def train(recipe: CLIPRecipe, *, loss_fn: Callable = clip_step, callback: Callable | None = None,
          callback_every: int = 0, progress: bool = True) -> tuple[CLIP, Tokenizer, History, dict[str, float]]:
    """Train a CLIP on `recipe.pool` rendered shapes images -> (clip, tokenizer, History, held-out retrieval of
    recipe.eval_n).

    loss_fn(clip, (images, tokens)) -> loss or (loss, logs): CLIP.loss, or a learner's (notebook 02).
    callback(step, clip, None) every `callback_every` steps. With recipe.checkpoint_dir, a stopped run resumes."""
    r = recipe
    seed_everything(r.seed)
    text = r.text or TextConfig(width=r.width, layers=r.layers, heads=r.heads, projection_dim=r.width,
                                activation=r.activation, causal=r.attention == "causal")
    image = r.image or ImageEncoderConfig(image_size=r.size, embed_dim=text.pooled_dim)
    tok = Tokenizer(context_length=text.max_positions, vocab=text.vocab)
    clip = CLIP(TextEncoder(text), ImageEncoder(image)).to(r.device)
    images, captions = render_pool(ShapesDataset(size=r.size, split="train", seed=r.seed), r.pool, progress)
    batches = ((x.to(r.device), t.to(r.device))
               for x, t in unique_caption_batches(images, captions, tok, r.batch_size, r.seed))
    hist = fit(clip, loss_fn, batches,
               TrainConfig(steps=r.steps, lr=r.lr, warmup=100, callback_every=callback_every,
                           checkpoint_every=r.checkpoint_every, desc="clip"),
               callback=callback, progress=progress, checkpoint_dir=r.checkpoint_dir)
    if not r.eval_n:
        return clip, tok, hist, {}
    h_images, h_captions = render_pool(ShapesDataset(size=r.size, split="heldout", seed=r.seed), r.eval_n, progress)
    return clip, tok, hist, retrieval(clip, tok, h_images, h_captions)


def command_line():
    p, e = parser("clip", __doc__, CLIPRecipe, CLIPRelease)
    e.add_argument("--size", type=int, default=32)
    e.add_argument("--n", type=int, default=1000, help="held-out images")
    e.add_argument("--name", default="shapes-clip", help="the release to measure (shapes-clip or shapes-clip-g)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = command_line().parse_args(argv)
    start = time.perf_counter()
    if args.cmd == "eval":
        text = pretrained.load(args.name, args.size)
        clip = CLIP(text, pretrained.load(f"{args.name}-image", args.size))
        images, captions = render_pool(ShapesDataset(size=args.size, split="heldout", length=max(args.n, 1)), args.n)
        acc = retrieval(clip, Tokenizer.for_encoder(text), images, captions)
        print(f"held-out top-1 retrieval among {args.n}:", {k: round(v, 3) for k, v in acc.items()})
        reproduce(args.name, args.size, start)
        return 0
    r, run = settings(args)
    set_threads(run)
    clip, tok, hist, acc = train(r)
    clip = clip.cpu()
    print(f"trained {r.steps} steps in {hist.seconds / 60:.1f} min ({(time.perf_counter() - start) / 60:.1f} min "
          f"with rendering and evaluation); final loss {sum(hist.losses[-50:]) / len(hist.losses[-50:]):.3f}")
    print("held-out top-1 retrieval:", {k: round(v, 3) for k, v in acc.items()})
    if run.release or run.out:
        extra = {f"heldout_{k}": f"{v:.4f}" for k, v in acc.items()}
        for model, name in ((clip.text, run.name), (clip.image, f"{run.name}-image")):
            dest = Path(run.out).with_name(f"{name}-{r.size}.safetensors") if run.out else None
            print("wrote", pretrained.save(model, name, r.size, command("clip", argv), dest, **extra))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
