"""sdlearn.sdxl's data: the shapes scenes rendered as SDXL's (random original sizes and crops, recorded), and degraded
images with a quality label; every scene the same as the plain dataset's."""
import numpy as np
import pytest
import torch

from sdlearn.data import ShapesDataset
from sdlearn.sdxl import QUALITY_CLEAN, QUALITY_WORST, SDXLShapes, degrade_image


def test_sdxl_data_is_deterministic():
    aug1, aug2 = (SDXLShapes(ShapesDataset(seed=3), augment=True) for _ in range(2))
    for i in range(5):
        s1, s2 = aug1.item(i), aug2.item(i)
        assert torch.equal(s1.image, s2.image) and s1.original_size == s2.original_size
        assert s1.crop_top_left == s2.crop_top_left


@pytest.mark.parametrize("size", [16, 32])
def test_augment_metadata(size):
    plain = ShapesDataset(size=size, seed=1)
    aug = SDXLShapes(plain, augment=True)
    originals, crops = [], []
    for i in range(150):
        s = aug.item(i)
        assert s.image.shape == (3, size, size) and s.image.dtype == torch.float32
        assert s.image.min() >= -1 and s.image.max() <= 1
        assert s.caption == plain[i][1] and s.objects == plain.item(i).objects  # caption unchanged
        assert s.target_size == (size, size)
        o, o2 = s.original_size
        assert o == o2 and size // 2 <= o <= 2 * size
        top, left = s.crop_top_left
        assert 0 <= top <= round(1.25 * size) - size and 0 <= left <= round(1.25 * size) - size
        originals.append(o)
        crops.append((top, left))
    assert min(originals) < size < max(originals)  # both smaller (blurry) and larger originals
    assert any(c != (0, 0) for c in crops)


def test_augment_small_originals_are_blurrier():
    """A scene rendered at ~size/2 and upscaled has softer edges than one rendered at ~2*size."""
    aug = SDXLShapes(ShapesDataset(size=32, seed=1), augment=True)
    samples = [aug.item(i) for i in range(300)]

    def soft(img):  # fraction of the foreground that is neither fully on nor off
        v = ((img + 1) / 2).amax(0)
        return (((v > 0.05) & (v < 0.95)).sum() / (v > 0.05).sum()).item()

    small = [soft(s.image) for s in samples if s.original_size[0] <= 20]
    large = [soft(s.image) for s in samples if s.original_size[0] >= 56]
    assert len(small) > 10 and len(large) > 10
    assert np.mean(small) > np.mean(large) + 0.1


def test_degraded_images_carry_a_quality_label_and_the_same_scene():
    plain, bad = (SDXLShapes(ShapesDataset(seed=5), augment=True, degrade=d) for d in (0.0, 0.5))
    qualities = []
    for i in range(60):
        a, b = plain.item(i), bad.item(i)
        assert a.caption == b.caption and a.original_size == b.original_size and a.crop_top_left == b.crop_top_left
        assert b.image.shape == a.image.shape and b.image.min() >= -1 and b.image.max() <= 1
        assert (b.quality == QUALITY_CLEAN) == torch.equal(a.image, b.image)
        qualities.append(b.quality)
    degraded = [q for q in qualities if q < QUALITY_CLEAN]
    assert 15 < len(degraded) < 45 and min(degraded) >= QUALITY_WORST
    assert all(SDXLShapes(ShapesDataset(seed=5), degrade=1.0).item(i).quality < QUALITY_CLEAN for i in range(10))
    with pytest.raises(ValueError, match=r"degrade is the fraction of degraded images, in \[0, 1\], got 1.5"):
        SDXLShapes(ShapesDataset(), degrade=1.5)
    with pytest.raises(ValueError, match="unknown degradation 'smear'"):
        degrade_image(plain[0][0], "smear", 0.5)
