"""Tests for sdlearn.data: the shapes dataset and the real-data loaders (on small fixtures, no downloads)."""
import itertools
import pickle
import struct

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from sdlearn.data import (
    COLOR_RGB,
    COLORS,
    HELDOUT_PAIRS,
    POSITION_PHRASES,
    POSITION_XY,
    POSITIONS,
    SHAPES,
    ImageCaptionFolder,
    Placement,
    ShapeObject,
    ShapesDataset,
    TorchvisionCaptions,
    caption,
    centroid,
    free_layout,
    layout,
    object_masks,
    parse_caption,
    place,
    position_at,
    render,
)

ALL_OBJECTS = [ShapeObject(c, s, p) for c in COLORS for s in SHAPES for p in POSITIONS]



# -----------------------------------------------------------------------------
# vocabulary and captions


def test_vocabulary():
    assert COLORS == ("red", "yellow", "green", "cyan", "blue", "magenta")
    assert SHAPES == ("circle", "square", "triangle", "cross")
    assert POSITIONS == ("left", "right", "top", "bottom", "center")
    for k, c in enumerate(COLORS):  # pure hues, 60 degrees apart, in order
        r, g, b = COLOR_RGB[c]
        assert max(r, g, b) == 1 and min(r, g, b) == 0
        hue = np.degrees(np.arctan2(np.sqrt(3) * (g - b), 2 * r - g - b)) % 360
        assert hue == pytest.approx(60 * k, abs=1e-6)
    assert POSITION_XY["left"][0] < POSITION_XY["center"][0] < POSITION_XY["right"][0]
    assert POSITION_XY["top"][1] < POSITION_XY["center"][1] < POSITION_XY["bottom"][1]


def test_heldout_pairs_are_a_latin_square():
    assert len(HELDOUT_PAIRS) == 4
    colors, shapes = zip(*HELDOUT_PAIRS)
    assert len(set(colors)) == 4 and len(set(shapes)) == 4
    assert set(colors) <= set(COLORS) and set(shapes) == set(SHAPES)


def test_caption_format():
    red_left, blue_right = ShapeObject("red", "circle", "left"), ShapeObject("blue", "square", "right")
    assert caption([red_left]) == "a red circle on the left"
    assert caption([red_left, blue_right]) == "a red circle on the left and a blue square on the right"
    assert caption([blue_right, red_left]) == "a blue square on the right and a red circle on the left"
    assert set(POSITION_PHRASES.values()) == {"on the left", "on the right", "at the top", "at the bottom",
                                              "in the center"}


def test_caption_round_trip_all_combinations():
    n = 0
    for a in ALL_OBJECTS:
        assert parse_caption(caption([a])) == [a]
        for b in ALL_OBJECTS:
            if a.position != b.position:
                assert parse_caption(caption([a, b])) == [a, b]
                n += 1
    assert n == 120 * 96


def test_parse_caption_is_lenient_about_case_and_spaces():
    assert parse_caption("  A Red  circle on the LEFT ") == [ShapeObject("red", "circle", "left")]


@pytest.mark.parametrize("bad", [
    "a purple circle on the left", "a red hexagon on the left", "a red circle in the corner", "red circle on the left",
    "a red circle on the left and", "a red circle on the left, a blue square on the right", "", "a cat",
])
def test_parse_caption_errors(bad):
    with pytest.raises(ValueError, match="cannot parse caption") as e:
        parse_caption(bad)
    msg = str(e.value)
    assert repr(bad) in msg
    assert "a <color> <shape> <position phrase>" in msg
    for word in COLORS + SHAPES + tuple(POSITION_PHRASES.values()):
        assert word in msg


def test_parse_caption_same_position_and_non_str():
    with pytest.raises(ValueError, match="same position"):
        parse_caption("a red circle on the left and a blue square on the left")
    with pytest.raises(ValueError, match="must be a str"):
        parse_caption(None)


# -----------------------------------------------------------------------------
# rendering


@pytest.mark.parametrize("size", [8, 15, 16.0, "32", True, None])
def test_render_bad_size(size):
    with pytest.raises(ValueError, match=r"size must be an int >= 16, got"):
        render([ShapeObject("red", "circle", "left")], size)


@pytest.mark.parametrize("size", [16, 32, 64])
def test_render_colours_and_background(size):
    objects = [ShapeObject("red", "square", "left"), ShapeObject("cyan", "circle", "top")]
    img = render(objects, size)
    assert img.shape == (3, size, size) and img.dtype == torch.float32
    assert img.min() >= -1 and img.max() <= 1
    assert torch.equal(img[:, 0, 0], torch.tensor([-1.0, -1.0, -1.0]))  # black corner
    for o in objects:
        x, y = POSITION_XY[o.position]
        centre = img[:, int(y * size), int(x * size)]
        assert torch.allclose(centre, torch.tensor(COLOR_RGB[o.color]) * 2 - 1)
    values = set(img.flatten().tolist())
    assert len(values) > 2  # anti-aliased edges have intermediate values


def test_render_shapes_geometry():
    """Coverage of each shape relative to its bounding box, at 64 px with no jitter (side 0.28)."""
    fill = {}
    for shape in SHAPES:
        img = render([ShapeObject("green", shape, "center")], 64)
        area = ((img[1] + 1) / 2).sum().item() / (0.28 * 64) ** 2
        fill[shape] = area
        top, bottom = ((img[1] + 1) / 2)[:32].sum(), ((img[1] + 1) / 2)[32:].sum()
        if shape == "triangle":
            assert bottom > 2 * top  # points up: most of the area below the centre
    assert fill["square"] == pytest.approx(1.0, abs=0.03)
    assert fill["circle"] == pytest.approx(np.pi / 4, abs=0.03)
    assert fill["triangle"] == pytest.approx(0.5, abs=0.03)
    assert fill["cross"] == pytest.approx(5 / 9, abs=0.03)  # arms 1/3 of the side wide


@pytest.mark.parametrize("size", [16, 32, 64])
def test_layout_never_overlaps(size):
    objects = list(itertools.combinations([ShapeObject("red", "square", p) for p in POSITIONS], 2))
    for seed in range(40):
        rng = np.random.default_rng(seed)
        for pair in objects:
            a, b = layout(pair, rng, margin=1 / size)
            gap = max(abs(a.cx - b.cx), abs(a.cy - b.cy)) - (a.s + b.s) / 2
            assert gap >= 1 / size - 1e-9
            for p in (a, b):
                ax, ay = POSITION_XY[p.obj.position]
                assert abs(p.cx - ax) <= 0.02 and abs(p.cy - ay) <= 0.02
                assert p.s <= 0.30 and (p.s >= 0.26 or size < 32)
                assert p.s >= 0.2


def test_free_layouts_place_objects_anywhere_and_keep_the_caption_exact():
    """Notebook 09's scenes: any centre and size, inside the frame, apart, and each object's centroid nearest the
    anchor its caption names (by a margin), so that the judge reads the same caption back from the render."""
    from sdlearn.metrics import prompt_adherence

    rng, size = np.random.default_rng(0), 64
    scenes, centres = [], []
    for _ in range(150):
        k = int(rng.integers(1, 3))
        objects = [ShapeObject(str(rng.choice(COLORS)), str(rng.choice(SHAPES)), p)
                   for p in rng.choice(POSITIONS, k, replace=False)]
        placed = free_layout(objects, rng, margin=1 / size)
        for p in placed:
            assert p.s / 2 + 1 / size - 1e-9 <= min(p.cx, p.cy, 1 - p.cx, 1 - p.cy), p  # inside the frame
            assert position_at(*centroid(p)) == p.obj.position, p
            centres.append((p.cx, p.cy))
        if k == 2:
            a, b = placed
            assert max(abs(a.cx - b.cx), abs(a.cy - b.cy)) - (a.s + b.s) / 2 >= 1 / size - 1e-9
        scenes.append(placed)
    spread = np.array(centres)
    assert spread.std(0).min() > 0.15 and len({(round(x, 2), round(y, 2)) for x, y in centres}) > 100  # not anchors
    images = torch.stack([render(placed, size) for placed in scenes])
    result = prompt_adherence(images, [caption([p.obj for p in placed]) for placed in scenes])
    assert result["exact"] >= 0.97, result
    with pytest.raises(ValueError, match="size_range"):
        free_layout(objects, rng, size_range=(0.5, 0.2))


def test_place_names_the_nearest_anchor_and_masks_cover_the_shape():
    p = place("red", "circle", 0.2, 0.8, 0.3)
    assert p.obj == ShapeObject("red", "circle", position_at(0.2, 0.8)) and p.obj.position in POSITIONS
    assert position_at(*POSITION_XY["center"]) == "center"
    ax, ay = POSITION_XY["center"]
    bx, by = POSITION_XY[next(q for q in POSITIONS if q != "center")]
    assert position_at((ax + bx) / 2, (ay + by) / 2, margin=0.01) is None  # halfway: ambiguous
    with pytest.raises(ValueError, match="colour"):
        place("mauve", "circle", 0.5, 0.5, 0.3)
    square = place("blue", "square", 0.5, 0.5, 0.5)
    mask = object_masks([square], 16)[0]
    assert mask.dtype == torch.bool and mask[4:12, 4:12].all() and mask.sum() == 64
    assert torch.equal(mask, (render([square], 16)[2] > 0))


def test_render_placements():
    p = Placement(ShapeObject("blue", "square", "center"), 0.5, 0.5, 0.5)
    img = render([p], 16)
    assert torch.equal(img[:, 4:12, 4:12], torch.tensor([-1.0, -1.0, 1.0]).view(3, 1, 1).expand(3, 8, 8))
    assert (img[:, :4] == -1).all()


# -----------------------------------------------------------------------------
# the shapes dataset


def test_dataset_item_shapes_and_ranges():
    for size in (16, 32, 64):
        ds = ShapesDataset(size=size)
        for i in range(20):
            img, cap = ds[i]
            assert img.shape == (3, size, size) and img.dtype == torch.float32
            assert img.min() >= -1 and img.max() <= 1
            assert isinstance(cap, str)
            s = ds.item(i)
            assert parse_caption(cap) == list(s.objects)


def test_dataset_lengths_and_index_errors():
    assert len(ShapesDataset()) == 50_000
    assert len(ShapesDataset(split="heldout")) == 1_000
    ds = ShapesDataset(length=7)
    assert len(ds) == 7
    assert torch.equal(ds[-1][0], ds[6][0])
    with pytest.raises(IndexError):
        ds[7]
    assert len(list(ds)) == 7


def test_dataset_determinism():
    a, b = ShapesDataset(seed=3), ShapesDataset(seed=3)
    for i in (0, 1, 17, 49_999):
        x1, c1 = a[i]
        x2, c2 = a[i]
        x3, c3 = b[i]
        assert torch.equal(x1, x2) and torch.equal(x1, x3) and c1 == c2 == c3
    other_seed = ShapesDataset(seed=4)
    heldout = ShapesDataset(seed=3, split="heldout")
    assert [a[i][1] for i in range(20)] != [other_seed[i][1] for i in range(20)]
    assert [a[i][1] for i in range(20)] != [heldout[i][1] for i in range(20)]


def test_dataset_object_counts_and_positions():
    ds = ShapesDataset(length=600)
    counts = [len(ds.item(i).objects) for i in range(600)]
    assert set(counts) == {1, 2}
    assert 0.4 < counts.count(1) / 600 < 0.6
    for i in range(600):
        positions = [o.position for o in ds.item(i).objects]
        assert len(set(positions)) == len(positions)
    assert all(len(ShapesDataset(max_objects=1).item(i).objects) == 1 for i in range(100))


def test_train_heldout_split():
    train, heldout = ShapesDataset(split="train"), ShapesDataset(split="heldout")
    train_pairs = {(o.color, o.shape) for i in range(3000) for o in train.item(i).objects}
    assert train_pairs.isdisjoint(HELDOUT_PAIRS)
    assert len(train_pairs) == 24 - 4  # every other pair is seen
    seen = set()
    for i in range(len(heldout)):
        pairs = {(o.color, o.shape) for o in heldout.item(i).objects}
        assert pairs & set(HELDOUT_PAIRS), heldout.item(i).caption
        seen |= pairs
    assert set(HELDOUT_PAIRS) <= seen


@pytest.mark.parametrize("kwargs, match", [
    (dict(split="test"), r"unknown split 'test', expected one of \('train', 'heldout'\)"),
    (dict(split="val"), "train.*heldout"),
    (dict(max_objects=3), "max_objects must be 1 or 2, got 3"),
    (dict(max_objects=0), "max_objects must be 1 or 2"),
    (dict(size=8), "size must be an int >= 16, got 8"),
    (dict(size=32.0), "size must be an int >= 16, got 32.0"),
    (dict(length=0), "length must be a positive int or None, got 0"),
])
def test_dataset_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ShapesDataset(**kwargs)


def test_default_collate():
    x, captions = next(iter(DataLoader(ShapesDataset(length=8), batch_size=4)))
    assert x.shape == (4, 3, 32, 32) and len(captions) == 4 and isinstance(captions[0], str)


# -----------------------------------------------------------------------------
# real-data loaders, on fixtures


def _write_idx(path, array: np.ndarray):
    """MNIST's idx-ubyte format: magic (0, 0, 0x08 = ubyte, ndim), big-endian dims, raw bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def _write_mnist(root, folder: str, n: int = 12):
    rng = np.random.default_rng(0)
    for prefix in ("train", "t10k"):
        _write_idx(root / folder / "raw" / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)))
        _write_idx(root / folder / "raw" / f"{prefix}-labels-idx1-ubyte", np.arange(n) % 10)


def test_mnist_loader(tmp_path):
    _write_mnist(tmp_path, "MNIST")
    ds = TorchvisionCaptions("mnist", tmp_path, size=32)
    assert len(ds) == 12
    img, cap = ds[7]
    assert cap == "a handwritten digit 7"
    assert img.shape == (3, 32, 32) and img.dtype == torch.float32
    assert img.min() >= -1 and img.max() <= 1 and img.min() < 0 < img.max()
    assert torch.equal(img[0], img[1]) and torch.equal(img[1], img[2])  # grey repeated to 3 channels
    assert TorchvisionCaptions("mnist", tmp_path, size=16, train=False)[3][0].shape == (3, 16, 16)


def test_fashion_mnist_loader(tmp_path):
    _write_mnist(tmp_path, "FashionMNIST")
    ds = TorchvisionCaptions("fashion-mnist", tmp_path, size=32)
    caps = [ds[i][1] for i in range(10)]
    assert caps[0] == "a photo of a t-shirt"
    assert caps[7] == "a photo of a sneaker"
    assert caps[9] == "a photo of an ankle boot"
    assert ds[0][0].shape == (3, 32, 32)


def test_cifar10_loader(tmp_path, monkeypatch):
    import torchvision.datasets.cifar
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *args, **kwargs: True)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]:
        entry = {"data": rng.integers(0, 256, (4, 3 * 32 * 32)).astype(np.uint8), "labels": [3, 0, 1, 9]}
        (folder / name).write_bytes(pickle.dumps(entry))
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": names}))
    ds = TorchvisionCaptions("cifar10", tmp_path, size=16)
    assert len(ds) == 20
    img, cap = ds[0]
    assert cap == "a photo of a cat" and img.shape == (3, 16, 16)
    assert img.min() >= -1 and img.max() <= 1
    assert ds[1][1] == "a photo of an airplane"
    assert len(TorchvisionCaptions("cifar10", tmp_path, train=False)) == 4


def test_torchvision_loader_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown dataset 'imagenet', supported: mnist, fashion-mnist, cifar10"):
        TorchvisionCaptions("imagenet", tmp_path)
    for name in ("mnist", "fashion-mnist", "cifar10"):
        with pytest.raises(RuntimeError, match="pass download=True"):
            TorchvisionCaptions(name, tmp_path / "nothing-here")


def _save_pairs(folder, pairs):
    folder.mkdir(parents=True, exist_ok=True)
    for name, img, text in pairs:
        img.save(folder / name)
        (folder / name).with_suffix(".txt").write_text(text)


def test_image_caption_folder(tmp_path):
    wide = np.zeros((30, 90, 3), np.uint8)  # blue | green | red thirds: the centre crop keeps green
    wide[:, :30, 2], wide[:, 30:60, 1], wide[:, 60:, 0] = 255, 255, 255
    _save_pairs(tmp_path, [
        ("a.png", Image.fromarray(wide), "a green stripe\n"),
        ("b.jpg", Image.new("L", (20, 40), 128), "grey"),
        ("c.png", Image.new("RGBA", (64, 64), (255, 0, 0, 255)), "  red  "),
    ])
    ds = ImageCaptionFolder(tmp_path, size=32)
    assert len(ds) == 3
    assert [ds[i][1] for i in range(3)] == ["a green stripe", "grey", "red"]
    for i in range(3):
        img = ds[i][0]
        assert img.shape == (3, 32, 32) and img.dtype == torch.float32
        assert img.min() >= -1 and img.max() <= 1
    green = ds[0][0]
    assert green[1].mean() > 0.8 and green[0].mean() < -0.8 and green[2].mean() < -0.8
    assert torch.allclose(ds[2][0][:, 16, 16], torch.tensor([1.0, -1.0, -1.0]))


def test_image_caption_folder_errors(tmp_path):
    good = Image.new("RGB", (8, 8))
    _save_pairs(tmp_path / "orphan_image", [("a.png", good, "x")])
    good.save(tmp_path / "orphan_image" / "lonely.webp")
    with pytest.raises(ValueError, match=r"without a partner.*lonely\.webp.*expected layout: root/name\.png"):
        ImageCaptionFolder(tmp_path / "orphan_image")

    _save_pairs(tmp_path / "orphan_text", [("a.png", good, "x")])
    (tmp_path / "orphan_text" / "notes.txt").write_text("no image")
    with pytest.raises(ValueError, match=r"notes\.txt"):
        ImageCaptionFolder(tmp_path / "orphan_text")

    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no image/caption pairs"):
        ImageCaptionFolder(tmp_path / "empty")
    with pytest.raises(ValueError, match="not a folder"):
        ImageCaptionFolder(tmp_path / "missing")
