"""Where the words land: sdlearn.unet.cross_attention_maps / attention_share and sdlearn.data.object_masks."""
import pytest
import torch

from sdlearn.data import COLOR_RGB, ShapesDataset, draw, object_masks
from sdlearn.unet import UNet, UNetConfig, attention_share, cross_attention_maps


def test_object_masks_cover_the_pixels_drawn_in_each_objects_colour():
    ds = ShapesDataset(size=32, seed=4)
    for i in range(6):
        _, placements, _ = ds.scene(i)
        masks = object_masks(placements, 32)  # [n, 32, 32]
        image = (draw(placements, 32) + 1) / 2  # [3, 32, 32] in [0, 1]
        assert masks.shape == (len(placements), 32, 32) and masks.dtype == torch.bool
        drawn = image.amax(0) > 0.5  # [32, 32]: not background
        assert (drawn == masks.any(0)).float().mean() > 0.97  # the masks are where something is drawn (edges aside)
        for p, m in zip(placements, masks):
            colour = ((image - torch.tensor(COLOR_RGB[p.obj.color])[:, None, None]).abs().amax(0) < 0.5)
            assert colour[m].float().mean() > 0.7  # each mask is mostly its own object's colour


def test_attention_share_is_one_on_the_object_and_the_area_by_chance():
    mask = torch.zeros(8, 8, dtype=torch.bool)
    mask[:4, :2] = True  # an eighth of the image, exactly two cells of a 4x4 map
    maps = torch.full((4, 4, 3), 1 / 3)
    maps[:2, 0] = torch.tensor([1.0, 0.0, 0.0])  # token 0 only where the object is
    maps[:2, 0, 0] = 1.0
    share, area = attention_share(maps, mask)
    assert area.item() == pytest.approx(1 / 8)
    assert share[0].item() == pytest.approx(2 / (2 + 14 / 3))  # its mass on the object / its total mass
    uniform, _ = attention_share(torch.full((4, 4, 3), 1 / 3), mask)
    torch.testing.assert_close(uniform, torch.full((3,), 1 / 8))  # a word that ignores the image: the area
    with pytest.raises(ValueError, match=r"maps \[h, w, L\] and a mask \[H, W\]"):
        attention_share(maps[None], mask)


def test_cross_attention_maps_are_the_blocks_weights_per_pixel():
    torch.manual_seed(0)
    unet = UNet(UNetConfig(in_channels=4, out_channels=4, channels=(8, 16), layers_per_block=1,
                           attention=(True, True), heads=2, context_dim=8, norm_groups=4)).eval()
    x, t, context = torch.randn(2, 4, 8, 8), torch.tensor([10, 500]), torch.randn(2, 5, 8)
    maps = cross_attention_maps(unet, x, t, context)  # the mid block: 4x4
    assert maps.shape == (2, 4, 4, 5)
    torch.testing.assert_close(maps.sum(-1), torch.ones(2, 4, 4))
    fine = unet.up[-1].attentions[-1].blocks[0]
    seen = {}
    hook = fine.attn2.register_forward_hook(lambda m, a, out: seen.update(w=m.weights(a[0], a[1])))
    with torch.no_grad():
        unet(x, t, context)
    hook.remove()
    got = cross_attention_maps(unet, x, t, context, fine)
    torch.testing.assert_close(got, seen["w"].mean(1).view(2, 8, 8, 5))
    assert not torch.allclose(got[0], got[1])  # each sample its own map
