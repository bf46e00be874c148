"""The judge: does a generated image show what its shapes-dataset caption asks for?

prompt_adherence(images, captions) decodes every image with plain image processing, no learned model:
  1. foreground = saturated pixels (max - min channel > 0.5), each given the nearest of the 6 hues;
     (0.5, because two objects 1 px apart can't both cover more than half of two neighbouring pixels)
  2. objects = connected components of same-hue foreground (label propagation with a 3x3 max filter,
     batched); too-small components are dropped as specks, and so are components that do not stand on a dark
     ground (texture: the blobs of pure noise), so that an image with no objects has no detections;
  3. per object: colour = circular mean of its pixels' hue, shape = best match of its silhouette (centred on
     its centroid, scaled by its area) against templates of the 4 shapes rendered the same way,
     position = nearest anchor to its centroid;
then compares them with the parsed caption. detect_objects(image) shows what it saw.
layout_iou(images, placements) (notebook 09) asks, beside the caption, whether each object sits where and as large
as its scene placed it: the IoU of its pixels with those of the detected object of its colour and shape.

Assumes what the dataset guarantees: black background, saturated pure-hue objects, objects >= 1 px apart.
"""
from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cache

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.ops import roi_align
from torchvision.transforms.functional import gaussian_blur
from tqdm.auto import tqdm

from sdlearn.data import (
    COLOR_RGB,
    COLORS,
    POSITION_XY,
    POSITIONS,
    SHAPES,
    SIZE_RANGE,
    Placement,
    ShapeObject,
    ShapesDataset,
    object_masks,
    parse_caption,
    render,
)

FG_THRESHOLD = 0.5  # saturation (max - min channel, in [0,1]) above which a pixel is foreground
MIN_AREA = 0.007  # smallest object kept, as a fraction of the image area (a triangle is ~0.03)
# largest mean brightness (max channel, in [0,1]) of a component's surroundings (1 to 3 px outside it at 32 px,
# other components' neighbourhoods left out) for it to count as an object on black: a clean render's
# surroundings are 0 (a released model's at most 0.02), under blur of 2 px or noise of std 0.8 at most ~0.46; pure
# noise's blobs sit at 0.7 to 0.9 (tests/test_metrics.py: pure noise scores near 0 on every attribute)
SURROUND_MAX = 0.5
WINDOW = 1.25  # silhouette window half-width, in units of sqrt(object area)
TEMPLATE_RES = 16  # silhouettes are compared at 16x16
TEMPLATE_BLURS = (0.0, 0.75, 1.5)  # template variants: gaussian blur sigma, in pixels at 32 px (scaled with size)
HUES = torch.arange(len(COLORS)) * (2 * math.pi / len(COLORS))  # red 0, yellow 60, ... magenta 300 degrees
ANCHORS = torch.tensor([POSITION_XY[p] for p in POSITIONS])  # [5,2] (x,y) in unit coordinates


@dataclass(frozen=True)
class DetectedObject:
    color: str
    shape: str
    position: str
    area: float  # in pixels; anti-aliased edge pixels count partly
    centroid: tuple[float, float]  # (x, y) in unit coordinates, x right, y down


# -----------------------------------------------------------------------------
# decoding


def _hue_vectors(rgb: torch.Tensor) -> torch.Tensor:
    """[N,3,H,W] in [0,1] -> [N,2,H,W] (cos, sin) of hue scaled by saturation; pure hues have length = value."""
    r, g, b = rgb.unbind(1)
    return torch.stack([r - (g + b) / 2, (g - b) * (math.sqrt(3) / 2)], 1)


def _max3x3(x: torch.Tensor) -> torch.Tensor:
    """3x3 max filter over the last two dims (same as max_pool2d(x, 3, 1, 1) for x >= 0, much faster on CPU)."""
    p = F.pad(x, (1, 1, 1, 1))
    rows = torch.maximum(torch.maximum(p[..., :-2], p[..., 1:-1]), p[..., 2:])
    return torch.maximum(torch.maximum(rows[..., :-2, :], rows[..., 1:-1, :]), rows[..., 2:, :])


def _label_components(mask: torch.Tensor) -> torch.Tensor:
    """8-connected components of each plane. mask [M,H,W] bool -> labels [M,H,W] float, 0 = background.

    Every pixel starts with its own id (1..H*W); ids spread to neighbours by a 3x3 max filter until nothing
    changes, so each component ends up labelled by the largest id it contains.
    """
    M, H, W = mask.shape
    m = mask.float()
    labels = torch.arange(1, H * W + 1, dtype=torch.float32).view(1, H, W) * m
    while True:
        new = labels
        for _ in range(4):  # a few steps between convergence checks
            new = _max3x3(new) * m
        if torch.equal(new, labels):
            return labels
        labels = new


@dataclass
class _Components:
    """Per-component tensors for a batch, K components in all."""
    image: torch.Tensor  # [K] long, which image
    color: torch.Tensor  # [K] long, index into COLORS
    area: torch.Tensor  # [K] float, soft area in pixels
    centroid: torch.Tensor  # [K,2] (x, y) in pixels
    silhouette: torch.Tensor  # [K,R,R] in [0,1], centred on the centroid, scaled by sqrt(area)
    pixels: torch.Tensor  # [K,H,W] bool, the component's own (foreground, same-hue, connected) pixels


def _dilate(mask: torch.Tensor, r: int) -> torch.Tensor:
    """[..., H, W] in [0,1] -> everything within r px (Chebyshev distance) of it."""
    for _ in range(r):
        mask = _max3x3(mask)
    return mask


def _surround_brightness(onehot: torch.Tensor, image: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """[K] mean brightness of each component's surroundings: the pixels r to 3r px outside it (r = 1 px at 32 px,
    scaled with the size) that lie near no other component. onehot [K,H,W] components, image [K] which image,
    value [N,H,W] brightness. A component with no such pixels (crowded by others, as in noise) scores 1."""
    r = max(1, round(onehot.shape[-1] / 32))
    near = _dilate(onehot, r)  # [K,H,W]
    covered = torch.zeros(value.shape).index_add_(0, image, near)  # [N,H,W] how many components are near
    alone = (covered[image] - near) < 0.5  # [K,H,W] near no other component
    surround = ((_dilate(near, 2 * r) - near) * alone).flatten(1)  # [K,H*W]
    pixels = surround.sum(1)
    return torch.where(pixels > 0, (surround * value[image].flatten(1)).sum(1) / pixels.clamp_min(1), 1.0)


def _components(images: torch.Tensor) -> _Components:
    """images [N,3,H,W] in [-1,1] -> the objects in them (before shape classification)."""
    N, _, H, W = images.shape
    rgb = ((images.float() + 1) / 2).clamp(0, 1)
    sat = rgb.amax(1) - rgb.amin(1)  # [N,H,W] saturation ("chroma"): 1 inside an object, 0 on black
    hue = _hue_vectors(rgb)  # [N,2,H,W]
    hue_class = (hue[:, 0:1] * HUES.cos().view(1, -1, 1, 1) + hue[:, 1:2] * HUES.sin().view(1, -1, 1, 1)).argmax(1)
    fg = sat > FG_THRESHOLD  # [N,H,W]
    per_hue = F.one_hot(hue_class, len(COLORS)).permute(0, 3, 1, 2).bool() & fg[:, None]  # [N,6,H,W]
    used = per_hue.flatten(2).any(2)  # [N,6] only label the (image, hue) planes that have pixels
    planes = torch.zeros(N, len(COLORS), H, W)
    planes[used] = _label_components(per_hue[used])
    labels = planes.sum(1).long()  # [N,H,W], the 6 hue planes don't overlap

    # number the components 0..K-1 across the batch, dropping specks now (a noisy image has hundreds)
    key = torch.arange(N).view(N, 1, 1) * (H * W + 1) + labels  # [N,H,W]
    keys, comp = torch.unique(key[fg], return_inverse=True)  # comp: [P] component of each fg pixel
    big = torch.bincount(comp, minlength=len(keys)) >= MIN_AREA * H * W / 2  # [K0]
    comp = torch.where(big[comp], torch.cumsum(big, 0)[comp] - 1, -1)  # [P] new ids, -1 = dropped
    keys = keys[big]
    K = len(keys)
    comp_map = torch.full((N, H, W), -1, dtype=torch.long)
    comp_map[fg] = comp
    image = keys // (H * W + 1)  # [K]

    # each component's soft mask: its pixels plus a 1-px ring (anti-aliased edges), weighted by saturation
    onehot = (comp_map[image] == torch.arange(K).view(K, 1, 1)).float()  # [K,H,W]
    ring = _max3x3(onehot)  # [K,H,W]
    on_black = _surround_brightness(onehot, image, rgb.amax(1)) <= SURROUND_MAX  # [K]
    soft = ring * sat[image]  # [K,H,W]
    core_sat = (onehot * sat[image]).flatten(1)  # [K,H*W]
    brightness = (core_sat**2).sum(1) / core_sat.sum(1).clamp_min(1e-6)  # [K] ~1 for a clean object
    soft = (soft / brightness.view(K, 1, 1)).clamp(max=1)
    area = soft.flatten(1).sum(1)  # [K]
    ys = torch.arange(H, dtype=torch.float32).view(1, H, 1) + 0.5
    xs = torch.arange(W, dtype=torch.float32).view(1, 1, W) + 0.5
    cx = (soft * xs).flatten(1).sum(1) / area.clamp_min(1e-6)
    cy = (soft * ys).flatten(1).sum(1) / area.clamp_min(1e-6)

    # colour: circular mean of hue over the component's pixels (vector sum)
    kept = comp >= 0
    hsum = torch.zeros(K, 2).index_add_(0, comp[kept], hue.permute(0, 2, 3, 1)[fg][kept])  # [K,2]
    angle = torch.atan2(hsum[:, 1], hsum[:, 0])  # [K]
    color = torch.remainder(torch.round(angle / (2 * math.pi / len(COLORS))), len(COLORS)).long()

    # silhouette: the soft mask in a window centred on the centroid, half-width WINDOW * sqrt(area)
    w = WINDOW * area.clamp_min(1).sqrt()
    boxes = torch.stack([torch.arange(K, dtype=torch.float32), cx - w, cy - w, cx + w, cy + w], 1)  # [K,5]
    sil = roi_align(soft[:, None], boxes, TEMPLATE_RES, spatial_scale=1.0, sampling_ratio=2, aligned=True)[:, 0]

    keep = (area >= max(MIN_AREA * H * W, 1.0)) & on_black
    centroid = torch.stack([cx, cy], 1)
    return _Components(image[keep], color[keep], area[keep], centroid[keep], sil[keep], onehot[keep] > 0)


@cache
def _templates(size: int) -> torch.Tensor:
    """[4,V,R*R] unit-norm silhouettes of SHAPES rendered at this image size and decoded like real objects;
    V variants: sharp and increasingly blurred (generated images are often soft)."""
    rng = np.random.default_rng(0)
    images, shapes = [], []
    for k, shape in enumerate(SHAPES):
        for _ in range(16):  # average over sub-pixel offsets and object sizes
            s = rng.uniform(*SIZE_RANGE)
            cx, cy = 0.5 + rng.uniform(-0.5, 0.5, size=2) / size
            images.append(render([Placement(ShapeObject("red", shape, "center"), cx, cy, s)], size))
            shapes.append(k)
    images, shapes = torch.stack(images), torch.tensor(shapes)
    variants = []
    for sigma in TEMPLATE_BLURS:
        sigma = sigma * size / 32
        blurred = gaussian_blur(images, 2 * math.ceil(3 * sigma) + 1, sigma) if sigma > 0 else images
        c = _components(blurred)
        sil, shape_of = c.silhouette.flatten(1), shapes[c.image]
        variants.append(torch.stack([sil[shape_of == k].mean(0) for k in range(len(SHAPES))]))
    return F.normalize(torch.stack(variants, 1), dim=2)  # [4,V,R*R]


def _decoded(images: torch.Tensor, chunk: int = 256) -> Iterator[tuple[slice, _Components, torch.Tensor]]:
    """images [N,3,H,W] in [-1,1], in chunks -> (the chunk's slice, its components, their shapes [K] (SHAPES index))."""
    templates = _templates(images.shape[-1])
    for start in range(0, len(images), chunk):
        c = _components(images[start:start + chunk])
        sim = torch.einsum("kd,svd->ksv", F.normalize(c.silhouette.flatten(1), dim=1), templates)  # [K,4,V] cosine
        yield slice(start, start + chunk), c, sim.amax(2).argmax(1)  # best shape over its variants


def _objects(c: _Components, shape: torch.Tensor, n: int, size: int) -> list[list[DetectedObject]]:
    """A chunk of n images' components -> for each image, its DetectedObjects (largest first)."""
    unit = c.centroid / size  # [K,2]
    position = torch.cdist(unit, ANCHORS).argmin(1)  # [K]
    found: list[list[DetectedObject]] = [[] for _ in range(n)]
    for k in torch.argsort(c.area, descending=True).tolist():
        found[int(c.image[k])].append(DetectedObject(
            COLORS[c.color[k]], SHAPES[shape[k]], POSITIONS[position[k]], round(float(c.area[k]), 2),
            (round(float(unit[k, 0]), 4), round(float(unit[k, 1]), 4))))
    return found


def _detect(images: torch.Tensor, chunk: int = 256) -> list[list[DetectedObject]]:
    found = []
    for part, c, shape in _decoded(images, chunk):
        found += _objects(c, shape, len(images[part]), images.shape[-1])
    return found


def _check_images(images: torch.Tensor) -> torch.Tensor:
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3 \
            or images.shape[2] != images.shape[3] or images.shape[2] < 16:
        got = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images must be a tensor [N,3,H,W] with H == W >= 16, in [-1,1]; got {got}")
    return images.detach().float().cpu()


def detect_batch(images: torch.Tensor) -> list[list[DetectedObject]]:
    """images [N,3,H,W] in [-1,1] -> for each image, the objects the judge sees (largest first)."""
    return _detect(_check_images(images))


def detect_objects(image: torch.Tensor) -> list[DetectedObject]:
    """image [3,H,W] in [-1,1] -> the objects the judge sees (largest first)."""
    if not isinstance(image, torch.Tensor) or image.ndim != 3:
        got = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise ValueError(f"image must be a tensor [3,H,W] (for a batch use detect_batch); got {got}")
    return detect_batch(image[None])[0]


# -----------------------------------------------------------------------------
# scoring

ATTRIBUTES = ("exact", "color", "shape", "position", "count")


def score(detected: Sequence[DetectedObject], wanted: Sequence[ShapeObject]) -> dict[str, bool]:
    """One image: each wanted object takes the unused detection nearest its position's anchor.

    color/shape/position: right for every wanted object (a wanted object with no detection left is wrong on
    all three); count: as many detections as wanted objects; exact: all of these.
    """
    unused = list(detected)
    right = {"color": True, "shape": True, "position": True}
    for w in wanted:
        if not unused:
            right = dict.fromkeys(right, False)
            continue
        ax, ay = POSITION_XY[w.position]
        d = min(unused, key=lambda d: (d.centroid[0] - ax) ** 2 + (d.centroid[1] - ay) ** 2)
        unused.remove(d)
        right["color"] &= d.color == w.color
        right["shape"] &= d.shape == w.shape
        right["position"] &= d.position == w.position
    right["count"] = len(detected) == len(wanted)
    right["exact"] = all(right.values())
    return right


def clearly_differ(p: float, q: float, n: int, m: int | None = None) -> bool:
    """Whether adherence rates p (a share of n prompts) and q (of m, default n) differ by more than two standard
    errors of their difference, sqrt(p(1-p)/n + q(1-q)/m) (two independent binomial proportions): a smaller
    difference is within what another draw of the judged prompts could move."""
    m = n if m is None else m
    if n < 1 or m < 1 or not (0 <= p <= 1 and 0 <= q <= 1):
        raise ValueError(f"clearly_differ: rates in [0, 1] over at least one prompt each, got {p} of {n}, {q} of {m}")
    return abs(p - q) > 2 * (p * (1 - p) / n + q * (1 - q) / m) ** 0.5


def judge_report(images: torch.Tensor, captions: Sequence[str]) -> list[dict]:
    """Per image: caption, what was detected, and which attributes are right."""
    images = _check_images(images)
    if isinstance(captions, str) or len(captions) != len(images):
        n = "a single str" if isinstance(captions, str) else f"{len(captions)} captions"
        raise ValueError(f"expected one caption per image: {len(images)} images, got {n}")
    wanted = [parse_caption(c) for c in captions]  # fail on a bad caption before the (slower) decoding
    detected = _detect(images)
    return [{"caption": c, "detected": d, **score(d, w)} for c, d, w in zip(captions, detected, wanted)]


def prompt_adherence(images: torch.Tensor, captions: Sequence[str]) -> dict[str, float]:
    """images [N,3,H,W] in [-1,1], N shapes-dataset captions -> fraction of images right on each attribute.

    Keys: exact (everything right), color, shape, position, count.
    """
    report = judge_report(images, captions)
    return {k: sum(r[k] for r in report) / max(len(report), 1) for k in ATTRIBUTES}


# -----------------------------------------------------------------------------
# layout adherence (notebook 09): is each object where, and as large as, the scene asked?


def _check_scenes(placements, n: int) -> list[list[Placement]]:
    nested = isinstance(placements, Sequence) and all(isinstance(s, Sequence) for s in placements)
    scenes = [list(s) for s in placements] if nested else None
    if scenes is None or len(scenes) != n:
        got = f"{len(scenes)} scenes" if scenes is not None else f"a {type(placements).__name__} not of lists"
        raise ValueError(f"expected one scene (a list of Placements) per image: {n} images, got {got}")
    bad = sorted({type(p).__name__ for s in scenes for p in s if not isinstance(p, Placement)})
    if bad or not all(scenes):
        got = f"items of type {', '.join(bad)}" if bad else "an empty scene"
        raise ValueError(f"each scene must be a non-empty list of Placements (sdlearn.data.Placement), got {got}")
    return scenes


def _ious(c: _Components, shape: torch.Tensor, scenes: Sequence[Sequence[Placement]], size: int) -> torch.Tensor:
    """A chunk's requested objects -> [J] IoU of each (object_masks) with the detected component of its colour and
    shape that overlaps it best (0 if there is none), J = all objects of all scenes in order."""
    wanted = torch.cat([object_masks(s, size) for s in scenes]).flatten(1).float()  # [J,H*W]
    which = torch.repeat_interleave(torch.arange(len(scenes)), torch.tensor([len(s) for s in scenes]))  # [J]
    color = torch.tensor([COLORS.index(p.obj.color) for s in scenes for p in s])  # [J]
    kind = torch.tensor([SHAPES.index(p.obj.shape) for s in scenes for p in s])  # [J]
    match = (which[:, None] == c.image) & (color[:, None] == c.color) & (kind[:, None] == shape)  # [J,K]
    found = c.pixels.flatten(1).float()  # [K,H*W]
    inter = wanted @ found.T  # [J,K]
    union = wanted.sum(1, keepdim=True) + found.sum(1) - inter
    iou = torch.where(match, inter / union.clamp_min(1), 0.0)
    return torch.cat([iou, torch.zeros(len(iou), 1)], 1).amax(1)


def _judge_layout(images: torch.Tensor, placements) -> tuple[list[list[DetectedObject]], list[torch.Tensor], list]:
    """Decode once -> (detections per image, per image [n_i] object IoUs, the scenes checked)."""
    images = _check_images(images)
    scenes = _check_scenes(placements, len(images))
    found, ious = [], []
    for part, c, shape in _decoded(images):
        chunk = scenes[part]
        found += _objects(c, shape, len(chunk), images.shape[-1])
        ious += list(_ious(c, shape, chunk, images.shape[-1]).split([len(s) for s in chunk]))
    return found, ious, scenes


def object_ious(images: torch.Tensor, placements: Sequence[Sequence[Placement]]) -> list[torch.Tensor]:
    """images [N,3,H,W] in [-1,1], per image the placed objects asked for -> per image [n_i] floats: each requested
    object's IoU between its pixels (object_masks at H) and the pixels of the detected object (connected
    component) of the same colour and shape that overlaps it best; 0 if the judge sees none."""
    return _judge_layout(images, placements)[1]


def layout_iou(images: torch.Tensor, placements: Sequence[Sequence[Placement]]) -> torch.Tensor:
    """images [N,3,H,W] in [-1,1], per image the placed objects asked for -> [N]: the mean over each image's
    requested objects of object_ious (1: every object exactly where and as large as asked, in its colour and
    shape; 0: none found there)."""
    return torch.stack([iou.mean() for iou in object_ious(images, placements)])


def layout_adherence(images: torch.Tensor, placements: Sequence[Sequence[Placement]]) -> dict[str, float]:
    """images [N,3,H,W] in [-1,1], per image its scene -> {"iou": mean layout_iou, and prompt_adherence's keys
    (exact, color, shape, position, count) on the scenes' captions}, from one decoding."""
    found, ious, scenes = _judge_layout(images, placements)
    right = [score(d, [p.obj for p in s]) for d, s in zip(found, scenes)]
    iou = torch.stack([i.mean() for i in ious]).mean().item()
    return {"iou": iou, **{k: sum(r[k] for r in right) / len(right) for k in ATTRIBUTES}}


# -----------------------------------------------------------------------------
# the judge set of the text-to-image notebooks (05 to 08)


def eval_prompts(n: int, size: int = 32, seed: int = 123) -> tuple[list[str], int]:
    """n judge prompts: the first half from the training split, the rest naming a held-out colour-shape pair.
    -> (captions, n_train)."""
    n_train = n // 2
    train, heldout = (ShapesDataset(size=size, split=s, seed=seed, length=max(n, 1)) for s in ("train", "heldout"))
    return [train[i][1] for i in range(n_train)] + [heldout[i][1] for i in range(n - n_train)], n_train


def adherence_by_group(images: torch.Tensor, captions: Sequence[str], n_train: int) -> dict[str, dict[str, float]]:
    """The judge's scores over all prompts and per group: one / two objects, training / held-out pairs."""
    count = [len(parse_caption(c)) for c in captions]
    groups = {"all": lambda i: True, "1 object": lambda i: count[i] == 1, "2 objects": lambda i: count[i] == 2,
              "1 object, train pairs": lambda i: count[i] == 1 and i < n_train,
              "1 object, held-out pair": lambda i: count[i] == 1 and i >= n_train,
              "2 objects, train pairs": lambda i: count[i] == 2 and i < n_train,
              "2 objects, held-out pair": lambda i: count[i] == 2 and i >= n_train}
    out = {}
    for name, keep in groups.items():
        idx = [i for i in range(len(captions)) if keep(i)]
        if idx:
            out[name] = {**prompt_adherence(images[idx], [captions[i] for i in idx]), "prompts": len(idx)}
    return out


@torch.no_grad()
def evaluate(pipe, n: int = 200, steps: int = 50, guidance_scale: float = 3.0, seed: int = 123,
             progress: bool = True) -> tuple[dict[str, dict[str, float]], torch.Tensor, list[str]]:
    """Judge a text-to-image pipeline (anything with .generate(prompts, steps, guidance_scale, seed=) and
    .image_size): one image for each of n judge prompts (half held-out), in batches of 100, then
    adherence_by_group. -> (scores by group, images, captions)."""
    captions, n_train = eval_prompts(n, pipe.image_size, seed)
    images = torch.cat([pipe.generate(captions[i:i + 100], steps, guidance_scale, seed=seed + i, progress=False)
                        for i in tqdm(range(0, n, 100), desc="judging", disable=not progress)])
    return adherence_by_group(images, captions, n_train), images, captions


# -----------------------------------------------------------------------------
# image measures beside the judge (notebook 07: what SDXL's refiner and micro-conditioning change)


def inside_frame(images: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """[N] bool: no foreground (a saturated pixel, as the judge sees it) touches the image border, i.e. every
    object is wholly inside the frame. images [N,3,H,W] in [-1,1]."""
    x = (images.float().clamp(-1, 1) + 1) / 2
    fg = (x.amax(1) - x.amin(1)) > threshold  # [N,H,W]
    border = torch.cat([fg[:, 0], fg[:, -1], fg[:, :, 0], fg[:, :, -1]], dim=1)  # [N, 4 sides]
    return ~border.any(1)


def sharpness(images: torch.Tensor) -> torch.Tensor:
    """[N] mean absolute difference between neighbouring pixels, on [0, 1]: hard edges score high, soft ones low."""
    x = (images.float().clamp(-1, 1) + 1) / 2
    return ((x[..., 1:, :] - x[..., :-1, :]).abs().mean((1, 2, 3)) + (x[..., 1:] - x[..., :-1]).abs().mean((1, 2, 3)))


def palette_distance(images: torch.Tensor) -> torch.Tensor:
    """[N] the mean distance (RGB, on [0, 1]) from each pixel to the nearest colour a clean render uses: black and
    the six pure hues. Clean renders score near 0 (anti-aliased edges only); blur, noise and smudges score higher."""
    palette = torch.tensor([(0.0, 0.0, 0.0), *COLOR_RGB.values()])  # [7, 3]
    x = ((images.float().clamp(-1, 1) + 1) / 2).movedim(1, -1)  # [N,H,W,3]
    d = (x[..., None, :] - palette).norm(dim=-1).amin(-1)  # [N,H,W]
    return d.mean((1, 2)) / math.sqrt(3)
