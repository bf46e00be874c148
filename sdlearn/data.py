"""Datasets for the course.

The main one is a tiny synthetic text-to-image dataset: coloured shapes on black, with captions that are
exactly true ("a red circle on the left and a blue square on the right"), so that a program
(sdlearn.metrics) can check whether a generated image follows its prompt. It is generated on the fly,
deterministically, with no downloads. For notebook 09 its scenes also place objects anywhere, at any size
(free_layout, MapShapesDataset, parse_scene), with control maps drawn from them (render_map: segmentation, edges,
scribble); `python -m sdlearn.data render-map "<scene>" --out map.png` draws one without code.

For learners with internet there are also thin wrappers that turn MNIST / Fashion-MNIST / CIFAR-10 and a
folder of image + .txt pairs into the same (image [3,size,size] in [-1,1], caption) form.
"""
from __future__ import annotations

import argparse
import math
import operator
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from PIL import Image
from torch.utils.data import Dataset
from torchvision import datasets
from tqdm.auto import tqdm

# -----------------------------------------------------------------------------
# vocabulary

COLORS = ("red", "yellow", "green", "cyan", "blue", "magenta")  # pure hues, 60 degrees apart
COLOR_RGB = {  # in [0,1]
    "red": (1.0, 0.0, 0.0),
    "yellow": (1.0, 1.0, 0.0),
    "green": (0.0, 1.0, 0.0),
    "cyan": (0.0, 1.0, 1.0),
    "blue": (0.0, 0.0, 1.0),
    "magenta": (1.0, 0.0, 1.0),
}
SHAPES = ("circle", "square", "triangle", "cross")  # triangle points up, cross is a plus sign
POSITIONS = ("left", "right", "top", "bottom", "center")
POSITION_XY = {  # anchor centres in unit coordinates (x right, y down)
    "left": (0.2, 0.5),
    "right": (0.8, 0.5),
    "top": (0.5, 0.2),
    "bottom": (0.5, 0.8),
    "center": (0.5, 0.5),
}
POSITION_PHRASES = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "center": "in the center",
}
# (colour, shape) pairs never seen in training: a Latin square, so every colour and every shape
# appears in at most one pair and each word is still seen with its other partners
HELDOUT_PAIRS = (("red", "triangle"), ("green", "cross"), ("blue", "circle"), ("yellow", "square"))
SPLITS = ("train", "heldout")

SIZE_RANGE = (0.26, 0.30)  # object side, as a fraction of the canvas
JITTER = 0.02  # max offset of an object's centre from its anchor, unit coordinates
SUPERSAMPLE = 4  # render at 4x and average-pool: anti-aliasing


@dataclass(frozen=True)
class ShapeObject:
    color: str
    shape: str
    position: str


def caption(objects: Sequence[ShapeObject]) -> str:
    """[ShapeObject("red","circle","left")] -> "a red circle on the left" (objects joined by " and ")."""
    return " and ".join(f"a {o.color} {o.shape} {POSITION_PHRASES[o.position]}" for o in objects)


_PHRASE_TO_POSITION = {v: k for k, v in POSITION_PHRASES.items()}
_OBJECT_RE = re.compile(
    rf"a ({'|'.join(COLORS)}) ({'|'.join(SHAPES)}) ({'|'.join(POSITION_PHRASES.values())})"
)
GRAMMAR = (
    '"a <color> <shape> <position phrase>[ and a <color> <shape> <position phrase>]" with '
    f"color in {{{', '.join(COLORS)}}}, shape in {{{', '.join(SHAPES)}}}, "
    f"position phrase in {{{', '.join(POSITION_PHRASES.values())}}}, each position used at most once"
)


def parse_caption(text: str) -> list[ShapeObject]:
    """Inverse of caption(): "a red circle on the left and ..." -> [ShapeObject("red","circle","left"), ...]."""
    if not isinstance(text, str):
        raise ValueError(f"caption must be a str, got {type(text).__name__}; expected {GRAMMAR}")
    parts = " ".join(text.strip().lower().split()).split(" and ")
    objects = []
    for part in parts:
        m = _OBJECT_RE.fullmatch(part)
        if m is None:
            raise ValueError(f"cannot parse caption {text!r} (at {part!r}); expected {GRAMMAR}")
        objects.append(ShapeObject(m[1], m[2], _PHRASE_TO_POSITION[m[3]]))
    positions = [o.position for o in objects]
    if len(set(positions)) != len(positions):
        raise ValueError(f"caption {text!r} puts two objects at the same position; expected {GRAMMAR}")
    return objects


# -----------------------------------------------------------------------------
# rendering


@dataclass(frozen=True)
class Placement:
    """An object placed on the canvas: centre (cx, cy) and side s, in unit coordinates."""
    obj: ShapeObject
    cx: float
    cy: float
    s: float


def _check_size(size) -> None:
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 16:
        raise ValueError(f"size must be an int >= 16, got {size!r}")


def _fit(placed: Sequence[Placement], margin: float) -> float:
    """Largest factor (capped at 1) the sides can be scaled by so that all bounding boxes are `margin` apart
    along x or along y."""
    f = 1.0
    for i, a in enumerate(placed):
        for b in placed[i + 1:]:
            f = min(f, (max(abs(a.cx - b.cx), abs(a.cy - b.cy)) - margin) / ((a.s + b.s) / 2))
    return f


def layout(objects: Sequence[ShapeObject], rng: np.random.Generator | None = None,
           margin: float = 1 / 32, tries: int = 100) -> list[Placement]:
    """Place objects near their anchors: side ~ U[0.26, 0.30], centre jitter ~ U[-0.02, 0.02].

    Resamples (with the same rng) until all bounding boxes are `margin` apart. If all `tries` draws fail
    (only on tiny canvases, where 1 px is a lot) the draw that needs the least shrinking is shrunk to fit.
    rng=None: no randomness, objects of side 0.28 on their anchors.
    """
    if rng is None:
        return _shrunk([[Placement(o, *POSITION_XY[o.position], sum(SIZE_RANGE) / 2) for o in objects]], margin)

    def near_anchors() -> list[Placement]:
        placed = []
        for o in objects:
            ax, ay = POSITION_XY[o.position]
            s = rng.uniform(*SIZE_RANGE)
            dx, dy = rng.uniform(-JITTER, JITTER, size=2)
            placed.append(Placement(o, ax + dx, ay + dy, s))
        return placed
    return _resample(near_anchors, margin, tries)


def _resample(draw_once: Callable[[], list[Placement]], margin: float, tries: int) -> list[Placement]:
    """draw_once() until all bounding boxes are `margin` apart; after `tries` failures, the best draw shrunk."""
    draws = []
    for _ in range(tries):
        placed = draw_once()
        if _fit(placed, margin) >= 1:
            return placed
        draws.append(placed)
    return _shrunk(draws, margin)


def _shrunk(draws: Sequence[list[Placement]], margin: float) -> list[Placement]:
    """The draw that needs the least shrinking, its sides shrunk (about their centres) until it fits."""
    best = max(draws, key=lambda placed: _fit(placed, margin))
    f = min(_fit(best, margin), 1.0)
    return [Placement(p.obj, p.cx, p.cy, p.s * f) for p in best]


# -----------------------------------------------------------------------------
# free layouts: objects anywhere, at any size (notebook 09 conditions on where they are)

FREE_SIZE_RANGE = (0.16, 0.40)  # object side in a free layout, as a fraction of the canvas
POSITION_MARGIN = 0.04  # a freely placed object is nearer its named anchor than any other by at least this


def centroid(p: Placement) -> tuple[float, float]:
    """A placed object's area centroid (x, y), unit coordinates: a triangle's sits s/6 below its box centre."""
    return p.cx, p.cy + (p.s / 6 if p.obj.shape == "triangle" else 0.0)


def position_at(x: float, y: float, margin: float = 0.0) -> str | None:
    """The named position whose anchor is nearest (x, y); None if another is nearer than that plus `margin`."""
    (d0, name), (d1, _) = sorted((math.hypot(x - ax, y - ay), k) for k, (ax, ay) in POSITION_XY.items())[:2]
    return name if d1 - d0 >= margin else None


def place(color: str, shape: str, cx: float, cy: float, s: float) -> Placement:
    """An object at any centre (cx, cy) and side s (unit coordinates); its named position, the one its caption
    says, is the anchor nearest its centroid."""
    if color not in COLORS or shape not in SHAPES:
        raise ValueError(f"expected a colour in {COLORS} and a shape in {SHAPES}, got {color!r} and {shape!r}")
    p = Placement(ShapeObject(color, shape, "center"), float(cx), float(cy), float(s))
    return Placement(ShapeObject(color, shape, position_at(*centroid(p))), p.cx, p.cy, p.s)


def _free_place(o: ShapeObject, s: float, rng: np.random.Generator, margin: float, tries: int = 100) -> Placement:
    """One object of side s, wholly inside the frame, its centroid unambiguously nearest its own anchor."""
    lo, hi = s / 2 + margin, 1 - s / 2 - margin
    for _ in range(tries):
        cx, cy = rng.uniform(lo, hi, size=2)
        p = Placement(o, float(cx), float(cy), s)
        if position_at(*centroid(p), POSITION_MARGIN) == o.position:
            return p
    ax, ay = POSITION_XY[o.position]  # (rare) the anchor itself, moved inside the frame
    return Placement(o, min(max(ax, lo), hi), min(max(ay, lo), hi), s)


def free_layout(objects: Sequence[ShapeObject], rng: np.random.Generator,
                size_range: tuple[float, float] = FREE_SIZE_RANGE, margin: float = 1 / 32,
                tries: int = 100) -> list[Placement]:
    """Place objects anywhere, at any size: side ~ U[size_range], centre uniform over the points that keep the
    object inside the frame (`margin` from the border) and its centroid nearest its named position's anchor by at
    least POSITION_MARGIN, so that the caption stays exact. Resamples until boxes are `margin` apart, as layout()."""
    lo, hi = size_range
    if not 0 < lo <= hi <= 0.6:
        raise ValueError(f"size_range must be (low, high) with 0 < low <= high <= 0.6, got {size_range!r}")
    return _resample(lambda: [_free_place(o, float(rng.uniform(lo, hi)), rng, margin) for o in objects],
                     margin, tries)


def shape_mask(shape: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Inside-test for a shape of side 2 centred at 0: x, y are coordinates relative to the centre / (s/2)."""
    if shape == "circle":
        return x**2 + y**2 <= 1
    if shape == "square":
        return (x.abs() <= 1) & (y.abs() <= 1)
    if shape == "triangle":  # apex at (0,-1), base from (-1,1) to (1,1)
        return (y <= 1) & (x.abs() <= (y + 1) / 2)
    if shape == "cross":  # plus sign, arms 1/3 of the side wide
        return ((x.abs() <= 1) & (y.abs() <= 1 / 3)) | ((y.abs() <= 1) & (x.abs() <= 1 / 3))
    raise ValueError(f"unknown shape {shape!r}, expected one of {SHAPES}")


def draw(placements: Sequence[Placement], size: int, supersample: int = SUPERSAMPLE) -> torch.Tensor:
    """Placements -> [3,size,size] in [-1,1]. No size check (SDXL's augmentation renders small originals)."""
    n = size * supersample
    u = (torch.arange(n, dtype=torch.float32) + 0.5) / n  # pixel centres in unit coordinates
    y, x = torch.meshgrid(u, u, indexing="ij")  # [n,n] each
    img = torch.zeros(3, n, n)
    for p in placements:
        inside = shape_mask(p.obj.shape, (x - p.cx) / (p.s / 2), (y - p.cy) / (p.s / 2))  # [n,n]
        rgb = torch.tensor(COLOR_RGB[p.obj.color]).view(3, 1, 1)
        img = torch.where(inside, rgb, img)
    img = F.avg_pool2d(img[None], supersample)[0]  # [3,size,size] in [0,1]
    return img * 2 - 1


def object_masks(placements: Sequence[Placement], size: int) -> torch.Tensor:
    """Each placed object's pixels (pixel centres inside its shape) at `size` px: [n, size, size] bool."""
    u = (torch.arange(size, dtype=torch.float32) + 0.5) / size
    y, x = torch.meshgrid(u, u, indexing="ij")
    return torch.stack([shape_mask(p.obj.shape, (x - p.cx) / (p.s / 2), (y - p.cy) / (p.s / 2)) for p in placements])


def render(objects: Sequence[ShapeObject | Placement], size: int, rng: np.random.Generator | None = None,
           supersample: int = SUPERSAMPLE) -> torch.Tensor:
    """Draw a scene -> [3,size,size] float32 in [-1,1], black background, anti-aliased.

    objects: ShapeObjects (laid out with layout(objects, rng, margin=1 px)) or ready Placements.
    """
    _check_size(size)
    size = int(size)
    if all(isinstance(o, ShapeObject) for o in objects):
        objects = layout(objects, rng, margin=1 / size)
    elif not all(isinstance(o, Placement) for o in objects):
        raise TypeError("objects must be all ShapeObjects or all Placements")
    return draw(objects, size, supersample)


# -----------------------------------------------------------------------------
# control maps (notebook 09): what a ControlNet is conditioned on, drawn from the placements at any size

MAP_KINDS = ("segmentation", "edges", "scribble")
SEG_PALETTE = {  # segmentation colour per shape class, in [0,1]; none is an object colour (COLOR_RGB), so the
    "circle": (1.0, 1.0, 1.0),  # white          map says where and which shape, the caption which colour
    "square": (1.0, 0.5, 0.0),  # orange
    "triangle": (0.0, 0.5, 1.0),  # azure
    "cross": (0.5, 0.0, 1.0),  # violet
}
SCRIBBLE_WIDTH = 2 / 32  # a scribble's stroke width, unit coordinates (2 px at 32 px)
SCRIBBLE_JITTER = 0.03  # largest offset of a scribble's stroke from the true outline, unit coordinates
SCRIBBLE_POINTS = 48  # vertices of a scribble's stroke (a closed polyline)
_OUTLINES = {  # polygon of each shape of side 2 centred at 0 (as shape_mask draws it), clockwise on screen
    "circle": tuple((math.cos(a), math.sin(a)) for a in np.linspace(0, 2 * math.pi, 64, endpoint=False)),
    "square": ((-1, -1), (1, -1), (1, 1), (-1, 1)),
    "triangle": ((0, -1), (1, 1), (-1, 1)),
    "cross": tuple((x / 3, y / 3) for x, y in ((-1, -3), (1, -3), (1, -1), (3, -1), (3, 1), (1, 1), (1, 3), (-1, 3),
                                               (-1, 1), (-3, 1), (-3, -1), (-1, -1))),
}


def _outline(masks: torch.Tensor) -> torch.Tensor:
    """[n,H,W] bool -> each mask's 1-px inner outline: its pixels with a 4-neighbour outside it (8-connected)."""
    p = F.pad(masks, (1, 1, 1, 1))
    inner = p[..., :-2, 1:-1] & p[..., 2:, 1:-1] & p[..., 1:-1, :-2] & p[..., 1:-1, 2:]
    return masks & ~inner


def _scribble_stroke(p: Placement, rng: np.random.Generator | None) -> torch.Tensor:
    """A placed object's outline as a closed polyline of SCRIBBLE_POINTS vertices [P,2] (x, y, unit coordinates),
    evenly spaced along it, each moved by a smooth random offset (3 harmonics along the loop, at most
    SCRIBBLE_JITTER); rng None: no offset."""
    poly = np.asarray(_OUTLINES[p.obj.shape], dtype=np.float64)  # [V,2]
    ends = np.roll(poly, -1, 0)
    arc = np.concatenate([[0], np.cumsum(np.linalg.norm(ends - poly, axis=1))])  # [V+1]
    t = np.linspace(0, arc[-1], SCRIBBLE_POINTS, endpoint=False)
    closed = np.concatenate([poly, poly[:1]])
    pts = np.stack([np.interp(t, arc, closed[:, 0]), np.interp(t, arc, closed[:, 1])], 1) * (p.s / 2) + (p.cx, p.cy)
    if rng is not None:
        k = np.arange(1, 4)  # harmonics
        amp = rng.uniform(-1, 1, size=(2, 3)) * SCRIBBLE_JITTER / 3
        phase = rng.uniform(0, 2 * math.pi, size=(2, 3))
        u = t[:, None, None] / arc[-1]  # [P,1,1] position along the loop in [0,1)
        pts = pts + (amp * np.cos(2 * math.pi * k * u + phase)).sum(-1)  # [P,2]
    return torch.tensor(pts, dtype=torch.float32)


def _stroke_mask(pts: torch.Tensor, size: int, width: float) -> torch.Tensor:
    """Pixels (centres) within width/2 of a closed polyline pts [P,2] (unit coordinates) -> [size,size] bool."""
    u = (torch.arange(size, dtype=torch.float32) + 0.5) / size
    y, x = torch.meshgrid(u, u, indexing="ij")
    q = torch.stack([x.flatten(), y.flatten()], 1)[:, None]  # [size*size,1,2]
    a, ab = pts, pts.roll(-1, 0) - pts  # [P,2] segment starts and directions
    t = (((q - a) * ab).sum(-1) / (ab * ab).sum(-1).clamp_min(1e-12)).clamp(0, 1)  # [size*size,P]
    dist = (q - a - t[..., None] * ab).norm(dim=-1).amin(1)  # [size*size]
    return (dist <= width / 2).view(size, size)


def render_map(placements: Sequence[Placement], size: int, kind: str = "segmentation",
               rng: np.random.Generator | None = None) -> torch.Tensor:
    """A scene's control map -> [3,size,size] float32 in [0,1], black ground, drawn from the placements (exact at
    any size, not resized):
    segmentation: each object's pixels (object_masks) in its shape's SEG_PALETTE colour;
    edges: each object's 1-px outline (its pixels with a 4-neighbour outside it), white;
    scribble: each object's outline as a stroke SCRIBBLE_WIDTH wide (2 px at 32 px), jittered by rng (at most
    SCRIBBLE_JITTER; rng None: not jittered), white."""
    if kind not in MAP_KINDS:
        raise ValueError(f"unknown map kind {kind!r}, expected one of {MAP_KINDS}")
    _check_size(size)
    size, placements = int(size), list(placements)
    if not all(isinstance(p, Placement) for p in placements):
        got = sorted({type(p).__name__ for p in placements})
        raise TypeError(f"placements must be a sequence of Placement, got {', '.join(got)}")
    out = torch.zeros(3, size, size)
    if not placements:
        return out
    if kind == "scribble":
        strokes = torch.stack([_stroke_mask(_scribble_stroke(p, rng), size, SCRIBBLE_WIDTH) for p in placements])
        return out + strokes.any(0)  # white
    masks = object_masks(placements, size)  # [n,size,size]
    if kind == "edges":
        return out + _outline(masks).any(0)
    for p, mask in zip(placements, masks):
        out = torch.where(mask, torch.tensor(SEG_PALETTE[p.obj.shape]).view(3, 1, 1), out)
    return out


_NUMBER = r"(\d*\.?\d+)"
_SCENE_RE = re.compile(rf"an? ({'|'.join(COLORS)}) ({'|'.join(SHAPES)}) at {_NUMBER} {_NUMBER} size {_NUMBER}")
SCENE_GRAMMAR = (
    '"a <color> <shape> at <x> <y> size <side>[ and a <color> <shape> at <x> <y> size <side> ...]" with '
    f"color in {{{', '.join(COLORS)}}}, shape in {{{', '.join(SHAPES)}}}, the centre x (right), y (down) in [0, 1] "
    "and the side in (0, 1], as fractions of the canvas"
)


def parse_scene(text: str) -> list[Placement]:
    """"a red circle at 0.3 0.6 size 0.25 and a blue square at 0.7 0.3 size 0.2" -> Placements (by place(): each
    object's named position is the anchor nearest its centroid, so caption() of their objects is the scene's)."""
    if not isinstance(text, str):
        raise ValueError(f"scene must be a str, got {type(text).__name__}; expected {SCENE_GRAMMAR}")
    placements = []
    for part in " ".join(text.strip().lower().split()).split(" and "):
        m = _SCENE_RE.fullmatch(part)
        if m is None:
            raise ValueError(f"cannot parse scene {text!r} (at {part!r}); expected {SCENE_GRAMMAR}")
        x, y, side = (float(v) for v in m.groups()[2:])
        if not (x <= 1 and y <= 1 and 0 < side <= 1):
            raise ValueError(f"scene {text!r}: {part!r} has a centre outside [0, 1] or a side outside (0, 1]; "
                             f"expected {SCENE_GRAMMAR}")
        placements.append(place(m[1], m[2], x, y, side))
    return placements


# -----------------------------------------------------------------------------
# the shapes dataset

_TRAIN_PAIRS = [(c, s) for c in COLORS for s in SHAPES if (c, s) not in HELDOUT_PAIRS]  # 20 pairs


@dataclass
class ShapesSample:
    image: torch.Tensor  # [3,H,W] float32 in [-1,1]
    caption: str
    objects: tuple[ShapeObject, ...]


class ShapesDataset(Dataset):
    """Coloured shapes on black with exact captions; ds[i] -> (image [3,size,size] in [-1,1], caption).

    Item i is a pure function of (seed, split, i). split="train" never shows a HELDOUT_PAIRS object;
    split="heldout" shows exactly one per image (the other object, if any, is a training pair).
    """

    def __init__(self, size: int = 32, split: str = "train", seed: int = 0, max_objects: int = 2,
                 length: int | None = None):
        _check_size(size)
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}, expected one of {SPLITS}")
        if max_objects not in (1, 2):
            raise ValueError(f"max_objects must be 1 or 2, got {max_objects!r}")
        if length is None:
            length = 50_000 if split == "train" else 1_000
        if isinstance(length, bool) or not isinstance(length, int) or length < 1:
            raise ValueError(f"length must be a positive int or None, got {length!r}")
        self.size, self.split, self.seed = int(size), split, int(seed)
        self.max_objects, self.length = max_objects, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> tuple[torch.Tensor, str]:
        sample = self.item(i)
        return sample.image, sample.caption

    def sample_objects(self, rng: np.random.Generator) -> list[ShapeObject]:
        """Draw the scene's objects: 1..max_objects, distinct positions, split-dependent pairs."""
        n = int(rng.integers(1, self.max_objects + 1))
        positions = [POSITIONS[k] for k in rng.choice(len(POSITIONS), size=n, replace=False)]
        pairs = [_TRAIN_PAIRS[k] for k in rng.integers(len(_TRAIN_PAIRS), size=n)]
        if self.split == "heldout":  # one object, chosen at random, gets a held-out pair
            pairs[int(rng.integers(n))] = HELDOUT_PAIRS[int(rng.integers(len(HELDOUT_PAIRS)))]
        return [ShapeObject(c, s, p) for (c, s), p in zip(pairs, positions)]

    def rng(self, i: int, stream: int = 0) -> np.random.Generator:
        """Item i's random numbers (stream 0: the scene; others for what later notebooks draw on top of it)."""
        return np.random.default_rng([self.seed, SPLITS.index(self.split), i, *([stream] if stream else [])])

    def scene(self, i: int) -> tuple[list[ShapeObject], list[Placement], np.random.Generator]:
        """Item i's objects and where they sit, and its random stream after drawing them (to draw more from)."""
        i = operator.index(i)
        if not -self.length <= i < self.length:
            raise IndexError(f"index {i} out of range for a dataset of length {self.length}")
        rng = self.rng(i % self.length)
        objects = self.sample_objects(rng)
        return objects, self.arrange(objects, rng), rng

    def arrange(self, objects: Sequence[ShapeObject], rng: np.random.Generator) -> list[Placement]:
        """Where a scene's objects sit: near their named anchors, 1 px apart (layout)."""
        return layout(objects, rng, margin=1 / self.size)

    def item(self, i: int) -> ShapesSample:
        objects, placements, _ = self.scene(i)
        return ShapesSample(draw(placements, self.size), caption(objects), tuple(objects))


def render_samples(dataset: ShapesDataset, n: int, progress: bool = True) -> list[ShapesSample]:
    """The first n samples of a shapes dataset, with their metadata (sizes, crop, quality), rendered once.

    Renders on one thread: drawing is many tiny tensor ops, which extra threads only slow down (by 10x and
    more when other programs share the cores).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return [dataset.item(i) for i in tqdm(range(n), desc="render", disable=not progress)]
    finally:
        torch.set_num_threads(threads)


def render_pool(dataset: ShapesDataset, n: int, progress: bool = True) -> tuple[torch.Tensor, list[str]]:
    """The first n items of a shapes dataset, rendered once: images [n, 3, H, W] and their captions."""
    samples = render_samples(dataset, n, progress)
    return torch.stack([s.image for s in samples]), [s.caption for s in samples]


class MapShapesDataset(ShapesDataset):
    """Notebook 09's scenes: objects anywhere, at any size (free_layout), captions exact, with each scene's control
    map; ds[i] -> (image [3,size,size] in [-1,1], caption, control [3,size,size] in [0,1], render_map of `kind`).

    Item i is a pure function of (seed, split, i), and its scene is the same for every kind (a scribble's jitter
    comes from the item's second random stream), so maps of different kinds can be compared on the same scenes.
    """

    def __init__(self, size: int = 32, kind: str = "segmentation", split: str = "train", seed: int = 0,
                 length: int | None = None, max_objects: int = 2):
        if kind not in MAP_KINDS:
            raise ValueError(f"unknown map kind {kind!r}, expected one of {MAP_KINDS}")
        super().__init__(size, split, seed, max_objects, length)
        self.kind = kind

    def arrange(self, objects: Sequence[ShapeObject], rng: np.random.Generator) -> list[Placement]:
        """Anywhere, at any size, 1 px apart, each centroid nearest its caption's anchor (free_layout)."""
        return free_layout(objects, rng, margin=1 / self.size)

    def placements(self, i: int) -> list[Placement]:
        """Where item i's objects sit (what its map and image are drawn from, and what layout_iou compares with)."""
        return self.scene(i)[1]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, str, torch.Tensor]:
        objects, placements, _ = self.scene(i)
        jitter = self.rng(operator.index(i) % self.length, stream=1)
        return draw(placements, self.size), caption(objects), render_map(placements, self.size, self.kind, jitter)


# -----------------------------------------------------------------------------
# real data (needs internet once, e.g. on Colab)


def _to_model_range(img, size: int) -> torch.Tensor:
    """PIL image -> RGB, shorter side resized to size, centre crop -> [3,size,size] float32 in [-1,1]."""
    img = TF.center_crop(TF.resize(img.convert("RGB"), size, antialias=True), size)
    return TF.pil_to_tensor(img).float() / 127.5 - 1


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


class TorchvisionCaptions(Dataset):
    """MNIST / Fashion-MNIST / CIFAR-10 with class-name captions; ds[i] -> (image [3,size,size] in [-1,1], caption).

    Captions: "a handwritten digit 7", "a photo of a sneaker", "a photo of a cat".
    """
    NAMES = ("mnist", "fashion-mnist", "cifar10")

    def __init__(self, name: str, root: str | Path, size: int = 32, train: bool = True, download: bool = False):
        if name not in self.NAMES:
            raise ValueError(f"unknown dataset {name!r}, supported: {', '.join(self.NAMES)}")
        cls = {"mnist": datasets.MNIST, "fashion-mnist": datasets.FashionMNIST, "cifar10": datasets.CIFAR10}[name]
        try:
            self.ds = cls(str(root), train=train, download=download)
        except RuntimeError as e:
            raise RuntimeError(f"{name} not found under {str(root)!r} ({e}); "
                               f"pass download=True to download it (needs internet)") from e
        self.name, self.size = name, size
        if name == "mnist":
            self.captions = [f"a handwritten digit {k}" for k in range(10)]
        else:  # "T-shirt/top" -> "t-shirt", "Ankle boot" -> "ankle boot"
            names = [c.split("/")[0].lower() for c in self.ds.classes]
            self.captions = [f"a photo of {_article(c)} {c}" for c in names]

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, str]:
        img, label = self.ds[i]
        return _to_model_range(img, self.size), self.captions[int(label)]


IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp")


class ImageCaptionFolder(Dataset):
    """A folder of images, each with a same-stem .txt caption (cat.png + cat.txt), searched recursively.

    ds[i] -> (image [3,size,size] in [-1,1], caption): RGB, shorter side resized to size, centre-cropped.
    """

    def __init__(self, root: str | Path, size: int = 32):
        self.root, self.size = Path(root), size
        layout_hint = "expected layout: root/name.png + root/name.txt (images: png, jpg, jpeg, webp)"
        if not self.root.is_dir():
            raise ValueError(f"{str(self.root)!r} is not a folder; {layout_hint}")
        files = sorted(p for p in self.root.rglob("*") if p.is_file())
        images = {p.with_suffix(""): p for p in files if p.suffix.lower() in IMAGE_EXTS}
        texts = {p.with_suffix(""): p for p in files if p.suffix.lower() == ".txt"}
        n_images = sum(p.suffix.lower() in IMAGE_EXTS for p in files)
        if n_images != len(images):
            raise ValueError(f"several images share a stem in {str(self.root)!r}; one image per caption, "
                             f"{layout_hint}")
        orphans = [images[k] for k in images.keys() - texts.keys()] + [texts[k] for k in texts.keys() - images.keys()]
        if orphans:
            names = ", ".join(sorted(str(p.relative_to(self.root)) for p in orphans))
            raise ValueError(f"files without a partner in {str(self.root)!r}: {names}; {layout_hint}")
        if not images:
            raise ValueError(f"no image/caption pairs found in {str(self.root)!r}; {layout_hint}")
        self.pairs = [(images[k], texts[k]) for k in sorted(images)]

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, str]:
        image_path, text_path = self.pairs[i]
        with Image.open(image_path) as img:
            image = _to_model_range(img, self.size)
        return image, text_path.read_text(encoding="utf-8").strip()


# -----------------------------------------------------------------------------
# command line


def main(argv: Sequence[str] | None = None) -> None:
    """python -m sdlearn.data render-map "<scene>" [--kind segmentation] [--size 32] [--seed 0] --out map.png:
    draws the scene's control map (render_map) to a PNG and prints the caption the scene has."""
    parser = argparse.ArgumentParser(prog="python -m sdlearn.data", description="The shapes data, without code.")
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("render-map", help="draw a scene's control map to a PNG and print its caption")
    p.add_argument("scene", help=f"the scene, {SCENE_GRAMMAR}")
    p.add_argument("--kind", default="segmentation", choices=MAP_KINDS, help="which map (default segmentation)")
    p.add_argument("--size", type=int, default=32, help="pixels per side, at least 16 (default 32)")
    p.add_argument("--seed", type=int, default=0, help="the scribble's jitter (default 0)")
    p.add_argument("--out", required=True, type=Path, help="the PNG file to write")
    args = parser.parse_args(argv)
    try:
        placements = parse_scene(args.scene)
        control = render_map(placements, args.size, args.kind, np.random.default_rng(args.seed))
        Image.fromarray((control * 255).round().byte().permute(1, 2, 0).numpy()).save(args.out, format="PNG")
    except (ValueError, OSError) as e:
        parser.exit(2, f"{parser.prog} render-map: error: {e}\n")
    for q in placements:
        if position_at(*centroid(q), POSITION_MARGIN) is None:
            print(f"note: the {q.obj.color} {q.obj.shape} is about as near another named position as the caption's "
                  f"'{POSITION_PHRASES[q.obj.position]}'", file=sys.stderr)
    print(caption([p.obj for p in placements]))


if __name__ == "__main__":
    main()
