"""Notebook 09's control maps (sdlearn.data.render_map, MapShapesDataset, parse_scene, the render-map command) and
its layout judge (sdlearn.metrics.layout_iou, layout_adherence)."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sdlearn.data import (
    COLOR_RGB,
    MAP_KINDS,
    SCRIBBLE_JITTER,
    SCRIBBLE_WIDTH,
    SEG_PALETTE,
    SHAPES,
    MapShapesDataset,
    Placement,
    ShapeObject,
    object_masks,
    parse_caption,
    place,
    render_map,
)

PERIMETER = {"circle": math.pi, "square": 4.0, "triangle": 1 + math.sqrt(5), "cross": 4.0}  # in units of the side


def _near(mask: torch.Tensor, r: int) -> torch.Tensor:
    """[H,W] bool -> the pixels within r px (Chebyshev) of it."""
    return F.max_pool2d(mask[None, None].float(), 2 * r + 1, 1, r)[0, 0] > 0


@pytest.fixture(scope="module")
def scenes():
    ds = MapShapesDataset(32, seed=1, length=60)
    return [ds.placements(i) for i in range(60)]


def test_segmentation_map_paints_object_masks_in_the_shapes_palette(scenes):
    colours = {tuple(c) for c in SEG_PALETTE.values()}
    assert set(SEG_PALETTE) == set(SHAPES) and len(colours) == 4 and not colours & set(COLOR_RGB.values())
    for size in (32, 64):
        for placed in scenes[:20]:
            seg, masks = render_map(placed, size), object_masks(placed, size)  # [3,s,s], [n,s,s]
            assert seg.shape == (3, size, size) and seg.dtype == torch.float32
            assert torch.equal(seg.amax(0) > 0, masks.any(0))  # exactly the objects' pixels, black elsewhere
            for p, mask in zip(placed, masks):
                assert (seg[:, mask] == torch.tensor(SEG_PALETTE[p.obj.shape])[:, None]).all()


def test_maps_at_32_and_64_px_agree(scenes):
    ious = []
    for i, placed in enumerate(scenes):
        edges32 = render_map(placed, 32, "edges").amax(0) > 0
        near_outline = _near(edges32, 1)
        seg32, seg64 = render_map(placed, 32), F.avg_pool2d(render_map(placed, 64)[None], 2)[0]
        a, b = seg32.amax(0) > 0, seg64.amax(0) >= 0.5
        assert not ((a != b) & ~near_outline).any()  # they differ only on the outline
        ious.append(((a & b).sum() / (a | b).sum()).item())
        edges64 = F.max_pool2d(render_map(placed, 64, "edges")[None], 2)[0].amax(0) > 0
        assert not (edges64 & ~near_outline).any() and not (edges32 & ~_near(edges64, 1)).any()
        s32 = render_map(placed, 32, "scribble", np.random.default_rng(i)).amax(0) > 0
        s64 = F.avg_pool2d(render_map(placed, 64, "scribble", np.random.default_rng(i))[None], 2)[0].amax(0) >= 0.5
        ious.append(((s32 & s64).sum() / (s32 | s64).sum()).item())
    assert np.mean(ious[0::2]) > 0.85 and np.mean(ious[1::2]) > 0.8, (np.mean(ious[0::2]), np.mean(ious[1::2]))


def test_edges_are_thin_and_scribbles_thicker_and_jittered(scenes):
    for size in (32, 64):
        for k, placed in enumerate(scenes[:20]):
            masks = object_masks(placed, size)
            edges = render_map(placed, size, "edges")
            assert edges.shape == (3, size, size) and set(edges.unique().tolist()) <= {0.0, 1.0}
            on = edges[0] > 0
            inner = -F.max_pool2d(-masks[:, None].float(), 3, 1, 1)[:, 0] > 0  # 3x3 erosion
            assert not (on & ~masks.any(0)).any() and not (on & inner.any(0)).any()  # the objects' rims only
            perimeter = sum(PERIMETER[p.obj.shape] * p.s * size for p in placed)
            assert 0.6 < on.sum() / perimeter < 1.3, (on.sum(), perimeter)  # about 1 px wide
            rng = np.random.default_rng(k)
            scribble = render_map(placed, size, "scribble", rng)[0] > 0
            width = SCRIBBLE_WIDTH * size  # 2 px at 32 px
            assert 0.6 * width < scribble.sum() / perimeter < 1.6 * width
            assert not (scribble & ~_near(on, math.ceil((SCRIBBLE_JITTER + SCRIBBLE_WIDTH / 2) * size) + 1)).any()
    placed = scenes[0]
    one, again = (render_map(placed, 32, "scribble", np.random.default_rng(7)) for _ in range(2))
    other, smooth = render_map(placed, 32, "scribble", np.random.default_rng(8)), render_map(placed, 32, "scribble")
    assert torch.equal(one, again) and not torch.equal(one, other) and not torch.equal(one, smooth)


def test_map_dataset_is_deterministic_and_in_range():
    ds = MapShapesDataset(32, kind="scribble", seed=3, length=40)
    edges = MapShapesDataset(32, kind="edges", seed=3, length=40)
    counts, centres = set(), []
    for i in range(40):
        image, text, control = ds[i]
        again = MapShapesDataset(32, kind="scribble", seed=3, length=40)[i]
        assert torch.equal(image, again[0]) and text == again[1] and torch.equal(control, again[2])
        assert image.shape == control.shape == (3, 32, 32) and -1 <= image.min() and image.max() <= 1
        assert 0 <= control.min() and control.max() <= 1 and control.amax() == 1
        placed = ds.placements(i)
        assert [p.obj for p in placed] == parse_caption(text)  # the caption is exact
        assert torch.equal(edges[i][0], image) and torch.equal(edges[i][2], render_map(placed, 32, "edges"))
        counts.add(len(placed))
        centres += [(p.cx, p.cy, p.s) for p in placed]
    assert counts == {1, 2} and np.std(centres, 0).min() > 0.04  # anywhere, any size
    assert not torch.equal(ds[0][0], MapShapesDataset(32, kind="scribble", seed=4, length=40)[0][0])
    assert all(len(MapShapesDataset(32, seed=0, max_objects=1, length=5).placements(i)) == 1 for i in range(5))


def test_bad_map_requests_say_what_came():
    placed = [place("red", "circle", 0.5, 0.5, 0.3)]
    with pytest.raises(ValueError, match=r"'depth'.*segmentation"):
        render_map(placed, 32, "depth")
    with pytest.raises(ValueError, match="got 8"):
        render_map(placed, 8)
    with pytest.raises(TypeError, match="ShapeObject"):
        render_map([ShapeObject("red", "circle", "left")], 32)
    with pytest.raises(ValueError, match=r"'canny'.*edges"):
        MapShapesDataset(32, kind="canny")
    assert torch.equal(render_map([], 16, "edges"), torch.zeros(3, 16, 16))
    assert isinstance(placed[0], Placement) and set(MAP_KINDS) == {"segmentation", "edges", "scribble"}


# -----------------------------------------------------------------------------
# the layout judge


@pytest.fixture(scope="module")
def clean32():
    ds = MapShapesDataset(32, seed=5, length=120)
    items = [ds[i] for i in range(120)]
    images, captions = torch.stack([image for image, _, _ in items]), [text for _, text, _ in items]
    return images, [ds.placements(i) for i in range(120)], captions


def _shifted(images: torch.Tensor, d: int) -> torch.Tensor:
    """Move the images' content d px to the right, black coming in on the left."""
    out = torch.full_like(images, -1.0)
    out[..., d:] = images[..., :images.shape[-1] - d]
    return out


def test_layout_iou_is_near_one_on_clean_renders(clean32):
    from sdlearn.metrics import layout_adherence, layout_iou, prompt_adherence

    images, scenes, captions = clean32
    iou = layout_iou(images, scenes)
    assert iou.shape == (120,) and iou.mean() >= 0.9 and iou.min() > 0.5, iou  # measured: mean 0.93 at 32 px
    ds = MapShapesDataset(64, seed=5, length=40)
    assert layout_iou(torch.stack([ds[i][0] for i in range(40)]), [ds.placements(i) for i in range(40)]).mean() > 0.95
    result = layout_adherence(images, scenes)
    assert result == pytest.approx({"iou": iou.mean().item(), **prompt_adherence(images, captions)})
    assert result["exact"] >= 0.95


def test_layout_iou_falls_as_the_objects_move(clean32):
    from sdlearn.metrics import object_ious

    images, scenes, _ = clean32
    sides = torch.tensor([p.s * 32 for s in scenes for p in s])  # each object's side in px
    means = []
    for d in (0, 1, 2, 4, 8):
        per = torch.cat(object_ious(_shifted(images, d) if d else images, scenes))
        means.append(per.mean().item())
        assert (per[sides + 1 < d] <= 0.02).all()  # moved past itself: no overlap left
    assert all(a > b for a, b in zip(means, means[1:])) and means[-1] < 0.1, means  # measured 0.93 0.68 0.48 0.23 0.03


def test_layout_iou_is_zero_without_the_object(clean32):
    from sdlearn.metrics import layout_iou, object_ious

    images, scenes, _ = clean32
    noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(0)).clamp(-1, 1)
    assert layout_iou(noise, scenes).max() <= 0.02 and layout_iou(-torch.ones_like(images), scenes).max() == 0
    two = next(k for k, s in enumerate(scenes) if len(s) == 2)
    a, b = scenes[two]
    other = next(c for c in COLOR_RGB if c not in (a.obj.color, b.obj.color))
    recoloured = [Placement(ShapeObject(other, a.obj.shape, a.obj.position), a.cx, a.cy, a.s), b]
    wrong_color = object_ious(images[two:two + 1], [recoloured])[0]
    right = object_ious(images[two:two + 1], [scenes[two]])[0]
    assert wrong_color[0] == 0 and wrong_color[1] == right[1] > 0.5
    shapes = [s for s in SHAPES if s != a.obj.shape]
    reshaped = [Placement(ShapeObject(a.obj.color, shapes[0], a.obj.position), a.cx, a.cy, a.s), b]
    assert object_ious(images[two:two + 1], [reshaped])[0][0] == 0


def test_layout_iou_rejects_scenes_that_do_not_fit(clean32):
    from sdlearn.metrics import layout_iou

    images, scenes, _ = clean32
    with pytest.raises(ValueError, match="120 images, got 119 scenes"):
        layout_iou(images, scenes[:-1])
    with pytest.raises(ValueError, match="got a list not of lists"):
        layout_iou(images[:1], scenes[0])  # one scene, not a list of them
    with pytest.raises(ValueError, match="empty scene"):
        layout_iou(images[:1], [[]])
    with pytest.raises(ValueError, match="ShapeObject"):
        layout_iou(images[:1], [[ShapeObject("red", "circle", "left")]])
    with pytest.raises(ValueError, match=r"\[N,3,H,W\]"):
        layout_iou(images[0], scenes[:1])


# -----------------------------------------------------------------------------
# scenes in words, and the render-map command


def test_parse_scene_places_objects_and_names_their_positions():
    from sdlearn.data import caption, parse_scene

    placed = parse_scene("a red circle at 0.3 0.6 size 0.25 and  A Blue square at .75 0.2 size 0.2")
    assert placed == [place("red", "circle", 0.3, 0.6, 0.25), place("blue", "square", 0.75, 0.2, 0.2)]
    assert caption([p.obj for p in placed]) == "a red circle on the left and a blue square at the top"
    for bad, where in (("a red blob at 0.3 0.6 size 0.2", "a red blob"), ("a red circle at 0.3 0.6", "0.6'"),
                       ("a red circle at 0.3 0.6 size 0.2 and", "and")):
        with pytest.raises(ValueError, match=rf"cannot parse scene .*{where}.*expected \"a <color> <shape> at"):
            parse_scene(bad)
    with pytest.raises(ValueError, match=r"1.5 0.6 size 0.2'.*outside \[0, 1\]"):
        parse_scene("a red circle at 1.5 0.6 size 0.2")
    with pytest.raises(ValueError, match="side outside"):
        parse_scene("a red circle at 0.5 0.6 size 0")


def test_render_map_command_writes_the_map_and_prints_the_caption(tmp_path, capsys):
    import subprocess
    import sys

    from PIL import Image

    from sdlearn.data import main, parse_scene

    scene, out = "a green triangle at 0.4 0.7 size 0.3 and a cyan cross at 0.8 0.45 size 0.25", tmp_path / "map.png"
    run = subprocess.run([sys.executable, "-m", "sdlearn.data", "render-map", scene, "--kind", "scribble", "--size",
                          "48", "--seed", "3", "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "a green triangle at the bottom and a cyan cross on the right"
    with Image.open(out) as image:
        pixels = torch.tensor(np.asarray(image.convert("RGB"))).permute(2, 0, 1).float() / 255
    assert torch.equal(pixels, render_map(parse_scene(scene), 48, "scribble", np.random.default_rng(3)))
    with pytest.raises(SystemExit) as exit_:  # the same command, in this process
        main(["render-map", "a green hexagon at 0.4 0.7 size 0.3", "--out", str(out)])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and len(err.strip().splitlines()) == 1
    assert "cannot parse scene" in err and "expected" in err and "hexagon" in err
