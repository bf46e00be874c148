"""Measuring what an idea buys: the same prompts and seeds, one thing changed, the judge's scores side by side.

    rows, images = refinement_table(sdxl_pipe, captions)          # base alone vs + refiner vs img2img, equal work
    rows, images = sweep(base, captions, "crop_top_left", [(0, 0), (8, 8)])   # one micro-condition varied
    print_table(encoder_ablation(base, captions))                 # SDXL's base without one of its encoders

The tables of notebook 07 and benchmarks/sdxl.py come from here; the models stay in their own modules.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from sdlearn.metrics import inside_frame, palette_distance, prompt_adherence, sharpness
from sdlearn.pipeline import Conditioner, TextToImage
from sdlearn.sdxl import SDXLConditioner, SDXLPipeline


def image_scores(images: torch.Tensor, captions: Sequence[str]) -> dict[str, float]:
    """The judge's exact rate (all prompts, and one-object prompts), the palette distance, the sharpness and the
    rate of images with every object inside the frame, over images [N,3,H,W] generated for captions."""
    one = [i for i, c in enumerate(captions) if " and " not in c]
    return {"exact": prompt_adherence(images, captions)["exact"],
            "1 object exact": prompt_adherence(images[one], [captions[i] for i in one])["exact"] if one else math.nan,
            "palette distance": palette_distance(images).mean().item(), "sharpness": sharpness(images).mean().item(),
            "inside frame": inside_frame(images).float().mean().item()}


def refinement_table(pipe: SDXLPipeline, captions: Sequence[str], steps: int = 50, guidance_scale: float = 3.0,
                     strength: float = 0.3) -> tuple[dict[str, dict[str, float]], dict[str, torch.Tensor]]:
    """Four ways to spend the UNet on the same prompts and seeds: the base alone; base + refiner on one trajectory
    (as many UNet evaluations); the base's image refined as img2img at `strength` (more evaluations); the same at
    equal compute (the base given that many fewer steps). -> ({way: image_scores + "UNet evaluations"}, images)."""
    extra = len(pipe.refiner.schedule.trajectory(steps, 1 - strength)) - 1  # the img2img steps
    fewer = max(1, steps - extra)

    finished = {}

    def base(n_steps):  # each step count's images once: the img2img rows start from the base-alone row's images
        if n_steps not in finished:
            finished[n_steps] = pipe.generate(captions, n_steps, guidance_scale, switch=1.0, progress=False)
        return finished[n_steps]

    def img2img(images):
        return pipe.refine(images, captions, strength, steps, guidance_scale, progress=False)

    ways = {f"base alone, {steps} steps": (lambda: base(steps), steps),
            f"base + refiner from {pipe.switch}": (lambda: pipe.generate(captions, steps, guidance_scale,
                                                                          progress=False), steps),
            f"base {steps} + img2img {strength}": (lambda: img2img(base(steps)), steps + extra),
            f"base {fewer} + img2img {strength}": (lambda: img2img(base(fewer)), fewer + extra)}
    rows, images = {}, {}
    for name, (run, evaluations) in ways.items():
        images[name] = run()
        rows[name] = {**image_scores(images[name], captions), "UNet evaluations": evaluations}
    return rows, images


def sweep(pipe: TextToImage, captions: Sequence[str], condition: str, values: Sequence, steps: int = 50,
          guidance_scale: float = 3.0) -> tuple[dict, dict]:
    """The same prompts and seeds under each value of one micro-condition (e.g. "crop_top_left": [(0, 0), (8, 8)])
    -> ({value: image_scores}, {value: images})."""
    rows, images = {}, {}
    for value in values:
        images[value] = pipe.generate(captions, steps, guidance_scale, progress=False, **{condition: value})
        rows[value] = image_scores(images[value], captions)
    return rows, images


def print_table(rows: dict[str, dict[str, float]]) -> None:
    """Rows of image_scores (and more columns), aligned."""
    columns = list(dict.fromkeys(c for row in rows.values() for c in row))

    def cell(value) -> str:
        return f"{value:17.4f}" if isinstance(value, float) else f"{value:>17}"

    print(f"{'':40}" + "".join(f"{c:>17}" for c in columns))
    for name, row in rows.items():
        print(f"{str(name):40}" + "".join(cell(row.get(c, "")) for c in columns))


class WithoutEncoder(Conditioner):
    """An SDXLConditioner with one encoder's share of the text zeroed at sampling time: which=1, the first's
    channels of the context; which=2, the second's channels and the pooled vector; which="pooled", the pooled vector
    alone. What does the UNet read?"""

    dropout_keys, takes = SDXLConditioner.dropout_keys, SDXLConditioner.takes

    def __init__(self, conditioner: SDXLConditioner, which: int):
        super().__init__()
        if which not in (1, 2, "pooled") or conditioner.text_encoder is None:
            raise ValueError(f"which must be 1, 2 or 'pooled', of a conditioner with two encoders; got {which!r}")
        self.inner, self.which = conditioner, which
        self.split = conditioner.text_encoder.config.width  # the first encoder's channels come first

    @property
    def dims(self) -> dict[str, int]:
        return self.inner.dims

    def encode(self, prompts: list[str], **conditions) -> dict[str, torch.Tensor]:
        cond = self.inner.encode(prompts, **conditions)
        keep = torch.arange(cond["context"].shape[-1], device=cond["context"].device) >= self.split  # the second's
        if self.which != "pooled":
            cond["context"] = cond["context"] * (keep if self.which == 1 else ~keep)
        if self.which != 1:
            cond["pooled"] = torch.zeros_like(cond["pooled"])
        return cond

    def encode_unconditional(self, n: int, **conditions) -> dict[str, torch.Tensor]:
        return self.inner.encode_unconditional(n, **conditions)


def encoder_ablation(base: TextToImage, captions: Sequence[str], steps: int = 50,
                     guidance_scale: float = 3.0) -> dict[str, dict[str, float]]:
    """The judge on the base with both encoders, with each one's share zeroed, and with the pooled vector alone
    zeroed -> {label: image_scores}."""
    rows = {}
    for label, conditioner in (("both encoders", base.conditioner),
                               ("without the first (CLIP-L's role)", WithoutEncoder(base.conditioner, 1)),
                               ("without the second (bigG's), pooled too", WithoutEncoder(base.conditioner, 2)),
                               ("without the pooled vector only", WithoutEncoder(base.conditioner, "pooled"))):
        pipe = TextToImage(conditioner, base.denoiser, base.schedule, base.vae, image_size=base.image_size)
        rows[label] = image_scores(pipe.generate(captions, steps, guidance_scale, progress=False), captions)
    return rows
