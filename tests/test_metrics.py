"""Tests for the judge (sdlearn.metrics): right on clean images, strict on wrong captions, graceful on bad ones."""
import time

import numpy as np
import pytest
import torch
from torchvision.transforms.functional import gaussian_blur

from sdlearn.data import (
    COLORS,
    POSITION_XY,
    POSITIONS,
    SHAPES,
    ShapeObject,
    ShapesDataset,
    caption,
    parse_caption,
    render,
)
from sdlearn.metrics import (
    DetectedObject,
    clearly_differ,
    detect_batch,
    detect_objects,
    judge_report,
    prompt_adherence,
    score,
)

KEYS = {"exact", "color", "shape", "position", "count"}



def make_set(size: int, split: str, n: int = 500, seed: int = 1):
    ds = ShapesDataset(size=size, split=split, seed=seed)
    images, captions = zip(*(ds[i] for i in range(n)))
    return torch.stack(images), list(captions)


@pytest.fixture(scope="module")
def heldout32():
    return make_set(32, "heldout")


# -----------------------------------------------------------------------------
# right on clean images


@pytest.mark.parametrize("size", [32, 64])
@pytest.mark.parametrize("split", ["train", "heldout"])
def test_clean_images_score_high(size, split):
    images, captions = make_set(size, split)
    report = judge_report(images, captions)
    for n_objects in (1, 2):  # both kinds of scene are present and judged right
        subset = [r for r in report if len(parse_caption(r["caption"])) == n_objects]
        assert len(subset) > 150
        assert sum(r["exact"] for r in subset) / len(subset) >= 0.99
    result = prompt_adherence(images, captions)
    assert set(result) == KEYS and all(isinstance(v, float) for v in result.values())
    assert all(v >= 0.99 for v in result.values()), result


def test_clean_images_16px_mostly_right():
    images, captions = make_set(16, "train", n=300)
    assert prompt_adherence(images, captions)["exact"] >= 0.95


def test_detect_objects_on_a_known_scene():
    objects = [ShapeObject("yellow", "triangle", "top"), ShapeObject("magenta", "cross", "center")]
    found = detect_objects(render(objects, 32))
    assert all(isinstance(d, DetectedObject) for d in found)
    assert {(d.color, d.shape, d.position) for d in found} == {(o.color, o.shape, o.position) for o in objects}
    for d in found:
        x, y = POSITION_XY[d.position]
        assert abs(d.centroid[0] - x) < 0.06 and abs(d.centroid[1] - y) < 0.06
        assert 0.3 * (0.28 * 32) ** 2 < d.area < (0.28 * 32) ** 2  # a fraction of its bounding box, in pixels
    assert detect_objects(-torch.ones(3, 32, 32)) == []  # black: nothing there


@pytest.mark.parametrize("size", [16, 32, 48, 64])
def test_every_colour_shape_position(size):
    """Every single object, with no jitter, at every size."""
    objects = [ShapeObject(c, s, p) for c in COLORS for s in SHAPES for p in POSITIONS]
    images = torch.stack([render([o], size) for o in objects])
    assert prompt_adherence(images, [caption([o]) for o in objects])["exact"] == 1.0


# -----------------------------------------------------------------------------
# strict on wrong captions: changing one thing must be caught, every time


def _change(captions, what, seed=0):
    """Each caption with exactly one thing changed: an object's color/shape/position, or an object dropped/added."""
    rng = np.random.default_rng(seed)
    out = []
    for c in captions:
        objects = parse_caption(c)
        k = int(rng.integers(len(objects)))
        o = objects[k]
        free = [p for p in POSITIONS if p not in {o.position for o in objects}]
        if what == "color":
            objects[k] = ShapeObject(rng.choice([x for x in COLORS if x != o.color]), o.shape, o.position)
        elif what == "shape":
            objects[k] = ShapeObject(o.color, rng.choice([x for x in SHAPES if x != o.shape]), o.position)
        elif what == "position":
            objects[k] = ShapeObject(o.color, o.shape, rng.choice(free))
        elif what == "drop":
            del objects[k]
        elif what == "add":
            objects.append(ShapeObject(rng.choice(COLORS), rng.choice(SHAPES), rng.choice(free)))
        out.append(caption(objects))
    return out


@pytest.mark.parametrize("what, attribute", [("color", "color"), ("shape", "shape"), ("position", "position"),
                                             ("drop", "count"), ("add", "count")])
def test_one_change_is_always_caught(heldout32, what, attribute):
    images, captions = heldout32
    if what == "drop":  # only scenes with 2 objects can lose one
        keep = [i for i, c in enumerate(captions) if " and " in c]
        images, captions = images[keep], [captions[i] for i in keep]
    changed = _change(captions, what)
    assert all(a != b for a, b in zip(changed, captions))
    result = prompt_adherence(images, changed)
    assert result["exact"] == 0.0, result
    assert result[attribute] == 0.0, result
    if what in ("color", "shape"):  # the other attributes are still judged right
        assert all(result[k] >= 0.99 for k in KEYS - {"exact", attribute}), result
    if what == "position":  # (a moved object may be matched to the other detection, so only count is sure)
        assert result["count"] >= 0.99, result


def test_someone_elses_caption(heldout32):
    images, captions = heldout32
    assert prompt_adherence(images, captions[1:] + captions[:1])["exact"] < 0.05


def test_score_rules():
    red_left, blue_right = ShapeObject("red", "circle", "left"), ShapeObject("blue", "square", "right")

    def det(color, shape, position):
        return DetectedObject(color, shape, position, 50.0, POSITION_XY[position])

    assert score([det("blue", "square", "right"), det("red", "circle", "left")], [red_left, blue_right])["exact"]
    assert not score([det("red", "circle", "left")], [red_left, blue_right])["exact"]
    one = score([det("red", "circle", "left")] * 2, [red_left])
    assert not one["count"] and one["color"] and not one["exact"]
    missing = score([], [red_left])
    assert not any(missing.values())


# -----------------------------------------------------------------------------
# graceful on corrupted images


def test_blur_degrades_gracefully(heldout32):
    images, captions = heldout32
    exact = {s: prompt_adherence(gaussian_blur(images, 9, s), captions)["exact"] for s in (0.5, 1.0, 2.0, 3.0)}
    assert exact[0.5] >= 0.95 and exact[1.0] >= 0.9, exact
    assert exact[0.5] >= exact[1.0] >= exact[2.0] >= exact[3.0], exact
    assert exact[3.0] < 0.3, exact


def test_noise_degrades_gracefully(heldout32):
    images, captions = heldout32
    gen = torch.Generator().manual_seed(0)
    exact = {s: prompt_adherence((images + s * torch.randn(images.shape, generator=gen)).clamp(-1, 1),
                                 captions)["exact"] for s in (0.1, 0.2, 0.6, 1.0)}
    assert exact[0.1] >= 0.95 and exact[0.2] >= 0.9, exact
    assert exact[0.1] >= exact[0.2] >= exact[0.6] >= exact[1.0], exact
    assert exact[1.0] < 0.05, exact


def test_an_image_with_no_objects_scores_near_zero_on_every_attribute(heldout32):
    """Pure noise has coloured blobs but no object on a dark ground: it must not score position (or anything) for
    free; nor may a blank image."""
    images, captions = heldout32
    pure_noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(0)).clamp(-1, 1)
    for name, fake in (("pure noise", pure_noise), ("a blank image", -torch.ones_like(images))):
        result = prompt_adherence(fake, captions)
        assert all(v <= 0.02 for v in result.values()), (name, result)


# -----------------------------------------------------------------------------
# interface


def test_bad_inputs(heldout32):
    images, captions = heldout32
    with pytest.raises(ValueError, match=r"one caption per image: 500 images, got 499 captions"):
        prompt_adherence(images, captions[:-1])
    with pytest.raises(ValueError, match="got a single str"):
        prompt_adherence(images[:1], captions[0])
    for bad in (images[0], images[:, :1], images[:, :, :, :16], images[:, :, :8, :8], images.numpy()):
        with pytest.raises(ValueError, match=r"images must be a tensor \[N,3,H,W\] with H == W >= 16"):
            prompt_adherence(bad, captions)
    with pytest.raises(ValueError, match="cannot parse caption 'a purple blob'"):
        prompt_adherence(images[:2], [captions[0], "a purple blob"])
    with pytest.raises(ValueError, match=r"image must be a tensor \[3,H,W\]"):
        detect_objects(images)


def test_batch_and_single_agree(heldout32):
    images, _ = heldout32
    batch = detect_batch(images[:20])
    assert batch == [detect_objects(img) for img in images[:20]]


def test_speed():
    images, captions = make_set(32, "train", n=1000)
    prompt_adherence(images[:8], captions[:8])  # warm up (templates are built once per size)
    start = time.perf_counter()
    prompt_adherence(images, captions)
    assert time.perf_counter() - start < 10  # ~0.5 s on one core


def test_clearly_differ_weighs_a_difference_against_its_standard_error():
    # 0.575 vs 0.595 on 200 prompts: the difference's standard error is 0.049, so 0.02 is noise; 0.70 vs 0.575 is
    # 2.6 of them
    assert not clearly_differ(0.575, 0.595, 200)
    assert clearly_differ(0.70, 0.575, 200)
    assert not clearly_differ(0.70, 0.575, 30), "on 30 prompts the same gap is within noise"
    assert clearly_differ(0.5, 0.6, 1000, 1000) and not clearly_differ(0.5, 0.6, 10, 1000)
    assert not clearly_differ(1.0, 1.0, 5)
    with pytest.raises(ValueError, match=r"rates in \[0, 1\] .*got 1.5 of 10"):
        clearly_differ(1.5, 0.5, 10)
